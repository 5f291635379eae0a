"""The serving loop's share of a decode step under `kairos serve`: a router, a prefill and a
decode worker, the first requests of the Azure conversation trace sent at once, and the decode
worker's step log read back.

A decode step's period is the loop's whole turn: receiving messages (KV offers, new requests,
heartbeats), the engine step, then sending its tokens. The loop's share is the time outside
the engine step over the period, summed over the decode steps that ran.

  python -m kairos.bench.serve_loop                                     # tiny model, this CPU
  python -m kairos.bench.serve_loop --model bench/models/Llama-3.1-8B --load-format dummy \\
      --gpu-memory-utilization 0.42 --requests 200                      # one GPU, two workers
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from kairos.bench import DEFAULT_TRACE
from kairos.bench.common import write_result
from kairos.cli.engine_flags import engine_argv
from kairos.scheduler.traces import load_azure
from kairos.transport.replay import replay, warm_up
from kairos.transport.serve import local_cluster


def loop_share(step_log: Path) -> dict:
    steps = [json.loads(line) for line in step_log.read_text().splitlines()]
    decode = [s for s in steps if s["stepped"] and not s["blocked"]]
    if not decode:
        raise SystemExit(f"{step_log} holds no decode step")
    loop = [s["messages_s"] + s["after_s"] for s in decode]
    step = [s["step_s"] for s in decode]
    return {"decode_steps": len(decode), "loop_share": sum(loop) / (sum(loop) + sum(step)),
            "loop_ms_p50": statistics.median(loop) * 1e3, "step_ms_p50": statistics.median(step) * 1e3,
            # Before the step (receiving), and after it (sending the step's tokens out).
            "messages_ms_p50": statistics.median(s["messages_s"] for s in decode) * 1e3,
            "after_ms_p50": statistics.median(s["after_s"] for s in decode) * 1e3,
            "batch_p50": statistics.median(s["stepped"] for s in decode)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.42)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-prompt-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=64)
    args = ap.parse_args()

    trace = [replace(r, arrival=0.0, prompt_len=min(r.prompt_len, args.max_prompt_len),
                     output_len=min(r.output_len, args.max_output_len))
             for r in load_azure(DEFAULT_TRACE)[: args.requests + 4]]
    settings = engine_argv(model=args.model, load_format=args.load_format,
                           gpu_memory_utilization=args.gpu_memory_utilization,
                           max_model_len=args.max_prompt_len + args.max_output_len + 1)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "decode.jsonl"
        with local_cluster(settings, [*settings, "--step-log", str(log)]) as addr:
            warm_up(addr, trace[:4], requests=4)
            log.write_text("")  # the measured requests only
            report = replay(addr, trace[4:])
        share = loop_share(log)
    print(f"{share['decode_steps']} decode steps (median batch {share['batch_p50']:.0f}): the loop takes "
          f"{share['loop_share']:.1%} of each step's period; median {share['loop_ms_p50']:.2f} ms outside the "
          f"engine step ({share['messages_ms_p50']:.2f} receiving, {share['after_ms_p50']:.2f} sending) against "
          f"{share['step_ms_p50']:.2f} ms in it")
    name = Path(args.model).name if args.model != "tiny" else "tiny"
    path = write_result(f"serve_loop_{name}", {"model": name, "requests": args.requests, **share,
                                                "replayed": report["requests"], "failed": report["failed"]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
