"""Triton small-op kernels against their PyTorch references, on fresh random inputs with odd
sizes; output buffers are poisoned with NaN so every element is proven written."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_testing import DEVICE, DTYPES, close, poison_outputs  # noqa: E402

from kairos.kernels import reference as ref  # noqa: E402
from kairos.kernels import small_ops  # noqa: E402


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    poison_outputs(monkeypatch, small_ops)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 64), (7, 100), (33, 128)])
def test_rms_norm_and_fused_residual(dtype, rows, cols):
    x = torch.randn(rows, cols, device=DEVICE, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(cols, device=DEVICE, dtype=dtype)
    close(small_ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype)
    out, new_res = small_ops.add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = ref.add_rms_norm(x, res, w, 1e-6)
    close(out, ref_out, dtype)
    close(new_res, ref_res, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_strided_head_views(dtype):
    qkv = torch.randn(5, 3 * 4 * 24, device=DEVICE, dtype=dtype)  # head_dim 24, as Qwen3 q/k norm
    q = qkv[:, : 4 * 24].reshape(5, 4, 24)
    w = torch.randn(24, device=DEVICE, dtype=dtype)
    close(small_ops.rms_norm(q, w, 1e-6), ref.rms_norm(q, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, d", [(1, 16), (9, 344), (4, 1500)])
def test_silu_and_mul(dtype, rows, d):
    x = torch.randn(rows, 2 * d, device=DEVICE, dtype=dtype)
    close(small_ops.silu_and_mul(x), ref.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(4, 4, 64, 16), (8, 2, 24, 32), (32, 8, 128, 16),
                                                                    (4, 1, 64, 16)])
def test_rope_and_store_kv_on_packed_qkv(dtype, heads, kv_heads, head_dim, block_size):
    """q and k rotated in place and v untouched in the packed projection; the rotated k and v
    written to exactly the mapped slots (-1: padding, stored nowhere)."""
    tokens, num_blocks = 13, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    positions = torch.randint(0, 500, (tokens,), device=DEVICE)
    angles = torch.outer(torch.arange(512.0), 1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))
    cos_sin = torch.cat((angles.cos(), angles.sin()), -1).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[[2, 7]] = -1
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), device=DEVICE, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    expected = [t.clone() for t in (qkv, k_cache, v_cache)]

    def split(packed):
        q, k, v = packed.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)

    ref.rope_and_store_kv(positions, *split(expected[0]), cos_sin, expected[1], expected[2], slots)
    small_ops.rope_and_store_kv(positions, *split(qkv), cos_sin, k_cache, v_cache, slots)
    close(qkv, expected[0], dtype)
    written = ~expected[1].isnan()
    assert torch.equal(~k_cache.isnan(), written) and torch.equal(~v_cache.isnan(), written)
    close(k_cache[written], expected[1][written], dtype)  # rotated: within rounding of the reference
    assert torch.equal(v_cache[written], expected[2][written])  # copied: exactly
