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
from kairos.scheduler.output_length import OutputLengthEstimator
from kairos.scheduler.prefill import KairosPolicy, MooreHodgsonPolicy
from kairos.scheduler.request import RequestSLO
from kairos.scheduler.request_queue import RequestQueue

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
    for _ in range(500):
        est.observe(rng.choice(CLASSES[:3]), int(rng.lognormvariate(5, 1)) + 1)
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


@pytest.mark.parametrize("seed", range(4))
def test_remaining_outputs_match_the_estimator(seed):
    rng = random.Random(seed)
    est = estimator(rng)
    reqs = queue(rng, 300)
    class_ids, lengths, starts = native._estimator_arrays(est)
    got = native.remaining_outputs(
        np.array([r.num_output_tokens for r in reqs]), np.array([r.max_tokens for r in reqs]),
        np.array([-1 if r.slo.output_len_hint is None else r.slo.output_len_hint for r in reqs]),
        np.array([class_ids.get(r.slo.request_class, len(class_ids)) for r in reqs]), lengths, starts, est.quantile)
    want = [est.remaining(r.slo.request_class, r.num_output_tokens, r.max_tokens, r.slo.output_len_hint) for r in reqs]
    assert got.tolist() == want


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
    est.observe("chat", 10)
    assert native._estimator_arrays(est)[1].tolist() == [10]
    est.observe("chat", 5)
    est.observe("code", 7)
    class_ids, lengths, starts = native._estimator_arrays(est)
    assert lengths[starts[class_ids["chat"]]:starts[class_ids["chat"] + 1]].tolist() == [5, 10]
    assert starts[-1] == starts[-2] == 3  # the class never seen: an empty range
