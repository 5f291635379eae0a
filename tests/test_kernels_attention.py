"""Triton attention kernels against the PyTorch references: paged layouts with scattered
blocks, odd lengths around tile and page boundaries, GQA ratios 1, 4 and 8, several splits."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_testing import DEVICE, DTYPES, close, pack_prefill, paged_pool, poison_outputs  # noqa: E402

from kairos.kernels import attention  # noqa: E402
from kairos.kernels import reference as ref  # noqa: E402


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    poison_outputs(monkeypatch, attention)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim, page", [(64, 16), (128, 32), (24, 16)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_attention(dtype, group, head_dim, page, num_splits):
    lengths = [1, 15, 16, 17, 100, 300]
    kv_heads = 2
    k_cache, v_cache, tables = paged_pool(lengths, kv_heads, head_dim, page, dtype)
    q = torch.randn(len(lengths), kv_heads * group, head_dim, device=DEVICE, dtype=dtype)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = attention.decode_attention(q, k_cache, v_cache, tables, ctx, scale, num_splits=num_splits)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, ctx, scale), dtype, fp32_tol=1e-4)


@pytest.mark.parametrize("num_splits", [attention.MERGE_SPLITS - 1, attention.MERGE_SPLITS + 1, 70])
def test_decode_attention_merges_splits_in_chunks(num_splits):
    """More splits than the merge takes at once: the longest contexts have keys in every chunk
    of splits, the short ones only in the first (the rest saw none and must weigh nothing)."""
    lengths = [1, 50, 64 * num_splits - 5, 64 * num_splits + 7]
    k_cache, v_cache, tables = paged_pool(lengths, 2, 32, 16, torch.float16)
    q = torch.randn(len(lengths), 8, 32, device=DEVICE, dtype=torch.float16)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = attention.decode_attention(q, k_cache, v_cache, tables, ctx, 32**-0.5, num_splits=num_splits)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, ctx, 32**-0.5), torch.float16)


def test_decode_splits_follow_shapes_only():
    h100_sms = 132
    assert attention.decode_num_splits(64, 8, 4096, h100_sms) == 1  # 512 programs already
    splits = attention.decode_num_splits(1, 8, 32768, h100_sms)  # a long context must fill the SMs
    assert 8 * splits >= 4 * h100_sms and 32768 / splits >= attention.MIN_TOKENS_PER_SPLIT
    assert attention.decode_num_splits(1, 1, 100, h100_sms) == 1  # never below the minimum split
    # Aiming at 3 programs per SM: 16 programs a split, 25 splits fill 3 x 132 slots.
    assert attention.decode_num_splits(2, 8, 32768, h100_sms, programs_per_sm=3) == 25


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 24])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_prefill_attention(dtype, group, head_dim, with_prefix):
    q_lens = [1, 17, 16, 5, 40]
    prefixes = [0, 0, 32, 16, 3] if with_prefix else [0] * len(q_lens)
    q, k, v, k_cache, v_cache, cu_q, cu_k, tables = pack_prefill(q_lens, prefixes, 2, group, head_dim, 16, dtype)
    tables = tables if with_prefix else None
    args = (q, k, v, k_cache, v_cache, cu_q, cu_k, tables, head_dim**-0.5, max(q_lens))
    close(attention.prefill_attention(*args), ref.prefill_attention(*args), dtype, fp32_tol=1e-4)


@pytest.mark.parametrize("block_n", [32, 128])
def test_decode_attention_under_the_benchmarked_tiles(block_n):
    """bench/kernels.py times other key tiles than the engine's: they must compute the same."""
    lengths = [1, 31, 33, 200, 700]
    k_cache, v_cache, tables = paged_pool(lengths, 2, 64, 16, torch.float16)
    q = torch.randn(len(lengths), 8, 64, device=DEVICE, dtype=torch.float16)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 3):
        out = attention.decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, num_splits=num_splits,
                                         block_n=block_n)
        close(out, ref.decode_attention(q, k_cache, v_cache, tables, ctx, 0.125), torch.float16)


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32)])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_prefill_attention_under_the_benchmarked_tiles(block_m, block_n, with_prefix):
    """Query and key tiles of different sizes (bench/kernels.py times 128 by 64): the causal
    diagonal then crosses key tiles at other offsets."""
    q_lens = [1, 17, 40, 33]
    prefixes = [0, 16, 3, 20] if with_prefix else [0] * len(q_lens)
    q, k, v, k_cache, v_cache, cu_q, cu_k, tables = pack_prefill(q_lens, prefixes, 2, 4, 64, 16, torch.float16)
    args = (q, k, v, k_cache, v_cache, cu_q, cu_k, tables if with_prefix else None, 0.125, max(q_lens))
    close(attention.prefill_attention(*args, block_m=block_m, block_n=block_n), ref.prefill_attention(*args),
          torch.float16)


@pytest.mark.parametrize("head_dim, page", [(256, 16), (128, 128)])
def test_decode_attention_large_heads_and_pages(head_dim, page):
    lengths = [3, 129, 257]
    k_cache, v_cache, tables = paged_pool(lengths, 2, head_dim, page, torch.float16)
    q = torch.randn(len(lengths), 8, head_dim, device=DEVICE, dtype=torch.float16)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = attention.decode_attention(q, k_cache, v_cache, tables, ctx, head_dim**-0.5, num_splits=2)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, ctx, head_dim**-0.5), torch.float16)
