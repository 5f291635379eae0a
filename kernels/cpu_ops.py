"""Paged decode attention, and RoPE with the KV store, on the CPU as compiled loops (numba),
with the signatures of `kairos.kernels.reference`.

A decode step on a CPU is bound by the number of ops it dispatches, not by the bytes it reads:
the PyTorch reference takes some twenty ops a layer to gather, score, mask and merge a packed
batch of blocks, and a dozen more to rotate q and k and store k and v.

- `decode_attention` walks each sequence's context slots through the block table, scoring
  every query head against its KV head's key as the slot is read, then takes the softmax and
  the weighted sum of the values: no gather, no padding (a step costs its total context, as
  with the reference), and nothing past a context is read, so whatever lies there (NaN even)
  adds nothing.
- `rope_and_store_kv` rotates each token's q and k in place and stores k and v at its slot
  (slot -1 skipped), rounding as the reference does: the same bits.

The loops run on one thread: a worker on a CPU shares its cores with torch's threads and often
with another worker, and these are a small part of its step. float32 only, the CPU's default
dtype (numba has no half types), over a contiguous KV cache, as the engine's is; anything
else, or a tensor on another device, takes the reference. numba compiles the loops on first
use (cached on disk; the engine's warm-up runs a decode step). Without numba, or with
KAIROS_NUMBA=0, the torch backend keeps to the reference.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from kairos.kernels import reference

ENABLED = os.environ.get("KAIROS_NUMBA", "1") != "0" and importlib.util.find_spec("numba") is not None

def _takes(*tensors: torch.Tensor) -> bool:
    """Whether the loops take these: float32 on the CPU, the KV cache (the last two) contiguous."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and tensors[-1].is_contiguous() and tensors[-2].is_contiguous())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if not _takes(q, k_cache, v_cache):
        return reference.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty(q.shape, dtype=torch.float32)
    # Contiguous arrays and int32 metadata, as the loop's one signature takes them.
    _paged_decode(q.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(),
                  block_tables.to(torch.int32).contiguous().numpy(),
                  context_lens.to(torch.int32).contiguous().numpy(), float(scale), out.numpy())
    return out


def rope_and_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    if not _takes(q, k, v, cos_sin_cache, k_cache, v_cache):
        return reference.rope_and_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
    # q and k are rotated where they lie (views of the packed projection): they keep their strides.
    _rope_store(positions.to(torch.int32).contiguous().numpy(), q.numpy(), k.numpy(), v.numpy(),
                cos_sin_cache.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(),
                slot_mapping.to(torch.int32).contiguous().numpy())


def _compiled(signature: str, fastmath=False):
    """Compiles the loop it decorates with numba, on its first call (cached on disk), for this
    one signature, so that serving never meets a variant the warm-up did not compile."""

    def decorate(loop):
        dispatcher = None

        def call(*args):
            nonlocal dispatcher
            if dispatcher is None:
                from numba import njit

                dispatcher = njit(signature, cache=True, nogil=True, fastmath=fastmath)(loop)
            return dispatcher(*args)

        return call

    return decorate


# The loops index without bounds checks: what they are handed is checked first, so that a bad
# shape, length, block or slot is an error rather than a read or write out of bounds.
#
# q contiguous, the rest too. It sums in any order (its reference's matmuls do too).
@_compiled("void(float32[:, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], int32[:, ::1], int32[::1], "
           "float64, float32[:, :, ::1])", fastmath={"reassoc", "contract"})
def _paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, out):
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    if (num_heads % num_kv_heads or head_dim != k_cache.shape[3] or v_cache.shape != k_cache.shape
            or block_tables.shape[0] < batch or context_lens.shape[0] < batch or out.shape != q.shape):
        raise ValueError("decode attention: q, the KV cache, block tables and context lengths disagree in shape")
    longest = 0
    for seq in range(batch):
        longest = max(longest, context_lens[seq])
        if context_lens[seq] < 1 or context_lens[seq] > block_tables.shape[1] * block_size:
            raise ValueError("decode attention: a context length is outside its block table")
        for j in range((context_lens[seq] + block_size - 1) // block_size):
            if block_tables[seq, j] < 0 or block_tables[seq, j] >= num_blocks:
                raise ValueError("decode attention: a block table names a block outside the KV cache")
    group = num_heads // num_kv_heads
    scale = np.float32(scale)
    # Scratch for the longest context, allocated once per call rather than per sequence.
    weights = np.empty((num_heads, longest), dtype=np.float32)
    totals = np.empty(num_heads, dtype=np.float32)
    acc = np.empty((num_heads, head_dim), dtype=np.float32)
    for seq in range(batch):
        length = context_lens[seq]
        queries = q[seq]
        # Each slot's keys, every KV head's, are read once, for every query head, block by block
        # through the table (no division per slot): a slot holds all its KV heads side by side,
        # and a cache larger than the CPU's caches costs misses per block visited, so one visit
        # serves them all (the tiny model at batch 32, context ~330: 0.6-0.8 ms a layer against
        # 1.6-3.1 with a visit per KV head, on a 2-core x86 CPU).
        for j in range((length + block_size - 1) // block_size):
            block, start = block_tables[seq, j], j * block_size
            for s in range(min(block_size, length - start)):
                for head in range(num_kv_heads):
                    key = k_cache[block, s, head]
                    for g in range(group):
                        h = head * group + g
                        dot = np.float32(0.0)
                        for d in range(head_dim):
                            dot += queries[h, d] * key[d]
                        weights[h, start + s] = dot * scale
        # Softmax as the reference takes it: less the maximum, divided by the sum once the
        # values are summed, in float32 (math.exp would take a double).
        for h in range(num_heads):
            peak = weights[h, :length].max()
            totals[h] = 0
            for t in range(length):
                weights[h, t] = np.exp(weights[h, t] - peak)
                totals[h] += weights[h, t]
        acc[:] = 0
        for j in range((length + block_size - 1) // block_size):
            block, start = block_tables[seq, j], j * block_size
            for s in range(min(block_size, length - start)):
                for head in range(num_kv_heads):
                    value = v_cache[block, s, head]
                    for g in range(group):
                        h = head * group + g
                        weight = weights[h, start + s]
                        for d in range(head_dim):
                            acc[h, d] += weight * value[d]
        for h in range(num_heads):
            out[seq, h] = acc[h] / totals[h]


# q, k and v strided (views of the packed projection) or not. It rounds each product and sum as
# its reference does, so it must not fuse them.
@_compiled("void(int32[::1], float32[:, :, :], float32[:, :, :], float32[:, :, :], float32[:, ::1], "
           "float32[:, :, :, ::1], float32[:, :, :, ::1], int32[::1])")
def _rope_store(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping):
    block_size, half = k_cache.shape[1], q.shape[2] // 2
    tokens = q.shape[0]
    if (q.shape[2] % 2 or cos_sin_cache.shape[1] != q.shape[2] or k.shape[0] != tokens or v.shape != k.shape
            or k.shape[1:] != k_cache.shape[2:] or v_cache.shape != k_cache.shape or k.shape[2] != q.shape[2]
            or positions.shape[0] < tokens or slot_mapping.shape[0] < tokens):
        raise ValueError("RoPE and KV store: q, k, v, the cos/sin table and the KV cache disagree in shape")
    for t in range(tokens):
        if positions[t] < 0 or positions[t] >= cos_sin_cache.shape[0]:
            raise ValueError("RoPE and KV store: a position is outside the cos/sin table")
        if slot_mapping[t] >= k_cache.shape[0] * block_size:
            raise ValueError("RoPE and KV store: a slot is outside the KV cache")
    for t in range(tokens):
        cos = cos_sin_cache[positions[t], :half]
        sin = cos_sin_cache[positions[t], half:]
        for h in range(q.shape[1]):
            for i in range(half):
                x1, x2 = q[t, h, i], q[t, h, half + i]
                q[t, h, i] = x1 * cos[i] - x2 * sin[i]
                q[t, h, half + i] = x2 * cos[i] + x1 * sin[i]
        for h in range(k.shape[1]):
            for i in range(half):
                x1, x2 = k[t, h, i], k[t, h, half + i]
                k[t, h, i] = x1 * cos[i] - x2 * sin[i]
                k[t, h, half + i] = x2 * cos[i] + x1 * sin[i]
        slot = slot_mapping[t]
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = k[t]
            v_cache[slot // block_size, slot % block_size] = v[t]
