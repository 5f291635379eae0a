"""Triton kernels for the small memory-bound ops: RMSNorm (with fused residual add),
SiLU-and-mul, and RoPE fused with the KV store. Signatures match `kernels.reference`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_res, stride_res_out, stride_out,
                     n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the activation dtype, as an unfused add would round it.
        x = x + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=mask)


def alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it with NaN to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [tokens, features] with each row contiguous, as the kernels index it (copied only
    where it is not already)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_launch(x, residual, weight, eps):
    x2 = as_rows(x)
    out = alloc(x2.shape, x.dtype, x.device)
    n_rows, n_cols = x2.shape
    block = triton.next_power_of_2(n_cols)
    num_warps = min(max(block // 256, 1), 8)
    if residual is None:
        _rms_norm_kernel[(n_rows,)](x2, x2, weight, out, out, x2.stride(0), 0, 0, out.stride(0), n_cols, eps,
                                    HAS_RESIDUAL=False, BLOCK=block, num_warps=num_warps)
        return out.view(x.shape), None
    res2 = as_rows(residual)
    res_out = alloc(res2.shape, res2.dtype, res2.device)
    _rms_norm_kernel[(n_rows,)](x2, res2, weight, out, res_out, x2.stride(0), res2.stride(0), res_out.stride(0),
                                out.stride(0), n_cols, eps, HAS_RESIDUAL=True, BLOCK=block, num_warps=num_warps)
    return out.view(x.shape), res_out.view(residual.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return _norm_launch(x, residual, weight, eps)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded like torch's silu output
    tl.store(out_ptr + row * stride_out + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x2 = as_rows(x)
    d = x2.shape[-1] // 2
    out = alloc((x2.shape[0], d), x.dtype, x.device)
    block = min(triton.next_power_of_2(d), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d, BLOCK=block)
    return out.view(*x.shape[:-1], d)


@triton.jit
def _rotate_heads(base, t, stride_t, stride_h, num_heads, cos, sin, d, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotates a token's heads in place; returns the rotated halves and their mask."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    ptrs = base + t * stride_t + heads * stride_h + d[None, :]
    mask = (heads < num_heads) & (d[None, :] < HALF)
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    # cos and sin are rounded to the activation dtype first, as in transformers.
    c = cos.to(x1.dtype).to(tl.float32)[None, :]
    s = sin.to(x1.dtype).to(tl.float32)[None, :]
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (f1 * c - f2 * s).to(x1.dtype)
    r2 = (f2 * c + f1 * s).to(x1.dtype)
    tl.store(ptrs, r1, mask=mask)
    tl.store(ptrs + HALF, r2, mask=mask)
    return r1, r2, mask


@triton.jit
def _rope_store_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, num_q_heads, num_kv_heads,
                          HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr):
    """One token: q and k rotated in place, and k (rotated) and v stored at the token's slot."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, num_q_heads, cos, sin, d, HALF, BLOCK_QH)
    k1, k2, mask = _rotate_heads(k_ptr, t, stride_kt, stride_kh, num_kv_heads, cos, sin, d, HALF, BLOCK_KH)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_KH)[:, None]
        dst = slot * num_kv_heads * 2 * HALF + heads * 2 * HALF + d[None, :]
        tl.store(k_cache_ptr + dst, k1, mask=mask)
        tl.store(k_cache_ptr + dst + HALF, k2, mask=mask)
        v = v_ptr + t * stride_vt + heads * stride_vh + d[None, :]
        tl.store(v_cache_ptr + dst, tl.load(v, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst + HALF, tl.load(v + HALF, mask=mask), mask=mask)


def rope_and_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.shape[-1] % 2 == 0, f"rotate-half RoPE needs an even head dim, not {q.shape[-1]}"
    half = q.shape[-1] // 2
    _rope_store_kv_kernel[(q.shape[0],)](
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), q.shape[1], k.shape[1], HALF=half,
        BLOCK_D=triton.next_power_of_2(half), BLOCK_QH=triton.next_power_of_2(q.shape[1]),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]))
