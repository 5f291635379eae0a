"""The scheduling policies' compiled array paths (`kairos.scheduler.native`) decide exactly as
their plain-Python paths, on random queues with ties, hints and classes never seen, whether
they read the requests' numbers from a RequestQueue's columns or gather them."""

import random

import numpy as np
import pytest

from kairos.bench.decision_time import Req
from kairos.scheduler import native
from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.decode import SlackBatching
from kairos.scheduler.output_length import NUM_BUCKETS, OutputLengthEstimator, lookup_keys, prompt_bucket
from kairos.scheduler.prefill import KairosPolicy, MooreHodgsonPolicy
from kairos.scheduler.request import RequestSLO
from kairos.scheduler.request_queue import RequestQueue, columns_of

COST = CostModel(prefill=(0.004, 6e-5, 2e-10), decode=(0.008, 3e-5, 1.5e-8))
CLASSES = ["chat", "code", None, "agent"]  # "agent" is never observed


def queue(rng: random.Random, n: int) -> list[Req]:
    out = []
    for _ in range(n):
        arrival = rng.choice([0.0, 0.5, 1.0, rng.uniform(0, 10)])  # many equal arrivals
        prompt = int(rng.lognormvariate(6, 1.2)) + 1
        produced = rng.randrange(0, 300)
        slo = RequestSLO(rng.choice([200, 500, 1000, 3000]), rng.choice([20, 30, 50, 100]), rng.choice(CLASSES),
                         rng.choice([None, None, rng.randrange(1, 600)]))
        out.append(Req(arrival, arrival + rng.uniform(0, 2), slo, rng.choice([prompt, rng.randrange(1, prompt + 1)]),
                       prompt + produced, produced, rng.choice([produced + 1, 256, 1024])))
    return out


def estimator(rng: random.Random) -> OutputLengthEstimator:
    est = OutputLengthEstimator(window=300)
    for _ in range(500):  # few enough that some buckets fall back to their class, and classes to all requests
        est.observe(rng.choice(CLASSES[:3]), int(rng.lognormvariate(6, 1.2)) + 1, int(rng.lognormvariate(5, 1)) + 1)
    return est


def both_ways(monkeypatch, decide):
    monkeypatch.setattr(native, "ENABLED", False)
    plain = decide()
    monkeypatch.setattr(native, "ENABLED", True)
    return plain, decide()


def ids(lists):
    return [[id(r) for r in part] for part in lists]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [native.MIN_REQUESTS, 200, 1000])
def test_decode_ranking_and_admission_match(monkeypatch, seed, n):
    rng = random.Random(seed)
    policy = SlackBatching(COST, 256, estimator(rng))
    running, ready = queue(rng, n), queue(rng, n)
    now = rng.uniform(5, 12)
    queued = RequestQueue(ready)
    plain, compiled = both_ways(monkeypatch, lambda: policy.split(ready, running, now))
    assert ids(plain) == ids(compiled) == ids(policy.split(queued, running, now))
    assert plain[0] and plain[1]  # both feasible and lost requests were ranked
    plain, compiled = both_ways(monkeypatch, lambda: policy.admit(running[:100], ready, now, 100_000))
    assert ids([plain]) == ids([compiled]) == ids([policy.admit(running[:100], queued, now, 100_000)])
    assert plain
    # A fuller batch, where requests about to be lost join past the step limit (see the next test).
    plain, compiled = both_ways(monkeypatch, lambda: policy.admit(running[:200], ready, now, 150))
    assert ids([plain]) == ids([compiled]) == ids([policy.admit(running[:200], queued, now, 150)])


@pytest.mark.parametrize("seed", [0, 2])
def test_admission_past_the_step_limit_matches(monkeypatch, seed):
    rng = random.Random(seed)
    policy = SlackBatching(COST, 256, estimator(rng))
    running, ready = queue(rng, 1000), queue(rng, 1000)
    now = rng.uniform(5, 12)
    within_limit = SlackBatching(COST, 256, policy.estimator, rescue=False)
    plain, compiled = both_ways(monkeypatch, lambda: policy.admit(running[:200], ready, now, 100_000))
    assert ids([plain]) == ids([compiled])
    assert len(plain) > len(within_limit.admit(running[:200], ready, now, 100_000))


@pytest.mark.parametrize("seed", range(4))
def test_remaining_outputs_match_the_estimator(seed):
    rng = random.Random(seed)
    est = estimator(rng)
    reqs = queue(rng, 300)
    for est.quantile in (0.9, 0.5):
        got = native.remaining_of(columns_of(reqs), est)
        want = [est.remaining(r.slo.request_class, r.num_prompt_tokens, r.num_output_tokens, r.max_tokens,
                              r.slo.output_len_hint) for r in reqs]
        assert got.tolist() == want
    levels = {len(est.lengths_by_key().get(k, ())) >= est.min_samples for r in reqs
              for k in lookup_keys(r.slo.request_class, r.num_prompt_tokens)[:2]}
    assert levels == {True, False}  # both a key that answers and one that falls back were met


def test_prompt_buckets_match_over_arrays():
    lengths = np.array([*range(1, 5000), 2**20 - 1, 2**20, 2**31 - 1], dtype=np.int64)
    assert native.prompt_buckets(lengths).tolist() == [prompt_bucket(int(n)) for n in lengths]


@pytest.mark.parametrize("policy_class", [KairosPolicy, MooreHodgsonPolicy])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [native.MIN_REQUESTS, 300, 2000])
def test_prefill_split_matches(monkeypatch, policy_class, seed, n):
    rng = random.Random(seed)
    policy = policy_class(COST, rng.choice([512, 2048, 8192]))
    waiting = queue(rng, n)
    now = rng.uniform(0, 3)
    plain, compiled = both_ways(monkeypatch, lambda: policy.split(waiting, now))
    assert ids(plain) == ids(compiled)
    assert plain[0] and plain[1]
    # As the engine ranks: prompts part-way through ahead of a queue, some of it held back.
    front, queued, held = waiting[:3], RequestQueue(waiting[3:]), waiting[5:n:7]
    rest = [r for r in waiting if all(r is not h for h in held)]
    plain, _ = both_ways(monkeypatch, lambda: policy.split(rest, now))
    assert ids(plain) == ids(policy.split(queued.snapshot(front, held), now))


def test_the_estimator_arrays_follow_new_lengths():
    est = OutputLengthEstimator()
    est.observe("chat", 100, 10)
    assert native._estimator_arrays(est)[2].tolist() == [10, 10, 10]  # its bucket's, its class's, everyone's
    est.observe("chat", 100, 5)
    est.observe("code", 100, 7)
    rows, pools, lengths, starts = native._estimator_arrays(est)
    chat = pools[rows["chat"], NUM_BUCKETS]
    assert lengths[starts[chat]:starts[chat + 1]].tolist() == [5, 10]
    unseen = pools[len(rows), prompt_bucket(100)]
    assert starts[unseen] == starts[unseen + 1] == starts[-1]  # the class never seen: an empty range


def test_the_estimator_arrays_stay_exact_as_keys_change_and_are_forgotten():
    """The arrays are rebuilt from each key's lengths kept as an array until that key changes:
    whatever is observed or forgotten between two builds, every key's range holds its lengths."""
    rng = random.Random(3)
    est = OutputLengthEstimator(window=20, max_keys=12)
    for step in range(300):
        est.observe(rng.choice(CLASSES), rng.choice([10, 100, 1000, 5000]), rng.randrange(1, 500))
        if step % 7 == 0:
            rows, pools, lengths, starts = native._estimator_arrays(est)
            keyed = {}
            for c, row in rows.items():
                keyed[(c,)] = pools[row, NUM_BUCKETS]
                keyed.update({(c, b): pools[row, b] for b in range(NUM_BUCKETS)})
            keyed[()] = pools[0, NUM_BUCKETS + 1]
            built = {k: lengths[starts[i]:starts[i + 1]].tolist() for k, i in keyed.items()}
            assert {k: v for k, v in built.items() if v} == {k: v for k, v in est.lengths_by_key().items() if v}
            assert set(est.key_arrays) <= set(est.lengths_by_key())  # nothing kept of forgotten keys
