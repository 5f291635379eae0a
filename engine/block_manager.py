"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and prefix caching.

A block that is full is identified by a hash chained over every token up to its end, so equal
hashes mean equal prefixes. Freed blocks keep their hash and stay findable until they are
handed out again (least recently freed first), so a later request with the same prefix can
reuse them without recomputing.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from kairos.engine.sequence import PENDING, Sequence


def chain_hash(prev_hash: bytes, token_ids) -> bytes:
    return hashlib.blake2b(prev_hash + array("q", token_ids).tobytes(), digest_size=16).digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def match_prefix(self, seq: Sequence) -> int:
        """Attaches cached blocks for the longest cached prefix of a sequence that holds no
        blocks yet, and returns how many tokens they cover. The last token is never served
        from the cache: its logits are needed."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        h = b""
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(h, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int, register: bool = True) -> None:
        """Gives the sequence blocks for its next num_new_tokens tokens, and registers the hash
        of every block those tokens fill (their K/V is written in the same step). Not with
        `register` False: blocks reserved for KV that arrives later (`register_filled` then)."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free):
            raise RuntimeError("allocate() without enough free blocks; check can_allocate() first")
        for _ in range(needed):
            block_id = next(iter(self.free))
            self._evict_hash(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        if register:
            bs = self.block_size
            first_full = seq.num_computed_tokens // bs
            last_full = (seq.num_computed_tokens + num_new_tokens) // bs
            for i in range(first_full, last_full):
                self.register_block(seq, i)

    def register_filled(self, seq: Sequence) -> None:
        """Registers every full block of the sequence's computed tokens: KV written into its
        reserved blocks from elsewhere (a prefill worker's) is now there to match."""
        for i in range(seq.num_computed_tokens // self.block_size):
            self.register_block(seq, i)

    def free_sequence(self, seq: Sequence) -> None:
        # Tail blocks go back first, so they are reused before the (more shareable) head blocks.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def register_block(self, seq: Sequence, index: int) -> None:
        """Makes a sequence's full block findable by its prefix hash, once every token in it is
        known (a token sampled by a step still on the device is not) and so is the hash of the
        block before it."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[seq.block_table[index]]
        if block.hash is not None:
            return  # a prefix hit, already registered
        bs = self.block_size
        prev = self.blocks[seq.block_table[index - 1]].hash if index else b""
        tokens = tuple(seq.token_ids[index * bs : (index + 1) * bs])
        if prev is None or PENDING in tokens:
            return
        block.token_ids = tokens
        block.hash = chain_hash(prev, tokens)
        self.cached[block.hash] = block.block_id

    def forget_blocks(self, block_ids) -> None:
        """Makes these blocks unfindable by prefix: a step that was to write their KV failed."""
        for block_id in block_ids:
            self._evict_hash(block_id)

    def forget_prefixes(self) -> None:
        """Drops every cached prefix (blocks in use keep their KV, and are no longer matched)."""
        for block_id in list(self.cached.values()):
            self._evict_hash(block_id)

    def _evict_hash(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids = None, ()
