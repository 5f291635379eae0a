"""A step's integer inputs, built with a few array operations and moved to the device in one copy.

Every input of a step (token ids, positions, KV slots, sequence offsets, block tables) is int32
and lives in one packed buffer: numpy fills a pinned host copy, one non-blocking copy moves it,
and the model reads views into the device copy. Decode keeps one buffer for the whole run, so
that its device views can be the fixed inputs of CUDA graphs; padding rows of a graph's bucket
store nothing (slot -1) and read one token of block 0.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from kairos.engine.context import AttentionContext
from kairos.engine.sequence import Sequence

ALIGN = 16  # elements: every part starts 64-byte aligned, as Triton specializes kernels on it


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def block_table_array(seqs: list[Sequence], width: int | None = None) -> np.ndarray:
    """The sequences' block tables as one [len(seqs), width] int32 array, -1 past each end."""
    lengths = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max(initial=0)) if width is None else width
    table = np.full((len(seqs), width), -1, dtype=np.int32)
    filled = np.arange(width) < lengths[:, None]
    table[filled] = np.fromiter(chain.from_iterable(s.block_table for s in seqs), dtype=np.int32,
                                count=int(lengths.sum()))
    return table


def slots_of(table: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """KV slot of each token: its sequence's block (row of table) holding the position."""
    return table[rows, positions // block_size] * block_size + positions % block_size


class PackedBuffer:
    """A pinned host buffer and its device twin, of int32. `upload(n)` copies the first n.

    The host side may be rewritten for the next step only once the last upload has left it:
    with overlapped steps, that upload can still be queued behind the step before."""

    def __init__(self, size: int, device: torch.device):
        self.device = device
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=on_cuda)
        self.array = self.host.numpy()
        self.device_buffer = torch.zeros(size, dtype=torch.int32, device=device) if on_cuda else self.host
        self.uploaded = torch.cuda.Event() if on_cuda else None

    def wait_writable(self) -> None:
        if self.uploaded is not None:
            self.uploaded.synchronize()

    def upload(self, n: int) -> None:
        if self.device_buffer is not self.host:
            self.device_buffer[:n].copy_(self.host[:n], non_blocking=True)
            self.uploaded.record()


class DecodeInputs:
    """Persistent decode inputs for up to max_batch sequences of up to max_blocks blocks each.

    Layout: ids | positions | slots | context lengths | sources (max_batch each) | block tables
    (max_batch x max_blocks), so that a batch of b rows is one copy of the head of the buffer.
    A row whose input token is still pending on the device (its step overlapped the last one)
    names a source: the row of the last step's sampled ids (`sampled`) to read it from."""

    PARTS = 5

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device: torch.device):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.stride = _aligned(max_batch)
        head = self.PARTS * self.stride
        self.buffer = PackedBuffer(head + max_batch * max_blocks, device)
        self.ids, self.positions, self.slots, self.context_lens, self.sources = (
            self.buffer.array[i * self.stride : i * self.stride + max_batch] for i in range(self.PARTS))
        self.tables = self.buffer.array[head:].reshape(max_batch, max_blocks)
        dev = self.buffer.device_buffer
        self.device_ids, self.device_positions, self.device_slots, self.device_context_lens, self.device_sources = (
            dev[i * self.stride : i * self.stride + max_batch] for i in range(self.PARTS))
        self.device_tables = dev[head:].view(max_batch, max_blocks)
        self.sampled = torch.zeros(max_batch, dtype=torch.int32, device=device)

    def keep_sampled(self, token_ids: torch.Tensor) -> None:
        """Holds a decode step's sampled ids on the device, for the next step's pending inputs."""
        self.sampled[: len(token_ids)].copy_(token_ids)

    def fill(self, seqs: list[Sequence], rows: int) -> None:
        """Writes the step of these sequences, padded to `rows` rows, and copies it to the device."""
        n = len(seqs)
        self.buffer.wait_writable()
        lengths = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=n)
        self.ids[:n] = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int32, count=n)
        self.sources[:n] = np.fromiter((s.pending_row if s.num_pending else -1 for s in seqs), dtype=np.int32, count=n)
        self.positions[:n] = lengths - 1
        self.context_lens[:n] = lengths
        # Only the columns some sequence uses: the kernels never read a row past its length.
        table = block_table_array(seqs)
        self.tables[:n, : table.shape[1]] = table
        self.slots[:n] = slots_of(self.tables, np.arange(n), lengths - 1, self.block_size)
        # Padding: token 0 at position 0, stored nowhere, attending to one token of block 0.
        self.ids[n:rows] = self.positions[n:rows] = 0
        self.sources[n:rows] = -1
        self.slots[n:rows] = -1
        self.context_lens[n:rows] = 1
        self.tables[n:rows, 0] = 0
        self.buffer.upload(self.PARTS * self.stride + rows * self.max_blocks)

    def forward_args(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        """The first `rows` rows on the device: ids, positions and the attention context. A row
        whose token is pending reads it from the last step's sampled ids, on the device and in
        stream order after that step, so the host never waits for it; a CUDA graph captures
        this gather with the forward pass."""
        sources = self.device_sources[:rows]
        ids = torch.where(sources >= 0, self.sampled[sources.clamp(min=0)], self.device_ids[:rows])
        ctx = AttentionContext(is_prefill=False, slot_mapping=self.device_slots[:rows],
                               block_tables=self.device_tables[:rows], context_lens=self.device_context_lens[:rows])
        return ids, self.device_positions[:rows], ctx


class PrefillInputs:
    """Packed inputs of one prefill step; the host buffer grows to the largest step seen."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = PackedBuffer(0, device)

    def build(self, seqs: list[Sequence], num_new_tokens: list[int], block_size: int,
              logit_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        """ids, positions, context and the rows whose logits are wanted, on the device."""
        n_seqs = len(seqs)
        self.buffer.wait_writable()
        computed = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=n_seqs)
        counts = np.asarray(num_new_tokens, dtype=np.int64)
        total = int(counts.sum())
        cu_q = np.concatenate(([0], np.cumsum(counts)))
        cu_k = np.concatenate(([0], np.cumsum(computed + counts)))
        rows = np.repeat(np.arange(n_seqs), counts)
        positions = np.arange(total) - cu_q[:-1][rows] + computed[rows]
        table = block_table_array(seqs)
        has_prefix = bool(computed.any())
        sizes = [total, total, total, n_seqs + 1, n_seqs + 1, len(logit_rows), table.size if has_prefix else 0]
        offsets = np.cumsum([0] + [_aligned(n) for n in sizes]).tolist()
        self._reserve(offsets[-1])
        parts = [self.buffer.array[a : a + n] for a, n in zip(offsets, sizes)]
        parts[0][:] = np.fromiter(chain.from_iterable(s.token_ids[a : a + c] for s, a, c in
                                                      zip(seqs, computed.tolist(), num_new_tokens)),
                                  dtype=np.int32, count=total)
        parts[1][:] = positions
        parts[2][:] = slots_of(table, rows, positions, block_size)
        parts[3][:], parts[4][:], parts[5][:] = cu_q, cu_k, logit_rows
        if has_prefix:
            parts[6][:] = table.ravel()
        self.buffer.upload(offsets[-1])
        ids, pos, slots, dev_cu_q, dev_cu_k, dev_rows, dev_table = (
            self.buffer.device_buffer[a : a + n] for a, n in zip(offsets, sizes))
        ctx = AttentionContext(is_prefill=True, slot_mapping=slots, cu_seqlens_q=dev_cu_q, cu_seqlens_k=dev_cu_k,
                               max_seqlen_q=max(num_new_tokens),
                               block_tables=dev_table.view(table.shape) if has_prefix else None)
        return ids, pos, ctx, dev_rows

    def _reserve(self, size: int) -> None:
        if size > self.buffer.array.size:
            # A new buffer, never a resized one: the last step's copy may still be reading the old.
            self.buffer = PackedBuffer(max(size, 2 * self.buffer.array.size), self.device)
