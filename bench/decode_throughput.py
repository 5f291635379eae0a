"""Decode throughput of the engine against the memory floor of the same step.

A decode step must read every weight once (all but an untied embedding table, of which it
gathers the batch's rows) and each sequence's whole KV context, so it cannot beat (those
weight bytes + KV bytes) / copy bandwidth. This times whole engine steps (scheduling,
input building, forward, sampling) at several batch sizes and prints the ratio to that floor.

  python -m kairos.bench.decode_throughput --model bench/models/Llama-3.1-8B --load-format dummy
  python -m kairos.bench.decode_throughput --model tiny --batch-sizes 1,8,32     # CPU smoke run
  python -m kairos.bench.decode_throughput --model tiny --batch-sizes 8,32,64 --context 300 --mixed
  python -m kairos.bench.decode_throughput --hf-peers static,eager --hf-batch-sizes 1   # with peers

--hf-peers times transformers generate() on the same shape in the same run (after Kairos has
freed the GPU): `static` is its static cache, which it compiles on first use (about a minute
for an 8B model), `eager` its default dynamic cache. Their step time is the time between the
first and the last generated token over the tokens between.

--breakdown (CUDA) also profiles a few steps of each batch size and says where the GPU's time
went: matmuls against the floor of the weights they read, attention against that of the KV,
the small ops, sampling, and the GPU's idle time between kernels (bench/step_breakdown.py).

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

from kairos.bench.common import (
    add_model_args,
    backend_suffix,
    copy_bandwidth,
    device_name,
    device_tag,
    matmul_flops,
    synchronize,
    write_result,
)
from kairos.bench.step_breakdown import describe, profile_steps
from kairos.engine import LLM, SamplingParams
from kairos.scheduler.defaults import TOKEN_BUDGET


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--mixed", action="store_true", help="also time mixed prompt lengths of the same mean")
    ap.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--overlap", default="auto", choices=("auto", "on", "off"),
                    help="overlapped decode steps (the engine's --overlap)")
    ap.add_argument("--serial-too", action="store_true",
                    help="also time each batch size with steps one at a time (overlap off), in the same engine")
    ap.add_argument("--sampled-too", action="store_true",
                    help="also time each batch size sampling (temperature 0.8, top-p 0.95) rather than greedy")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile each batch size's steps: GPU time by kind of kernel, and idle (CUDA)")
    ap.add_argument("--breakdown-steps", type=int, default=4, help="steps profiled per breakdown")
    ap.add_argument("--skinny-matmul-tokens", type=int, default=0,
                    help="steps of at most this many tokens take the Triton skinny matmul (as kairos serve)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--prefill-tokens", type=int, default=0,
                    help="also time one prefill step of a prompt this long against the bf16 matmul ceiling")
    ap.add_argument("--hf-peers", default="", help="comma-separated: static, eager (transformers generate)")
    ap.add_argument("--hf-batch-sizes", default="1", help="batch sizes at which the peers are timed")
    args = ap.parse_args()
    if args.breakdown and not torch.cuda.is_available():
        ap.error("--breakdown profiles GPU kernels: it needs CUDA")

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    max_len = (2 * args.context if args.mixed else args.context) + args.warmup + args.steps + 8
    max_len = max(max_len, args.prefill_tokens + 1)
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=max_len, max_num_seqs=max(batch_sizes), enable_prefix_caching=False,
              max_num_batched_tokens=max(TOKEN_BUDGET, args.prefill_tokens),
              enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization,
              overlap=args.overlap, backend=args.backend, skinny_matmul_tokens=args.skinny_matmul_tokens)
    runner = llm.runner
    device = runner.device
    weight_bytes, weight_bytes_read, matmul_bytes = weight_bytes_per_step(runner.model)
    kv_bytes_per_token = runner.kv_bytes_per_block() // llm.config.block_size
    bandwidth = copy_bandwidth(device)
    print(f"{device_name(device)}: copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 1e9:.2f} GB, "
          f"{weight_bytes_read / 1e9:.2f} GB read per step; KV {kv_bytes_per_token} B/token")

    rows = []
    gen = torch.Generator().manual_seed(0)
    vocab = llm.model_config.vocab_size

    def time_steps(prompt_lens: list[int], temperature: float = 0, top_p: float = 1,
                   profiled: bool = False) -> tuple[float, float, dict | None]:
        """Seconds per decode step over these prompts, their mean context while timed, and
        where the GPU time of the steps after went (when profiled)."""
        profiled_steps = args.breakdown_steps if profiled else 0
        params = SamplingParams(max_tokens=args.warmup + args.steps + profiled_steps + 1, temperature=temperature,
                                top_p=top_p, ignore_eos=True)
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
        breakdown = None
        if profiled:
            try:
                breakdown = profile_steps(llm.step, profiled_steps, device)
            except Exception as exc:  # the timing above stands without it
                breakdown = {"error": repr(exc)}
        while llm.has_unfinished():
            llm.step()
        return step_s, contexts / len(prompt_lens) + args.steps / 2, breakdown

    def add_breakdown(row: dict, key: str, result: dict | None, kv_bytes: float) -> None:
        if result is None or "error" in result:
            print(f"  {key}: " + (f"the profiler failed: {result['error']}" if result else "no GPU kernels recorded"))
            row[key] = result
            return
        floors_ms = {"matmul": matmul_bytes / bandwidth * 1e3, "attention": kv_bytes / bandwidth * 1e3}
        row[key] = result | {"floor_ms_by_kind": floors_ms}
        print(f"  {key}: {describe(result, floors_ms)}")

    for batch in tqdm(batch_sizes, desc="batch sizes"):
        step_s, mean_context, breakdown = time_steps([args.context] * batch, profiled=args.breakdown)
        kv_bytes = batch * mean_context * kv_bytes_per_token
        floor_s = (weight_bytes_read + kv_bytes) / bandwidth
        row = {"batch": batch, "context": args.context, "step_ms": step_s * 1e3,
               "tokens_per_s": batch / step_s, "memory_floor_ms": floor_s * 1e3,
               "fraction_of_floor": floor_s / step_s}
        if args.serial_too:
            overlap, llm.overlap = llm.overlap, False
            serial_s, _, _ = time_steps([args.context] * batch)
            llm.overlap = overlap
            row.update(serial_step_ms=serial_s * 1e3, serial_over_step=serial_s / step_s)
        if args.sampled_too:
            sampled_s, _, sampled_breakdown = time_steps([args.context] * batch, temperature=0.8, top_p=0.95,
                                                         profiled=args.breakdown)
            row.update(sampled_step_ms=sampled_s * 1e3, sampled_over_step=sampled_s / step_s)
        mixed = ""
        if args.mixed:
            # In pairs (n, 2 x mean - n), so that the total context is the uniform batch's.
            half = torch.randint(16, 2 * args.context - 15, (batch // 2,), generator=gen).tolist()
            lens = [n for h in half for n in (h, 2 * args.context - h)] + [args.context] * (batch % 2)
            mixed_s, _, _ = time_steps(lens)
            row.update(mixed_step_ms=mixed_s * 1e3, mixed_longest=max(lens), mixed_over_uniform=mixed_s / step_s)
            mixed = f"  mixed lengths (longest {max(lens)}): {row['mixed_over_uniform']:.2f}x the uniform step"
        rows.append(row)
        serial = f"  steps one at a time: {row['serial_step_ms']:.2f} ms" if args.serial_too else ""
        serial += f"  sampling: {row['sampled_step_ms']:.2f} ms" if args.sampled_too else ""
        print(f"B={batch:4d}  step {row['step_ms']:8.2f} ms  {row['tokens_per_s']:9.1f} tok/s  "
              f"floor {row['memory_floor_ms']:7.2f} ms  ({row['fraction_of_floor']:.0%} of the memory floor)"
              f"{serial}{mixed}")
        if args.breakdown:
            add_breakdown(row, "breakdown", breakdown, kv_bytes)
            if args.sampled_too:
                add_breakdown(row, "sampled_breakdown", sampled_breakdown, kv_bytes)

    prefill = time_prefill(llm, args.prefill_tokens, gen) if args.prefill_tokens else None
    name = Path(args.model).name if args.model != "tiny" else "tiny"
    result = {"prefill": prefill,"device": device_name(device), "model": name, "load_format": args.load_format,
              "dtype": str(runner.dtype), "backend": runner.backend.name, "cuda_graphs": runner.graphs is not None,
              "overlap": llm.overlap, "skinny_matmul_tokens": args.skinny_matmul_tokens,
              "copy_bandwidth_GBps": bandwidth / 1e9, "weight_bytes": weight_bytes,
              "weight_bytes_read_per_step": weight_bytes_read,
              "kv_bytes_per_token": kv_bytes_per_token, "results": rows}
    peers = [p for p in args.hf_peers.split(",") if p]
    if peers:
        dtype, model = runner.dtype, args.model
        del llm, runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["transformers"] = time_peers(model, dtype, device, peers, args, rows)
    skinny = f"_skinny{args.skinny_matmul_tokens}" if args.skinny_matmul_tokens else ""
    path = write_result(f"decode_throughput_{name}_{device_tag(device)}{backend_suffix(args)}{skinny}", result)
    print(f"wrote {path}")


def weight_bytes_per_step(model: torch.nn.Module) -> tuple[int, int, int]:
    """Bytes of all weights; of those a decode step reads, every one but an untied embedding
    table (the step gathers its batch's rows, under a megabyte); and of those, the matmuls'."""
    embedding = model.model.embed_tokens.weight
    gathered = None if embedding is model.lm_head.weight else embedding
    params = list(model.parameters())  # each tied tensor once
    nbytes = [p.numel() * p.element_size() for p in params]
    read = [(p, n) for p, n in zip(params, nbytes) if p is not gathered]
    return sum(nbytes), sum(n for _, n in read), sum(n for p, n in read if p.dim() == 2)


def time_prefill(llm, tokens: int, gen: torch.Generator) -> dict:
    """One prefill step of a `tokens`-long prompt (the best of three), as a share of the device's
    bf16 matmul rate: the step's FLOPs are its layers' matmuls over every token, causal
    attention, and the LM head for the one sampled row."""
    cfg, device = llm.model_config, llm.runner.device
    layer_params = sum(p.numel() for n, p in llm.runner.model.named_parameters()
                       if ".layers." in n and p.dim() == 2)
    flops = 2 * layer_params * tokens + 2 * tokens**2 * cfg.num_heads * cfg.head_dim * cfg.num_layers \
        + 2 * cfg.hidden_size * cfg.vocab_size
    best = float("inf")
    for _ in range(4):  # the first warms up
        llm.add_request(torch.randint(0, cfg.vocab_size, (tokens,), generator=gen).tolist(),
                        SamplingParams(max_tokens=1))
        synchronize(device)
        start = time.perf_counter()
        llm.step()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    ceiling = matmul_flops(device, llm.runner.dtype)
    row = {"tokens": tokens, "step_ms": best * 1e3, "TFLOPs": flops / best / 1e12,
           "matmul_ceiling_TFLOPs": ceiling / 1e12, "fraction_of_matmul": flops / best / ceiling}
    print(f"prefill of {tokens} tokens: {row['step_ms']:.1f} ms, {row['TFLOPs']:.0f} TFLOP/s "
          f"({row['fraction_of_matmul']:.0%} of the {row['matmul_ceiling_TFLOPs']:.0f} TFLOP/s matmul ceiling)")
    return row


def time_peers(model: str, dtype: torch.dtype, device: torch.device, peers: list[str], args, rows) -> list[dict]:
    import transformers

    from kairos.bench.hf_peer import decode_step_seconds, load_hf_model

    hf = load_hf_model(model, dtype, device)
    ours = {row["batch"]: row["step_ms"] for row in rows}
    out = []
    for peer in peers:
        cache = {"static": "static", "eager": None}[peer]
        for batch in (int(b) for b in args.hf_batch_sizes.split(",")):
            step_s = decode_step_seconds(hf, batch, args.context, new_tokens=min(args.steps, 32),
                                         cache_implementation=cache)
            row = {"transformers": transformers.__version__, "mode": peer, "batch": batch,
                   "context": args.context, "step_ms": step_s * 1e3}
            if batch in ours:
                row["kairos_speedup"] = row["step_ms"] / ours[batch]
            out.append(row)
            print(f"transformers generate ({peer}) B={batch:4d}  step {row['step_ms']:8.2f} ms"
                  + (f"  {compared(row['kairos_speedup'])}" if batch in ours else ""))
    return out


def compared(speedup: float) -> str:
    """Kairos's speedup over a peer, said the way round that reads as more than 1x."""
    return f"Kairos is {speedup:.2f}x faster" if speedup >= 1 else f"Kairos is {1 / speedup:.2f}x slower"


if __name__ == "__main__":
    main()
