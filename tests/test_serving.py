"""Disaggregated serving with real router, prefill and decode processes (tiny model, CPU)."""

import asyncio
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import replace

import msgpack
import pytest
import torch
import zmq
from serving import Cluster, decode_stats, kairos_process, raw_dealer, reply

from kairos.engine import LLM, SamplingParams
from kairos.transport import protocol as p
from kairos.transport.client import AsyncClient, RequestFailed


@pytest.fixture(scope="module")
def step_logs(tmp_path_factory):
    logs = tmp_path_factory.mktemp("step_logs")
    return {role: logs / f"{role}.jsonl" for role in ("prefill", "decode")}


@pytest.fixture(scope="module")
def cluster(tiny_path, step_logs):
    c = Cluster()
    try:
        c.add_worker("prefill", "--step-log", str(step_logs["prefill"]))
        # Overlapped decode steps, as CUDA runs them by default: every test here checks them.
        c.add_worker("decode", "--overlap", "on", "--step-log", str(step_logs["decode"]))
        c.wait_for_workers(1, 1)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def offline():
    return LLM("tiny", num_kv_blocks=512, max_model_len=512)


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 512) for _ in range(rng.choice([1, 5, 16, 17, 40, 100, 250]))] for _ in range(n)]


def test_disaggregated_outputs_equal_the_offline_engine(cluster, offline):
    prompts = mixed_prompts(100)
    max_tokens = [random.Random(i).choice([1, 3, 20, 40]) for i in range(100)]
    expected = offline.generate(prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens])
    with cluster.client() as client:
        ids = [client.submit(prompt, max_tokens=m, temperature=0) for prompt, m in zip(prompts, max_tokens)]
        results = [client.result(rid) for rid in ids]
    for got, want in zip(results, expected):
        assert got.error is None
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason
        assert got.text == want.text
        assert len(got.token_times_ms) == len(got.token_ids) and got.ttft_ms == got.token_times_ms[0]
        assert got.token_times_ms == sorted(got.token_times_ms)
    status = cluster.wait_idle()
    counters = status["counters"]
    assert counters["completed"] >= 100 and counters["failed"] == 0
    # Workers on one GPU copy KV GPU to GPU (CUDA IPC); on a CPU it goes over the socket. A
    # request whose first token ends it finishes on the prefill worker, with no transfer.
    decode = next(w for w in status["workers"] if w["role"] == "decode")
    transfers = sum(len(want.token_ids) > 1 for want in expected)
    assert decode["kv_cuda_ipc"] == (transfers if torch.cuda.is_available() else 0), decode
    # Attainment against the router's default SLOs (1 s TTFT, 100 ms TPOT) is counted.
    assert 0 <= counters["slo_met"] <= min(counters["ttft_met"], counters["tpot_met"]) <= counters["completed"]
    assert counters["ttft_met"] > 0


def test_decode_preemption_recomputes_on_the_decode_worker_and_keeps_outputs_exact(cluster, offline):
    """Twelve 300-token prompts fit the decode worker's 256 blocks (19 each, a spare per
    sequence), but not once they have grown by 180 tokens (30 each): it preempts, recomputes
    the preempted sequences' prompt and output itself, and every output is still the offline
    engine's."""
    rng = random.Random(11)
    prompts = [[rng.randrange(1, 512) for _ in range(300)] for _ in range(12)]
    expected = offline.generate(prompts, SamplingParams(max_tokens=180, temperature=0))
    before = decode_stats(cluster)["preemptions"]
    with cluster.client() as client:
        results = [client.result(rid) for rid in [client.submit(prompt, max_tokens=180, temperature=0)
                                                  for prompt in prompts]]
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    assert decode_stats(cluster, lambda w: w["preemptions"] > before)["preemptions"] > before
    cluster.wait_idle()  # every block back


def test_step_logs_account_for_every_prefill_and_where_the_loop_spent_its_time(cluster, step_logs):
    cluster.wait_idle()
    decode_log = step_logs["decode"]
    earlier = len(decode_log.read_text().splitlines()) if decode_log.exists() else 0
    with cluster.client() as client:
        for rid in [client.submit(prompt, max_tokens=4, temperature=0) for prompt in mixed_prompts(20, seed=3)]:
            assert client.result(rid).error is None
    # Every first token came out of a logged prefill step (heartbeats lag: wait until the
    # worker's count has caught up with the 20 just served).
    deadline = time.monotonic() + 10
    while True:
        status = cluster.wait_idle()
        (prefill,) = [w for w in status["workers"] if w["role"] == "prefill"]
        logged = {role: [json.loads(line) for line in path.read_text().splitlines()]
                  for role, path in step_logs.items()}
        if sum(r["stepped"] for r in logged["prefill"]) == prefill["first_tokens"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert sum(r["stepped"] for r in logged["prefill"]) == prefill["first_tokens"] >= 20
    # The decode worker prefills only to recompute preempted sequences, which these short
    # requests never are (an earlier test's may have been).
    assert sum(r["prefill_tokens"] for r in logged["decode"][earlier:]) == 0 and len(logged["decode"]) - earlier >= 3
    for records in logged.values():
        assert len({r["worker"] for r in records}) == 1
        assert all(r["step_s"] > 0 and r["messages_s"] >= 0 and r["after_s"] >= 0 for r in records)
        # These workers run without a cost model: no prediction is logged, and none made up.
        assert not any("predicted_s" in r for r in records)
        assert all(0 <= r["free_blocks"] <= 256 for r in records)
        times = [r["t"] for r in records]
        assert times == sorted(times)


def test_seeded_sampling_continues_across_workers(cluster, offline):
    prompts = ["Once upon a time", "def add(a, b):"]
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=s) for s in (5, 6)]
    expected = offline.generate(prompts, params)
    with cluster.client() as client:
        for prompt, sp, want in zip(prompts, params, expected):
            got = client.generate(prompt, max_tokens=24, temperature=0.9, top_p=0.95, seed=sp.seed)
            assert got.token_ids == want.token_ids


def test_asyncio_client_streams_and_stop_strings_spanning_tokens(cluster, offline):
    prompt = "The quick brown fox"
    full = offline.generate(prompt, SamplingParams(max_tokens=30, temperature=0))[0].text
    # A stop string that starts inside one token's text and ends inside a later one.
    stop = full[9:14]
    want = offline.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop]))[0]
    assert want.finish_reason == "stop"

    async def run():
        async with AsyncClient(cluster.addr, timeout_s=30) as client:
            chunks = [c async for c in client.stream(prompt, max_tokens=30, temperature=0, stop=[stop])]
            together = await asyncio.gather(*[client.generate(prompt, max_tokens=30, temperature=0)
                                              for _ in range(5)])
            bad = await client.generate([3] * 600, max_tokens=4)
            return chunks, together, bad, await client.status()

    chunks, together, bad, status = asyncio.run(run())
    assert "".join(c.text for c in chunks) == want.text
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert all(c.text == full for c in together)
    assert bad.error and "maximum length is 512" in bad.error
    assert {w["role"] for w in status["workers"]} == {"prefill", "decode"}


def test_abort_mid_stream_frees_every_block(cluster):
    with cluster.client() as client:
        rid = client.submit([5] * 200, max_tokens=400, ignore_eos=True, temperature=0)
        stream = client.stream(rid)
        received = [next(stream) for _ in range(5)]
        client.abort(rid)
        rest = list(stream)
    assert all(c.token_ids for c in received)
    assert rest[-1].finish_reason == "abort"
    assert sum(len(c.token_ids) for c in received + rest) < 400
    status = cluster.wait_idle()
    assert status["counters"]["aborted"] >= 1


def test_a_client_gone_mid_stream_without_a_word_has_its_request_aborted(cluster):
    """The client process dies after a few tokens of a 400-token request and sends no abort:
    the router, unable to deliver the next tokens, aborts it on the workers, and its blocks
    come back long before 400 tokens could have been decoded."""
    before = cluster.wait_idle()["counters"]
    script = (f"import os\nfrom kairos.transport.client import Client\nc = Client({cluster.addr!r}, timeout_s=30)\n"
              "rid = c.submit([5] * 200, max_tokens=400, temperature=0, ignore_eos=True)\n"
              "for i, _ in enumerate(c.stream(rid)):\n    if i == 5:\n        os._exit(0)\n")
    child = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert child.returncode == 0
    status = cluster.wait_idle()
    assert status["counters"]["aborted"] == before["aborted"] + 1
    assert status["counters"]["completed"] == before["completed"]


def test_bad_requests_fail_with_a_clear_error(cluster):
    with cluster.client() as client:
        too_long = client.generate([3] * 600, max_tokens=2)
        out_of_vocab = client.generate([100000], max_tokens=2)
        assert "maximum length is 512" in too_long.error
        assert "token ids must be integers in [0, 512)" in out_of_vocab.error
        with pytest.raises(ValueError, match="temperature"):
            client.submit("x", temperature=-1)
        rid = client.submit("x", max_tokens=2)
        with pytest.raises(ValueError, match="already in use"):
            client.submit("y", request_id=rid)
        client.result(rid)
        with pytest.raises(RequestFailed, match="maximum length"):
            list(client.stream(client.submit([3] * 600)))


def test_bad_messages_on_every_socket_are_refused_and_serving_goes_on(cluster):
    ctx = zmq.Context()
    try:
        router = raw_dealer(ctx, cluster.addr)
        for data, error in [(b"\x93\x01", "malformed"),
                            (msgpack.packb({"v": p.PROTOCOL_VERSION - 1, "type": "abort", "request_id": "x"}),
                             f"version {p.PROTOCOL_VERSION - 1}"),
                            (msgpack.packb({"v": p.PROTOCOL_VERSION, "type": "nuke"}), "unknown message type"),
                            (p.encode(p.KVAck("t")), "unexpected kv_ack"),
                            (p.encode(p.Submit("s", "hi", slo={"ttft_ms": -1.0})),
                             "TTFT SLO (ttft_ms) must be between"),
                            (p.encode(p.Submit("s", "hi", slo={"tpot_ms": math.nan})),
                             "TPOT SLO (tpot_ms) must be between"),
                            (p.encode(p.Submit("s", "hi", slo={"ttft": 5.0})), "unknown SLO fields ['ttft']")]:
            router.send(data)
            answer = reply(router)
            assert isinstance(answer, p.Error) and error in answer.message
        # Oversized: ZeroMQ drops it and disconnects the sender; nothing comes back.
        router.send(b"\x00" * (p.MAX_CONTROL_MESSAGE_BYTES + 1))
        assert not router.poll(500)

        kv_addr = decode_stats(cluster)["kv_addr"]
        kv = raw_dealer(ctx, kv_addr)
        kv.send(b"junk")
        assert "malformed" in reply(kv).message
        kv.send(p.encode(p.KVOffer("t", "r", [1], {}, {}, 1)))
        assert "handshake" in reply(kv).message
        kv.send(p.encode(p.KVHello("intruder", {"model": "other"})))
        assert "bad KV geometry" in reply(kv).message
    finally:
        ctx.destroy(linger=0)
    with cluster.client() as client:
        assert client.generate("still serving", max_tokens=3, temperature=0).finish_reason == "length"


def test_cli_client_json_and_exit_status(cluster):
    ok = kairos_process("client", "--addr", cluster.addr, "--json", "--max-tokens", "5", "--temperature", "0",
                        "hello", "world")
    out, _ = ok.communicate(timeout=60)
    assert ok.returncode == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    for obj in lines:
        assert set(obj) == {"request_id", "text", "token_ids", "ttft_ms", "token_times_ms", "finish_reason",
                            "prompt_tokens"}
        assert len(obj["token_ids"]) == len(obj["token_times_ms"]) == 5 and obj["prompt_tokens"] > 1  # BOS and the word
    bad = kairos_process("client", "--addr", cluster.addr, "--json", "--max-tokens", "5", "x " * 600)
    out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 1 and "maximum length" in json.loads(out.splitlines()[-1])["error"]
    status = kairos_process("status", "--addr", cluster.addr)
    out, _ = status.communicate(timeout=60)
    assert status.returncode == 0 and "prefill" in out and "free_blocks" in out and "cost_scale" in out
    assert "queued_prompt_tokens" in out and "preemptions" in out and "kv_cuda_ipc" in out
    dead = kairos_process("status", "--addr", "tcp://127.0.0.1:1", "--timeout", "0.5")
    out, _ = dead.communicate(timeout=60)
    assert dead.returncode == 1 and "no router at tcp://127.0.0.1:1: not connected" in out
    ready = kairos_process("status", "--addr", cluster.addr, "--wait", "30", "--json")
    out, _ = ready.communicate(timeout=60)
    assert ready.returncode == 0 and {w["role"] for w in json.loads(out)["workers"]} == {"prefill", "decode"}
    started = time.monotonic()
    never = kairos_process("status", "--addr", "tcp://127.0.0.1:1", "--wait", "1.5")
    out, _ = never.communicate(timeout=60)
    assert never.returncode == 1 and "decode workers did not register within 1.5 s" in out
    assert time.monotonic() - started < 30
    zero = kairos_process("status", "--addr", cluster.addr, "--wait", "0")
    out, _ = zero.communicate(timeout=60)
    assert zero.returncode == 2 and "--wait: must be a positive number" in out


def test_slo_clocks_start_at_the_router_whatever_the_hosts_clock_skew():
    from kairos.transport.prefill import MAX_DISPATCH_AGE_S, dispatch_age

    assert dispatch_age(100.0, 100.25) == pytest.approx(0.25)  # waited a step in the worker's socket
    assert dispatch_age(100.0, 99.0) == 0.0  # this host's clock is behind the router's
    assert dispatch_age(100.0, 1e6) == MAX_DISPATCH_AGE_S


def test_cpu_threads_are_checked_and_local_workers_split_the_cores():
    from kairos.transport.serve import cpu_share

    cores = cpu_share(1)
    assert cores >= 1 and cpu_share(2) == max(1, cores // 2) and cpu_share(10 * cores) == 1
    bad = kairos_process("generate", "--prompt", "hi", "--cpu-threads", "0")
    out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "--cpu-threads must be at least 1" in out


def test_live_replay_reports_what_the_simulator_reports(cluster):
    from kairos.scheduler.traces import synthetic, with_slos
    from kairos.transport.replay import replay

    trace = with_slos(synthetic(12, rate=20.0, prompt_mean=40, output_mean=6, max_len=200, seed=2), 5000, 1000)
    report = replay(cluster.addr, trace, timeout_s=60)
    assert report["requests"] == 12 and report["failed"] == 0
    assert {"ttft_attainment", "tpot_attainment", "e2e_attainment", "decode_throughput_tok_s", "ttft_ms",
            "tpot_ms"} <= set(report)
    assert report["ttft_ms"]["p50"] > 0 and report["decode_throughput_tok_s"] > 0
    # A request that fails is counted, and the first one's reason is given.
    too_long = replay(cluster.addr, [trace[0], replace(trace[1], prompt_len=600)], timeout_s=60)
    assert too_long["failed"] == 1 and "maximum length is 512" in too_long["first_failure"]
    cluster.wait_idle()


def test_a_replay_under_a_client_cap_still_ends_each_output_at_its_trace_length(cluster):
    """With --max-tokens, every request sets that cap, as clients do, and its output ends at its
    trace length as at an end token (eos_after), which the policies are not told."""
    from kairos.scheduler.traces import synthetic, with_slos
    from kairos.transport.replay import replay_requests

    trace = with_slos(synthetic(10, rate=20.0, prompt_mean=40, output_mean=8, max_len=200, seed=5), 5000, 1000)
    done = replay_requests(cluster.addr, trace, timeout_s=60, max_tokens=100)
    assert [d.output_len for d in done] == [r.output_len for r in trace] and len({r.output_len for r in trace}) > 3
    with pytest.raises(ValueError, match="over a router only"):
        replay_requests("http://127.0.0.1:9", trace, max_tokens=100)
    cluster.wait_idle()


def test_a_mixed_trace_replays_live_with_each_dag_call_sent_after_the_one_before_ends(cluster):
    """Throughput and collective requests travel with their kind and deadline; a DAG's later
    call leaves its tool time after the call before it has its last token, with the time the
    DAG has left as its deadline; the report adds the service metrics."""
    from kairos.scheduler.traces import mixed, synthetic, with_slos
    from kairos.transport.replay import replay_requests, report

    base = with_slos(synthetic(12, rate=20.0, prompt_mean=40, output_mean=6, max_len=200, seed=4), 5000, 1000)
    trace = mixed(base, throughput_share=0.3, collective_share=0.3, dag_calls=(3, 3), seed=2)
    done = replay_requests(cluster.addr, trace, timeout_s=60)
    assert all(r.error is None for r in done)
    later = [(r, done[r.after], d) for r, d in zip(trace, done) if r.after is not None]
    assert later
    for r, before, d in later:
        assert d.arrival_time >= before.finish_time + r.arrival - 0.01  # its tool time after the call before
        assert d.dag_start == before.dag_start
        assert d.slo.deadline_ms < before.slo.deadline_ms  # what its DAG has left
    result = report(done)
    kinds = result["service"]["requests_by_kind"]
    assert kinds["collective"] == sum(r.slo.kind == "collective" and r.after is None for r in trace)
    assert kinds["throughput"] == sum(r.slo.kind == "throughput" for r in trace)
    cluster.wait_idle()


def test_replay_shares_prompt_prefixes_where_the_trace_marks_them_and_nowhere_else(cluster):
    """Mooncake hash ids mark shared prompt blocks: replayed live, those blocks hit the prefill
    worker's prefix cache, as the simulator models them. Nothing else may share a prefix by
    chance, not even the warm-up's prompts with the measured replay's."""
    from kairos.scheduler.traces import synthetic, with_slos
    from kairos.transport.replay import replay, warm_up

    def prefill_totals() -> tuple[int, int]:
        """First tokens and cached prompt tokens, over the prefill workers."""
        with cluster.client() as client:
            workers = [w for w in client.fresh_status()["workers"] if w["role"] == "prefill"]
        return sum(w["first_tokens"] for w in workers), sum(w["cached_prompt_tokens"] for w in workers)

    trace = with_slos(synthetic(8, rate=20.0, prompt_mean=60, output_mean=3, max_len=200, seed=4), 5000, 1000)
    first, cached = prefill_totals()
    warm_up(cluster.addr, trace, requests=4)
    assert replay(cluster.addr, trace, timeout_s=60)["failed"] == 0
    assert prefill_totals() == (first + 4 + 8, cached)
    # Two 300-token prompts of the same 512-token block (truncated), a second apart: the second
    # is served from the cache but for its last, partial, 16-token block.
    shared = [replace(r, arrival=float(i), prompt_len=300, hash_ids=(77,)) for i, r in enumerate(trace[:2])]
    assert replay(cluster.addr, shared, timeout_s=60)["failed"] == 0
    assert prefill_totals() == (first + 4 + 8 + 2, cached + 299 // 16 * 16)
    cluster.wait_idle()


def test_compare_live_sweeps_policies_on_real_workers(tmp_path):
    proc = kairos_process("bench", "compare", "--live", "--trace-format", "synthetic", "--synthetic-requests", "10",
                          "--synthetic-rate", "10", "--rate-scales", "1", "--policies", "kairos+kairos",
                          "--max-prompt-len", "64", "--max-output-len", "4", "--token-budget", "256",
                          "--max-batch", "16", "--kv-capacity-tokens", "4096", "--out-dir", str(tmp_path),
                          "--name", "live", "--repeats", "2", "--prefill-workers", "2",
                          "--load-format", "dummy", "--max-model-len", "256")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    result = json.loads((tmp_path / "live.json").read_text())
    workers = result["workers"]  # the workers were started with the model's settings asked for
    assert workers[workers.index("--load-format") + 1] == "dummy"
    assert workers[workers.index("--max-model-len") + 1] == "256"
    assert result["mode"] == "live" and {r["policy"] for r in result["rows"]} == {"fcfs+cb", "kairos+kairos"}
    assert all(r["requests"] == 10 and r["failed"] == 0 and r["ttft_ms"]["p50"] > 0 for r in result["rows"])
    assert all(len(r["e2e_runs"]) == 2 for r in result["rows"])  # two fresh clusters per policy
    # Two prefill workers and one decode worker each time, and every measured request counted once.
    for row in result["rows"]:
        served = row["served_by_worker"]
        assert set(served) == {"prefill 1", "prefill 2", "decode 1"}
        assert served["prefill 1"] + served["prefill 2"] == 10
    assert (tmp_path / "live_attainment.png").exists() and "goodput" in out


def test_compare_live_refuses_what_only_the_simulator_has_and_reports_a_worker_that_will_not_start(tmp_path):
    proc = kairos_process("bench", "compare", "--live", "--kv-bandwidth-gb-s", "2")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--kv-bandwidth-gb-s sets up the simulator" in out
    proc = kairos_process("bench", "compare", "--load-format", "dummy")  # and the other way round
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--load-format sets up the live workers: it needs --live" in out
    proc = kairos_process("bench", "compare", "--live", "--prefill-workers", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--prefill-workers must be at least 1" in out
    proc = kairos_process("bench", "compare", "--live", "--model", "no-such-model", "--limit", "5",
                          "--rate-scales", "1", "--policies", "kairos+kairos")
    out, _ = proc.communicate(timeout=120)
    # Said once, before any worker starts.
    assert proc.returncode == 2 and out.count("model folder no-such-model does not exist") == 1
    # A folder whose config passes, but that has no weights: the workers fail as they load it.
    from kairos.engine.tiny import tiny_model_path

    (tmp_path / "config.json").write_text((tiny_model_path() / "config.json").read_text())
    proc = kairos_process("bench", "compare", "--live", "--model", str(tmp_path), "--limit", "5",
                          "--rate-scales", "1", "--policies", "kairos+kairos")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "exited with status 2 during start-up" in out and "Traceback" not in out
