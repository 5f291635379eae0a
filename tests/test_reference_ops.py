"""The PyTorch reference ops against plain dense math, on fresh random inputs: paged layouts
with scattered blocks, odd lengths, GQA ratios 1, 4 and 8."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kairos.kernels import reference as ref

D = 32
BS = 16


def dense_attention(q, k, v, offset):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D]; query i sees keys up to i + offset."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + offset
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.double())


def paged(lengths, num_kv_heads, num_blocks=64):
    """A KV pool with each sequence's tokens in randomly scattered blocks."""
    k_cache = torch.randn(num_blocks, BS, num_kv_heads, D)
    v_cache = torch.randn(num_blocks, BS, num_kv_heads, D)
    order = torch.randperm(num_blocks).tolist()
    tables = []
    for n in lengths:
        tables.append([order.pop() for _ in range(-(-n // BS))])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, block_tables


def gather(cache, table, n):
    return cache[table[table >= 0].long()].flatten(0, 1)[:n]


@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_attention_over_scattered_blocks(group):
    lengths = [1, 15, 16, 17, 100]
    k_cache, v_cache, tables = paged(lengths, 2)
    q = torch.randn(len(lengths), 2 * group, D)
    out = ref.decode_attention(q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32), D**-0.5)
    for s, n in enumerate(lengths):
        expected = dense_attention(q[s : s + 1], gather(k_cache, tables[s], n), gather(v_cache, tables[s], n), n - 1)
        torch.testing.assert_close(out[s : s + 1].double(), expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_ignores_whatever_lies_past_the_context():
    """Unwritten slots of a sequence's last block may hold anything, NaN included."""
    lengths = [3, 17, 40]
    k_cache, v_cache, tables = paged(lengths, 2)
    clean = ref.decode_attention(q := torch.randn(3, 4, D), k_cache, v_cache, tables,
                                 torch.tensor(lengths, dtype=torch.int32), D**-0.5)
    for s, n in enumerate(lengths):
        for pos in range(n, tables.shape[1] * BS):
            block = tables[s, pos // BS].item()
            if block >= 0:
                k_cache[block, pos % BS] = float("nan")
                v_cache[block, pos % BS] = float("nan")
    poisoned = ref.decode_attention(q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32), D**-0.5)
    torch.testing.assert_close(poisoned, clean)


def check_prefill_attention(q_lens, prefix, group, dtype=torch.float32, tolerance=1e-5):
    """Prompts of q_lens new tokens over cached prefixes of `prefix` tokens, packed, against
    dense math per sequence."""
    k_lens = [a + b for a, b in zip(q_lens, prefix)]
    k_cache, v_cache, tables = paged(k_lens, 2, num_blocks=sum(-(-n // BS) for n in k_lens) + 3)
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    total = sum(q_lens)
    q = torch.randn(total, 2 * group, D, dtype=dtype)
    k, v = torch.randn(total, 2, D, dtype=dtype), torch.randn(total, 2, D, dtype=dtype)
    slots = []
    for s, (ql, p) in enumerate(zip(q_lens, prefix)):
        slots += [tables[s, pos // BS].item() * BS + pos % BS for pos in range(p, p + ql)]
    ref.store_kv(k, v, k_cache, v_cache, torch.tensor(slots))
    cu_q = torch.tensor([0] + q_lens).cumsum(0).int()
    cu_k = torch.tensor([0] + k_lens).cumsum(0).int()
    out = ref.prefill_attention(q, k, v, k_cache, v_cache, cu_q, cu_k, tables, D**-0.5, max(q_lens))
    assert out.dtype == dtype
    for s, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        qs = q[cu_q[s] : cu_q[s + 1]]
        expected = dense_attention(qs, gather(k_cache, tables[s], kl), gather(v_cache, tables[s], kl), kl - ql)
        torch.testing.assert_close(out[cu_q[s] : cu_q[s + 1]].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_attention_with_and_without_cached_prefix(group):
    # SDPA's flash kernel only: one that SDPA cannot use (3-D inputs, say) raises, rather than
    # quietly taking the math path, which materialises every score matrix.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        # Sequences 2..4 read a cached prefix from the pool.
        check_prefill_attention(q_lens=[1, 17, 16, 5, 40], prefix=[0, 0, 32, 16, 3], group=group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_attention_over_a_cached_prefix_either_side_of_the_split(group, dtype):
    """Long runs of queries over a cached prefix attend to the prefix and to themselves apart on a
    CPU; shorter ones in one masked call. Both against dense math, at the threshold and by it."""
    split = ref.SPLIT_PREFIX_MIN_QUERIES
    check_prefill_attention([split - 1, split, split + 37], [5, 200, 16], group, dtype,
                            tolerance=1e-5 if dtype == torch.float32 else 2e-2)


def test_store_kv_skips_negative_slots():
    k_cache, v_cache = torch.zeros(4, BS, 2, D), torch.zeros(4, BS, 2, D)
    k, v = torch.randn(3, 2, D), torch.randn(3, 2, D)
    ref.store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 63]))
    flat_k = k_cache.view(-1, 2, D)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[63], k[2])
    assert flat_k.abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == [5, 63]
    assert torch.equal(v_cache.view(-1, 2, D)[63], v[2])


def test_rms_norm_and_fused_residual():
    x, res, w = torch.randn(7, 48), torch.randn(7, 48), torch.randn(48)
    expected = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-6), expected)
    out, new_res = ref.add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(out, ref.rms_norm(x + res, w, 1e-6))


def test_silu_and_mul():
    x = torch.randn(5, 2 * 24)
    torch.testing.assert_close(ref.silu_and_mul(x), torch.sigmoid(x[:, :24]) * x[:, :24] * x[:, 24:])


def test_rotary_embedding_rotates_pairs_in_place():
    positions = torch.tensor([0, 3, 17])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.outer(torch.arange(32).float(), inv_freq)
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    q, k = torch.randn(3, 4, D), torch.randn(3, 2, D)
    q0, k0 = q.clone(), k.clone()
    ref.rotary_embedding(positions, q, k, cache)
    half = D // 2
    for t, t0 in ((q, q0), (k, k0)):
        a = angles[positions].unsqueeze(1)
        x1, x2 = t0[..., :half], t0[..., half:]
        torch.testing.assert_close(t[..., :half], x1 * a.cos() - x2 * a.sin())
        torch.testing.assert_close(t[..., half:], x2 * a.cos() + x1 * a.sin())
    assert torch.equal(q[0], q0[0])  # position 0 is the identity


def test_per_pass_metadata_written_in_place_or_met_with_other_heads_are_derived_anew():
    """A forward pass's layers share metadata tensors, so what the ops derive from them alone
    is derived once and reused while they are the very same, unwritten tensors: a write in
    place (a new step in the same buffers) or another head count must not meet a stale one."""
    lengths = [3, 17, 40]
    k_cache, v_cache, tables = paged(lengths, 2)
    lens = torch.tensor(lengths, dtype=torch.int32)

    def check(group):
        q = torch.randn(len(lengths), 2 * group, D)
        out = ref.decode_attention(q, k_cache, v_cache, tables, lens, D**-0.5)
        for s, n in enumerate(lens.tolist()):
            expected = dense_attention(q[s : s + 1], gather(k_cache, tables[s], n), gather(v_cache, tables[s], n),
                                       n - 1)
            torch.testing.assert_close(out[s : s + 1].double(), expected, rtol=1e-5, atol=1e-5)

    check(group=1)
    check(group=4)  # the same tensors, unwritten: other query heads per KV head
    lens[1] = 9  # block 1 of sequence 1 now lies past its context
    check(group=4)

    flat_cache = torch.zeros(4 * BS, 2, D)
    slots = torch.tensor([5, -1, 63])
    for expected_slots in ([5, 63], [6, 62]):
        k_cache, v_cache = torch.zeros(4, BS, 2, D), torch.zeros(4, BS, 2, D)
        k = torch.randn(3, 2, D)
        ref.store_kv(k, k, k_cache, v_cache, slots)
        assert k_cache.view_as(flat_cache).abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == expected_slots
        slots[0], slots[2] = 6, 62

    angles = torch.outer(torch.arange(8).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    positions, cache = torch.tensor([0, 0]), torch.cat((angles.cos(), angles.sin()), dim=-1)
    q, k = torch.randn(2, 1, D), torch.randn(2, 1, D)
    ref.rotary_embedding(positions, q.clone(), k, cache)
    positions[1] = 3
    rotated = q.clone()
    ref.rotary_embedding(positions, rotated, k, cache)
    x1, x2, a = q[1, :, : D // 2], q[1, :, D // 2 :], angles[3]
    torch.testing.assert_close(rotated[1], torch.cat((x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()), -1))
