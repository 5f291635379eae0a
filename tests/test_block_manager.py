"""Paged KV bookkeeping: reference counts, prefix reuse, and every block coming back."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kairos.engine.block_manager import BlockManager
from kairos.engine.sequence import Sequence
from kairos.scheduler.request import SamplingParams

BS = 4


def seq_of(tokens):
    return Sequence(tokens, SamplingParams(max_tokens=1000, temperature=0))


def admit(bm, seq):
    """What the scheduler does for a new prompt: reuse a cached prefix, then allocate the rest."""
    bm.match_prefix(seq)
    n = seq.num_uncomputed_tokens
    if not bm.can_allocate(seq, n):
        bm.free_sequence(seq)
        return False
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    return True


def check_invariants(bm, live):
    holders = {}
    for seq in live:
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
        assert len(seq.block_table) == -(-seq.num_computed_tokens // BS)
    for block in bm.blocks:
        assert block.ref_count == holders.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in bm.free)
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h


def test_prefix_blocks_are_shared_and_survive_their_owner():
    bm = BlockManager(16, BS)
    a = seq_of(list(range(10)))
    assert admit(bm, a)
    first_two = a.block_table[:2]
    bm.free_sequence(a)  # finished: blocks free but still cached
    assert bm.num_free_blocks == 16
    b = seq_of(list(range(8)) + [99, 98, 97])
    assert admit(bm, b)
    assert b.block_table[:2] == first_two and b.num_cached_tokens == 8
    c = seq_of(list(range(8)) + [5])
    assert admit(bm, c)
    assert c.block_table[:2] == first_two
    assert bm.blocks[first_two[0]].ref_count == 2
    check_invariants(bm, [b, c])


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(16, BS)
    a = seq_of(list(range(8)))
    assert admit(bm, a)
    bm.free_sequence(a)
    again = seq_of(list(range(8)))
    bm.match_prefix(again)
    assert again.num_computed_tokens == 4  # the second block holds the last token: recomputed


def test_reallocating_a_cached_block_forgets_its_hash():
    bm = BlockManager(4, BS)
    a = seq_of(list(range(16)))
    assert admit(bm, a)
    bm.free_sequence(a)
    b = seq_of([7] * 16)  # needs all four blocks: every cached one is recycled
    assert admit(bm, b)
    assert b.num_cached_tokens == 0
    c = seq_of(list(range(16)))
    bm.free_sequence(b)
    bm.match_prefix(c)
    assert c.num_cached_tokens == 0
    check_invariants(bm, [c])


ops = st.lists(
    st.tuples(st.sampled_from(["new", "decode", "finish", "abort", "preempt"]),
              st.integers(0, 10**6)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(6, 24), caching=st.booleans())
def test_any_mix_of_finish_preempt_and_abort_returns_every_block(ops, num_blocks, caching):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    live, waiting = [], []
    for op, r in ops:
        if op == "new":
            # Prompts from a small alphabet and shared openings, so prefixes really collide.
            tokens = [r % 3] * (r % 5) + [(r >> k) % 4 for k in range(1 + r % 13)]
            seq = seq_of(tokens)
            (live if admit(bm, seq) else waiting).append(seq)
        elif op == "decode" and live:
            seq = live[r % len(live)]
            seq.token_ids.append(r % 4)
            if bm.can_allocate(seq, 1):
                bm.allocate(seq, 1)
                seq.num_computed_tokens += 1
            else:
                seq.token_ids.pop()
        elif op in ("finish", "abort") and live:
            bm.free_sequence(live.pop(r % len(live)))
        elif op == "preempt" and live:
            seq = live.pop(r % len(live))
            bm.free_sequence(seq)
            waiting.append(seq)
            if waiting and admit(bm, waiting[0]):
                live.append(waiting.pop(0))
        check_invariants(bm, live)
    for seq in live:
        bm.free_sequence(seq)
    assert bm.num_free_blocks == bm.num_total_blocks
    check_invariants(bm, [])
