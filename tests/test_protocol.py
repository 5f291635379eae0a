"""The wire protocol, socket validation and the KV frame format, in one process."""

import random
import time

import msgpack
import pytest
import torch
import zmq

from kairos.transport import protocol as p
from kairos.transport.kv import (
    KVWriter,
    OutgoingKV,
    PinnedPool,
    blocks_per_frame,
    export_cache,
    kv_geometry,
    open_peer_cache,
)
from kairos.transport.sockets import make_socket, recv, send

EXAMPLES = [
    p.Submit("r1", prompt="hello", params={"max_tokens": 4}, slo={"ttft_ms": 200.0, "request_class": "chat"}),
    p.Submit("r2", prompt_token_ids=[1, 2, 3]),
    p.Abort("r1"),
    p.Submit("r3", prompt="<s>user: hi", add_special_tokens=False),
    p.Tokens("r1", 3, [7, 8], "ab", "stop", prompt_tokens=12),
    p.StepTokens(["r1", "r2"], [3, 0], [[7], [9]], ["a", ""], [None, "length"]),
    p.StepTokens(["r1", "r2"], [3, 0], [[7], [9]], ["a", ""], [None, "length"], [None, 40]),
    p.Error(None, "nope"),
    p.Error("r1", "too long", p.PROMPT_TOO_LONG),
    p.StatusQuery(),
    p.StatusReport([{"role": "decode"}], {"completed": 1}, 0),
    p.MetricsQuery(),
    p.MetricsReport("# HELP kairos:x y\n"),
    p.Register("w", "decode", {"dtype": "float32"}, 64, "tcp://127.0.0.1:1"),
    p.Heartbeat("w", {"free_blocks": 3}),
    p.PrefillRequest("7", None, [1, 2], {}, {"ttft_ms": 200.0}, "d", "tcp://127.0.0.1:2", 1.7e9),
    p.KVOffer("t", "7", [1, 2], {"max_tokens": 2}, {"tpot_ms": 20.0}, 1),
    p.KVData("t", 4, 3),
    p.KVHello("p", {"dtype": "bfloat16"}, {"host": "h", "handle": b"\x00\xff"}),  # bytes stay bytes
    p.KVHelloOk("d", cuda_ipc=True),
    p.KVData("t", 4, 3, block_ids=[3, 9]),
    p.KVCancel("t", "timed out"),
    p.Completed({"request_class": "chat", "kind": "latency"}, 300, 42),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg):
    assert p.decode(p.encode(msg)) == msg


def raw(**body) -> bytes:
    return msgpack.packb(body)


@pytest.mark.parametrize("data, error", [
    (b"\xc1\x00", "not msgpack"),
    (msgpack.packb([1, 2]), "expected a map"),
    (raw(v=99, type="abort", request_id="x"), "protocol version 99"),
    (raw(type="abort", request_id="x"), "protocol version None"),
    (raw(v=p.PROTOCOL_VERSION, type="launch_missiles"), "unknown message type 'launch_missiles'"),
    (raw(v=p.PROTOCOL_VERSION, type="abort"), "missing field 'request_id'"),
    (raw(v=p.PROTOCOL_VERSION, type="abort", request_id=5), "abort.request_id: expected str, got int"),
    (raw(v=p.PROTOCOL_VERSION, type="abort", request_id="x", extra=1), "unknown fields ['extra']"),
    (raw(v=p.PROTOCOL_VERSION, type="submit", request_id="x", prompt_token_ids=[1, "2"]), "prompt_token_ids"),
    (raw(v=p.PROTOCOL_VERSION, type="tokens", request_id="x", index=True, token_ids=[], text=""),
     "expected int, got bool"),
])
def test_invalid_messages_are_rejected_with_the_reason(data, error):
    with pytest.raises(p.ProtocolError, match=error.replace("[", r"\[").replace("]", r"\]")):
        p.decode(data)


def test_oversized_messages_are_rejected_before_parsing():
    with pytest.raises(p.ProtocolError, match="exceeds the limit"):
        p.decode(p.encode(p.Abort("x" * 100)), max_bytes=50)


def test_a_bad_message_gets_an_error_reply_and_the_socket_keeps_serving():
    ctx = zmq.Context()
    try:
        server = make_socket(ctx, zmq.ROUTER, max_bytes=4096)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = make_socket(ctx, zmq.DEALER)
        client.connect(f"tcp://127.0.0.1:{port}")

        def receive():
            assert server.poll(5000)
            return recv(server, routed=True)

        client.send(b"garbage")
        assert receive() is None
        assert client.poll(5000)
        reply = p.decode(client.recv())
        assert isinstance(reply, p.Error) and "malformed" in reply.message
        client.send(p.encode(p.Abort("ok")))
        good = receive()
        assert good.msg == p.Abort("ok") and good.identity
        assert send(server, p.Abort("back"), good.identity)
        assert client.poll(5000) and p.decode(client.recv()) == p.Abort("back")
        # A peer that is gone: the send reports it instead of raising.
        assert not send(server, p.Abort("x"), b"nobody")
    finally:
        ctx.destroy(linger=0)


def test_geometry_mismatch_names_every_difference(tiny_llm):
    g = kv_geometry(tiny_llm.runner)
    other = p.KVGeometry(g.model, "float16", 32, g.num_layers, g.num_kv_heads, g.head_dim)
    assert g.mismatch(g) is None
    assert g.mismatch(other) == "KV geometry differs: dtype 'float32' vs 'float16'; block_size 16 vs 32"


class FakeFrame:
    def __init__(self, view):
        self.buffer = memoryview(bytes(view))


@pytest.mark.parametrize("num_blocks, frame_blocks", [(1, 1), (5, 2), (7, 16), (3, 3)])
def test_kv_blocks_survive_export_and_import(tiny_llm, num_blocks, frame_blocks):
    """Blocks copied out of one cache as frames land bit-exact in other blocks of a cache."""
    runner = tiny_llm.runner
    cache = runner.kv_cache
    src_ids = torch.randperm(32)[:num_blocks].tolist()
    dst_ids = (torch.randperm(32) + 64)[:num_blocks].tolist()
    cache[:, :, src_ids] = torch.randn_like(cache[:, :, src_ids])
    geometry = kv_geometry(runner)
    frame_bytes = frame_blocks * geometry.bytes_per_block_layer
    per_frame = blocks_per_frame(geometry, frame_bytes)
    assert per_frame == frame_blocks
    frames = [FakeFrame(f) for f in OutgoingKV(runner, src_ids, None).frames(per_frame)]
    writer = KVWriter(runner, frame_bytes)
    assert writer.check(frames, num_blocks, per_frame) is None
    writer.write(frames, dst_ids, per_frame)
    assert torch.equal(cache[:, :, dst_ids], cache[:, :, src_ids])


def test_kv_frames_of_the_wrong_shape_are_refused(tiny_llm):
    runner = tiny_llm.runner
    geometry = kv_geometry(runner)
    writer = KVWriter(runner, 4 * geometry.bytes_per_block_layer)
    frames = [FakeFrame(f) for f in OutgoingKV(runner, [0, 1, 2], None).frames(2)]
    assert writer.check(frames, 3, 2) is None
    assert "expected 16 KV frames, got 15" in writer.check(frames[:-1], 3, 2)
    assert "bytes, expected" in writer.check(frames, 4, 2)
    assert "blocks_per_frame 5" in writer.check(frames, 3, 5)


class FakeTracker:
    def __init__(self):
        self.done = False


def test_the_staging_pool_lends_disjoint_ranges_and_reuses_them_only_once_sent():
    """Ranges never overlap, a range whose frames ZeroMQ still holds is not lent again, and
    when everything is back the pool is one free range again."""
    align = PinnedPool.ALIGN
    pool = PinnedPool(64 * align, pin=False)
    rng = random.Random(7)
    lent: dict[int, int] = {}  # offset -> bytes
    for _ in range(2000):
        if lent and (rng.random() < 0.5 or len(lent) > 12):
            offset = rng.choice(list(lent))
            tracker = FakeTracker() if rng.random() < 0.3 else None
            pool.release(offset, lent.pop(offset), tracker)
            if tracker is not None:  # ZeroMQ still holds it: not free until the send is done
                pool.take(0)
                assert all(not o <= offset < o + n for o, n in pool.free)
                tracker.done = True
        else:
            nbytes = rng.randint(1, 8 * align)
            offset = pool.take(nbytes)
            if offset is None:
                assert all(n < nbytes for _, n in pool.free)  # no free range fits
                continue
            assert offset % align == 0 and offset + nbytes <= 64 * align
            end = offset + nbytes
            assert all(end <= o or o + n <= offset for o, n in lent.items())  # disjoint
            lent[offset] = nbytes
    for offset, nbytes in lent.items():
        pool.release(offset, nbytes)
    assert pool.take(64 * align) == 0  # coalesced back into one range


def test_the_decode_worker_keeps_kv_under_way_within_its_byte_budget():
    """Offers are made ready while the KV under way fits the budget; one always may go, and
    the next goes once the first is no longer under way."""
    import time

    from kairos.engine import LLM
    from kairos.transport.decode import DecodeWorker

    llm = LLM("tiny", num_kv_blocks=64, max_model_len=256)
    three_blocks = 3 * kv_geometry(llm.runner).bytes_per_block
    worker = DecodeWorker(llm, "tcp://127.0.0.1:9", max_inflight_bytes=three_blocks + 1)
    peer = b"prefill-test"
    worker.greeted.add(peer)
    for i, num_tokens in enumerate((40, 40, 100)):  # 3, 3 and 7 blocks of 16 tokens
        prompt = list(range(1, num_tokens + 1))
        worker.handle_router(p.KVExpect(f"r{i}", peer.decode()))  # the router assigned it to this peer
        worker.on_offer(peer, p.KVOffer(f"t{i}", f"r{i}", prompt, {"max_tokens": 5}, {}, -(-num_tokens // 16)))
    worker.accept_offers(time.monotonic())
    assert list(worker.incoming) == ["t0"] and worker.inflight_bytes == three_blocks
    worker.drop(worker.incoming["t0"])
    worker.accept_offers(time.monotonic())
    assert list(worker.incoming) == ["t1"]
    worker.drop(worker.incoming["t1"])
    worker.accept_offers(time.monotonic())  # 7 blocks exceed the budget, but nothing is under way
    assert list(worker.incoming) == ["t2"] and not worker.offers
    worker.close()


def test_the_decode_worker_makes_room_saying_how_long_its_steps_take():
    """It takes KV in and acknowledges it between steps: its answer to an offer carries its
    longest step, which the prefill side waits beyond its transfer timeout for the ack."""
    import time

    from kairos.engine import LLM
    from kairos.transport.decode import DecodeWorker

    worker = DecodeWorker(LLM("tiny", num_kv_blocks=64, max_model_len=256), "tcp://127.0.0.1:9")
    sent = []
    worker.kv_socket.send_multipart = lambda frames, *a, **k: sent.append(p.decode(frames[-1]))
    peer = b"prefill-test"
    worker.greeted.add(peer)
    worker.longest_step_s = 2.25
    worker.handle_router(p.KVExpect("r", peer.decode()))
    worker.on_offer(peer, p.KVOffer("t", "r", list(range(1, 41)), {"max_tokens": 5}, {}, 3))
    worker.accept_offers(time.monotonic())
    assert sent == [p.KVReady("t", step_s=2.25)]
    worker.drop(worker.incoming["t"])
    worker.close()


def test_the_decode_worker_writes_kv_in_the_background_and_frees_blocks_only_after_the_write():
    """KV lands on a writer thread while the worker loop goes on. A request aborted while its
    write is under way keeps its blocks until the write is over (the thread is still filling
    them), a failed write fails its request, and every path gives all blocks back."""
    import threading
    import time

    from kairos.engine import LLM
    from kairos.transport.decode import DecodeWorker

    llm = LLM("tiny", num_kv_blocks=64, max_model_len=256)
    worker = DecodeWorker(llm, "tcp://127.0.0.1:9")  # no router there: its messages are dropped
    total = llm.num_total_blocks
    gate = threading.Event()
    write = worker.writer.write
    worker.writer.write = lambda *args: (gate.wait(10), write(*args))
    failures = []
    worker.fail = lambda request_id, message: failures.append((request_id, message))
    peer = b"prefill-test"
    worker.greeted.add(peer)
    source = llm.runner.kv_cache
    source[:, :, :3] = torch.randn_like(source[:, :, :3])
    per_frame = blocks_per_frame(worker.geometry, worker.max_frame_bytes)
    frames = [FakeFrame(f) for f in OutgoingKV(llm.runner, [0, 1, 2], None).frames(per_frame)]
    expected = source[:, :, :3].clone()

    def receive(transfer_id: str, request_id: str):
        worker.handle_router(p.KVExpect(request_id, peer.decode()))
        worker.on_offer(peer, p.KVOffer(transfer_id, request_id, list(range(1, 41)), {"max_tokens": 5}, {}, 3))
        worker.accept_offers(time.monotonic())
        worker.on_data(peer, p.KVData(transfer_id, per_frame, 7), frames)
        assert transfer_id in worker.writing and llm.num_free_blocks == total - 3

    def settle():
        deadline = time.monotonic() + 10
        while worker.writing:
            worker.finish_writes()
            assert time.monotonic() < deadline, "the writer thread did not finish"
            time.sleep(0.01)

    try:
        receive("t1", "aborted")
        worker.abort("aborted")
        worker.finish_writes()
        assert llm.num_free_blocks == total - 3 and worker.counters["aborted"] == 1  # still being written
        gate.set()
        settle()
        assert llm.num_free_blocks == total and not llm.has_unfinished()

        receive("t2", "decoded")
        settle()
        (seq,) = llm.scheduler.ready
        assert seq.request_id == "decoded" and seq.num_computed_tokens == 40
        assert torch.equal(source[:, :, seq.block_table], expected)
        while llm.has_unfinished():
            llm.step()
        assert llm.num_free_blocks == total

        worker.writer.write = lambda *args: (_ for _ in ()).throw(RuntimeError("device lost"))
        receive("t3", "failed")
        settle()
        assert failures == [("failed", "writing the KV failed: device lost")]
        assert llm.num_free_blocks == total and not llm.has_unfinished()
    finally:
        gate.set()
        worker.close()


def test_the_router_sends_each_prompt_to_the_prefill_worker_with_the_least_prompt_work_queued():
    """A prefill worker's queue is measured in prompt tokens until each first token comes back
    (a request count would send a short prompt behind a long one); finished and aborted
    requests leave the count."""

    from kairos.transport.router import Router, WorkerInfo

    router = Router(port=0)
    router.socket.send_multipart = lambda frames, *args, **kwargs: None  # no client to stream to
    try:
        for worker_id, role in (("p1", "prefill"), ("p2", "prefill"), ("d1", "decode")):
            router.workers[worker_id] = WorkerInfo(worker_id, role, worker_id.encode(), {}, 64,
                                                   "tcp://127.0.0.1:1" if role == "decode" else None, time.monotonic())
        p1, p2, d1 = (router.workers[w] for w in ("p1", "p2", "d1"))

        def submit(request_id: str, tokens: int | None = None, text: str | None = None) -> str:
            router.on_submit(b"client", p.Submit(request_id, prompt=text,
                                                 prompt_token_ids=None if text else [1] * tokens))
            return router.by_client[(b"client", request_id)]

        long = submit("long", 4000)
        assert router.requests[long].prefill == "p1"
        short = [submit(f"s{i}", 100) for i in range(3)]  # three short prompts, all behind no long one
        assert all(router.requests[rid].prefill == "p2" for rid in short)
        assert sum(p2.prefill_tokens.values()) == 300 and len(p2.requests) == 3
        text = submit("text", text="x" * 4000)  # about 1000 tokens: still less work queued on p2
        assert router.requests[text].prefill == "p2"
        router.on_tokens(p1, p.Tokens(long, 0, [5], "a"))  # the long prompt's first token
        assert p1.prefill_tokens == {} and long in p1.requests  # it decodes on; its prompt is done
        assert router.requests[submit("next", 100)].prefill == "p1"
        router.on_client_abort(b"client", "s0")
        assert short[0] not in p2.prefill_tokens and short[0] not in d1.requests
        assert router.status().workers[1]["queued_prompt_tokens"] == 200 + 1001
    finally:
        router.ctx.destroy(linger=0)


def test_the_router_reports_how_old_each_workers_figures_are():
    """A worker's figures come in its heartbeats; other messages show it alive without
    refreshing them, so the status says how old the figures are, apart from the last contact."""
    from kairos.transport.router import Router, WorkerInfo

    router = Router(port=0)
    try:
        router.workers["p1"] = WorkerInfo("p1", "prefill", b"p1", {}, 64, None, time.monotonic())
        assert router.status().workers[0]["stats_age_ms"] is None
        router.handle(b"p1/heartbeat", p.Heartbeat("p1", {"free_blocks": 60}))
        time.sleep(0.2)
        router.handle(b"p1", p.Error(None, "an error about no request"))
        status = router.status().workers[0]
        assert status["free_blocks"] == 60
        assert status["stats_age_ms"] >= 200 > status["last_seen_ms"]
    finally:
        router.ctx.destroy(linger=0)


def test_a_kv_cache_is_mapped_only_from_a_well_formed_export_on_this_gpu(tiny_llm):
    """CUDA IPC exports are checked field by field before anything is mapped, and a worker whose
    cache is not on a GPU exports nothing and maps nothing."""
    runner = tiny_llm.runner
    geometry = kv_geometry(runner)
    export = {"host": "h", "device_uuid": "GPU-0", "handle": b"h", "storage_bytes": 1 << 20, "storage_offset": 0,
              "ref_counter_handle": b"r", "ref_counter_offset": 0, "event_handle": b"e",
              "event_sync_required": False, "tensor_offset": 0, "shape": list(runner.kv_cache.shape)}
    for name, bad in [("handle", "not bytes"), ("shape", None), ("event_sync_required", 1)]:
        with pytest.raises(ValueError, match=f"bad CUDA IPC export: {name}"):
            open_peer_cache({**export, name: bad}, runner, geometry)
    if runner.kv_cache.device.type == "cpu":
        assert export_cache(runner) is None
        with pytest.raises(ValueError, match="not on a GPU"):
            open_peer_cache(export, runner, geometry)
    else:
        with pytest.raises(ValueError, match="another host or GPU"):
            open_peer_cache(export, runner, geometry)


def test_one_message_carries_a_steps_tokens_and_the_router_relays_each_in_order():
    """A worker sends one step's tokens in one message; the router hands each request its
    chunk (holding any that arrive ahead of their turn), and rejects columns of unequal length."""
    from kairos.transport.router import Router, WorkerInfo

    router = Router(port=0)
    sent = []
    try:
        router.workers["d1"] = WorkerInfo("d1", "decode", b"d1", {}, 64, "tcp://127.0.0.1:1", time.monotonic())
        router.workers["p1"] = WorkerInfo("p1", "prefill", b"p1", {}, 64, None, time.monotonic())
        rids = []
        for name in ("a", "b"):
            router.on_submit(b"client", p.Submit(name, prompt_token_ids=[1, 2, 3]))
            rid = router.by_client[(b"client", name)]
            router.requests[rid].prefill, router.requests[rid].decode = "p1", "d1"
            rids.append(rid)
        router.socket.send_multipart = lambda frames, *args, **kwargs: sent.append(p.decode(frames[-1]))
        chunks = [p.Tokens(rids[0], 1, [8], "y"), p.Tokens(rids[1], 0, [5], "x", "stop", prompt_tokens=3),
                  p.Tokens(rids[0], 0, [7], "x")]
        router.handle(b"d1", p.StepTokens.of(chunks))
        sent = [m for m in sent if isinstance(m, p.Tokens)]
        assert [(m.request_id, m.index, m.token_ids, m.finish_reason, m.prompt_tokens) for m in sent] == [
            ("b", 0, [5], "stop", 3), ("a", 0, [7], None, None), ("a", 1, [8], None, None)]
        assert rids[1] not in router.requests and rids[0] in router.requests
        sent.clear()
        router.handle(b"d1", p.StepTokens([rids[0]], [2, 3], [[1]], ["z"], [None]))
        assert len(sent) == 1 and isinstance(sent[0], p.Error) and "unequal length" in sent[0].message
        assert router.requests[rids[0]].next_index == 2  # nothing of the bad message was relayed
    finally:
        router.ctx.destroy(linger=0)


def test_the_router_tells_every_prefill_worker_how_long_a_finished_output_ran():
    """A prefill worker sees no output past the first token, yet its policy may rank prompts by
    predicted output length: the router reports each request that ran to its end to every
    prefill worker (its SLO, prompt and output lengths), and no aborted one."""
    from serving import recording_router

    from kairos.transport.router import WorkerInfo

    router = recording_router()
    try:
        router.workers["p2"] = WorkerInfo("p2", "prefill", b"p2", {}, 64, None, time.monotonic())
        rids = {}
        for name in ("done", "aborted"):
            router.on_submit(b"client", p.Submit(name, prompt_token_ids=[1, 2, 3], slo={"request_class": "chat"}))
            rids[name] = rid = router.by_client[(b"client", name)]
            router.requests[rid].prefill, router.requests[rid].decode = "p1", "d1"
        router.sent.clear()
        router.handle(b"d1", p.StepTokens.of([p.Tokens(rids["done"], 0, [5, 6], "xy"),
                                              p.Tokens(rids["aborted"], 0, [7], "z")]))
        router.handle(b"d1", p.StepTokens.of([p.Tokens(rids["done"], 2, [8], "w", "length", prompt_tokens=3)]))
        router.on_client_abort(b"client", "aborted")
        reports = [(to, m) for to, m in router.sent if isinstance(m, p.Completed)]
        assert sorted(to for to, _ in reports) == [b"p1", b"p2"]
        _, report = reports[0]
        assert (report.slo["request_class"], report.prompt_tokens, report.output_tokens) == ("chat", 3, 3)
    finally:
        router.ctx.destroy(linger=0)


def test_the_router_says_what_kind_of_failure_each_refusal_is():
    """Error codes let a front end answer in its own terms: a prompt over the router's limits
    is prompt_too_long, a bad parameter invalid_request, no worker in time unavailable; each is
    counted under its code in the metrics."""
    from serving import recording_router

    router = recording_router()
    router.max_prompt_chars, router.queue_timeout_s = 10, 0.0
    try:
        router.on_submit(b"c", p.Submit("long", prompt="x" * 11))
        router.on_submit(b"c", p.Submit("bad", prompt="x", params={"max_tokens": 0}))
        router.workers.clear()
        router.on_submit(b"c", p.Submit("alone", prompt="x"))
        router.dispatch_pending(time.monotonic() + 1)
        errors = {m.request_id: m.code for _, m in router.sent if isinstance(m, p.Error)}
        assert errors == {"long": p.PROMPT_TOO_LONG, "bad": p.INVALID_REQUEST, "alone": p.UNAVAILABLE}
        text = router.metrics.text()
        for code in errors.values():
            assert f'kairos:request_failure_total{{code="{code}"}} 1.0' in text
    finally:
        router.close()


def test_a_decode_worker_clocks_a_request_from_its_arrival_and_its_first_token_from_its_sampling():
    """The offer says how long ago the request reached the router and the KV how long ago its
    first token was sampled: the decode policy's slack and TPOT clocks run from then, as the
    simulator's do, not from when the offer and the KV happened to come. A peer's nonsense age
    counts as none, or as at most a day."""
    from kairos.engine import LLM
    from kairos.transport.decode import DecodeWorker

    llm = LLM("tiny", num_kv_blocks=64, max_model_len=256)
    worker = DecodeWorker(llm, "tcp://127.0.0.1:9")  # no router there: its messages are dropped
    peer = b"prefill-test"
    worker.greeted.add(peer)
    per_frame = blocks_per_frame(worker.geometry, worker.max_frame_bytes)
    frames = [FakeFrame(f) for f in OutgoingKV(llm.runner, [0, 1, 2], None).frames(per_frame)]
    try:
        for request_id, age, token_age, taken, token_taken in [("a", 2.5, 1.0, 2.5, 1.0),
                                                                ("b", float("inf"), -5.0, 0.0, 0.0),
                                                                ("c", 1e12, float("nan"), 86400.0, 0.0)]:
            worker.handle_router(p.KVExpect(request_id, peer.decode()))
            now = time.monotonic()
            worker.on_offer(peer, p.KVOffer(f"t-{request_id}", request_id, list(range(1, 41)), {"max_tokens": 5},
                                            {}, 3, age_s=age))
            seq = worker.offers[-1]
            assert seq.arrival_time == pytest.approx(now - taken, abs=0.5)
            worker.accept_offers(time.monotonic())
            now = time.monotonic()
            worker.on_data(peer, p.KVData(f"t-{request_id}", per_frame, 7, first_token_age_s=token_age), frames)
            assert seq.first_token_time == pytest.approx(now - token_taken, abs=0.5)
            while worker.writing:
                worker.finish_writes()
    finally:
        worker.close()
