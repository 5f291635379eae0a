"""Decode throughput of the engine against the memory floor of the same step.

A decode step must read every weight once and each sequence's whole KV context, so it cannot
beat (weight bytes + KV bytes) / copy bandwidth. This times whole engine steps (scheduling,
input building, forward, sampling) at several batch sizes and prints the ratio to that floor.

  python -m kairos.bench.decode_throughput --model bench/models/Llama-3.1-8B --load-format dummy
  python -m kairos.bench.decode_throughput --model tiny --batch-sizes 1,8,32     # CPU smoke run
  python -m kairos.bench.decode_throughput --model tiny --batch-sizes 8,32,64 --context 300 --mixed

--mixed also times, at each batch size, prompts of mixed lengths (between 16 and twice the
mean less 16) with the same total: a step should cost what its total context costs, so the
ratio of the two step times should stay near 1 (padding to the longest context would make it
approach twice that).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kairos.bench.common import copy_bandwidth, device_name, synchronize, write_result
from kairos.engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/models/Llama-3.1-8B")
    ap.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--mixed", action="store_true", help="also time mixed prompt lengths of the same mean")
    args = ap.parse_args()

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    max_len = (2 * args.context if args.mixed else args.context) + args.warmup + args.steps + 8
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=max_len, max_num_seqs=max(batch_sizes), enable_prefix_caching=False)
    runner = llm.runner
    device = runner.device
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_bytes_per_token = runner.kv_bytes_per_block() // llm.config.block_size
    bandwidth = copy_bandwidth(device)
    print(f"{device_name(device)}: copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"weights {weight_bytes / 1e9:.2f} GB; KV {kv_bytes_per_token} B/token")

    rows = []
    gen = torch.Generator().manual_seed(0)
    vocab = llm.model_config.vocab_size

    def time_steps(prompt_lens: list[int]) -> tuple[float, float]:
        """Seconds per decode step over these prompts, and their mean context while timed."""
        params = SamplingParams(max_tokens=args.warmup + args.steps + 1, temperature=0, ignore_eos=True)
        for n in prompt_lens:
            llm.add_request(torch.randint(0, vocab, (n,), generator=gen).tolist(), params)
        while any(s.is_prefilling for s in llm.scheduler.running) or llm.scheduler.waiting:
            llm.step()
        for _ in range(args.warmup):
            llm.step()
        contexts = sum(len(s) for s in llm.scheduler.running)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            llm.step()
        synchronize(device)
        step_s = (time.perf_counter() - start) / args.steps
        while llm.has_unfinished():
            llm.step()
        return step_s, contexts / len(prompt_lens) + args.steps / 2

    for batch in tqdm(batch_sizes, desc="batch sizes"):
        step_s, mean_context = time_steps([args.context] * batch)
        floor_s = (weight_bytes + batch * mean_context * kv_bytes_per_token) / bandwidth
        row = {"batch": batch, "context": args.context, "step_ms": step_s * 1e3,
               "tokens_per_s": batch / step_s, "memory_floor_ms": floor_s * 1e3,
               "fraction_of_floor": floor_s / step_s}
        mixed = ""
        if args.mixed:
            # In pairs (n, 2 x mean - n), so that the total context is the uniform batch's.
            half = torch.randint(16, 2 * args.context - 15, (batch // 2,), generator=gen).tolist()
            lens = [n for h in half for n in (h, 2 * args.context - h)] + [args.context] * (batch % 2)
            mixed_s, _ = time_steps(lens)
            row.update(mixed_step_ms=mixed_s * 1e3, mixed_longest=max(lens), mixed_over_uniform=mixed_s / step_s)
            mixed = f"  mixed lengths (longest {max(lens)}): {row['mixed_over_uniform']:.2f}x the uniform step"
        rows.append(row)
        print(f"B={batch:4d}  step {row['step_ms']:8.2f} ms  {row['tokens_per_s']:9.1f} tok/s  "
              f"floor {row['memory_floor_ms']:7.2f} ms  ({row['fraction_of_floor']:.0%} of the memory floor){mixed}")

    name = Path(args.model).name if args.model != "tiny" else "tiny"
    path = write_result(f"decode_throughput_{name}_{device.type}", {
        "device": device_name(device), "model": name, "load_format": args.load_format,
        "dtype": str(runner.dtype), "backend": runner.backend.name,
        "copy_bandwidth_GBps": bandwidth / 1e9, "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token, "results": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
