"""Triton kernels for the sampler's top-k/top-p filter: the smallest logit each row keeps, found
by radix selection over the logits' bits instead of a sort of the vocabulary.

A sort of [B, 128k] logits is a segmented sort of 16M keys at batch 128, every sampled step.
Selection needs a few passes over each row instead: the logits map to 32-bit keys in the
floats' order, and each pass histograms one digit (4 bits by default) of the keys that share
the digits chosen so far, by count (top-k) or by unnormalised probability (top-p); the highest
digit where the weight from the top reaches the target is kept. Eight passes of 4-bit digits
give the cutoff's key exactly. Every pass splits
each row among many programs (one row alone would leave all but one SM idle), so a pass is a
launch: its programs first choose the last pass's digit from the partial histograms that pass
left, then write their own. Nothing waits for the host. Signature matches
`kairos.kernels.reference.top_k_top_p_cutoff`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kairos.kernels import attention
from kairos.kernels.attention import alloc  # tests poison this module's name for it

BLOCK = 256  # logits a program reads per iteration: 61 registers at 4 warps on sm_90
# Bits a pass selects. Each pass histograms 2**DIGIT_BITS bins: a compare, a select and an add
# per bin and logit. Wider digits mean fewer passes over memory and more instructions in each
# (bench/kernels.py times 2 and 4).
DIGIT_BITS = 4
PROGRAMS_PER_SM = 8  # as registers allow (61 on sm_90)
MIN_BLOCKS_PER_SPLIT = 4
# Tiles a program's loop keeps loading ahead (six in flight on sm_90): a pass reads each row
# once at the copy rate only with enough bytes in flight per SM.
STAGES = tl.constexpr(8)


@triton.jit
def _key(x):
    """float32 -> int64 in [0, 2**32) with the floats' order (negatives have their bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _value(key):
    bits = (key - 2147483648).to(tl.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _target(row, top_k_ptr, top_p_ptr, norm_ptr, num_splits, vocab, BY_MASS: tl.constexpr,
            SPLITS_BLOCK: tl.constexpr):
    """Whether the row selects in this round, the weight to reach, and the softmax peak."""
    if BY_MASS:
        splits = tl.arange(0, SPLITS_BLOCK)
        in_range = splits < num_splits
        peaks = tl.load(norm_ptr + (row * num_splits + splits) * 2, mask=in_range, other=float("-inf"))
        sums = tl.load(norm_ptr + (row * num_splits + splits) * 2 + 1, mask=in_range, other=0.0)
        peak = tl.max(peaks)
        shift_to = tl.where(peak == float("-inf"), 0.0, peak)  # a row that selects nothing has no peak
        total = tl.sum(sums * tl.exp(peaks - shift_to))
        top_p = tl.load(top_p_ptr + row)
        return top_p < 1.0, top_p * total, peak
    top_k = tl.load(top_k_ptr + row)
    return top_k < vocab, top_k.to(tl.float32), 0.0


@triton.jit
def _choose_digit(partial_ptr, row, num_splits, prefix, above, target, BITS: tl.constexpr,
                  SPLITS_BLOCK: tl.constexpr):
    """Extends prefix by the highest digit at which the weight from the top reaches target,
    from the last pass's partial histograms; above: the weight of keys above the prefix's range."""
    splits = tl.arange(0, SPLITS_BLOCK)
    digits = tl.arange(0, 1 << BITS)
    partial = tl.load(partial_ptr + (row * num_splits + splits[:, None]) * (1 << BITS) + digits[None, :],
                      mask=splits[:, None] < num_splits, other=0.0)
    hist = tl.sum(partial, axis=0)
    # Rounding may put the target a hair above what the histogram sums to: the lowest digit
    # holding any weight is then chosen, and the chosen digit always holds some.
    target = tl.minimum(target, above + tl.sum(hist))
    at_or_above = above + tl.sum(hist) - tl.cumsum(hist, 0) + hist  # weight of digits >= d
    digit = tl.max(tl.where(at_or_above >= target, digits, -1))
    return (prefix << BITS) + digit, above + tl.sum(tl.where(digits > digit, hist, 0.0))


# Nothing here specializes on batch-dependent integers or on the alignment of the rows' settings
# (views into one tensor): a new variant would compile mid-serving.
@triton.jit(do_not_specialize=["stride", "vocab", "chunk", "num_splits", "top_k_ptr", "top_p_ptr", "level"])
def _radix_pass_kernel(logits_ptr, stride, vocab, chunk, num_splits, floor_ptr, top_k_ptr, top_p_ptr, norm_ptr,
                       partial_in_ptr, partial_out_ptr, prefix_ptr, above_ptr, level,
                       BY_MASS: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr):
    """Pass `level` over one chunk of a row: chooses the last pass's digit, then histograms the
    next digit of the keys in the chosen range (and >= the row's floor)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    selects, target, peak = _target(row, top_k_ptr, top_p_ptr, norm_ptr, num_splits, vocab, BY_MASS, SPLITS_BLOCK)
    if selects:
        prefix = tl.full((), 0, tl.int64)
        above = tl.full((), 0.0, tl.float32)
        if level > 0:
            prefix = tl.load(prefix_ptr + (level - 1) * tl.num_programs(0) + row)
            above = tl.load(above_ptr + (level - 1) * tl.num_programs(0) + row)
            prefix, above = _choose_digit(partial_in_ptr, row, num_splits, prefix, above, target, BITS,
                                          SPLITS_BLOCK)
        if split == 0:  # the next pass reads the digits chosen so far from here
            tl.store(prefix_ptr + level * tl.num_programs(0) + row, prefix)
            tl.store(above_ptr + level * tl.num_programs(0) + row, above)
        floor = tl.load(floor_ptr + row)
        shift = 32 - BITS * (level + 1)
        cols = tl.arange(0, BLOCK)
        digits = tl.arange(0, 1 << BITS)
        # Per-lane partial histograms, summed once after the loop rather than every iteration.
        partial = tl.zeros((1 << BITS, BLOCK), tl.float32)
        start = split * chunk
        for offset in tl.range(start, tl.minimum(start + chunk, vocab), BLOCK, num_stages=STAGES):
            offs = offset + cols
            in_row = offs < vocab  # the loop ends at the chunk's end, a multiple of BLOCK
            x = tl.load(logits_ptr + row * stride + offs, mask=in_row, other=float("-inf"))
            key = _key(x)
            # Keys under the floor (outside the top k) never count: were they to, a target that
            # rounding puts above the top k's mass could select a cutoff among them.
            live = in_row & (key >= floor) & ((key >> (shift + BITS)) == prefix)
            if BY_MASS:
                weight = tl.where(live, tl.exp(x - peak), 0.0)
            else:
                weight = live.to(tl.float32)
            key_digit = ((key >> shift) & ((1 << BITS) - 1)).to(tl.int32)
            partial += tl.where(digits[:, None] == key_digit[None, :], weight[None, :], 0.0)
        tl.store(partial_out_ptr + (row * num_splits + split) * (1 << BITS) + digits, tl.sum(partial, axis=1))


@triton.jit(do_not_specialize=["stride", "vocab", "chunk", "num_splits", "top_p_ptr"])
def _softmax_parts_kernel(logits_ptr, stride, vocab, chunk, num_splits, floor_ptr, top_p_ptr, norm_ptr,
                          BLOCK: tl.constexpr):
    """Peak and sum of exp(x - peak) over one chunk of a row's logits >= its floor (its top-k);
    -inf and 0 in a row without top-p."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    peak = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32))
    total = tl.sum(tl.zeros((BLOCK,), tl.float32))
    if tl.load(top_p_ptr + row) < 1.0:
        floor = tl.load(floor_ptr + row)
        cols = tl.arange(0, BLOCK)
        start = split * chunk
        for offset in tl.range(start, tl.minimum(start + chunk, vocab), BLOCK, num_stages=STAGES):
            offs = offset + cols
            x = tl.load(logits_ptr + row * stride + offs, mask=offs < vocab, other=float("-inf"))
            x = tl.where(_key(x) >= floor, x, float("-inf"))
            new_peak = tl.maximum(peak, tl.max(x))
            shift_to = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # no -inf - -inf while all is out
            total = total * tl.exp(peak - shift_to) + tl.sum(tl.exp(x - shift_to))
            peak = new_peak
    tl.store(norm_ptr + (row * num_splits + split) * 2, peak)
    tl.store(norm_ptr + (row * num_splits + split) * 2 + 1, total)


@triton.jit(do_not_specialize=["vocab", "num_splits", "top_k_ptr", "top_p_ptr"])
def _finish_kernel(vocab, num_splits, floor_ptr, top_k_ptr, top_p_ptr, norm_ptr, partial_ptr, prefix_ptr,
                   above_ptr, cutoff_ptr, BY_MASS: tl.constexpr, BITS: tl.constexpr, SPLITS_BLOCK: tl.constexpr):
    """Chooses the last digit: the selected key is the row's new floor, and its value the cutoff."""
    row = tl.program_id(0).to(tl.int64)
    selects, target, _ = _target(row, top_k_ptr, top_p_ptr, norm_ptr, num_splits, vocab, BY_MASS, SPLITS_BLOCK)
    floor = tl.load(floor_ptr + row)
    if selects:
        last = (32 // BITS - 1) * tl.num_programs(0) + row  # what the last pass chose
        floor, _ = _choose_digit(partial_ptr, row, num_splits, tl.load(prefix_ptr + last), tl.load(above_ptr + last),
                                 target, BITS, SPLITS_BLOCK)
        tl.store(floor_ptr + row, floor)
    tl.store(cutoff_ptr + row, tl.where(floor > 0, _value(floor), float("-inf")))


def top_k_top_p_cutoff(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                       num_splits: int | None = None, digit_bits: int = DIGIT_BITS) -> torch.Tensor:
    """The reference's signature; a stage no row asks for (None) costs no pass. num_splits
    (programs per row) is derived from the shape and the SM count unless given; digit_bits
    (a divisor of 32) fixes the bits a pass selects: the bench times 2 and 4, as 8 would spill."""
    assert 32 % digit_bits == 0, f"digit_bits must divide 32, not {digit_bits}"
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    rows, vocab = logits.shape
    cutoff = alloc((rows,), torch.float32, logits.device)
    stages = [by_mass for by_mass, setting in ((False, top_k), (True, top_p)) if setting is not None]
    if rows == 0 or not stages:
        return cutoff.fill_(float("-inf"))
    # One wave of programs, each reading at least MIN_BLOCKS_PER_SPLIT tiles: below that, the
    # partial histograms every program reads back outweigh its share of the row.
    programs = PROGRAMS_PER_SM * attention.device_sms(logits)
    max_splits = min(programs, -(-vocab // (MIN_BLOCKS_PER_SPLIT * BLOCK)))
    if num_splits is None:
        num_splits = max(1, min(programs // rows, max_splits))
    chunk = -(-vocab // (num_splits * BLOCK)) * BLOCK
    num_splits = -(-vocab // chunk)
    device = logits.device
    floor = torch.zeros(rows, dtype=torch.int64, device=device)  # keys >= 0: every logit
    norm = torch.empty(rows, num_splits, 2, dtype=torch.float32, device=device)
    passes = 32 // digit_bits
    partials = torch.empty(2, rows, num_splits, 1 << digit_bits, dtype=torch.float32, device=device)
    prefix = torch.empty(passes, rows, dtype=torch.int64, device=device)
    above = torch.empty(passes, rows, dtype=torch.float32, device=device)
    # Sized by the most splits any batch takes, so that one compiled variant serves every batch.
    splits_block = triton.next_power_of_2(max(num_splits, max_splits))
    grid = (rows, num_splits)
    stride = logits.stride(0)
    # A stage's kernels read only its own setting, but a pointer's element type is part of the
    # compiled variant: a setting not given is stood in for by an unread one of its own type.
    top_k = top_k if top_k is not None else torch.empty(1, dtype=torch.int64, device=device)
    top_p = top_p if top_p is not None else torch.empty(1, dtype=torch.float32, device=device)
    for by_mass in stages:  # top-k, then top-p among the top k
        if by_mass:
            _softmax_parts_kernel[grid](logits, stride, vocab, chunk, num_splits, floor, top_p, norm, BLOCK=BLOCK)
        for level in range(passes):
            _radix_pass_kernel[grid](logits, stride, vocab, chunk, num_splits, floor, top_k, top_p, norm,
                                     partials[(level + 1) % 2], partials[level % 2], prefix, above, level,
                                     BY_MASS=by_mass, BITS=digit_bits, BLOCK=BLOCK, SPLITS_BLOCK=splits_block)
        _finish_kernel[(rows,)](vocab, num_splits, floor, top_k, top_p, norm, partials[(passes - 1) % 2], prefix,
                                above, cutoff, BY_MASS=by_mass, BITS=digit_bits, SPLITS_BLOCK=splits_block)
    return cutoff
