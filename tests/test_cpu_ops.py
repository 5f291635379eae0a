"""The compiled CPU loops against the PyTorch reference, on fresh random inputs: decode
attention over paged blocks (odd lengths and block boundaries, GQA ratios 1, 4 and 8, anything
past a context), and RoPE with the KV store (the same bits)."""

import pytest
import torch
from kernel_testing import close, paged_pool

from kairos.kernels import cpu_ops, get_backend
from kairos.kernels import reference as ref

pytest.importorskip("numba")

LENGTHS = [1, 15, 16, 17, 33, 100, 301]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page", [16, 32])
def test_decode_attention_matches_the_reference(group, page):
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool(LENGTHS, 2, 64, page, torch.float32))
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    q = torch.randn(len(LENGTHS), 2 * group, 64)
    out = cpu_ops.decode_attention(q, k_cache, v_cache, tables, lens, 64**-0.5)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 64**-0.5), torch.float32)


def test_whatever_lies_past_a_context_adds_nothing():
    lengths = [3, 16, 17, 40]
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool(lengths, 2, 32, 16, torch.float32))
    lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), 4, 32)
    clean = cpu_ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    used = {(tables[s, pos // 16].item(), pos % 16) for s, n in enumerate(lengths) for pos in range(n)}
    for block in range(k_cache.shape[0]):
        for slot in range(16):
            if (block, slot) not in used:
                k_cache[block, slot] = v_cache[block, slot] = float("nan")
    assert torch.equal(cpu_ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.2), clean)


def test_views_of_the_engines_buffers_and_int64_metadata_give_the_same_result():
    """The engine hands q as a view of the packed q/k/v projection and the metadata as views of
    its input buffers."""
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool([5, 50], 2, 32, 16, torch.float32))
    qkv = torch.randn(2, 8 * 32)
    q = qkv[:, : 4 * 32].view(2, 4, 32)
    lens = torch.tensor([5, 50, 7], dtype=torch.int32)[:2]
    out = cpu_ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    close(out, cpu_ops.decode_attention(q.contiguous(), k_cache, v_cache, tables.long(), lens.long(), 0.2),
          torch.float32, fp32_tol=0)
    close(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 0.2), torch.float32)


def test_half_precision_or_a_strided_cache_takes_the_reference():
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool([5, 20], 1, 32, 16, torch.float16))
    lens = torch.tensor([5, 20], dtype=torch.int32)
    q = torch.randn(2, 2, 32, dtype=torch.float16)
    out = cpu_ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    assert out.dtype == torch.float16
    assert torch.equal(out, ref.decode_attention(q, k_cache, v_cache, tables, lens, 0.2))
    k, v = torch.randn(2, 1, 32, dtype=torch.float16), torch.randn(2, 1, 32, dtype=torch.float16)
    args = (torch.tensor([3, 9]), q.clone(), k, v, torch.randn(16, 32), k_cache, v_cache, torch.tensor([0, 17]))
    cpu_ops.rope_and_store_kv(*args)
    assert torch.equal(k_cache.view(-1, 1, 32)[17], k[1]) and not torch.equal(args[1], q)

    pool = torch.randn(k_cache.shape[0], 2, *k_cache.shape[1:])
    strided_k, strided_v = pool[:, 0], pool[:, 1]  # each cache a strided view
    q = q.float()
    assert torch.equal(cpu_ops.decode_attention(q, strided_k, strided_v, tables, lens, 0.2),
                       ref.decode_attention(q, strided_k, strided_v, tables, lens, 0.2))


@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 4, 2, 32), (17, 32, 8, 128), (300, 4, 4, 16)])
@pytest.mark.parametrize("packed", [True, False])
def test_rope_and_store_kv_gives_the_references_bits(tokens, heads, kv_heads, head_dim, packed):
    """packed: q, k and v are views of one projection, as the engine hands them; otherwise each
    is a tensor of its own (as after Qwen3's q and k norms)."""
    width = (heads + 2 * kv_heads) * head_dim
    positions = torch.randint(0, 4096, (tokens,))
    cos_sin = torch.randn(4096, head_dim)
    slots = torch.randperm(40 * 16)[:tokens]
    slots[tokens // 2] = -1  # stored nowhere

    def inputs():
        qkv = torch.randn(tokens, width, generator=torch.Generator().manual_seed(tokens))
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = (x.view(tokens, -1, head_dim) for x in (q, k, v))
        if not packed:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return q, k, v, torch.zeros(40, 16, kv_heads, head_dim), torch.zeros(40, 16, kv_heads, head_dim)

    expected, actual = inputs(), inputs()
    ref.rope_and_store_kv(positions, *expected[:3], cos_sin, *expected[3:], slots)
    cpu_ops.rope_and_store_kv(positions.int(), *actual[:3], cos_sin, *actual[3:], slots.int())
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_the_torch_backend_on_a_cpu_takes_the_loops_unless_numba_is_off(monkeypatch):
    monkeypatch.setattr(cpu_ops, "ENABLED", True)
    for op in ("decode_attention", "rope_and_store_kv"):
        assert getattr(get_backend("torch", "cpu"), op) is getattr(cpu_ops, op)
        assert getattr(get_backend("torch", "cuda"), op) is getattr(ref, op)
    monkeypatch.setattr(cpu_ops, "ENABLED", False)  # as KAIROS_NUMBA=0 sets it
    assert get_backend("torch", "cpu").decode_attention is ref.decode_attention


def test_inputs_that_would_read_or_write_out_of_bounds_are_refused_before_anything_is_written():
    """The loops index without bounds checks, so they check what they are handed first."""
    k_cache, v_cache, tables = (t.cpu() for t in paged_pool([20, 40], 2, 32, 16, torch.float32))
    q = torch.randn(2, 4, 32)
    for lens, table in (([20, 49], tables), ([20, 0], tables), ([20, 40], tables.clone().fill_(k_cache.shape[0]))):
        with pytest.raises(ValueError, match="block table"):
            cpu_ops.decode_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), 0.2)
    with pytest.raises(ValueError, match="disagree in shape"):
        cpu_ops.decode_attention(torch.randn(2, 3, 32), k_cache, v_cache, tables, torch.tensor([20, 40]), 0.2)

    k, v = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    before = (q.clone(), k.clone(), k_cache.clone())
    for positions, slots, message in (([0, 16], [0, 1], "position"), ([0, 1], [0, k_cache.shape[0] * 16], "slot")):
        with pytest.raises(ValueError, match=message):
            cpu_ops.rope_and_store_kv(torch.tensor(positions), q, k, v, torch.randn(16, 32), k_cache, v_cache,
                                      torch.tensor(slots))
        assert all(torch.equal(a, b) for a, b in zip((q, k, k_cache), before))
