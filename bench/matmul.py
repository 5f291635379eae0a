"""The skinny matmul candidates (kairos.kernels.linear) against torch's matmul, cuBLAS, which the
engine's projections run on, at a decode step's shapes and batches: each against one read of
its weight, input and output at the copy bandwidth measured in the same run.

  python -P -m kairos.bench.matmul   # needs a CUDA GPU; writes bench/results/matmul_<gpu>.json

Where a tile beats cuBLAS at the decode batches on every projection, the decode step can take
it (and the fused activation and norms save three launches a layer, and round trips of the
activations); the decode bench's --breakdown says how far the step's matmuls are from their
floor today.
"""

from __future__ import annotations

import sys

import torch
import triton

from kairos.bench.common import write_result
from kairos.bench.kernels import DEV, DTYPE, ceilings, ms, ms_quick
from kairos.kernels import linear, reference, small_ops

# A Llama-3.1-8B decode step's projections, [out_features, in_features] as nn.Linear holds them.
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
BATCHES = (1, 8, 32, 128)
# (block_n, block_k, num_warps, num_stages) tried beside linear.DEFAULT_TILE: shorter k tiles
# pipelined deeper, and wider row tiles over two warpgroups.
TILES = [(16, 128, 4, 6), (32, 128, 4, 4), (64, 128, 8, 3), (32, 64, 4, 8)]
# The projections a decoder block's norm (with its residual add) comes before.
NORMED = ("qkv", "gate_up")
EPS = 1e-5


def bench_matmuls(ceil: dict) -> list[dict]:
    """The skinny matmul candidates at a decode step's shapes and batches against torch's matmul
    (cuBLAS, which the engine's projections run on), each against one read of the weight, input
    and output at copy bandwidth. The down projection is also timed with its activation
    (silu_and_mul then cuBLAS, as the engine runs it, against the fused kernel), and the q/k/v
    and gate/up projections with the norm before them (add_rms_norm then cuBLAS against the
    fused kernel). Every tile's output is checked against the reference's before its time counts."""
    rows = []
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, dtype=DTYPE, device=DEV) / k**0.5
        for batch in BATCHES:
            x = torch.randn(batch, k, dtype=DTYPE, device=DEV)
            nbytes = (weight.numel() + x.numel() + batch * n) * weight.element_size()
            floor_ms = nbytes / (ceil["copy_GBps"] * 1e9) * 1e3
            expected = torch.nn.functional.linear(x, weight)
            row = {"proj": name, "out_features": n, "in_features": k, "batch": batch, "floor_ms": floor_ms,
                   "cublas_ms": ms(lambda: torch.nn.functional.linear(x, weight))}
            row["sweep"] = _sweep(lambda tile: linear.linear(x, weight, tile=tile), expected, floor_ms)
            activation_ms = batch * k * weight.element_size() / (ceil["copy_GBps"] * 1e6)  # one read or write
            if name == "down":
                gated = torch.randn(batch, 2 * k, dtype=DTYPE, device=DEV)
                row["gated_floor_ms"] = floor_ms + activation_ms
                row["gated_unfused_ms"] = ms(lambda: torch.nn.functional.linear(small_ops.silu_and_mul(gated), weight))
                row["gated_sweep"] = _sweep(lambda tile: linear.silu_and_mul_linear(gated, weight, tile=tile),
                                            reference.silu_and_mul_linear(gated, weight), row["gated_floor_ms"])
            if name in NORMED:
                residual, gamma = torch.randn_like(x), torch.rand(k, dtype=DTYPE, device=DEV) + 0.5
                row["normed_floor_ms"] = floor_ms + 2 * activation_ms  # the residual read, the sum written
                row["normed_unfused_ms"] = ms(lambda: torch.nn.functional.linear(
                    small_ops.add_rms_norm(x, residual, gamma, EPS)[0], weight))
                row["normed_sweep"] = _sweep(
                    lambda tile: linear.rms_norm_linear(x, residual, gamma, EPS, weight, tile=tile)[0],
                    reference.rms_norm_linear(x, residual, gamma, EPS, weight)[0], row["normed_floor_ms"])
            rows.append(row)
            print(_line(row, "", row["floor_ms"], row["cublas_ms"], row["sweep"]))
            if name == "down":
                print(_line(row, "silu+", row["gated_floor_ms"], row["gated_unfused_ms"], row["gated_sweep"]))
            if name in NORMED:
                print(_line(row, "norm+", row["normed_floor_ms"], row["normed_unfused_ms"], row["normed_sweep"]))
    return rows


def _sweep(call, expected: torch.Tensor, floor_ms: float) -> list[dict]:
    """Each tile's time, or why it has none: a launch that fails to compile (too much shared
    memory, say) or whose output is wrong."""
    sweep = []
    for tile in [linear.DEFAULT_TILE, *TILES]:
        entry = {"tile": list(tile)}
        try:
            out = call(tile)
            if not torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2):
                entry["error"] = f"differs from cuBLAS by up to {(out.float() - expected.float()).abs().max():.3g}"
            else:
                entry["ms"] = (ms if tile == linear.DEFAULT_TILE else ms_quick)(lambda: call(tile))
                entry["fraction_of_floor"] = floor_ms / entry["ms"]
        except Exception as e:  # one tile's failure leaves the others to time
            entry["error"] = repr(e)[:300]
        sweep.append(entry)
    return sweep


def _line(row: dict, prefix: str, floor: float, cublas_ms: float, sweep: list[dict]) -> str:
    timed = [e for e in sweep if "ms" in e]
    line = (f"{prefix + row['proj']:13s} B={row['batch']:3d}: cuBLAS {cublas_ms:7.3f} ms "
            f"({floor / cublas_ms:.0%} of floor)")
    if timed:
        best = min(timed, key=lambda e: e["ms"])
        line += (f", Triton default {sweep[0].get('ms', float('nan')):7.3f} ms, best {best['ms']:7.3f} ms "
                 f"({best['fraction_of_floor']:.0%}, {'/'.join(map(str, best['tile']))}): "
                 f"{cublas_ms / best['ms']:.2f}x cuBLAS")
    failed = len(sweep) - len(timed)
    return line + (f"; {failed} tiles failed" if failed else "")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("kairos.bench.matmul times kernels on a CUDA GPU; none is visible here")
    ceil = ceilings()
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    result = {"device": name, "triton": triton.__version__, "ceilings": ceil, "matmuls": bench_matmuls(ceil)}
    print(f"wrote {write_result('matmul_' + name.replace(' ', '_'), result)}")


if __name__ == "__main__":
    main()
