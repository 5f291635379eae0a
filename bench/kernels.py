"""Kernel benchmark on the GPU: each Triton kernel against the device's own ceilings, measured
in the same run, and against peers (torch SDPA flash for prefill, the sort for the sampler's
top-k/top-p filter, FlashInfer where installed).

  python -m kairos.bench.kernels            # needs a CUDA GPU; writes bench/results/kernels_<gpu>.json

Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head dim 128, bf16). Times are medians
from triton.testing.do_bench, which flushes L2 between runs; KV pools are far larger than L2.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.testing import do_bench

from kairos.bench.common import pyplot, save_figure, write_result
from kairos.engine.sampler import Sampler
from kairos.kernels import attention, reference, sampling, small_ops
from kairos.kernels.flashinfer_attention import FlashInferAttention
from kairos.scheduler.request import SamplingParams

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DEV = "cuda"


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ceilings() -> dict:
    n = 1 << 30
    src = torch.empty(n // 2, dtype=DTYPE, device=DEV).uniform_()
    dst = torch.empty_like(src)
    copy_gbps = 2 * n / (ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    a = torch.randn(8192, 8192, dtype=DTYPE, device=DEV)
    b = torch.randn_like(a)
    tflops = 2 * 8192**3 / (ms(lambda: a @ b) * 1e-3) / 1e12
    return {"copy_GBps": copy_gbps, "matmul_bf16_TFLOPs": tflops}


def paged_kv(batch: int, length: int):
    pages_per_seq = triton.cdiv(length, PAGE)
    num_pages = batch * pages_per_seq
    k_cache = torch.randn(num_pages, PAGE, HKV, D, dtype=DTYPE, device=DEV)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_pages, device=DEV).view(batch, pages_per_seq).to(torch.int32)
    return k_cache, v_cache, tables


def flashinfer_peer():
    """The FlashInfer backend's attention (kairos.kernels.flashinfer_attention), or None where
    FlashInfer is not installed. Timed calls reuse their plan, as a forward pass's layers do."""
    try:
        return FlashInferAttention()
    except ValueError:
        return None


def time_peer(row: dict, ours_ms: float, call) -> str:
    """Times FlashInfer's call into row beside ours; the part of the printed line it adds."""
    try:
        row["flashinfer_ms"] = ms(call)
    except Exception as e:  # a FlashInfer whose API differs or fails to build: record why, keep going
        row["flashinfer_error"] = repr(e)
        return ", FlashInfer failed"
    row["speedup_vs_flashinfer"] = row["flashinfer_ms"] / ours_ms
    return f", {row['speedup_vs_flashinfer']:.2f}x FlashInfer"


# (block_n, num_warps, num_stages): the engine's decode launch at pages of 16 tokens, and the
# tiles tried beside it: 32 to 128 keys, one or two warpgroups, and pipelines that keep one or
# two K/V tiles loading while a program computes another (stages 3 and 4; the default keeps
# none). bench/kernel_resources.py gives each one's registers, copies in flight and programs per SM.
DECODE_DEFAULT = (64, 4, 2)
DECODE_TILES = [(32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 3), (64, 8, 2), (128, 4, 2)]
# Programs per SM the split count aims at in the sweep (the engine's default aims at 4).
SPLIT_TARGETS = (2, 3, 4, 5, 6)
# (block_m, block_n, num_warps, num_stages): the engine's prefill launch, and beside it the same
# tile with one K/V tile loading while another is computed, and 128-query tiles over two warpgroups.
PREFILL_DEFAULT = (64, 64, 4, 2)
PREFILL_TILES = [(64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]


def ms_quick(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def bench_decode(ceil: dict, flashinfer: FlashInferAttention | None) -> list[dict]:
    """Decode attention at the decode benchmark's batches (1k context) and at long contexts, and
    a sweep of every tile against the split counts that aim at 2 to 6 programs per SM."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, length in [(32, 1024), (128, 1024), (64, 4096), (1, 32768), (2, 32768), (4, 32768), (8, 32768)]:
        k_cache, v_cache, tables = paged_kv(batch, length)
        q = torch.randn(batch, HQ, D, dtype=DTYPE, device=DEV)
        lens = torch.full((batch,), length, dtype=torch.int32, device=DEV)

        def call(**launch):
            return lambda: attention.decode_attention(q, k_cache, v_cache, tables, lens, D**-0.5, **launch)

        kv_bytes = 2 * batch * length * HKV * D * 2
        t = ms(call())
        gbps = kv_bytes / (t * 1e-3) / 1e9
        chosen = attention.decode_num_splits(batch, HKV, length, sms)
        splits = {attention.decode_num_splits(batch, HKV, length, sms, per_sm): per_sm for per_sm in SPLIT_TARGETS}
        sweep = []
        for block_n, num_warps, num_stages in [DECODE_DEFAULT, *DECODE_TILES]:
            for num_splits, per_sm in splits.items():
                sweep_ms = ms_quick(call(num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                                         num_stages=num_stages))
                sweep.append({"block_n": block_n, "num_warps": num_warps, "num_stages": num_stages,
                              "programs_per_sm_aimed": per_sm, "splits": num_splits, "ms": sweep_ms,
                              "fraction_of_copy_bw": kv_bytes / (sweep_ms * 1e-3) / 1e9 / ceil["copy_GBps"]})
        best = min(sweep, key=lambda r: r["ms"])
        # In the H200 run B=2 over 32k read 2.3 TB/s where B=1 and B=4 read 2.7 and 3.8: the same
        # launch on a second pool, allocated beside the first, tells whether where a pool lies counts.
        other_k, other_v, other_tables = paged_kv(batch, length)
        t_other = ms(lambda: attention.decode_attention(q, other_k, other_v, other_tables, lens, D**-0.5))
        row = {"batch": batch, "context": length, "ms": t, "GBps": gbps,
               "fraction_of_copy_bw": gbps / ceil["copy_GBps"], "ms_other_pool": t_other, "splits": chosen,
               "sweep": sweep, "best": best}
        peer = "" if flashinfer is None else time_peer(row, t, lambda: flashinfer.decode_attention(
            q, k_cache, v_cache, tables, lens, D**-0.5))
        rows.append(row)
        print(f"decode B={batch:3d} L={length:6d}: {t:8.3f} ms {gbps:7.0f} GB/s ({row['fraction_of_copy_bw']:.0%} "
              f"of copy; {t_other:.3f} ms on another pool), {chosen} splits; best {best['block_n']}/"
              f"{best['num_warps']}/{best['num_stages']} with {best['splits']} splits: "
              f"{best['fraction_of_copy_bw']:.0%} of copy{peer}")
    return rows


def plot_decode_sweep(rows: list[dict], path) -> None:
    """Fraction of copy bandwidth against split count, a line per tile, a panel per long-context
    batch: where the engine's launch sits among the others."""
    plt = pyplot()
    if plt is None:
        return
    long_rows = [r for r in rows if r["context"] >= 32768]
    fig, axes = plt.subplots(1, len(long_rows), figsize=(4 * len(long_rows), 3.6), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], long_rows):
        for tile in [DECODE_DEFAULT, *DECODE_TILES]:
            points = sorted((r["splits"], r["fraction_of_copy_bw"]) for r in row["sweep"]
                            if (r["block_n"], r["num_warps"], r["num_stages"]) == tile)
            engine = " (engine)" if tile == DECODE_DEFAULT else ""
            ax.plot(*zip(*points), marker="o", label="{}/{}/{}".format(*tile) + engine)
        ax.axvline(row["splits"], color="grey", linestyle=":")
        ax.set_title(f"B={row['batch']}, {row['context'] // 1024}k tokens")
        ax.set_xlabel("splits")
    axes[0][0].set_ylabel("fraction of copy bandwidth")
    axes[0][-1].legend(title="keys/warps/stages", fontsize=7)
    save_figure(fig, path)


def bench_prefill(ceil: dict, flashinfer: FlashInferAttention | None) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for seq in (4096, 8192):
        q = torch.randn(seq, HQ, D, dtype=DTYPE, device=DEV)
        k = torch.randn(seq, HKV, D, dtype=DTYPE, device=DEV)
        v = torch.randn_like(k)
        cu = torch.tensor([0, seq], dtype=torch.int32, device=DEV)
        empty = torch.empty(1, PAGE, HKV, D, dtype=DTYPE, device=DEV)

        def call(**launch):
            return lambda: attention.prefill_attention(q, k, v, empty, empty, cu, cu, None, D**-0.5, seq, **launch)

        t = ms(call())
        sweep = [{"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st,
                  "ms": ms_quick(call(block_m=bm, block_n=bn, num_warps=w, num_stages=st))}
                 for bm, bn, w, st in [PREFILL_DEFAULT, *PREFILL_TILES]]
        best = min(sweep, key=lambda r: r["ms"])
        # The peer gets its K/V already expanded to every query head, outside the timing.
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k.repeat_interleave(HQ // HKV, 1),
                                                             v.repeat_interleave(HQ // HKV, 1)))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        tflops = 2 * seq * seq * HQ * D / (t * 1e-3) / 1e12  # causal: half of 4*S^2*H*D
        row = {"seq": seq, "ms": t, "TFLOPs": tflops, "fraction_of_matmul": tflops / ceil["matmul_bf16_TFLOPs"],
               "sdpa_flash_ms": t_sdpa, "speedup_vs_sdpa_flash": t_sdpa / t, "sweep": sweep, "best": best,
               "best_fraction_of_matmul": tflops * t / best["ms"] / ceil["matmul_bf16_TFLOPs"]}
        peer = "" if flashinfer is None else time_peer(row, t, lambda: flashinfer.prefill_attention(
            q, k, v, empty, empty, cu, cu, None, D**-0.5, seq))
        rows.append(row)
        print(f"prefill S={seq}: {t:8.3f} ms {tflops:6.0f} TFLOP/s ({tflops / ceil['matmul_bf16_TFLOPs']:.0%} of "
              f"matmul), {t_sdpa / t:.2f}x SDPA flash{peer}; best {best['block_m']}/{best['block_n']}/"
              f"{best['num_warps']}/{best['num_stages']}: {row['best_fraction_of_matmul']:.0%} of matmul")
    return rows


def bench_small_ops(ceil: dict) -> list[dict]:
    tokens, hidden, inter = 8192, 4096, 14336
    x = torch.randn(tokens, hidden, dtype=DTYPE, device=DEV)
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=DTYPE, device=DEV)
    gate_up = torch.randn(tokens, 2 * inter, dtype=DTYPE, device=DEV)
    qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, dtype=DTYPE, device=DEV)
    q = qkv[:, : HQ * D].view(tokens, HQ, D)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D)
    v = qkv[:, (HQ + HKV) * D :].view(tokens, HKV, D)
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    cos_sin = torch.randn(8192, D, device=DEV)
    k_cache, v_cache, _ = paged_kv(1, 4 * tokens)
    slots = torch.randperm(4 * tokens, device=DEV)[:tokens]
    e = x.element_size()
    cases = {
        "rms_norm": (lambda: small_ops.rms_norm(x, w, 1e-5), 2 * x.numel() * e),
        "add_rms_norm": (lambda: small_ops.add_rms_norm(x, res, w, 1e-5), 4 * x.numel() * e),
        "silu_and_mul": (lambda: small_ops.silu_and_mul(gate_up), 1.5 * gate_up.numel() * e),
        # q and k read and written back rotated, k and v read (k once) and written to the cache
        "rope_and_store_kv": (lambda: small_ops.rope_and_store_kv(positions, q, k, v, cos_sin, k_cache, v_cache,
                                                                  slots), (2 * q.numel() + 3 * k.numel()
                                                                           + 2 * v.numel()) * e),
    }
    rows = []
    for name, (fn, nbytes) in cases.items():
        t = ms(fn)
        gbps = nbytes / (t * 1e-3) / 1e9
        rows.append({"op": name, "tokens": tokens, "ms": t, "GBps": gbps,
                     "fraction_of_copy_bw": gbps / ceil["copy_GBps"]})
        print(f"{name:17s}: {t:7.3f} ms {gbps:7.0f} GB/s ({gbps / ceil['copy_GBps']:.0%} of copy)")
    return rows


SAMPLING_BATCHES = (1, 32, 128)
SAMPLING_SETTINGS = [(0, 0.95), (50, 0.95)]  # (top_k, top_p): 0 turns top-k off
SAMPLING_DIGIT_BITS = (2,)  # bits per selection pass timed beside the default (4): 16 passes of 4 bins
VOCAB = 128256  # Llama 3's


def bench_sampling(ceil: dict, flashinfer: FlashInferAttention | None) -> list[dict]:
    """The sampler's top-k/top-p cutoff against the sort it replaces (the reference), both as the
    filter alone and as the sampler's whole draw (temperature, filter, softmax, noise, argmax);
    FlashInfer's fused top-k/top-p draw beside them where installed. The floor is one read of the
    logits at copy bandwidth; a selection pass reads them once per digit. The cutoff is also
    timed at the other digit widths of SAMPLING_DIGIT_BITS."""
    rows = []
    for batch in SAMPLING_BATCHES:
        logits = torch.randn(batch, VOCAB, device=DEV) * 3
        for top_k, top_p in SAMPLING_SETTINGS:
            # As the sampler calls it: no top-k tensor where no row asks for top-k.
            k = torch.full((batch,), top_k, dtype=torch.int64, device=DEV) if top_k else None
            p = torch.full((batch,), top_p, device=DEV)
            params = [SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)] * batch
            steps = [0] * batch
            ours_sampler, sort_sampler = (Sampler(torch.device(DEV), 0, f) for f in
                                          (sampling.top_k_top_p_cutoff, reference.top_k_top_p_cutoff))
            row = {"batch": batch, "vocab": VOCAB, "top_k": top_k, "top_p": top_p,
                   "ms": ms(lambda: sampling.top_k_top_p_cutoff(logits, k, p)),
                   "ms_by_digit_bits": {bits: ms(lambda: sampling.top_k_top_p_cutoff(logits, k, p, digit_bits=bits))
                                        for bits in SAMPLING_DIGIT_BITS},
                   "sort_ms": ms(lambda: reference.top_k_top_p_cutoff(logits, k, p)),
                   "sampler_ms": ms(lambda: ours_sampler(logits, params, steps)),
                   "sort_sampler_ms": ms(lambda: sort_sampler(logits, params, steps)),
                   "floor_ms": logits.numel() * logits.element_size() / (ceil["copy_GBps"] * 1e9) * 1e3}
            row["speedup_vs_sort"] = row["sort_ms"] / row["ms"]
            row["sampler_speedup_vs_sort"] = row["sort_sampler_ms"] / row["sampler_ms"]
            line = (f"cutoff B={batch:4d} top-k {top_k or '-':>3} top-p {top_p}: {row['ms']:.3f} ms "
                    f"({row['floor_ms'] / row['ms']:.0%} of one read), {row['speedup_vs_sort']:.2f}x the sort "
                    f"(digits of {', '.join(f'{b} bits {t:.3f}' for b, t in row['ms_by_digit_bits'].items())} ms); "
                    f"whole draw {row['sampler_ms']:.3f} ms, {row['sampler_speedup_vs_sort']:.2f}x")
            if flashinfer is not None:
                line += time_peer(row, row["sampler_ms"], lambda: flashinfer.flashinfer.sampling.
                                  top_k_top_p_sampling_from_logits(logits / 0.8, top_k or VOCAB, p))
            print(line)
            rows.append(row)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("kairos.bench.kernels times kernels on a CUDA GPU; none is visible here")
    ceil = ceilings()
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    flashinfer = flashinfer_peer()
    print("FlashInfer: " + (flashinfer.flashinfer.__version__ if flashinfer else "not installed"))
    result = {"device": name, "triton": triton.__version__,
              "flashinfer": flashinfer.flashinfer.__version__ if flashinfer else None, "ceilings": ceil,
              "decode": bench_decode(ceil, flashinfer), "prefill": bench_prefill(ceil, flashinfer),
              "small_ops": bench_small_ops(ceil), "sampling": bench_sampling(ceil, flashinfer)}
    path = write_result("kernels_" + name.replace(" ", "_"), result)
    print(f"wrote {path}")
    plot_decode_sweep(result["decode"], path.with_name(path.stem + "_decode_sweep.png"))


if __name__ == "__main__":
    main()
