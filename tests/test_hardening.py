"""One small message must not kill a process: deep nesting, too many frames, huge numbers,
bad heartbeat figures and SLOs out of bounds get an error reply, and a failing engine step
fails its own requests only."""

import time
from pathlib import Path

import msgpack
import pytest
import zmq
from serving import add_fake_workers, recording_router

from kairos.transport import protocol as p
from kairos.transport.sockets import make_socket, recv


def nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("where", ["v", "params"])
def test_deep_nesting_is_a_protocol_error_with_a_short_reply(where):
    body = {"v": p.PROTOCOL_VERSION, "type": "submit", "request_id": "x", "prompt": "hi", "params": {}}
    body[where] = nested(1000)  # once a RecursionError that killed the router
    with pytest.raises(p.ProtocolError, match="nested deeper") as e:
        p.decode(msgpack.packb(body))
    assert len(str(e.value)) < 200


def test_a_bad_version_is_named_briefly():
    with pytest.raises(p.ProtocolError, match="protocol version a list"):
        p.decode(msgpack.packb({"v": [[1]], "type": "abort", "request_id": "x"}))
    with pytest.raises(p.ProtocolError) as e:
        p.decode(msgpack.packb({"v": p.PROTOCOL_VERSION, "type": "x" * 10_000}))
    assert len(str(e.value)) < 200


@pytest.fixture()
def socket_pair():
    ctx = zmq.Context()
    server = make_socket(ctx, zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = make_socket(ctx, zmq.DEALER, identity=b"peer")
    client.connect(f"tcp://127.0.0.1:{port}")
    yield server, client
    ctx.destroy(linger=0)


def received(server, **limits):
    deadline = time.monotonic() + 5
    while not server.poll(100):
        assert time.monotonic() < deadline
    return recv(server, routed=True, **limits)


@pytest.mark.parametrize("frames, limits, problem", [
    ([p.encode(p.Abort("x"))] * 4, {}, "4 frames"),  # once served whole: 60 MB in 4 frames
    ([p.encode(p.Abort("x")), b"\0" * 1000], {"max_frames": 2, "max_total_bytes": 500}, "bytes"),
    ([msgpack.packb({"v": nested(1000), "type": "abort", "request_id": "x"})], {}, "nested deeper"),
])
def test_a_socket_rejects_oversized_or_malformed_messages_and_keeps_serving(socket_pair, frames, limits, problem):
    server, client = socket_pair
    client.send_multipart(frames)
    assert received(server, **limits) is None
    reply = p.decode(client.recv())
    assert isinstance(reply, p.Error) and problem in reply.message
    client.send_multipart([p.encode(p.Abort("y"))])
    assert received(server, **limits).msg == p.Abort("y")  # the socket goes on


@pytest.fixture()
def router():
    router = recording_router()
    yield router
    router.ctx.destroy(linger=0)


@pytest.mark.parametrize("stats", [{"free_blocks": "x"}, {"free_blocks": 1.5}, {"running": -1},
                                   {"cost_scale": {"decode": {"mean": float("nan")}}}, {"a": {"b": {"c": {"d": 1}}}},
                                   {"x" * 100: 1}])
def test_a_heartbeat_with_bad_figures_is_refused_and_placement_goes_on(router, stats):
    router.handle(b"d1/heartbeat", p.Heartbeat("d1", {"free_blocks": 40}))
    router.handle(b"d1/heartbeat", p.Heartbeat("d1", stats))  # once a TypeError in placement
    assert router.workers["d1"].stats == {"free_blocks": 40}
    assert isinstance(router.sent[-1][1], p.Error) and "heartbeat rejected" in router.sent[-1][1].message
    router.on_submit(b"client", p.Submit("r", prompt_token_ids=[1, 2, 3]))
    assert router.requests[router.by_client[(b"client", "r")]].decode == "d1"


@pytest.mark.parametrize("submit, problem", [
    (p.Submit("r", prompt="hi", slo={"tpot_ms": 5e-324}), "TPOT SLO"),  # once failed only after prefill
    (p.Submit("r", prompt="hi", slo={"ttft_ms": 1e300}), "TTFT SLO"),
    (p.Submit("r", prompt="hi", params={"top_k": 2**63}), "top_k"),  # once killed the prefill worker
    (p.Submit("r", prompt="hi", params={"temperature": 2**63}), "temperature"),
    (p.Submit("r", prompt="hi", params={"nonsense": 1}), "unknown sampling parameters"),
])
def test_the_router_refuses_bad_values_before_any_worker_sees_them(router, submit, problem):
    router.on_submit(b"client", submit)
    (client, reply), = router.sent
    assert client == b"client" and isinstance(reply, p.Error) and problem in reply.message
    assert not router.requests and router.counters["failed"] == 1


def test_a_failing_step_fails_its_requests_and_the_worker_serves_on():
    from kairos.engine import LLM, SamplingParams
    from kairos.transport.decode import DecodeWorker

    llm = LLM("tiny", num_kv_blocks=64, max_model_len=256)
    worker = DecodeWorker(llm, "tcp://127.0.0.1:9")  # no router there: its messages are dropped
    failed = []
    worker.fail = lambda request_id, message: failed.append((request_id, message))
    try:
        for i in range(2):
            llm.add_request([1 + i] * 20, SamplingParams(max_tokens=4), request_id=f"r{i}")
        launch = llm.runner.launch
        llm.runner.launch = lambda batch: (_ for _ in ()).throw(OverflowError("Overflow when unpacking long long"))
        worker.run_once()
        assert sorted(r for r, _ in failed) == ["r0", "r1"] and "OverflowError" in failed[0][1]
        assert not llm.has_unfinished() and llm.num_free_blocks == llm.num_total_blocks
        llm.runner.launch = launch
        seq = llm.add_request([5] * 20, SamplingParams(max_tokens=4), request_id="r2")
        while llm.has_unfinished():
            worker.run_once()
        assert seq.is_finished and len(seq.output_token_ids) == 4
    finally:
        worker.close()


def test_the_router_refuses_prompts_over_its_limits():
    from kairos.transport.router import Router

    router = Router(port=0, max_prompt_chars=100, max_prompt_tokens=10)
    sent = []
    router.socket.send_multipart = lambda frames, *args, **kwargs: sent.append(p.decode(frames[-1]))
    try:
        router.on_submit(b"c", p.Submit("a", prompt="x" * 101))  # 4M characters once got a worker dropped
        router.on_submit(b"c", p.Submit("b", prompt_token_ids=[1] * 11))
        router.on_submit(b"c", p.Submit("c", prompt="x" * 100))
        assert [m.request_id for m in sent] == ["a", "b"]
        assert "101 characters" in sent[0].message and "11 tokens" in sent[1].message
        assert len(router.requests) == 1
    finally:
        router.ctx.destroy(linger=0)


def test_a_request_a_worker_reports_failed_is_aborted_on_every_worker_it_lives_on(router):
    router.on_submit(b"client", p.Submit("r", prompt_token_ids=[1, 2, 3]))
    rid = router.by_client[(b"client", "r")]
    router.requests[rid].prefill, router.requests[rid].decode = "p1", "d1"
    router.sent.clear()
    router.handle(b"d1", p.Error(rid, "bad KV transfer"))
    aborts = sorted(to for to, msg in router.sent if isinstance(msg, p.Abort) and msg.request_id == rid)
    assert aborts == [b"d1", b"p1"]  # the reporter too: the real sequence may be decoding there
    assert any(to == b"client" and isinstance(msg, p.Error) for to, msg in router.sent) and rid not in router.requests


def test_request_ids_inside_the_cluster_cannot_be_guessed(router):
    """Workers and the KV channel know a request by the router's id: a sequential one let a
    local process forge a transfer for another client's request."""
    for i in range(3):
        router.on_submit(b"client", p.Submit(f"r{i}", prompt_token_ids=[1, 2, 3]))
    ids = [router.by_client[(b"client", f"r{i}")] for i in range(3)]
    assert len(set(ids)) == 3 and all(len(rid) == 32 and int(rid, 16) >= 0 for rid in ids)


def test_a_refused_worker_learns_nothing_of_the_clusters_kv_geometry(router, caplog):
    add_fake_workers(router, {"num_layers": 32, "head_dim": 128})
    with caplog.at_level("WARNING", logger="kairos"):
        router.on_register(b"intruder", p.Register("intruder", "decode", {"num_layers": 2, "head_dim": 8},
                                                   64, "tcp://127.0.0.1:2"))
    (_, reply), = router.sent
    assert isinstance(reply, p.Error) and "geometry differs" in reply.message
    assert "32" not in reply.message and "128" not in reply.message and "intruder" not in router.workers
    assert "num_layers 2 vs 32" in caplog.text  # the operator still sees why


def test_the_decode_kv_socket_refuses_a_foreign_geometry_without_naming_its_own():
    from kairos.engine import LLM
    from kairos.transport.decode import DecodeWorker
    from kairos.transport.kv import kv_geometry

    llm = LLM("tiny", num_kv_blocks=64, max_model_len=256)
    worker = DecodeWorker(llm, "tcp://127.0.0.1:9")
    replies = []
    worker.kv_socket.send_multipart = lambda frames, *a, **k: replies.append(p.decode(frames[-1]))
    try:
        ours = kv_geometry(llm.runner).to_dict()
        worker.on_hello(b"peer", p.KVHello("intruder", {**ours, "num_layers": ours["num_layers"] + 7}))
        (reply,) = replies
        assert isinstance(reply, p.Error) and "geometry differs" in reply.message
        assert str(ours["num_layers"]) not in reply.message and b"peer" not in worker.greeted
    finally:
        worker.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_the_cpu_kv_cache_is_committed_at_start_so_serving_does_not_grow_the_process():
    """Untouched pages of an empty CPU tensor are committed only when first written: a worker
    grew by its whole KV cache over its first thousands of requests, which read as a leak of
    45 KB per request (bench/soak.py measures the process flat after its first round)."""
    from kairos.engine import LLM

    def rss_bytes() -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    before = rss_bytes()
    llm = LLM("tiny", cpu_kv_cache_gb=0.25, max_model_len=512)
    cache_bytes = llm.runner.kv_cache.numel() * llm.runner.kv_cache.element_size()
    assert cache_bytes > 200 * 2**20
    assert rss_bytes() - before > 0.9 * cache_bytes


def test_tokenizing_a_long_prompt_leaves_other_threads_running(tiny_path):
    """A worker's heartbeats come from a thread of their own: tokenizing a long prompt on the
    main thread must not hold them up (the router dropped a worker that went silent for it)."""
    import threading

    from kairos.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_path)
    text = "the quick brown fox jumps over the lazy dog, " * 40_000  # 1.8 million characters
    gaps, done = [], threading.Event()

    def beat():
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=beat)
    thread.start()
    time.sleep(0.05)
    started = time.perf_counter()
    ids = tokenizer.encode(text)
    took = time.perf_counter() - started
    done.set()
    thread.join()
    assert len(ids) > 400_000 and took > 0.2
    assert max(gaps) < took / 2, (max(gaps), took)


def test_binding_beyond_loopback_without_keys_warns_loudly(caplog, tmp_path):
    from kairos.transport.router import Router
    from kairos.transport.security import CurveKeys, generate_keys

    for host, keys, warned in (("127.0.0.1", None, False), ("0.0.0.0", None, True),
                               ("0.0.0.0", CurveKeys.load(generate_keys(tmp_path / "keys"), "router"), False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="kairos"):
            router = Router(host, port=0, keys=keys)
        router.close()
        assert ("WITHOUT authentication" in caplog.text) == warned, (host, keys)


def test_keys_are_written_once_and_read_with_a_clear_error(tmp_path):
    from kairos.transport.security import CurveKeys, generate_keys

    with pytest.raises(ValueError, match="kairos keys"):
        CurveKeys.load(tmp_path / "none", "worker")
    folder = generate_keys(tmp_path / "keys")
    with pytest.raises(ValueError, match="already holds keys"):
        generate_keys(folder)
    worker, client = CurveKeys.load(folder, "worker"), CurveKeys.load(folder, "client")
    assert worker.server_public == client.server_public and client.server_secret is None
    assert worker.public in worker.allowed_workers and client.public not in worker.allowed_workers
    assert CurveKeys.load(folder, "client").public != client.public  # a client's key is its own


def test_a_worker_socket_identity_taken_by_another_key_is_not_that_worker(router):
    router.workers["d1"].key = "the-key-d1-registered-with"
    router.handle(b"d1/heartbeat", p.Heartbeat("d1", {"free_blocks": 1}), user_id="someone-else")
    assert router.workers["d1"].stats == {} and isinstance(router.sent[-1][1], p.Error)
    router.handle(b"d1/heartbeat", p.Heartbeat("d1", {"free_blocks": 1}), user_id="the-key-d1-registered-with")
    assert router.workers["d1"].stats == {"free_blocks": 1}


def test_a_busy_worker_keeps_its_requests_but_gets_no_new_ones(router):
    """A worker whose loop is stuck in one long turn still beats (heartbeats have a thread of
    their own): it is busy, not dead. New requests go to a free worker, or wait for one."""
    from kairos.transport.router import WorkerInfo

    router.handle(b"p1/heartbeat", p.Heartbeat("p1", {"free_blocks": 64, "loop_age_s": 4.5}))
    router.on_submit(b"client", p.Submit("waits", prompt_token_ids=[1, 2, 3]))
    assert router.pending and not any(isinstance(m, p.PrefillRequest) for _, m in router.sent)
    router.workers["p2"] = WorkerInfo("p2", "prefill", b"p2", {}, 64, None, time.monotonic())
    router.dispatch_pending(time.monotonic())
    assert [who for who, m in router.sent if isinstance(m, p.PrefillRequest)] == [b"p2"]
    router.run_once(poll_ms=0)
    assert "p1" in router.workers  # beating, so not given up for dead
    router.handle(b"p1/heartbeat", p.Heartbeat("p1", {"free_blocks": 64, "loop_age_s": 0.01}))
    router.on_submit(b"client", p.Submit("next", prompt_token_ids=[1, 2, 3]))
    assert router.requests[router.by_client[(b"client", "next")]].prefill == "p1"  # free again, and idler


def test_a_worker_says_so_every_10_s_while_the_router_leaves_it_unanswered(caplog):
    """A wrong --router address would otherwise leave a worker waiting in silence."""
    from types import SimpleNamespace

    from kairos.transport.worker import REGISTER_WARNING_S, Worker

    worker = SimpleNamespace(role="prefill", worker_id="prefill-1", router_addr="tcp://127.0.0.1:1",
                             _unregistered_since=None, _warn_at=0.0)
    with caplog.at_level("WARNING", logger="kairos.worker"):
        for second in range(26):  # a registration sent each second
            Worker._warn_if_unanswered(worker, 100.0 + second)
    said = [r.getMessage() for r in caplog.records]
    assert REGISTER_WARNING_S == 10 and len(said) == 2
    assert "no answer from the router at tcp://127.0.0.1:1 for 10 s" in said[0] and "for 20 s" in said[1]


def test_a_worker_registering_again_takes_the_routers_further_answers_as_nothing_new(caplog):
    """After a router restart, each message the worker sent before it knew is answered with
    RegisterAgain: only the first drops its requests; the rest are neither handled nor logged."""
    from types import SimpleNamespace

    from kairos.transport.worker import Worker

    resets, handled = [], []
    worker = SimpleNamespace(registered=True, reset=lambda: resets.append(1), handle_router=handled.append,
                             _last_register=5.0)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            Worker._on_router_message(worker, SimpleNamespace(msg=p.RegisterAgain()))
    assert len(resets) == 1 and not worker.registered and worker._last_register == 0.0 and not handled
    assert len(caplog.records) == 1
