"""RequestQueue: a list of requests whose numbers it keeps as columns. Under any mix of appends,
inserts and removals, and in the engine's own queues through preemptions and overlapped steps,
the columns say what the requests themselves say; a sequence preempted with its token still on
the device is held back from prefill until the token is known."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_native import queue as random_requests

from kairos.engine import LLM, SamplingParams
from kairos.engine.block_manager import BlockManager
from kairos.engine.sequence import Sequence
from kairos.engine.step_scheduler import StepScheduler
from kairos.scheduler.request_queue import FLOAT_FIELDS, INT_FIELDS, GatheredColumns, RequestQueue, columns_of


def assert_columns_match(requests) -> None:
    """The columns a policy would read for `requests` equal those gathered from them now."""
    kept, gathered = columns_of(requests), GatheredColumns(list(requests))
    assert kept is not gathered
    for name in FLOAT_FIELDS + INT_FIELDS:
        if name != "class_code":
            assert getattr(kept, name).tolist() == getattr(gathered, name).tolist(), name
    assert [kept.class_names[c] for c in kept.class_code] == [r.slo.request_class for r in requests]


def test_columns_follow_every_change():
    rng = random.Random(0)
    pool = random_requests(rng, 400)
    queue, mirror, largest = RequestQueue(), [], 0
    for step in range(600):
        outside = [r for r in pool if all(r is not q for q in mirror)]
        op = rng.random() * (0.8 if step < 300 else 1.0)  # it grows first, then shrinks too
        if op < 0.5 and outside:
            r = rng.choice(outside)
            queue.append(r)
            mirror.append(r)
        elif op < 0.7 and outside:
            r, at = rng.choice(outside), rng.randrange(-3, len(mirror) + 3)
            queue.insert(at, r)
            mirror.insert(at, r)
        elif op < 0.9 and mirror:
            r = rng.choice(mirror)
            queue.remove(r)
            mirror.remove(r)
        elif mirror:
            # Both ways of removing many: a few searched for, or a pass over the queue.
            gone = rng.sample(mirror, min(len(mirror), rng.choice([1, 3, rng.randrange(1, 60)])))
            queue.remove_all(gone)
            mirror = [r for r in mirror if all(r is not g for g in gone)]
        assert list(queue) == mirror and len(queue) == len(mirror)
        assert_columns_match(queue)
        largest = max(largest, len(mirror))
    assert largest > 64  # the queue grew past its first capacity


def test_removing_what_is_not_queued_raises_and_removes_nothing():
    a, b, c = random_requests(random.Random(1), 3)
    queue = RequestQueue([a, b])
    for gone in ([c], [a, c], [a, a]):
        with pytest.raises(ValueError):
            queue.remove_all(gone)
        assert list(queue) == [a, b]
    assert_columns_match(queue)


def test_class_names_stay_bounded_as_clients_name_new_classes():
    rng = random.Random(2)
    queue = RequestQueue()
    for i in range(2000):
        r = random_requests(rng, 1)[0]
        object.__setattr__(r.slo, "request_class", f"class-{i}")  # a name no one sends twice
        queue.append(r)
        if len(queue) > 10:
            queue.remove(queue[rng.randrange(len(queue))])
    assert len(queue.columns.class_names) <= 2 * len(queue) + 65
    assert_columns_match(queue)


def test_a_snapshot_puts_the_front_first_and_leaves_out_what_is_skipped():
    rng = random.Random(3)
    queued, front = random_requests(rng, 50), random_requests(rng, 4)
    object.__setattr__(front[0].slo, "request_class", "only in the front")
    queue = RequestQueue(queued)
    skip = queued[::7]
    snapshot = queue.snapshot(front, skip)
    assert list(snapshot) == front + [r for r in queued if all(r is not s for s in skip)]
    assert_columns_match(snapshot)
    assert columns_of(queue.snapshot()) is not None and list(queue.snapshot()) == queued


def test_the_engines_queues_hold_their_sequences_numbers_through_preemption_and_overlap():
    llm = LLM("tiny", overlap="on", num_kv_blocks=16, max_model_len=256)
    g = np.random.default_rng(0)
    for n in g.integers(5, 60, size=8):
        llm.add_request(g.integers(2, 512, size=n).tolist(), SamplingParams(max_tokens=40, temperature=0,
                                                                               ignore_eos=True))
    sched = llm.scheduler
    schedule = sched.schedule

    def checked_schedule():
        assert_columns_match(sched.waiting)
        return schedule()

    sched.schedule = checked_schedule
    while llm.has_unfinished():
        llm.step()
    assert sched.num_preemptions > 0


def test_a_sequence_preempted_with_a_token_on_the_device_waits_for_it():
    sched = StepScheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    seq = Sequence([5, 6, 7, 8, 9], SamplingParams(max_tokens=8, temperature=0))
    sched.add(seq)
    step = sched.schedule()
    sched.advance(step, [0])  # its first token is sampled, not yet read
    sched._preempt(seq)
    assert sched.awaiting_token == {seq} and sched.schedule() is None
    assert_columns_match(sched.waiting)
    sched.resolve(step, [11])
    assert not sched.awaiting_token
    again = sched.schedule()
    # The prompt and its token recompute, past the block the prefix cache kept.
    assert again.seqs == [seq] and len(seq) == 6 and again.num_new_tokens == [6 - 4]
