"""The compiled CPU decode attention against the PyTorch reference, on fresh random paged
inputs: odd lengths and block boundaries, GQA ratios 1, 4 and 8, anything past a context."""

import pytest
import torch
from kernel_testing import close, paged_pool

from kairos.kernels import cpu_attention, get_backend
from kairos.kernels import reference as ref

pytest.importorskip("numba")

LENGTHS = [1, 15, 16, 17, 33, 100, 301]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page", [16, 32])
def test_decode_attention_matches_the_reference(group, page):
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool(LENGTHS, 2, 64, page, torch.float32))
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    q = torch.randn(len(LENGTHS), 2 * group, 64)
    out = cpu_attention.decode_attention(q, k_cache, v_cache, tables, lens, 64**-0.5)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 64**-0.5), torch.float32)


def test_whatever_lies_past_a_context_adds_nothing():
    lengths = [3, 16, 17, 40]
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool(lengths, 2, 32, 16, torch.float32))
    lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), 4, 32)
    clean = cpu_attention.decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    used = {(tables[s, pos // 16].item(), pos % 16) for s, n in enumerate(lengths) for pos in range(n)}
    for block in range(k_cache.shape[0]):
        for slot in range(16):
            if (block, slot) not in used:
                k_cache[block, slot] = v_cache[block, slot] = float("nan")
    assert torch.equal(cpu_attention.decode_attention(q, k_cache, v_cache, tables, lens, 0.2), clean)


def test_views_of_the_engines_buffers_and_int64_metadata_give_the_same_result():
    """The engine hands q as a view of the packed q/k/v projection and the metadata as views of
    its input buffers."""
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool([5, 50], 2, 32, 16, torch.float32))
    qkv = torch.randn(2, 8 * 32)
    q = qkv[:, : 4 * 32].view(2, 4, 32)
    lens = torch.tensor([5, 50, 7], dtype=torch.int32)[:2]
    out = cpu_attention.decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    close(out, cpu_attention.decode_attention(q.contiguous(), k_cache, v_cache, tables.long(), lens.long(), 0.2),
          torch.float32, fp32_tol=0)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 0.2), torch.float32)


def test_half_precision_takes_the_reference():
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool([5, 20], 1, 32, 16, torch.float16))
    lens = torch.tensor([5, 20], dtype=torch.int32)
    q = torch.randn(2, 2, 32, dtype=torch.float16)
    out = cpu_attention.decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 0.2))


def test_the_torch_backend_on_a_cpu_decodes_with_it_unless_numba_is_off(monkeypatch):
    monkeypatch.setattr(cpu_attention, "ENABLED", True)
    assert get_backend("torch", "cpu").decode_attention is cpu_attention.decode_attention
    assert get_backend("torch", "cuda").decode_attention is ref.decode_attention
    monkeypatch.setattr(cpu_attention, "ENABLED", False)  # as KAIROS_NUMBA=0 sets it
    assert get_backend("torch", "cpu").decode_attention is ref.decode_attention
