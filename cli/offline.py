"""`kairos generate` and `kairos profile`: an engine in this process."""

from __future__ import annotations

import argparse
import json
import sys

from kairos.cli.checks import writable_file
from kairos.cli.engine_flags import add_engine_args, engine_kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    from kairos.engine import LLM, SamplingParams

    # With --seed S, prompt i gets seed S + i (wrapping around the 64-bit range, where S itself
    # must lie): the run is reproducible and the prompts do not all share one random stream.
    def seed(i: int) -> int | None:
        if args.seed is None or i == 0:
            return args.seed  # checked as given
        return (args.seed + i + 2**63) % 2**64 - 2**63

    params = [SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=seed(i), stop=args.stop or [], ignore_eos=args.ignore_eos,
    ) for i in range(len(args.prompt))]
    llm = LLM(**engine_kwargs(args))
    outputs = llm.generate(args.prompt, params, use_tqdm=not args.json and sys.stderr.isatty())
    for out in outputs:
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                              "prompt_token_ids": out.prompt_token_ids,
                              "finish_reason": out.finish_reason,
                              "num_cached_tokens": out.num_cached_tokens}, ensure_ascii=False))
        else:
            print(f"--- prompt: {out.prompt!r}\n{out.prompt}{out.text}\n[{len(out.token_ids)} tokens, "
                  f"finish: {out.finish_reason}]")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from kairos.engine import LLM
    from kairos.engine.profiler import measure_profile

    if args.out:
        writable_file(args.out, "--out")  # now, not after the measurement
    llm = LLM(**engine_kwargs(args))
    profile = measure_profile(llm, quick=args.quick, progress=sys.stderr.isatty())
    out = args.out or f"profile_{profile['model']}_{llm.runner.device.type}.json"
    with open(out, "w") as f:
        json.dump(profile, f, indent=1)
    a, b, c = profile["fit"]["prefill"]
    alpha, beta, gamma = profile["fit"]["decode"]
    print(f"{len(profile['prefill'])} prefill and {len(profile['decode'])} decode steps timed in "
          f"{profile['seconds_to_measure']:.0f} s on {profile['device']} ({profile['dtype']})")
    print(f"prefill = {a * 1e3:.3f} ms + {b * 1e6:.3f} us/token + {c * 1e9:.4f} ns/(token x context)   "
          f"held-out MAPE {100 * profile['prefill_mape']:.1f}%")
    print(f"decode  = {alpha * 1e3:.3f} ms + {beta * 1e6:.3f} us/seq + {gamma * 1e9:.4f} ns/context token   "
          f"held-out MAPE {100 * profile['decode_mape']:.1f}%")
    print(f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="offline generation for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, help="sampling seed: prompt i uses S + i (reproducible output)")
    gen.add_argument("--stop", action="append", help="stop string; repeatable")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, per line")
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser("profile", help="time real prefill and decode steps; fit the cost model")
    add_engine_args(prof)
    prof.add_argument("--out", help="JSON file (default: profile_<model>_<device>.json)")
    prof.add_argument("--quick", action="store_true", help="a coarse grid (what workers do at start-up)")
    prof.set_defaults(func=cmd_profile)
