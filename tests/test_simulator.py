"""Trace loading and the discrete-event simulator (pure Python)."""

import json
import math
import random
from dataclasses import replace

import pytest

from kairos.bench import DEFAULT_TRACE
from kairos.scheduler.compare import compare, goodput, simulated_point, table
from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.metrics import metrics
from kairos.scheduler.prefill import PREFILL_POLICIES
from kairos.scheduler.request import RequestSLO
from kairos.scheduler.simulator import SimConfig, Simulator, simulate
from kairos.scheduler.traces import TraceRequest, load_azure, load_mooncake, shape, synthetic, with_slos

COST = CostModel(prefill=(0.005, 2e-5, 3e-10), decode=(0.006, 2e-5, 4e-8))
CONV = DEFAULT_TRACE


def test_the_azure_traces_load_with_their_published_shape():
    trace = load_azure(CONV)
    assert len(trace) == 19366
    assert trace[0].arrival == 0 and all(a.arrival <= b.arrival for a, b in zip(trace, trace[1:]))
    assert 3500 < trace[-1].arrival < 3600  # one hour
    prompts = sorted(r.prompt_len for r in trace)
    assert prompts[len(prompts) // 2] == 1020  # the README's p50


def test_malformed_traces_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt\n1,2\n")
    with pytest.raises(ValueError, match="not an Azure LLM trace"):
        load_azure(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_mooncake(broken)
    for record in ('{"timestamp": NaN, "input_length": 5, "output_length": 3}',
                   '{"timestamp": 1, "input_length": 5, "output_length": 3, "hash_ids": [[1], [2]]}',
                   '{"timestamp": 1, "input_length": 5, "output_length": 3, "hash_ids": "ab"}', "[1, 2]"):
        broken.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n' + record + "\n")
        with pytest.raises(ValueError, match="broken.jsonl:2: not a Mooncake trace record"):
            load_mooncake(broken)
    with pytest.raises(ValueError, match="positive rate"):
        synthetic(10, rate=0.0)


def test_mooncake_traces_carry_shared_prefixes(tmp_path):
    rows = [{"timestamp": 1000 + 10 * i, "input_length": 1500, "output_length": 4, "hash_ids": [7, 8, 100 + i]}
            for i in range(3)]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    trace = load_mooncake(path)
    assert [r.arrival for r in trace] == pytest.approx([0, 0.01, 0.02])
    assert trace[1].hash_ids == (7, 8, 101)


def test_rate_scaling_windows_and_slo_rules():
    trace = [TraceRequest(float(t), 100 * (t + 1), 10) for t in range(10)]
    window = shape(trace, rate_scale=2.0, start_s=2.0, duration_s=4.0)
    assert [r.arrival for r in window] == [0.0, 0.5, 1.0, 1.5]
    slo = with_slos(window, ttft_slo_ms=200, tpot_slo_ms=50, ttft_ms_per_1k_prompt=100)
    assert slo[0].slo.ttft_s == pytest.approx(0.2 + 0.1 * 0.3) and slo[0].slo.tpot_s == 0.05
    with pytest.raises(ValueError, match="no requests"):
        shape(trace, start_s=100)


def test_synthetic_arrivals_have_the_asked_rate_and_burstiness():
    poisson = synthetic(4000, rate=10.0, seed=1)
    gamma = synthetic(4000, rate=10.0, arrival="gamma", burstiness=8.0, seed=1)
    for trace in (poisson, gamma):
        assert trace[-1].arrival / len(trace) == pytest.approx(0.1, rel=0.15)

    def cv2(trace):
        gaps = [b.arrival - a.arrival for a, b in zip(trace, trace[1:])]
        mean = sum(gaps) / len(gaps)
        return sum((g - mean) ** 2 for g in gaps) / len(gaps) / mean**2

    assert cv2(poisson) == pytest.approx(1.0, rel=0.2) and cv2(gamma) > 4


def test_kv_leaves_between_prefill_steps_and_one_link_carries_one_transfer_at_a_time():
    """As in the workers: a prompt's KV is offered as the step that completes it starts, so it
    leaves as that step ends; KV the decode side makes room for later, while the prefill worker
    is busy, leaves when that step ends; and transfers into one decode worker queue on its link."""
    config = SimConfig(kv_bytes_per_token=1000, kv_bandwidth_gb_s=1.0, token_budget=1000)
    transfer = 1000 * 1000 / 1e9
    step = COST.prefill_time([(1000, 1000)])
    # A in the first step, B (arriving during it) in the second: A's KV does not wait for it.
    a, b = Simulator(config, COST).run([TraceRequest(0.0, 1000, 2), TraceRequest(0.001, 1000, 2)])
    assert b.first_token_time == pytest.approx(2 * step)
    assert a.finish_time == pytest.approx(step + transfer + COST.decode_time(1, 1001))
    # Room for one transfer at a time, each longer than a step: B's room frees while C's step
    # runs, and its KV leaves at once from a GPU worker (free while its step runs), as that
    # step ends from a CPU worker.
    slow = replace(config, kv_bandwidth_gb_s=0.02, max_inflight_transfer_bytes=1000 * 1000)
    three = [TraceRequest(0.0, 1000, 2), TraceRequest(0.001, 1000, 2), TraceRequest(0.002, 1000, 2)]
    a, b, c = Simulator(slow, COST).run(three)
    assert step + 50 * transfer == pytest.approx(a.finish_time - COST.decode_time(1, 1001))
    assert b.finish_time == pytest.approx(step + 100 * transfer + COST.decode_time(1, 1001))
    a, b, c = Simulator(replace(slow, kv_sent_during_steps=False), COST).run(three)
    assert b.finish_time == pytest.approx(3 * step + 50 * transfer + COST.decode_time(1, 1001))
    # A and B in one step (after C's, a one-token request with no KV to send), the worker idle
    # after it: both leave at once, one after the other.
    both = SimConfig(kv_bytes_per_token=1000, kv_bandwidth_gb_s=1.0, token_budget=2000)
    _, a, b = Simulator(both, COST).run([TraceRequest(0.0, 1000, 1), TraceRequest(0.001, 1000, 2),
                                         TraceRequest(0.001, 1000, 2)])
    prefilled = step + COST.prefill_time([(1000, 1000), (1000, 1000)])
    assert a.first_token_time == b.first_token_time == pytest.approx(prefilled)
    assert a.finish_time == pytest.approx(prefilled + transfer + COST.decode_time(1, 1001))
    assert b.finish_time > prefilled + 2 * transfer  # behind A's transfer on the link


def test_the_offers_one_step_makes_are_ranked_together():
    """As the decode worker ranks every offer it has taken in when it looks for room: of two
    prompts one step completes, the kairos decode policy moves the shorter output's KV in first,
    though the step computed it second; continuous batching keeps the step's order."""
    transfer = 1000 * 1000 / 1e9
    # A one-token request's step first (no KV to send), so that the other two share the next.
    trace = [TraceRequest(0.0, 1, 1), TraceRequest(0.001, 1000, 50), TraceRequest(0.001, 1000, 2)]
    for decode_policy, short_first in (("kairos", True), ("cb", False)):
        config = SimConfig(kv_bytes_per_token=1000, kv_bandwidth_gb_s=1.0, token_budget=2000,
                           decode_policy=decode_policy)
        _, long, short = Simulator(config, COST).run(trace)
        assert long.first_token_time == short.first_token_time
        alone = short.first_token_time + transfer + COST.decode_time(1, 1001)
        assert (short.finish_time == pytest.approx(alone)) is short_first
        assert short.finish_time >= alone


def test_a_decode_worker_takes_at_most_its_in_flight_limit_of_kv():
    """As `kairos decode --max-inflight-transfer-mb`. A and B share a step; they are offered as
    it starts, and both leave as it ends. With room in flight for one, B is made ready only when
    A lands, by then the worker is in C's step: from a GPU worker B leaves at once, from a CPU
    worker after that step, and C's KV waits for B's in turn, leaving after D's step."""
    config = SimConfig(kv_bytes_per_token=1000, kv_bandwidth_gb_s=1.0, token_budget=2000)
    trace = [TraceRequest(0.0, 1, 1), TraceRequest(0.001, 1000, 2), TraceRequest(0.001, 1000, 2),
             TraceRequest(0.002, 1000, 2), TraceRequest(0.06, 1000, 2)]
    _, a, b, c, d = Simulator(config, COST).run(trace)
    assert a.first_token_time == b.first_token_time < c.first_token_time < d.first_token_time
    assert b.finish_time < c.first_token_time
    one = replace(config, max_inflight_transfer_bytes=1500 * 1000)
    _, a, b, c, d = Simulator(one, COST).run(trace)
    assert a.finish_time < b.finish_time < c.first_token_time < c.finish_time < d.first_token_time
    _, a, b, c, d = Simulator(replace(one, kv_sent_during_steps=False), COST).run(trace)
    assert a.finish_time < c.first_token_time < b.finish_time < d.first_token_time < c.finish_time


def test_requests_are_placed_as_the_router_places_them():
    """Prefill: the worker with the least prompt work queued (two short prompts both go beside
    a long one). Decode: the worker with the fewest requests in hand, chosen on arrival."""
    sim = Simulator(SimConfig(prefill_workers=2, decode_workers=2), COST)
    long, first, second = sim.run([TraceRequest(0.0, 4000, 3), TraceRequest(0.0001, 100, 3),
                                   TraceRequest(0.0002, 100, 3)])
    assert long.source is sim.prefills[0] and first.source is second.source is sim.prefills[1]
    assert long.worker is second.worker is sim.decodes[0] and first.worker is sim.decodes[1]
    assert all(w.queued_prompt_tokens == 0 for w in sim.prefills) and all(d.requests_in_hand == 0 for d in sim.decodes)


def test_decode_kv_grows_by_blocks_and_a_short_step_preempts_the_newest_which_recomputes():
    """As the engine keeps decode KV: a transfer reserves the prompt's block, each sequence takes
    a block when its context crosses a boundary, and with six blocks two sequences growing to
    four each cannot both finish. A (first in) needs its fourth block at step 32, when all six
    are held: B, the newest, gives back its three and waits; A's new block is B's last, partial
    one (the engine frees a sequence's blocks tail first and hands out the longest-free first),
    so B's two full blocks stay in the prefix cache. Once A's finish frees the blocks, B
    recomputes only the 16 tokens past them (of 48: prompt and output so far), in a prefill
    step of its own, then decodes its last 8 tokens alone."""
    config = SimConfig(kv_capacity_tokens=6 * 16, kv_bytes_per_token=1, kv_bandwidth_gb_s=1000.0)
    sim = Simulator(config, COST)
    a, b = sim.run([TraceRequest(0.0, 16, 41), TraceRequest(0.0, 16, 41)])
    decode = sim.decodes[0]
    assert decode.preemptions == 1
    assert decode.used_blocks == 0 and not decode.preempted and not decode.running  # every block back
    assert decode.tokens_out == 2 * 40  # a recomputed sequence's tokens are not counted twice
    alone = sum(COST.decode_time(1, 49 + k) for k in range(8))
    assert b.finish_time - a.finish_time == pytest.approx(COST.prefill_time([(16, 48)]) + alone)
    assert decode.recomputed_tokens == 16
    roomy = Simulator(replace(config, kv_capacity_tokens=8 * 16), COST)
    a2, b2 = roomy.run([TraceRequest(0.0, 16, 41), TraceRequest(0.0, 16, 41)])
    assert roomy.decodes[0].preemptions == 0 and b2.finish_time < b.finish_time


@pytest.mark.parametrize("decode_policy", ["cb", "kairos"])
def test_preemption_under_decode_kv_pressure_leaks_no_block_and_loses_no_token(decode_policy):
    trace = with_slos(synthetic(600, rate=40.0, seed=8), 500, 50)
    config = SimConfig(decode_policy=decode_policy, kv_capacity_tokens=12_000, max_batch=64)
    sim = Simulator(config, COST)
    requests = sim.run(trace)
    assert all(not math.isnan(r.finish_time) for r in requests)
    decode = sim.decodes[0]
    assert decode.preemptions > 0
    assert decode.used_blocks == 0 and not decode.preempted and not decode.running and not decode.ready
    assert decode.tokens_out == sum(r.output_len - 1 for r in requests)


def test_prefill_steps_chunk_as_the_engine_does_and_prompts_hold_kv_until_it_lands():
    """A prompt longer than the budget goes in chunks; FCFS fills a step with part of the next
    prompt, kairos as far as the slack of the prompts the step finishes allows; a prefill
    worker admits no prompt its KV has no room for until an earlier prompt's transfer lands."""
    config = SimConfig(token_budget=1000, kv_bytes_per_token=1000, kv_bandwidth_gb_s=1.0)
    (long,) = Simulator(config, COST).run([TraceRequest(0.0, 2500, 2)])
    chunks = [[(1000, 1000)], [(1000, 2000)], [(500, 2500)]]
    assert long.first_token_time == pytest.approx(sum(COST.prefill_time(c) for c in chunks))
    # A and B arrive while C's step runs, so both wait for the next.
    queued = [TraceRequest(0.0, 100, 2), TraceRequest(0.001, 600, 2, slo=RequestSLO(ttft_ms=5000)),
              TraceRequest(0.001, 600, 2, slo=RequestSLO(ttft_ms=6000))]
    c, a, b = Simulator(config, COST).run(queued)
    first = c.first_token_time + COST.prefill_time([(600, 600), (400, 400)])
    assert a.first_token_time == pytest.approx(first)
    assert b.first_token_time == pytest.approx(first + COST.prefill_time([(200, 600)]))
    kairos = replace(config, prefill_policy="kairos")
    assert [r.first_token_time for r in Simulator(kairos, COST).run(queued)] == pytest.approx(
        [c.first_token_time, a.first_token_time, b.first_token_time])  # slack to spare: it fills as FCFS does
    # A's deadline leaves slack for part of B: the chunk is the most that keeps A in time.
    start, alone = c.first_token_time, COST.prefill_time([(600, 600)])
    deadline = start + alone + 0.5 * (COST.prefill_time([(600, 600), (400, 400)]) - alone)
    most = max(n for n in range(401) if start + COST.prefill_time([(600, 600), (n, n)]) <= deadline)
    tight = [queued[0], replace(queued[1], slo=RequestSLO(ttft_ms=(deadline - 0.001) * 1e3)), queued[2]]
    c, a, b = Simulator(kairos, COST).run(tight)
    assert 0 < most < 400 and a.first_token_time == pytest.approx(start + COST.prefill_time([(600, 600), (most, most)]))
    assert b.first_token_time == pytest.approx(a.first_token_time + COST.prefill_time([(600 - most, 600)]))
    small = replace(config, kv_capacity_tokens=1000)
    a, b = Simulator(small, COST).run([TraceRequest(0.0, 800, 2), TraceRequest(0.0, 800, 2)])
    landed = COST.prefill_time([(800, 800)]) + 800 * 1000 / 1e9
    assert b.first_token_time == pytest.approx(landed + COST.prefill_time([(800, 800)]))


@pytest.mark.parametrize("max_wait_s", [None, 2.0])
@pytest.mark.parametrize("policy", [name for name, cls in PREFILL_POLICIES.items() if cls.demotes_expired])
def test_expired_prompts_kept_aside_change_no_result(policy, max_wait_s):
    """The simulator keeps prompts past their deadline out of the sort of a policy that
    declares it demotes them; under a sustained overload that must give exactly what ranking
    the whole queue every step gives, with a wait limit too."""
    class RanksEverything(Simulator):
        def prefill_order(self, w):
            return w.policy.order(w.prefilling + w.waiting, self.now)

    trace = with_slos(synthetic(3000, rate=100.0, seed=5), ttft_slo_ms=500, tpot_slo_ms=100)
    config = SimConfig(prefill_policy=policy, decode_policy="kairos", kv_capacity_tokens=100_000,
                       max_prefill_wait_s=max_wait_s)
    fast, full = Simulator(config, COST).run(trace), RanksEverything(config, COST).run(trace)
    assert [(r.first_token_time, r.finish_time) for r in fast] == [(r.first_token_time, r.finish_time) for r in full]
    assert metrics(fast)["ttft_attainment"] < 0.6  # an overload: many prompts expire waiting


def test_a_wait_limit_bounds_demoted_prompts_under_closed_loop_clients():
    """100 clients, each sending its next request as its last one ends, keep the prefill queue
    full of prompts still in time, so a prompt kairos demoted waits until the load stops; with
    --max-prefill-wait-s every first token comes within about the limit, while more deadlines
    are met than first come, first served meets."""
    base = synthetic(1000, rate=1.0, seed=3)
    trace = [replace(r, arrival=i // 10 * 0.01 if i % 10 == 0 else 0.0, after=None if i % 10 == 0 else i - 1,
                     slo=RequestSLO(500, 100)) for i, r in enumerate(base)]

    def run(policy: str, max_wait_s: float | None) -> tuple[float, float]:
        config = SimConfig(prefill_policy=policy, kv_capacity_tokens=400_000, max_prefill_wait_s=max_wait_s)
        requests = Simulator(config, COST).run(trace)
        return metrics(requests)["ttft_attainment"], max(r.first_token_time - r.arrival_time for r in requests)

    (fcfs, _), (unbounded, longest), (bounded, longest_bounded) = run("fcfs", None), run("kairos", None), \
        run("kairos", 3.0)
    assert longest > 6.0 and longest_bounded < 3.0 + 1.0
    assert unbounded > bounded > fcfs + 0.1


def test_one_request_alone_takes_exactly_the_modelled_time():
    r = TraceRequest(0.0, 1000, 5, slo=RequestSLO(1000, 100))
    config = SimConfig(kv_bytes_per_token=1000, kv_bandwidth_gb_s=1.0)
    requests = Simulator(config, COST).run([r])
    ttft = COST.prefill_time([(1000, 1000)])
    transfer = 1000 * 1000 / 1e9
    steps = sum(COST.decode_time(1, 1001 + k) for k in range(4))
    assert requests[0].first_token_time == pytest.approx(ttft)
    assert requests[0].finish_time == pytest.approx(ttft + transfer + steps)


def test_step_jitter_spreads_step_times_around_the_model_and_the_policies_learn_it():
    trace = [TraceRequest(10.0 * i, 1000, 1, slo=RequestSLO(1000, 100)) for i in range(2000)]
    sim = Simulator(SimConfig(prefill_jitter=0.2, decode_jitter=0.2, prefill_policy="kairos"), COST)
    ratios = [(r.first_token_time - r.arrival_time) / COST.prefill_time([(1000, 1000)]) for r in sim.run(trace)]
    mean = sum(ratios) / len(ratios)
    assert mean == pytest.approx(1.0, abs=0.03)
    assert sum(abs(x - mean) for x in ratios) / len(ratios) == pytest.approx(0.2, abs=0.03)
    ratio, spread = sim.prefills[0].model.drift["prefill"]
    assert ratio == pytest.approx(1.0, abs=0.15) and spread == pytest.approx(0.2, abs=0.08)
    steady = Simulator(SimConfig(), COST)
    steady.run(trace[:5])
    assert steady.prefills[0].model is COST  # no jitter: the policies predict with the model itself
    with pytest.raises(ValueError, match="jitter"):
        Simulator(SimConfig(decode_jitter=-0.1), COST)


def test_co_located_workers_slow_each_others_steps_while_both_are_busy():
    """A's prefill step runs alone (1 s); B's starts as A's KV leaves, and runs 1.5x slower from
    the moment A starts decoding beside it (its pace changes mid-step); A's decode steps run 2x
    slower while B's prefill runs, then at their own pace: 1.5 s of B's step carries 0.75 s of
    A's decode, and the 1.24 s left of it follows."""
    cost = CostModel(prefill=(0.0, 1e-3, 0.0), decode=(0.01, 0.0, 0.0))
    trace = [TraceRequest(0.0, 1000, 200), TraceRequest(0.0, 1000, 2)]
    alone = SimConfig(token_budget=1000, kv_bytes_per_token=1, kv_bandwidth_gb_s=1000.0)
    a, b = Simulator(alone, cost).run(trace)
    assert b.first_token_time == pytest.approx(2.0) and a.finish_time == pytest.approx(1.0 + 199 * 0.01)
    shared = replace(alone, prefill_beside_decode=1.5, decode_beside_prefill=2.0)
    sim = Simulator(shared, cost)
    a, b = sim.run(trace)
    assert b.first_token_time == pytest.approx(1.0 + 1.5, abs=1e-6)
    assert a.finish_time == pytest.approx(2.5 + (199 * 0.01 - 1.5 / 2), abs=1e-6)
    assert a.first_token_time == pytest.approx(1.0)  # nothing decoded beside A's own prefill
    # The policies predict through a calibration that saw the slower steps.
    assert sim.prefills[0].model.drift["prefill"][0] > 1.0
    with pytest.raises(ValueError, match="--colocated-slowdown values must be at least 1"):
        Simulator(replace(alone, decode_beside_prefill=0.5), cost)


@pytest.mark.parametrize("policies", [("fcfs", "cb"), ("kairos", "kairos"), ("mh", "cb"), ("edf", "kairos")])
def test_every_request_finishes_under_load_and_kv_pressure(policies):
    trace = with_slos(synthetic(800, rate=60.0, seed=3), 500, 50)
    config = SimConfig(prefill_workers=2, decode_workers=2, prefill_policy=policies[0], decode_policy=policies[1],
                       kv_capacity_tokens=40_000, max_batch=64)
    report = simulate(trace, config, COST)  # raises if any request never finished
    assert report["requests"] == 800
    assert 0 <= report["e2e_attainment"] <= min(report["ttft_attainment"], report["tpot_attainment"])
    assert report["ttft_ms"]["p50"] <= report["ttft_ms"]["p90"] <= report["ttft_ms"]["p99"]


def test_light_load_meets_every_slo_and_overload_does_not():
    trace = with_slos(synthetic(300, rate=1.0, seed=4), 1000, 100)
    assert simulate(trace, SimConfig(), COST)["e2e_attainment"] == 1.0
    heavy = shape(trace, rate_scale=200)
    assert simulate(heavy, SimConfig(), COST)["ttft_attainment"] < 0.5


def test_prefix_cache_hits_shorten_prefill():
    shared = [TraceRequest(i * 0.5, 4096, 2, hash_ids=(1, 2, 3, 4, 5, 6, 7, 100 + i), slo=RequestSLO(1000, 1000))
              for i in range(4)]
    cold = [TraceRequest(r.arrival, r.prompt_len, 2, slo=RequestSLO(1000, 1000)) for r in shared]
    warm_ttft = metrics(Simulator(SimConfig(), COST).run(shared))["ttft_ms"]["p50"]
    cold_ttft = metrics(Simulator(SimConfig(), COST).run(cold))["ttft_ms"]["p50"]
    assert warm_ttft < 0.5 * cold_ttft


def test_kairos_beats_fcfs_on_a_bursty_trace():
    trace = with_slos(synthetic(1500, rate=40.0, arrival="gamma", burstiness=6.0, seed=5), 300, 100)
    results = {p: simulate(trace, SimConfig(prefill_policy=p), COST)["ttft_attainment"]
               for p in ("fcfs", "kairos", "mh")}
    assert results["kairos"] > results["fcfs"] + 0.05
    assert results["mh"] > results["kairos"]


def test_slack_batching_holds_tpot_through_a_decode_overload():
    """More arrivals than the decode worker can serve within a 20 ms TPOT: continuous batching
    lets every waiting request run late, slack-guided batching keeps most of them on time."""
    trace = with_slos(synthetic(1500, rate=80.0, seed=7), 5000, 20)
    tpot = {d: simulate(trace, SimConfig(prefill_workers=4, decode_policy=d), COST)["tpot_attainment"]
            for d in ("cb", "kairos")}
    assert tpot["cb"] < 0.7 and tpot["kairos"] > tpot["cb"] + 0.25


def test_replayed_prompts_share_the_blocks_the_trace_marks_and_nothing_else():
    from kairos.transport.replay import synthetic_prompt

    def synthetic_prompts(trace, vocab_ids, seed):
        return [synthetic_prompt(r, i, vocab_ids, seed) for i, r in enumerate(trace)]

    def request(prompt_len, hash_ids=()):
        return TraceRequest(0.0, prompt_len, 4, hash_ids)

    trace = [request(1100, (1, 2, 3)), request(700, (1, 2)), request(300, (2,)), request(600), request(600)]
    prompts = synthetic_prompts(trace, vocab_ids=100, seed=5)
    assert [len(x) for x in prompts] == [1100, 700, 300, 600, 600]
    assert all(1 <= t < 100 for x in prompts for t in x)
    assert prompts[1][:700] == prompts[0][:700]  # blocks 1 and 2 (the second truncated to 188 tokens)
    assert prompts[2] == prompts[0][512:812]  # block 2 alone, truncated
    assert prompts[3][:16] != prompts[4][:16] and prompts[0][1024:] != prompts[3][:76]
    again = synthetic_prompts(trace, vocab_ids=100, seed=5)
    other = synthetic_prompts(trace, vocab_ids=100, seed=6)
    assert again == prompts and all(a[:16] != b[:16] for a, b in zip(prompts, other))


def test_goodput_interpolates_to_the_ninety_percent_crossing():
    assert goodput([(1, 1.0), (2, 0.95), (3, 0.85)]) == pytest.approx(2.5)
    assert goodput([(1, 0.5), (2, 0.4)]) == 0.0
    assert goodput([(1, 1.0), (2, 0.99)]) == 2


def test_compare_reports_gains_against_the_baseline():
    trace = with_slos(synthetic(600, rate=10.0, seed=6), 800, 100)
    result = compare(trace, [1.0, 3.0], ["fcfs+cb", "kairos+kairos"], simulated_point(SimConfig(), COST))
    assert len(result["rows"]) == 4 and set(result["summary"]) == {"fcfs+cb", "kairos+kairos"}
    base = result["summary"]["fcfs+cb"]
    assert base["goodput_vs_baseline"] in (None, 1.0)
    assert all(math.isfinite(r["decode_throughput_tok_s"]) for r in result["rows"])


def test_a_client_cap_on_max_tokens_hides_the_lengths_but_not_the_work():
    """By default a request's max_tokens is its own length (as a replay forces it); with a cap
    the policies see the cap, the output still ends at the trace's length, or at the cap."""
    trace = [TraceRequest(0.0, 100, 10), TraceRequest(0.0, 100, 300)]
    exact = Simulator(SimConfig(), COST).run(trace)
    capped = Simulator(SimConfig(max_tokens=200), COST).run(trace)
    assert [r.max_tokens for r in exact] == [10, 300] and [r.max_tokens for r in capped] == [200, 200]
    assert [r.output_len for r in capped] == [10, 200]
    assert capped[0].finish_time == pytest.approx(exact[0].finish_time)  # under cb, lengths alone set the work
    with pytest.raises(ValueError, match="--max-tokens must be at least 1"):
        Simulator(SimConfig(max_tokens=0), COST)


def test_compare_counts_a_refused_request_as_a_miss_as_simulate_does():
    """A prompt longer than the KV cache is refused: a miss of every SLO in a compare row as in
    `kairos simulate`, not NaN times in the metrics (which made the first row's throughput 0)."""
    trace = [TraceRequest(0.0, 5000, 4)] + [TraceRequest(0.1 * i, 100, 4) for i in range(1, 20)]
    config = SimConfig(kv_capacity_tokens=4096)
    result = compare(trace, [1.0], ["fcfs+cb"], simulated_point(config, COST))
    (row,) = result["rows"]
    alone = simulate(trace, config, COST)
    assert row["refused"] == 1 and row["e2e_attainment"] == pytest.approx(alone["e2e_attainment"])
    assert row["e2e_attainment"] == pytest.approx(19 / 20) and row["decode_throughput_tok_s"] > 0


def test_compare_refuses_a_trace_with_no_rate_to_scale():
    for trace in ([], [TraceRequest(0.0, 10, 5)] * 3):
        with pytest.raises(ValueError, match="no rate to scale"):
            compare(trace, [1.0], ["fcfs+cb"], simulated_point(SimConfig(), COST))


def test_repeated_points_take_turns_and_report_the_mean():
    """Live runs vary, so each point may run several times: the policies alternate within a
    point (a slow spell of the machine falls on both), a row is the mean of its runs, and the
    CDFs pool every run's samples."""
    trace = with_slos(synthetic(50, rate=10.0, seed=2), 800, 100)
    calls = []

    def run_point(points, policy):
        calls.append(policy)
        e2e = 0.5 if policy == "fcfs+cb" else 0.6 + 0.1 * calls.count(policy)
        report = {"ttft_attainment": e2e, "tpot_attainment": 1.0, "e2e_attainment": e2e,
                  "decode_throughput_tok_s": 100.0 * len(calls), "ttft_ms": {"p50": 10.0 * len(calls)}}
        return report, {"ttft_ms": [float(len(calls))], "tpot_ms": []}

    result = compare(trace, [2.0], ["fcfs+cb", "kairos+kairos"], run_point, repeats=3)
    assert calls == ["fcfs+cb", "kairos+kairos"] * 3
    base, ours = result["rows"]
    assert ours["e2e_runs"] == pytest.approx([0.7, 0.8, 0.9]) and ours["e2e_attainment"] == pytest.approx(0.8)
    assert ours["ttft_ms"]["p50"] == pytest.approx(40.0) and base["decode_throughput_tok_s"] == pytest.approx(300.0)
    assert result["cdfs"][(2.0, "kairos+kairos")]["ttft_ms"] == [2.0, 4.0, 6.0]
    assert result["summary"]["kairos+kairos"]["best_in_40_80_band"]["e2e_points"] == pytest.approx(30.0)
    # The baseline misses 90% at the only rate swept: its goodput lies somewhere below it.
    goodput_line = next(line for line in table(result).splitlines() if line.strip().startswith("fcfs+cb  "))
    assert f"< {base['rate_req_s']:.1f}" in goodput_line and "sweep lower rates" in table(result)
    with pytest.raises(ValueError, match="at least 1"):
        compare(trace, [2.0], ["fcfs+cb"], run_point, repeats=0)


def test_a_goodput_below_the_sweep_is_shown_as_such_with_no_ratio():
    trace = with_slos(synthetic(20, rate=10.0, seed=3), 800, 100)

    def run_point(points, policy):
        e2e = 0.95 if policy == "fcfs+cb" and points[-1].arrival > 2.0 else 0.5  # at rate 1 only
        report = {"ttft_attainment": e2e, "tpot_attainment": 1.0, "e2e_attainment": e2e,
                  "decode_throughput_tok_s": 100.0}
        return report, {"ttft_ms": [1.0], "tpot_ms": [1.0]}

    result = compare(trace, [1.0, 2.0], ["fcfs+cb", "kairos+kairos"], run_point)
    assert result["summary"]["fcfs+cb"]["goodput_req_s"] > 0 == result["summary"]["kairos+kairos"]["goodput_req_s"]
    line = next(line for line in table(result).splitlines() if line.strip().startswith("kairos+kairos  "))
    lowest = min(r["rate_req_s"] for r in result["rows"])
    assert line.split()[1:4] == ["<", f"{lowest:.1f}", "n/a"]


def test_a_goodput_above_the_sweep_is_a_lower_bound_and_so_is_its_ratio():
    trace = with_slos(synthetic(20, rate=10.0, seed=3), 800, 100)

    def run_point(points, policy):
        e2e = 0.95 if policy == "kairos+kairos" or points[-1].arrival > 2.0 else 0.5  # fcfs+cb: at rate 1 only
        report = {"ttft_attainment": e2e, "tpot_attainment": 1.0, "e2e_attainment": e2e,
                  "decode_throughput_tok_s": 100.0}
        return report, {"ttft_ms": [1.0], "tpot_ms": [1.0]}

    result = compare(trace, [1.0, 2.0], ["fcfs+cb", "kairos+kairos"], run_point)
    ours, base = result["summary"]["kairos+kairos"], result["summary"]["fcfs+cb"]
    assert ours["goodput_above_sweep"] and not base["goodput_above_sweep"]
    highest = max(r["rate_req_s"] for r in result["rows"])
    assert ours["goodput_req_s"] == pytest.approx(highest)
    line = next(line for line in table(result).splitlines() if line.strip().startswith("kairos+kairos  "))
    assert line.split()[1:5] == [">=", f"{highest:.2f}", ">=", f"{ours['goodput_vs_baseline']:.2f}"]
    assert "sweep higher rates" in table(result)
    # With the baseline above the sweep too, neither goodput is known, nor their ratio.
    result = compare(trace, [0.5, 1.0], ["fcfs+cb", "kairos+kairos"], run_point)
    assert all(s["goodput_above_sweep"] for s in result["summary"].values())
    line = next(line for line in table(result).splitlines() if line.strip().startswith("kairos+kairos  "))
    assert line.split()[1:4] == [">=", f"{max(r['rate_req_s'] for r in result['rows']):.2f}", "n/a"]


def test_a_sweep_back_over_ninety_percent_after_a_dip_keeps_its_first_crossing_as_goodput():
    """Live runs are noisy: a policy may dip under 90% at one rate and come back over it at a
    higher one. Its goodput is the first crossing, a value, not a lower bound at the top rate."""
    trace = with_slos(synthetic(20, rate=10.0, seed=3), 800, 100)
    by_rate = {1.0: 0.97, 2.0: 0.85, 3.0: 0.93}

    def run_point(points, policy):
        e2e = by_rate[round(trace[-1].arrival / points[-1].arrival, 3)]  # shape divides arrivals by the scale
        report = {"ttft_attainment": e2e, "tpot_attainment": 1.0, "e2e_attainment": e2e,
                  "decode_throughput_tok_s": 100.0}
        return report, {"ttft_ms": [1.0], "tpot_ms": [1.0]}

    result = compare(trace, [1.0, 2.0, 3.0], ["fcfs+cb"], run_point)
    s = result["summary"]["fcfs+cb"]
    rates = sorted(r["rate_req_s"] for r in result["rows"])
    assert not s["goodput_above_sweep"] and rates[0] < s["goodput_req_s"] < rates[1]
    assert ">=" not in table(result) and "sweep higher rates" not in table(result)


def test_compare_refuses_repeats_without_live_runs(capsys):
    from kairos.cli.main import main

    assert main(["bench", "compare", "--trace", str(CONV), "--limit", "50", "--repeats", "3"]) == 2
    assert "--repeats is for --live runs" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--name", "sub/x"], "--name is the results' file name, without a folder"),
    (["--name", ""], "--name is the results' file name"),
    (["--rate-scale", "3"], "--rate-scale sets one rate; a comparison sweeps --rate-scales"),
])
def test_compare_refuses_before_the_sweep_what_would_fail_or_mislead_after_it(capsys, tmp_path, flags, message):
    from kairos.cli.main import main

    assert main(["bench", "compare", "--trace", str(CONV), "--limit", "20", "--out-dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_compare_sweeps_rates_in_order_and_each_rate_and_pair_once(capsys, tmp_path):
    """Goodput reads the rates in order: given unsorted, it once stopped at the first point."""
    from kairos.cli.main import main

    def summary(scales: str, policies: str) -> tuple[dict, list]:
        assert main(["bench", "compare", "--trace", str(CONV), "--limit", "300", "--rate-scales", scales,
                     "--policies", policies, "--out-dir", str(tmp_path), "--name", "x"]) == 0
        capsys.readouterr()
        result = json.loads((tmp_path / "x.json").read_text())
        return result["summary"], [(r["rate_scale"], r["policy"]) for r in result["rows"]]

    ordered, rows = summary("4,6,8,10", "kairos+kairos")
    assert summary("10,8,4,6,8", "kairos+kairos,kairos+kairos") == (ordered, rows)
    assert [scale for scale, _ in rows] == [4.0, 4.0, 6.0, 6.0, 8.0, 8.0, 10.0, 10.0]
    assert ordered["fcfs+cb"]["goodput_req_s"] > 0


def test_kairos_simulate_prints_the_slo_report_and_refuses_a_negative_jitter(capsys):
    from kairos.cli.main import main

    args = ["simulate", "--trace", str(CONV), "--limit", "300", "--rate-scale", "5", "--prefill-policy", "kairos",
            "--decode-policy", "kairos", "--json"]
    assert main(args + ["--step-jitter", "0.2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 300 and 0 <= report["e2e_attainment"] <= 1
    assert report["ttft_ms"]["p50"] <= report["ttft_ms"]["p99"]
    assert main(args + ["--step-jitter", "-1"]) == 2
    assert "jitter must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--prefill-workers", "0", "--prefill-workers must be at least 1, got 0"),
    ("--decode-workers", "0", "--decode-workers must be at least 1, got 0"),
    ("--token-budget", "0", "--token-budget must be at least 1, got 0"),
    ("--max-batch", "-2", "--max-batch must be at least 1, got -2"),
    ("--kv-capacity-tokens", "0", "--kv-capacity-tokens must be at least 16, got 0"),  # not the profile's
    ("--kv-bandwidth-gb-s", "0", "--kv-bandwidth-gb-s must be positive"),
    ("--max-inflight-transfer-mb", "-1", "--max-inflight-transfer-mb must be at least 0"),
    ("--max-prompt-len", "0", "--max-prompt-len must be at least 1, got 0"),  # not "no cap"
    ("--ttft-slo-ms", "0", "the TTFT SLO (ttft_ms) must be between 0.001 and 1e+09 milliseconds, got 0.0"),
    ("--tpot-slo-ms", "nan", "the TPOT SLO (tpot_ms) must be between 0.001 and 1e+09 milliseconds, got nan"),
    ("--ttft-ms-per-1k-prompt", "-50", "--ttft-ms-per-1k-prompt must be >= 0"),
    ("--rate-scale", "nan", "--rate-scale must be positive"),
    ("--max-prefill-wait-s", "0", "--max-prefill-wait-s must be positive, not 0.0"),
    ("--colocated-slowdown", "1.2", "--colocated-slowdown is PREFILL,DECODE (two numbers >= 1"),
    ("--colocated-slowdown", "1.2,0.9", "--colocated-slowdown values must be at least 1"),
])
def test_settings_no_system_or_trace_could_have_are_clear_errors(capsys, flag, value, message):
    from kairos.cli.main import main

    assert main(["simulate", "--trace", str(CONV), "--limit", "20", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_recorded_live_runs_are_judged_again_against_the_current_simulator(tmp_path, monkeypatch):
    """`sim_fidelity.py --resimulate` keeps the recorded live runs, simulates each point anew
    with the recorded settings and calibration (and at each run's own recorded step speed),
    and gaps are simulated minus live. The result file carries the profile it was judged with."""
    from kairos.bench import common, sim_fidelity

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"device": "test", "prefill_mape": 0.1, "decode_mape": 0.1,
                                   "fit": {"prefill": list(COST.prefill), "decode": list(COST.decode)}}))
    args = sim_fidelity.parse_args(["--requests", "40", "--rate-scales", "4", "--profile", str(profile),
                                    "--name", "recorded"])
    live = {"ttft_attainment": 0.5, "tpot_attainment": 0.75, "e2e_attainment": 0.25}
    calibration = {"prefill": 1.5, "prefill_jitter": 0.1, "decode": 1.2, "decode_jitter": 0.1}
    recorded = {"date": "2026-01-01T00:00:00+00:00", "command": "the live run's", "setup": vars(args),
                "calibration": calibration,
                "rows": [{"policy": "kairos+kairos", "rate_scale": 4.0, "live": live, "live_runs": [live],
                          "live_spread_points": {k: 0.0 for k in live}, "drift": calibration,
                          # The run's decode steps were fitted afresh: the fit, not the scale, is its speed.
                          "run_drifts": [{"prefill": 30.0, "prefill_jitter": 0.0, "decode": 1.0, "decode_jitter": 0.0,
                                          "decode_fit": [20 * c for c in COST.decode], "decode_fit_jitter": 0.0}]}]}
    path = tmp_path / "recorded.json"
    path.write_text(json.dumps(recorded))
    sim_fidelity.resimulate(path)
    profile.unlink()  # from now on only the copy in the result file remains
    sim_fidelity.resimulate(path)
    result = json.loads(path.read_text())
    (row,) = result["rows"]
    trace = sim_fidelity.point_trace(args, 4.0)
    config = SimConfig(prefill_policy="kairos", decode_policy="kairos", token_budget=args.token_budget,
                       max_batch=args.max_batch, kv_capacity_tokens=args.kv_blocks * 16,
                       kv_bandwidth_gb_s=args.kv_bandwidth_gb_s)
    assert row["without_jitter"] == simulate(trace, config, COST.scaled(1.5, 1.2))
    slow = simulate(trace, config, COST.scaled(30.0, 20.0))
    assert row["own_speed"] == pytest.approx({k: slow[k] for k in sim_fidelity.KEYS})  # no jitter: every draw alike
    assert row["own_speed_gap_points"]["e2e_attainment"] == pytest.approx(100 * (slow["e2e_attainment"] - 0.25))
    assert row["own_speed"] != {k: row["without_jitter"][k] for k in sim_fidelity.KEYS}
    assert row["live"] == live and result["live_date"] == recorded["date"] and "live_command" not in recorded
    assert result["live_command"] == recorded["command"] != result["command"]
    assert row["gap_points"]["e2e_attainment"] == pytest.approx(100 * (row["simulated"]["e2e_attainment"] - 0.25))
    # The prediction is jittered as calibrated: the mean of its draws, each a different run.
    jittered = replace(config, prefill_jitter=0.1, decode_jitter=0.1)
    draws = [simulate(trace, replace(jittered, seed=seed), COST.scaled(1.5, 1.2))
             for seed in range(sim_fidelity.JITTER_DRAWS)]
    assert row["simulated"]["ttft_attainment"] == pytest.approx(
        sum(d["ttft_attainment"] for d in draws) / len(draws))
    assert result["largest_gap_points"]["ttft_attainment"] == pytest.approx(abs(row["gap_points"]["ttft_attainment"]))


def test_serving_decode_steps_are_fitted_from_the_measured_runs_step_logs(tmp_path):
    """The decode steps logged within each measured run's span are fitted (fixed, per sequence,
    per context token); warm-up steps outside the span and steps without a decode shape are not."""
    from kairos.bench import sim_fidelity

    fit = (0.003, 0.0002, 2e-6)
    rng = random.Random(4)
    logs, spans = [], []
    for run in range(2):
        records = [{"t": 5.0, "blocked": False, "batch": 1, "context_tokens": 10, "observed_s": 9.0}]  # warm-up
        for i in range(40):
            batch, context = rng.randint(1, 64), rng.randint(10, 30000)
            seconds = fit[0] + fit[1] * batch + fit[2] * context
            records.append({"t": 10.0 + i, "blocked": False, "batch": batch, "context_tokens": context,
                            "observed_s": seconds, "calibrated_s": seconds * (1.1 if i % 2 else 0.8)})
            records.append({"t": 10.5 + i, "blocked": False, "prefill_tokens": 300, "observed_s": 1.0})  # a recompute
        logs.append(tmp_path / f"run{run}.jsonl")
        logs[-1].write_text("\n".join(json.dumps(r) for r in records) + "\n")
        spans.append((9.0, 60.0))
    served = sim_fidelity.served_decode_fit(logs, spans)
    assert served["decode_fit"] == pytest.approx(fit, rel=1e-6) and served["decode_fit_jitter"] < 1e-6
    assert served["decode_online_error"] == pytest.approx(0.15)  # the workers' calibration, 10% and 20% off in turn
    assert sim_fidelity.served_decode_fit(logs, [(0.0, 1.0)] * 2) == {}  # nothing within the spans


def test_serving_prefill_steps_scale_the_profile_by_least_squares(tmp_path):
    """Prefill steps logged within the measured span give the least-squares scale on the
    profile's prediction (long steps weigh most); warm-up steps and idle turns do not count."""
    from kairos.bench import sim_fidelity

    records = [{"t": 1.0, "step_s": 0.5, "prefill_tokens": 10, "predicted_s": 0.01, "observed_s": 0.5}]  # warm-up
    for i, (predicted, observed) in enumerate([(0.01, 0.01), (0.01, 0.01), (0.1, 0.2)]):
        records.append({"t": 10.0 + i, "step_s": observed, "prefill_tokens": 100, "predicted_s": predicted,
                        "observed_s": observed})
    records.append({"t": 20.0, "step_s": 0.0, "prefill_tokens": 0, "predicted_s": 0.0, "observed_s": 0.0})
    log = tmp_path / "prefill.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    # the span a run recorded before spans were begins after the warm-up
    span = sim_fidelity.replay_span(log, warm_up=1)
    assert span[0] == pytest.approx(10.0 - 0.01)
    served = sim_fidelity.served_prefill_fit([log], [span])
    scale = (2 * 0.01 * 0.01 + 0.1 * 0.2) / (2 * 0.01**2 + 0.1**2)
    assert served["prefill_fit"] == pytest.approx(scale)  # 1.98: the long step, twice its prediction, dominates
    expected_jitter = (2 * abs(1 / scale - 1) + abs(2 / scale - 1)) / 3
    assert served["prefill_fit_jitter"] == pytest.approx(expected_jitter)
    assert sim_fidelity.served_prefill_fit([log], [(30.0, 40.0)]) == {}


def test_co_located_workers_contention_is_fitted_from_both_workers_step_logs(tmp_path):
    """Prefill runs from 10 to 30 s, decode from 20 to 40 s: each runs alone half the time and
    beside the other half. Prefill steps take 1.2x the profile alone and 1.3x that beside decode,
    and the loop spends 5 ms between steps while prompts wait; decode steps take their fit alone
    and 1.5x it beside prefill. The fits recover all four; each worker's busy spans run from a
    step to the next while it has work, its idle turns not counted."""
    from kairos.bench import sim_fidelity

    rng = random.Random(7)
    prefill_busy = (10.0, 30.0)
    decode_busy = (20.0, 40.0)

    def inside(t, span):
        return span[0] <= t < span[1]

    prefill, t = [], prefill_busy[0]
    while t < prefill_busy[1]:
        predicted = rng.uniform(0.05, 0.2)
        observed = 1.2 * predicted * (1.3 if inside(t, decode_busy) else 1.0)
        prefill.append({"t": t + observed + 0.001, "messages_s": 0.004, "step_s": observed, "after_s": 0.001,
                        "blocked": False, "stepped": 2, "prefill_tokens": 300, "waiting": 1, "running": 0,
                        "predicted_s": predicted, "observed_s": observed})
        t += observed + 0.005
    prefill[-1]["waiting"] = 0
    prefill.append({"t": 50.0, "messages_s": 9.0, "step_s": 0.0, "after_s": 0.0, "blocked": False, "stepped": 0,
                    "prefill_tokens": 0, "waiting": 0, "running": 0})  # an idle turn
    decode, t, fit = [], decode_busy[0], (0.005, 1e-4, 1e-6)
    while t < decode_busy[1]:
        batch, context = rng.randint(1, 64), rng.randint(100, 5000)
        observed = (fit[0] + fit[1] * batch + fit[2] * context) * (1.5 if inside(t, (10.0, 30.005)) else 1.0)
        decode.append({"t": t + observed + 1e-4, "messages_s": 1e-4, "step_s": observed, "after_s": 1e-4,
                       "blocked": False, "stepped": batch, "waiting": 0, "running": batch, "batch": batch,
                       "context_tokens": context, "observed_s": observed})
        t += observed + 2e-4
    decode[-1]["running"] = 0
    logs = {}
    for role, records in (("prefill", prefill), ("decode", decode)):
        logs[role] = tmp_path / f"{role}.jsonl"
        logs[role].write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert sim_fidelity.busy_spans(logs["prefill"])[0] == [pytest.approx(10.0)]
    served = sim_fidelity.served_fits([logs["prefill"]], [(0.0, 100.0)], [logs["decode"]])
    assert served["prefill_fit"] == pytest.approx(1.2, rel=0.02)
    assert served["prefill_beside_decode"] == pytest.approx(1.3, rel=0.02)
    assert served["prefill_loop_s"] == pytest.approx(0.005)
    assert served["decode_beside_prefill"] == pytest.approx(1.5, rel=0.02)
    assert served["decode_fit"] == pytest.approx(fit, rel=0.05)
    assert served["prefill_stalls"] == 0
    # A step ten times its share (a kernel compiling on first use) is left out and counted.
    stalled = [dict(r) for r in prefill]
    stalled[5]["observed_s"] *= 10
    logs["stalled"] = tmp_path / "stalled.jsonl"
    logs["stalled"].write_text("\n".join(json.dumps(r) for r in stalled) + "\n")
    refit = sim_fidelity.served_prefill_fit([logs["stalled"]], [(0.0, 100.0)], [logs["decode"]])
    assert refit["prefill_stalls"] == 1 and refit["prefill_fit"] == pytest.approx(served["prefill_fit"], rel=0.01)
    # Where every step ran beside decode, its slowdown cannot be told from its scale.
    beside_only = sim_fidelity.served_prefill_fit([logs["prefill"]], [(20.5, 29.5)], [logs["decode"]])
    assert "prefill_beside_decode" not in beside_only
    assert beside_only["prefill_fit"] == pytest.approx(1.2 * 1.3, rel=0.02)
    # Without the other worker's log, one scale carries both.
    plain = sim_fidelity.served_prefill_fit([logs["prefill"]], [(0.0, 100.0)])
    assert "prefill_beside_decode" not in plain and 1.2 < plain["prefill_fit"] < 1.2 * 1.3


def test_resimulate_fits_recorded_runs_prefill_steps_from_their_step_logs(tmp_path, monkeypatch):
    """`--resimulate RESULT --step-logs DIR` fits each recorded run's prefill steps from the
    logs the run wrote and simulates with that scale rather than the recorded ratio."""
    from kairos.bench import common, sim_fidelity

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    profile = {"device": "test", "prefill_mape": 0.1, "decode_mape": 0.1,
               "fit": {"prefill": list(COST.prefill), "decode": list(COST.decode)}}
    args = sim_fidelity.parse_args(["--requests", "40", "--rate-scales", "4", "--warm-up", "1", "--name", "refit"])
    live = {"ttft_attainment": 0.5, "tpot_attainment": 0.75, "e2e_attainment": 0.25}
    ratio = {"prefill": 1.5, "prefill_jitter": 0.0, "decode": 1.2, "decode_jitter": 0.0}
    path = tmp_path / "refit.json"
    path.write_text(json.dumps({"date": "2026-01-01T00:00:00+00:00", "setup": vars(args), "calibration": ratio,
                                "profile": profile, "rows": [{
                                    "policy": "kairos+kairos", "rate_scale": 4.0, "live": live, "live_runs": [live],
                                    "live_spread_points": {k: 0.0 for k in live}, "drift": dict(ratio),
                                    "run_drifts": [dict(ratio)]}]}))
    steps = [{"t": float(i), "step_s": 0.01, "prefill_tokens": 50, "predicted_s": 0.01, "observed_s": 0.03}
             for i in range(6)]
    steps[0]["observed_s"] = 5.0  # the warm-up request's step, before the run
    (tmp_path / "kairos_kairos_x4_0_prefill.jsonl").write_text("\n".join(json.dumps(r) for r in steps) + "\n")
    sim_fidelity.resimulate(path, tmp_path)
    result = json.loads(path.read_text())
    assert result["calibration"]["prefill_fit"] == pytest.approx(3.0)
    (row,) = result["rows"]
    assert row["run_drifts"][0]["prefill_fit"] == pytest.approx(3.0)
    config = SimConfig(prefill_policy="kairos", decode_policy="kairos", token_budget=args.token_budget,
                       max_batch=args.max_batch, kv_capacity_tokens=args.kv_blocks * 16,
                       kv_bandwidth_gb_s=args.kv_bandwidth_gb_s)
    trace = sim_fidelity.point_trace(args, 4.0)
    assert row["without_jitter"] == simulate(trace, config, COST.scaled(result["calibration"]["prefill_fit"], 1.2))
    assert row["without_jitter"] != simulate(trace, config, COST.scaled(1.5, 1.2))


@pytest.mark.parametrize("policies, message", [
    ("kairos", "a policy pair is PREFILL+DECODE (such as kairos+kairos), not 'kairos'"),
    ("sjf+kairos", "unknown prefill policy 'sjf'; available: fcfs, edf, kairos, mh"),
    ("kairos+lifo", "unknown decode policy 'lifo'; available: cb, kairos"),
])
def test_compare_names_a_bad_policy_pair_before_any_run(capsys, policies, message):
    from kairos.cli.main import main

    assert main(["bench", "compare", "--trace", str(CONV), "--limit", "20", "--policies", policies]) == 2
    assert message in capsys.readouterr().err
