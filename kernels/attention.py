"""Triton attention kernels: paged decode (GQA-packed, split-KV) and varlen prefill with a
cached prefix. Signatures match `kernels.reference`."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256
MERGE_SPLITS = 32  # splits the merge combines per iteration


def alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it with NaN to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise round through tf32 on the GPU.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gpu_launch(t: torch.Tensor) -> bool:
    """Whether kernels on t launch on a GPU, with its tiles and SM count, rather than in the
    interpreter (bench/kernel_resources.py compiles a GPU's launches from CPU tensors)."""
    return t.is_cuda


def device_sms(t: torch.Tensor) -> int:
    """SMs of t's GPU, which a launch's grid is sized to fill; 4 in the interpreter."""
    return _num_sms(t.device.index or 0) if _gpu_launch(t) else 4


# Triton compiles a kernel anew for each new specialization of an integer argument (equal to 1,
# divisible by 16, other). The block-table stride (the widest sequence's block count) and the
# split count change from batch to batch, so the kernels leave them unspecialized: otherwise
# serving would meet up to six more variants of a kernel, each a step stalled while it compiles
# (over a second on a GPU).


# ---- decode ---------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(q_ptr, k_cache, v_cache, block_tables, context_lens, out_ptr, part_out, part_lse,
                   stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ob, stride_oh,
                   num_splits, qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr):
    """One (sequence, KV head, split): the GQA group's query heads share every K/V tile. Each
    sequence is split by its own length, so that the launch depends on shapes alone (a CUDA
    graph replays it for any context) and a short sequence in a long batch is split as finely."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens + b)
    # Whole tiles per split, and the compiler told so: it then keeps the loads vectorized.
    tokens_per_split = tl.multiple_of(tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    start = tl.multiple_of(split * tokens_per_split, BLOCK_N)
    end = tl.minimum(start + tokens_per_split, ctx_len)

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # Each tile's pages are read one tile ahead. Were they read in the tile's own iteration, the
    # K/V loads would depend on a load of that iteration, and Triton's pipeliner would divide its
    # stages between the two: num_stages=3 would then keep no K/V tile loading while one is
    # computed (bench/kernel_resources.py reads this off the compiled kernel).
    table = block_tables + b * stride_bt
    cols = start + tl.arange(0, BLOCK_N)
    page = tl.load(table + cols // PAGE, mask=cols < end, other=0).to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = cols < end
        next_cols = cols + BLOCK_N
        next_page = tl.load(table + next_cols // PAGE, mask=next_cols < end, other=0).to(tl.int64)
        kv_off = page * stride_cb + (cols % PAGE) * stride_ct + kv_head * stride_ch
        kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(k_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
        page = next_page

    has_keys = l > 0  # a split past the end of a short sequence saw no keys
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l, 1.0)[:, None], 0.0)
    if DIRECT:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        num_heads = tl.num_programs(1) * GROUP
        part = (b * num_heads + heads) * num_splits + split
        tl.store(part_out + part[:, None] * HEAD_DIM + d[None, :], out, mask=q_mask)
        lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l, 1.0)), float("-inf"))
        tl.store(part_lse + part, lse, mask=rows < GROUP)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(part_out, part_lse, out_ptr, stride_ob, stride_oh, num_splits,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Combines the splits of one (sequence, head) by their log-sum-exp weights, BLOCK_S splits
    at a time: registers stay bounded and one compiled merge serves every split count."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    d = tl.arange(0, BLOCK_D)
    base = (b * num_heads + h) * num_splits
    # Split 0 always holds keys (every context has at least one), so the maximum is finite and
    # the splits that saw none weigh exp2(-inf) = 0.
    lse_max = float("-inf")
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(part_lse + base + splits, mask=splits < num_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(lse, axis=0))
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = 0.0
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        in_range = splits < num_splits
        weights = tl.exp2(tl.load(part_lse + base + splits, mask=in_range, other=float("-inf")) - lse_max)
        parts = tl.load(part_out + (base + splits)[:, None] * HEAD_DIM + d[None, :],
                        mask=in_range[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        acc += tl.sum(parts * weights[:, None], axis=0)
        total += tl.sum(weights, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, (acc / total).to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def decode_num_splits(batch: int, num_kv_heads: int, max_tokens: int, num_sms: int, programs_per_sm: int = 4) -> int:
    """Splits enough for about programs_per_sm programs per SM when the batch alone (a program
    per sequence and KV head) leaves SMs idle, from shapes alone (no host sync, so it is fixed
    under a CUDA graph), never splitting below MIN_TOKENS_PER_SPLIT tokens."""
    programs = batch * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    wanted = triton.cdiv(programs_per_sm * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(max_tokens, MIN_TOKENS_PER_SPLIT)))


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int = 4, num_stages: int = 2):
    """The reference's signature; the keywords after it fix the launch (bench/kernels.py sweeps
    them) rather than derive it from the shapes."""
    batch, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and q.stride(-1) == 1
    group = num_heads // num_kv_heads
    if block_n is None:
        block_n = 64 if page <= 64 else page
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * page, device_sms(q))
    out = alloc(q.shape, q.dtype, q.device)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = alloc((batch, num_heads, num_splits, head_dim), torch.float32, q.device)
        part_lse = alloc((batch, num_heads, num_splits), torch.float32, q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), num_splits, scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=block_n, PAGE=page, DIRECT=direct, PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    if not direct:
        _merge_kernel[(batch, num_heads)](part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
                                          HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MERGE_SPLITS)
    return out


# ---- prefill --------------------------------------------------------------------------------


@triton.jit
def _tile_pages(block_tables, seq, stride_bt, cols, k_len, PAGE: tl.constexpr, PAGED: tl.constexpr):
    """The cache page of each key of a tile (read a tile ahead, as decode does; unused unpaged)."""
    if PAGED:
        return tl.load(block_tables + seq * stride_bt + cols // PAGE, mask=cols < k_len, other=0)
    return cols


@triton.jit
def _load_kv_tile(k_ptr, v_ptr, k_cache, v_cache, page, cols, valid, d, d_mask, kv_head, tok_start, stride_kt,
                  stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, PAGED: tl.constexpr,
                  PAGE: tl.constexpr):
    mask = valid[:, None] & d_mask[None, :]
    if PAGED:
        off = (page.to(tl.int64) * stride_cb + (cols % PAGE) * stride_ct + kv_head * stride_ch)[:, None] + d[None, :]
        return tl.load(k_cache + off, mask=mask, other=0.0), tl.load(v_cache + off, mask=mask, other=0.0)
    tok = (tok_start + cols).to(tl.int64)
    k = tl.load(k_ptr + (tok * stride_kt + kv_head * stride_kh)[:, None] + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + (tok * stride_vt + kv_head * stride_vh)[:, None] + d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _prefill_tile(q, m, l, acc, page, k_ptr, v_ptr, k_cache, v_cache, block_tables, seq, n0, rows, offset, k_len,
                  d, d_mask, kv_head, tok_start, stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct,
                  stride_ch, stride_bt, qk_scale, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Folds the key tile at n0 (its pages given) into the online softmax; returns the state and
    the next tile's pages."""
    cols = n0 + tl.arange(0, BLOCK_N)
    valid = cols < k_len
    next_page = _tile_pages(block_tables, seq, stride_bt, cols + BLOCK_N, k_len, PAGE, PAGED)
    k, v = _load_kv_tile(k_ptr, v_ptr, k_cache, v_cache, page, cols, valid, d, d_mask, kv_head, tok_start,
                         stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, PAGED, PAGE)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where((cols[None, :] <= rows[:, None] + offset) & valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc, next_page


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables, out_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_cb, stride_ct, stride_ch, stride_bt, qk_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, PRECISION: tl.constexpr):
    """One (sequence, query head, tile of BLOCK_M queries), online softmax in base 2. Key tiles
    wholly below the causal diagonal run unmasked; only the tiles it crosses are masked."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    k_len = tl.load(cu_seqlens_k + seq + 1) - tl.load(cu_seqlens_k + seq)
    offset = k_len - q_len  # cached prefix: query i is context position i + offset
    kv_head = head // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row_mask = rows < q_len
    q_off = ((q_start + rows).to(tl.int64) * stride_qt + head * stride_qh)[:, None] + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys before unmasked_end are visible to every row of the tile; up to end, some are.
    unmasked_end = ((tile * BLOCK_M + offset + 1) // BLOCK_N) * BLOCK_N
    end = tl.minimum(k_len, (tile + 1) * BLOCK_M + offset)
    # The first loop's last tile reads the pages of the second loop's first.
    page = _tile_pages(block_tables, seq, stride_bt, tl.arange(0, BLOCK_N), k_len, PAGE, PAGED)
    for n0 in range(0, unmasked_end, BLOCK_N):
        m, l, acc, page = _prefill_tile(q, m, l, acc, page, k_ptr, v_ptr, k_cache, v_cache, block_tables, seq, n0,
                                        rows, offset, k_len, d, d_mask, kv_head, q_start, stride_kt, stride_kh,
                                        stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, stride_bt, qk_scale,
                                        BLOCK_N, PAGE, PAGED, False, PRECISION)
    for n0 in range(unmasked_end, end, BLOCK_N):
        m, l, acc, page = _prefill_tile(q, m, l, acc, page, k_ptr, v_ptr, k_cache, v_cache, block_tables, seq, n0,
                                        rows, offset, k_len, d, d_mask, kv_head, q_start, stride_kt, stride_kh,
                                        stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, stride_bt, qk_scale,
                                        BLOCK_N, PAGE, PAGED, True, PRECISION)

    out = acc / l[:, None]
    o_off = ((q_start + rows).to(tl.int64) * stride_ot + head * stride_oh)[:, None] + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def prefill_attention(q, k, v, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables, scale, max_seqlen_q,
                      block_m: int | None = None, block_n: int | None = None, num_warps: int = 4,
                      num_stages: int = 2):
    """The reference's signature; the keywords after it fix the launch (bench/kernels.py sweeps
    them)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    page = k_cache.shape[1]
    paged = block_tables is not None
    if paged:
        assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    gpu = _gpu_launch(q)
    block_m = block_m or (64 if gpu else 16)
    block_n = block_n or (64 if gpu else 16)
    out = alloc(q.shape, q.dtype, q.device)
    grid = (cu_seqlens_q.shape[0] - 1, num_heads, triton.cdiv(max_seqlen_q, block_m))
    _prefill_kernel[grid](
        q, k, v, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables if paged else cu_seqlens_q, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0) if paged else 0,
        scale * LOG2E,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE=page, PAGED=paged, PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out
