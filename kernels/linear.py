"""Triton matmuls for a decode step's few tokens: `linear`; `silu_and_mul_linear`, which
computes its input's SiLU-and-mul as it reads it (the MLP's down projection without the launch
before it); and `rms_norm_linear`, which adds the residual and RMS-normalizes its input as it
reads it (a decoder block's norm and input projection in one launch). Signatures match
`kernels.reference`.

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
def _skinny_linear_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, res_out_ptr, gamma_ptr, M, N, K, stride_xm,
                          stride_wn, stride_om, stride_rm, stride_rom, eps,
                          GATED: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                          EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          STAGES: tl.constexpr, PRECISION: tl.constexpr):
    """out[m, n] = sum over k of x[m, k] * w[n, k] (+ bias[n]) for BLOCK_N weight rows and BLOCK_M
    tokens. GATED: x[m] holds gate then up, K columns each, and the product takes
    silu(gate) * up, rounded as the unfused ops round it. NORM: the product takes
    rms_norm(x (+ res with RESIDUAL)) * gamma, and x + res is stored to res_out."""
    # The token blocks of one weight tile are consecutive programs, which run together.
    m_blocks = tl.cdiv(M, BLOCK_M)
    m = tl.program_id(0) % m_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    n_tile = tl.program_id(0) // m_blocks
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m_mask = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + m.to(tl.int64)[None, :] * stride_xm
    res_cols = res_ptr + m.to(tl.int64)[None, :] * stride_rm
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    sum_squares = tl.zeros([BLOCK_M], tl.float32)
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
        if NORM:
            if RESIDUAL:
                # The sum is rounded to the activation dtype, as the unfused add rounds it.
                x += tl.load(res_cols + k[:, None], mask=x_mask, other=0.0)
            xf = x.to(tl.float32)
            sum_squares += tl.sum(xf * xf, axis=0)
            # The norm's scale is one number a token, known once every k is read: the product
            # takes x * gamma, and the sum is scaled after.
            gamma = tl.load(gamma_ptr + k, mask=k < K, other=0.0)
            x = x * gamma[:, None]
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
    if NORM:
        acc *= tl.rsqrt(sum_squares / K + eps)[None, :]
    if RESIDUAL:
        # The programs of weight tile j hand on slices j, j + tiles, ... (BLOCK_K columns each)
        # of x + res: after the loop above, where a store took registers enough to spill, and
        # spread over the tiles, so that no program runs long.
        n_tiles = tl.cdiv(N, BLOCK_N)
        for k0 in range(n_tile * BLOCK_K, K, n_tiles * BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = m_mask[None, :] & (k < K)[:, None]
            x = tl.load(x_cols + k[:, None], mask=mask, other=0.0)
            x += tl.load(res_cols + k[:, None], mask=mask, other=0.0)
            tl.store(res_out_ptr + m.to(tl.int64)[None, :] * stride_rom + k[:, None], x, mask=mask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + m.to(tl.int64)[None, :] * stride_om + n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, block_n: int,
            block_k: int, num_warps: int, num_stages: int, norm: tuple | None = None):
    """norm: (residual or None, gamma, eps) normalizes the input as it is read; the result is then
    (out, the input plus the residual) as one tensor each."""
    n_out, k_in = weight.shape
    width = 2 * k_in if gated else k_in
    if x.shape[-1] != width:
        raise ValueError(f"input of {x.shape[-1]} features for a weight of {k_in} inputs"
                         + (" (gated: gate and up, twice that)" if gated else ""))
    if weight.stride(-1) != 1:
        raise ValueError("the weight's rows must be contiguous (as nn.Linear holds them)")
    x2 = small_ops.as_rows(x)
    tokens = x2.shape[0]
    out = alloc((tokens, n_out), x.dtype, x.device)
    residual, gamma, eps = norm if norm is not None else (None, None, 0.0)
    res2 = small_ops.as_rows(residual) if residual is not None else x2
    res_out = alloc(res2.shape, x.dtype, x.device) if residual is not None else x2
    grid = (triton.cdiv(tokens, BLOCK_M) * triton.cdiv(n_out, block_n),)
    _skinny_linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, out, res2, res_out, gamma if gamma is not None else weight,
        tokens, n_out, k_in, x2.stride(0), weight.stride(0), out.stride(0), res2.stride(0), res_out.stride(0), eps,
        GATED=gated, NORM=norm is not None, RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        EVEN_K=k_in % block_k == 0, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=num_stages,
        PRECISION=_dot_precision(x.dtype), num_warps=num_warps)
    out = out.view(*x.shape[:-1], n_out)
    if norm is None:
        return out
    return out, (res_out.view(residual.shape) if residual is not None else x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tile: tuple[int, int, int, int] = DEFAULT_TILE) -> torch.Tensor:
    """The reference's signature; `tile` (block_n, block_k, num_warps, num_stages) fixes the
    launch (bench/matmul.py sweeps it)."""
    return _launch(x, weight, bias, False, *tile)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        tile: tuple[int, int, int, int] = DEFAULT_TILE) -> torch.Tensor:
    return _launch(x, weight, bias, True, *tile)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None,
                    tile: tuple[int, int, int, int] = DEFAULT_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch, except in float16: the product takes x * gamma before the norm's scale, which
    in float16's range can overflow where the normalized x would not; there the norm runs first."""
    if norm_weight.shape != (x.shape[-1],) or (residual is not None and residual.shape != x.shape):
        residual_shape = None if residual is None else tuple(residual.shape)
        raise ValueError(f"a norm weight of shape {tuple(norm_weight.shape)} and a residual of shape "
                         f"{residual_shape} for an input of shape {tuple(x.shape)}")
    if x.dtype == torch.float16:
        normed, residual = _normed(x, residual, norm_weight, eps)
        return linear(normed, weight, bias, tile), residual
    return _launch(x, weight, bias, False, *tile, norm=(residual, norm_weight.contiguous(), eps))


def _normed(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float):
    """The Triton norm kernel's rms_norm(x (+ residual)), and the residual it hands on."""
    if residual is None:
        return small_ops.rms_norm(x, norm_weight, eps), x
    return small_ops.add_rms_norm(x, residual, norm_weight, eps)


def skinny_or_torch(max_tokens: int) -> SimpleNamespace:
    """A backend's `linear`, `silu_and_mul_linear` and `rms_norm_linear`: these kernels for
    inputs of at most max_tokens rows (a decode step's; 0: none), torch's matmul above them,
    after the Triton silu_and_mul or norm. The choice is made on the host from the input's
    shape, so a captured step replays the one it made."""

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

    def rms_norm_linear_op(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                           weight: torch.Tensor, bias: torch.Tensor | None = None):
        if rows(x) <= max_tokens:
            return rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
        normed, residual = _normed(x, residual, norm_weight, eps)
        return F.linear(normed, weight, bias), residual

    return SimpleNamespace(linear=linear_op, silu_and_mul_linear=silu_and_mul_linear_op,
                           rms_norm_linear=rms_norm_linear_op)
