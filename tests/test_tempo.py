"""Tempo-style service-gain scheduling: request kinds, the output-length upper bound, the
policies' gain-density choices against brute force, DAG calls in the simulator and the service
metrics."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos.bench import DEFAULT_TRACE
from kairos.scheduler import DECODE_POLICIES, PREFILL_POLICIES
from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.metrics import service_metrics
from kairos.scheduler.request import RequestSLO
from kairos.scheduler.simulator import SimConfig, Simulator
from kairos.scheduler.tempo import TempoDecode, TempoPrefill
from kairos.scheduler.traces import load_azure, mixed, shape, with_slos

COST = CostModel(prefill=(0.005, 2e-5, 3e-10), decode=(0.006, 2e-5, 4e-8))


@dataclass
class Req:
    """A request as the policies see it."""

    arrival_time: float
    slo: RequestSLO
    prompt: int = 100
    num_output_tokens: int = 0
    max_tokens: int = 100
    num_uncomputed_tokens: int = field(default=-1)
    first_token_time: float = 0.0

    def __post_init__(self):
        if self.num_uncomputed_tokens < 0:
            self.num_uncomputed_tokens = self.prompt

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.num_output_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt


def test_request_kinds_are_checked_where_slos_are():
    assert RequestSLO().kind == "latency"
    RequestSLO(kind="throughput", deadline_ms=5000)
    RequestSLO(kind="collective", deadline_ms=5000, dag_id="agent-7", dag_stage=2)
    for bad, message in [({"kind": "batch"}, "kind must be one of"),
                         ({"kind": "throughput"}, "needs deadline_ms"),
                         ({"kind": "collective", "deadline_ms": 10}, "needs a dag_id"),
                         ({"deadline_ms": -1}, "deadline_ms must be between"),
                         ({"dag_stage": -1}, "dag_stage must be")]:
        with pytest.raises(ValueError, match=message):
            RequestSLO.from_dict(bad)
    assert "tempo" in PREFILL_POLICIES and "tempo" in DECODE_POLICIES


@settings(max_examples=200, deadline=None)
@given(jobs=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 400)), min_size=1, max_size=7))
def test_tempo_prefill_keeps_the_most_gain_brute_force_can_find(jobs):
    """Prompts of one step each (unit work): the walk keeps a set of on-time prompts whose gain
    no other on-time set beats, checked against every subset."""
    cost = CostModel(prefill=(0.0, 1e-3, 0.0), decode=COST.decode)  # 100 tokens: 0.1 s, one step
    policy = TempoPrefill(cost, token_budget=100)
    reqs = [Req(0.0, RequestSLO(ttft_ms=steps * 100 + 50), max_tokens=gain) for steps, gain in jobs]

    def on_time(subset) -> bool:  # earliest deadline first meets every deadline
        ordered = sorted(subset, key=lambda r: r.slo.ttft_s)
        return all(0.1 * (i + 1) <= r.slo.ttft_s for i, r in enumerate(ordered))

    def tokens(subset) -> int:
        return sum(policy.service.gain(r) for r in subset)

    best = max(tokens(s) for n in range(len(reqs) + 1) for s in itertools.combinations(reqs, n) if on_time(s))
    kept, _ = policy.split(reqs, now=0.0)
    assert on_time(kept) and tokens(kept) == best


def test_tempo_prefill_puts_overdue_prompts_last_oldest_first():
    """A prompt whose first token is already overdue gains nothing however dense it is: it may
    not go ahead of a late prompt that can still gain, and overdue ones keep arrival order."""
    cost = CostModel(prefill=(0.0, 1e-3, 0.0), decode=COST.decode)  # 100 tokens: 0.1 s, one step
    policy = TempoPrefill(cost, token_budget=100)
    overdue_dense = Req(0.5, RequestSLO(ttft_ms=100), prompt=10, max_tokens=400)
    overdue_old = Req(0.1, RequestSLO(ttft_ms=100), prompt=10, max_tokens=5)
    kept = Req(1.0, RequestSLO(ttft_ms=150), max_tokens=50)
    late_but_possible = Req(1.0, RequestSLO(ttft_ms=160), max_tokens=10)  # loses the one step to `kept`
    on_time, late = policy.split([overdue_dense, late_but_possible, overdue_old, kept], now=1.0)
    assert on_time == [kept]
    assert late == [late_but_possible, overdue_old, overdue_dense]


def test_tempo_decode_takes_the_densest_and_lets_requests_with_time_to_spare_wait():
    policy = TempoDecode(COST, max_batch=2)
    chat = Req(0.0, RequestSLO(ttft_ms=500, tpot_ms=50), max_tokens=10, num_output_tokens=1)
    big = Req(0.0, RequestSLO(kind="throughput", deadline_ms=60_000), max_tokens=400, num_output_tokens=1)
    small = Req(0.0, RequestSLO(kind="throughput", deadline_ms=60_000), max_tokens=20, num_output_tokens=1)
    feasible, lost = policy.split([big, small, chat], [], now=0.0)
    # Gain over tokens left: the chat's 10 over 9, the small one's 20 over 19, the big one's 400 over 399.
    assert feasible == [chat, small, big] and not lost
    late = Req(0.0, RequestSLO(kind="throughput", deadline_ms=100), max_tokens=400, num_output_tokens=1)
    _, lost = policy.split([late], [], now=0.0)
    assert lost == [late]  # 400 tokens cannot come in 0.1 s
    # A throughput request with a minute to go tolerates slow steps; a chat one bounds them.
    assert policy.step_limit(big, lost=False) > policy.step_limit(chat, lost=False) == pytest.approx(0.045)


def test_a_dags_calls_go_one_after_another_and_its_gain_counts_once_it_ends_in_time():
    trace = with_slos(shape(load_azure(DEFAULT_TRACE), 3.0, duration_s=300), 1000.0, 100.0)
    mix = mixed(trace, throughput_share=0.2, collective_share=0.2, seed=1)
    roots = {r.slo.dag_id for r in mix if r.slo.kind == "collective" and r.after is None}
    assert roots and all(3 <= sum(q.slo.dag_id == dag for q in mix) <= 8 for dag in roots)
    for pair in ("fcfs+cb", "tempo+tempo"):
        requests = Simulator(SimConfig(prefill_policy=pair.split("+")[0], decode_policy=pair.split("+")[1]),
                             COST).run(mix)
        assert all(not math.isnan(r.finish_time) for r in requests)
        for r in requests:
            if r.trace.after is not None:
                before = requests[r.trace.after]
                assert r.arrival_time >= before.finish_time and r.slo.dag_id == before.slo.dag_id
        report = service_metrics(requests)
        assert report["requests_by_kind"]["collective"] == len(roots)
        assert 0 < report["service_goodput_tok_s"]


def test_service_metrics_count_tokens_in_time_and_nothing_for_early_finishes():
    def done(arrival, first, finish, out, slo, dag_start=0.0):
        return type("R", (), {"arrival_time": arrival, "first_token_time": first, "finish_time": finish,
                              "output_len": out, "slo": slo, "dag_start": dag_start, "refused": False})()

    dag = {"kind": "collective", "dag_id": "d"}
    requests = [done(0, 0.5, 1.4, 10, RequestSLO()),  # latency, met: 10 tokens
                done(0, 2.0, 3.0, 10, RequestSLO()),  # TTFT missed
                done(0, 0.1, 0.2, 30, RequestSLO(kind="throughput", deadline_ms=100_000)),  # early: 30, no more
                done(0, 1.0, 9.0, 50, RequestSLO(kind="throughput", deadline_ms=5_000)),  # late
                done(0, 0.1, 1.0, 5, RequestSLO(**dag, deadline_ms=4000)),
                done(1.5, 1.6, 3.5, 7, RequestSLO(**dag, deadline_ms=2500, dag_stage=1))]  # DAG ends at 3.5 < 4
    report = service_metrics(requests)
    assert report["service_gain_tokens"] == 10 + 30 + 12
    assert report["attainment_by_kind"] == {"collective": 1.0, "latency": 0.5, "throughput": 0.5}
    assert report["slo_goodput_req_s"] == pytest.approx(4 / 9.0)


def test_every_prefill_worker_learns_the_output_lengths_as_the_decode_side_does():
    """Tempo's prefill ranks a throughput request by when its output must start, from its
    predicted length: with max_tokens far above the lengths, a prefill policy that never learned
    them would take every such request to need all of max_tokens."""
    trace = with_slos(shape(load_azure(DEFAULT_TRACE), 3.0, duration_s=120), 1000.0, 100.0)
    mix = mixed(trace, throughput_share=0.3, collective_share=0.0, seed=2)
    sim = Simulator(SimConfig(prefill_workers=2, prefill_policy="tempo", decode_policy="tempo", max_tokens=4096), COST)
    requests = sim.run(mix)
    seen = [w.policy.service.predictor.lengths_by_key()[()] for w in sim.prefills]
    assert seen[0] == seen[1] == sorted(r.output_len for r in requests)[-len(seen[0]):]
    fresh = SimpleNamespace(slo=RequestSLO(kind="throughput", deadline_ms=60_000), num_prompt_tokens=1000,
                            num_output_tokens=0, max_tokens=4096)
    assert sim.prefills[1].policy.service.remaining(fresh) < 1000
