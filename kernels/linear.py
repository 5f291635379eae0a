"""Triton matmuls for a decode step's few tokens: `linear`, and `silu_and_mul_linear`, which
computes its input's SiLU-and-mul as it reads it (the MLP's down projection without the launch
before it). Signatures match `kernels.reference`.

With a handful of tokens a matmul is a stream of its weight: each weight element is used once
per token. The kernel reads the weight once, as the dot's wide operand, and takes the tokens,
transposed, as its narrow one (16 columns, the least a dot takes); `tl.range` keeps weight
tiles loading while one is multiplied. cuBLAS (torch's matmul) stays the engine's matmul
unless `--skinny-matmul-tokens` hands it the steps this small (`skinny_or_torch`):
`bench/matmul.py` times both at a decode step's shapes.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kairos.kernels import small_ops
from kairos.kernels.attention import _dot_precision, alloc

# (block_n, block_k, num_warps, num_stages): weight rows and columns per tile, and the pipeline
# depth: a program keeps num_stages - 2 tiles loading while it multiplies one
# (bench/kernel_resources.py counts them in the compiled kernel).
DEFAULT_TILE = (16, 256, 4, 4)
# Tokens a program takes: the narrowest dot. More tokens take more programs over the same weight
# rows, launched one after another, so the rows they share come from L2 the second time; and
# one compiled variant serves every batch.
BLOCK_M = 16


@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                          GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                          PRECISION: tl.constexpr):
    """out[m, n] = sum over k of x[m, k] * w[n, k] (+ bias[n]) for BLOCK_N weight rows and BLOCK_M
    tokens. GATED: x[m] holds gate then up, K columns each, and the product takes
    silu(gate) * up, rounded as the unfused ops round it."""
    # The token blocks of one weight tile are consecutive programs, which run together.
    m_blocks = tl.cdiv(M, BLOCK_M)
    m = tl.program_id(0) % m_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) // m_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m_mask = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + m.to(tl.int64)[None, :] * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # no mask along k: the loads stay vectorized
            w_mask = n_mask[:, None]
            x_mask = m_mask[None, :]
        else:
            w_mask = n_mask[:, None] & (k < K)[None, :]
            x_mask = m_mask[None, :] & (k < K)[:, None]
        w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)
        x = tl.load(x_cols + k[:, None], mask=x_mask, other=0.0)
        if GATED:
            up = tl.load(x_cols + K + k[:, None], mask=x_mask, other=0.0)
            gate = x.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(x.dtype)
            x = (silu.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + m.to(tl.int64)[None, :] * stride_om + n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, block_n: int,
            block_k: int, num_warps: int, num_stages: int) -> torch.Tensor:
    n_out, k_in = weight.shape
    width = 2 * k_in if gated else k_in
    if x.shape[-1] != width:
        raise ValueError(f"input of {x.shape[-1]} features for a weight of {k_in} inputs"
                         + (" (gated: gate and up, twice that)" if gated else ""))
    if weight.stride(-1) != 1:
        raise ValueError("the weight's rows must be contiguous (as nn.Linear holds them)")
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    out = alloc((tokens, n_out), x.dtype, x.device)
    grid = (triton.cdiv(tokens, BLOCK_M) * triton.cdiv(n_out, block_n),)
    _skinny_linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, out, tokens, n_out, k_in, x2.stride(0), weight.stride(0),
        out.stride(0), GATED=gated, HAS_BIAS=bias is not None, EVEN_K=k_in % block_k == 0, BLOCK_M=BLOCK_M,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=num_stages, PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps)
    return out.view(*x.shape[:-1], n_out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tile: tuple[int, int, int, int] = DEFAULT_TILE) -> torch.Tensor:
    """The reference's signature; `tile` (block_n, block_k, num_warps, num_stages) fixes the
    launch (bench/matmul.py sweeps it)."""
    return _launch(x, weight, bias, False, *tile)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        tile: tuple[int, int, int, int] = DEFAULT_TILE) -> torch.Tensor:
    return _launch(x, weight, bias, True, *tile)


def skinny_or_torch(max_tokens: int) -> SimpleNamespace:
    """A backend's `linear` and `silu_and_mul_linear`: these kernels for inputs of at most
    max_tokens rows (a decode step's; 0: none), torch's matmul above them, after the Triton
    silu_and_mul. The choice is made on the host from the input's shape, so a captured step
    replays the one it made."""

    def rows(x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if rows(x) <= max_tokens:
            return linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def silu_and_mul_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if rows(x) <= max_tokens:
            return silu_and_mul_linear(x, weight, bias)
        return F.linear(small_ops.silu_and_mul(x), weight, bias)

    return SimpleNamespace(linear=linear_op, silu_and_mul_linear=silu_and_mul_linear_op)
