"""PyTorch reference implementations of every kernel on the engine's hot path.

Each public function here but two is the specification for the Triton kernel of the same name
and signature: kernel tests compare the two, and the engine runs on these wherever Triton is
unavailable. `rotary_embedding` and `store_kv` are the two parts of `rope_and_store_kv`, which
one Triton kernel does at once. `linear`, `silu_and_mul_linear` and `rms_norm_linear` specify
the skinny matmul, which the Triton backend takes only for steps of at most
`--skinny-matmul-tokens` tokens (torch's matmul, cuBLAS, otherwise, after the Triton
activation or norm; `bench/matmul.py` times the two).

Shapes:
  tokens      x, q, k, v: [num_tokens, ...]; q is [T, Hq, D], k and v are [T, Hkv, D]
  KV cache    k_cache, v_cache: [num_blocks, block_size, Hkv, D]
  slots       slot_mapping[i] = block_id * block_size + offset, or -1 to skip the token
  block table block_tables[s, j] = the j-th block of sequence s (-1 past its end)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kairos.kernels.per_pass import PassMemo

# What every layer of a forward pass would derive alike from its metadata (the rotation at the
# positions, the rows and slots to store, the decode layout) is derived at the first.
_per_pass = PassMemo()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32, then round to the input dtype before the weight, as transformers does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x is [..., 2 * d] holding gate then up; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): weight is [out_features, in_features], as nn.Linear holds it."""
    return F.linear(x, weight, bias)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(silu_and_mul(x), weight, bias): the MLP's activation and down projection."""
    return F.linear(silu_and_mul(x), weight, bias)


def rms_norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual), or with no residual (the first layer's)
    (linear(rms_norm(x)), x): a decoder block's norm and its input projection."""
    if residual is None:
        return F.linear(rms_norm(x, norm_weight, eps), weight, bias), x
    normed, residual = add_rms_norm(x, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), residual


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (rotate-half layout).

    cos_sin_cache is [max_positions, D] float32: cos in the first D/2 columns, sin in the rest.
    """
    cos, sin = _per_pass.get("rope", (positions, cos_sin_cache), (q.dtype,),
                             lambda: _rotation(positions, cos_sin_cache, q.dtype))
    for t in (q, k):
        # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], as [x1, x2] * cos + [x2, x1] * [-sin, sin].
        half = t.shape[-1] // 2
        t.copy_(t * cos + torch.cat((t[..., half:], t[..., :half]), dim=-1) * sin)


def _rotation(positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype):
    """cos and sin at these positions, [T, 1, D] each: the rotation of either half of a head."""
    cos, sin = cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    rows, slots = _per_pass.get("store", (slot_mapping,), (), lambda: _stored_rows(slot_mapping))
    for new, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new if rows is None else new.index_select(0, rows))


def _stored_rows(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rows of the tokens to store (None for all of them) and their slots."""
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return None, slot_mapping.long()
    rows = keep.nonzero().squeeze(1)
    return rows, slot_mapping[rows].long()


def rope_and_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """A layer's new tokens: q and k rotated in place, then k and v stored by slot mapping (one
    kernel on the GPU, where a decode step is made of many small ones)."""
    rotary_embedding(positions, q, k, cos_sin_cache)
    store_kv(k, v, k_cache, v_cache, slot_mapping)


def _gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence's paged KV, as [length, Hkv, D]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].flatten(0, 1)[:length]


# From this many queries over a cached prefix on a CPU, attending to the prefix and to the new
# tokens apart beats one masked call, whose kernel cannot skip the tiles past the diagonal: on
# one thread 1.5x faster at 1024 queries over 1024 cached tokens and 2.2x at 3000 over 1000, but
# slower under a few hundred queries.
SPLIT_PREFIX_MIN_QUERIES = 512


def _prefix_then_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """q [1, H, Lq, D] over k, v [1, Hkv, prefix + Lq, D], query i seeing up to prefix + i: the
    prefix unmasked and the new tokens causally, each by SDPA's CPU flash kernel (the op that
    also returns the log-sum-exp of each row's scores, which SDPA drops), merged by those sums."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))  # the op takes no enable_gqa
    o_prefix, lse_prefix = flash(q, k[:, :, :prefix], v[:, :, :prefix], scale=scale)
    o_new, lse_new = flash(q, k[:, :, prefix:], v[:, :, prefix:], is_causal=True, scale=scale)
    prefix_share = torch.sigmoid(lse_prefix - lse_new).unsqueeze(-1)  # of each row's softmax mass
    return torch.lerp(o_new.float(), o_prefix.float(), prefix_share).to(q.dtype)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_tables: torch.Tensor | None,
    scale: float,
    max_seqlen_q: int,
) -> torch.Tensor:
    """Causal attention for a batch of variable-length prompts, packed along the token axis.

    Sequence s owns queries cu_seqlens_q[s]:cu_seqlens_q[s+1] and has a context of
    cu_seqlens_k[s+1] - cu_seqlens_k[s] tokens. When the context is longer than the queries, the
    earlier tokens are a cached prefix: all of the context is then read from the paged cache
    (where the new tokens have already been stored). Query i sees context positions up to
    i + (context length - query length). max_seqlen_q (the longest query run, known on the
    host) sizes a kernel's launch grid.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    q_starts = cu_seqlens_q.tolist()
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    for s, k_len in enumerate(k_lens):
        q0, q1 = q_starts[s], q_starts[s + 1]
        q_len = q1 - q0
        if k_len == q_len:
            ks, vs = k[q0:q1], v[q0:q1]
        else:
            ks = _gather_paged(k_cache, block_tables[s], k_len)
            vs = _gather_paged(v_cache, block_tables[s], k_len)
        # [1, H, tokens, D]: SDPA's fused kernels (CPU flash attention among them) take only
        # 4-D inputs; 3-D ones take the math path, which materialises the score matrix and was
        # ten times slower for a 4k prompt on a CPU. enable_gqa shares each KV head with its
        # group of query heads without copying it.
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q[q0:q1], ks, vs))
        if k_len == q_len:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=group > 1)
        elif q.device.type == "cpu" and q_len >= SPLIT_PREFIX_MIN_QUERIES:
            o = _prefix_then_causal(qs, ks, vs, k_len - q_len, scale)
        else:
            rows = torch.arange(q_len, device=q.device).unsqueeze(1)
            cols = torch.arange(k_len, device=q.device).unsqueeze(0)
            mask = cols <= rows + (k_len - q_len)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


class _DecodeLayout(NamedTuple):
    """A decode batch's blocks packed end to end, N in all, gathered into [N, Hkv, block_size, D]."""

    owner: torch.Tensor  # [N] int64: the sequence each block belongs to
    blocks: torch.Tensor  # [N] int64: its block in the cache
    # Slots past a context (in its last block), as flat indices into the scores [N, Hkv, G,
    # block_size] and into the rows [N * block_size * Hkv] of the values as gathered.
    score_holes: torch.Tensor
    value_holes: torch.Tensor


def _decode_layout(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, num_kv_heads: int,
                   group: int) -> _DecodeLayout:
    device = context_lens.device
    lens = context_lens.long()
    num_blocks = (lens + block_size - 1) // block_size
    owner = torch.repeat_interleave(torch.arange(len(lens), device=device), num_blocks)
    index = torch.arange(owner.numel(), device=device) - (torch.cumsum(num_blocks, 0) - num_blocks)[owner]
    slot_positions = (index * block_size).unsqueeze(1) + torch.arange(block_size, device=device)
    block, slot = (slot_positions >= lens[owner].unsqueeze(1)).nonzero(as_tuple=True)
    heads = torch.arange(num_kv_heads, device=device)
    value_rows = (block * block_size + slot).unsqueeze(1) * num_kv_heads + heads
    score_rows = (block.view(-1, 1, 1) * num_kv_heads + heads.view(-1, 1)) * group + torch.arange(group, device=device)
    return _DecodeLayout(owner, block_tables.long()[owner, index],
                         (score_rows * block_size + slot.view(-1, 1, 1)).flatten(), value_rows.flatten())


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, q [B, Hq, D], over each sequence's paged KV.

    The batch's blocks are packed end to end, not padded to the longest context: a step's work
    is the sum of its context lengths (to within a block per sequence), as the cost model
    assumes; padding made a batch of mixed lengths cost up to twice what its total predicts."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    owner, blocks, score_holes, value_holes = _per_pass.get(
        "decode", (block_tables, context_lens), (block_size, num_kv_heads, group),
        lambda: _decode_layout(block_tables, context_lens, block_size, num_kv_heads, group))
    # Gathered in one copy and seen head-major, [N, Hkv, block_size, D] (a float16 or bfloat16
    # cache is converted in a second): the matmuls below batch over (block, head) as they lie.
    keys = k_cache.index_select(0, blocks).transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    values = v_cache.index_select(0, blocks)
    values.view(-1, head_dim).index_fill_(0, value_holes, 0.0)
    values = values.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = (qg.index_select(0, owner) @ keys.transpose(-1, -2)).mul_(scale)  # [N, Hkv, G, block_size]
    # Whatever lies past a context in its last block (NaN even) must get no weight and add nothing.
    scores.view(-1).index_fill_(0, score_holes, float("-inf"))
    # Softmax over each sequence's blocks together: subtract its maximum, divide by its sum.
    block_peak = scores.amax(-1)
    peak = qg.new_full((batch, num_kv_heads, group), float("-inf")).scatter_reduce(
        0, owner.view(-1, 1, 1).expand_as(block_peak), block_peak, "amax")
    weights = torch.exp(scores - peak.index_select(0, owner).unsqueeze(-1))
    total = qg.new_zeros((batch, num_kv_heads, group)).index_add_(0, owner, weights.sum(-1))
    out = torch.zeros_like(qg).index_add_(0, owner, weights @ values)
    return (out / total.unsqueeze(-1)).reshape(batch, num_heads, head_dim).to(q.dtype)


def top_k_top_p_cutoff(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """The smallest logit each row keeps under top-k, then top-p over the top-k renormalised:
    the k largest, then the smallest head of those whose probability reaches top_p. Returns
    [B] float32, -inf where a row keeps everything (top_k >= vocab and top_p >= 1). Ties with a
    cutoff stay in, at each stage: the sampler keeps the logits >= the cutoff.

    logits [B, V] float32; top_k [B] int64 (>= 1); top_p [B] float32 in (0, 1]; either may be
    None where no row asks for it. This sorts the whole vocabulary, as the Triton kernel avoids."""
    rows, vocab = logits.shape
    if top_k is None:
        top_k = torch.full((rows,), vocab, dtype=torch.int64, device=logits.device)
    if top_p is None:
        top_p = torch.ones(rows, device=logits.device)
    ordered = logits.sort(dim=-1, descending=True).values
    kth_largest = ordered.gather(1, (top_k.unsqueeze(1) - 1).clamp(max=vocab - 1))
    in_top_k = ordered >= kth_largest
    probs = ordered.masked_fill(~in_top_k, float("-inf")).softmax(dim=-1)
    # A token stays while the mass before it is short of top_p: the first always does. At
    # top_p 1 all stay, though the float32 mass before the last ones may round up to 1.
    mass_before = probs.cumsum(dim=-1) - probs
    kept = in_top_k & ((mass_before < top_p.unsqueeze(1)) | (top_p >= 1).unsqueeze(1))
    cutoff = ordered.gather(1, (kept.sum(dim=-1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
    return cutoff.masked_fill((top_k >= vocab) & (top_p >= 1), float("-inf"))
