"""The `kairos` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.config import DTYPES


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="Hugging Face model folder, or 'tiny' (built in)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json, if not the model's own")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone, for benchmarking shapes")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: auto is triton on CUDA, torch (the PyTorch reference) elsewhere")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache size in blocks (default: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")


def engine_kwargs(args: argparse.Namespace) -> dict:
    names = ("tokenizer", "dtype", "device", "load_format", "backend", "block_size", "num_kv_blocks",
             "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
             "enable_prefix_caching")
    return {n: getattr(args, n) for n in names}


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    # With --seed S, prompt i gets seed S + i: the run is reproducible and the prompts do not
    # all share one random stream.
    params = [SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=None if args.seed is None else args.seed + i, stop=args.stop or [], ignore_eos=args.ignore_eos,
    ) for i in range(len(args.prompt))]
    llm = LLM(args.model, **engine_kwargs(args))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kairos", description="Kairos LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine set-up details")
    sub = parser.add_subparsers(dest="command", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"kairos: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
