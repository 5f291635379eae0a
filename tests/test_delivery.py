"""Nothing the cluster sends is lost without a word, and nothing it computes is for nobody: no
queue limit drops a burst, a request whose client is gone or stopped reading is aborted on its
workers, a request that cannot go on the wire fails before it is sent, and a replay counts a
request that timed out as failed rather than ending."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import zmq
from serving import recording_router

from kairos.scheduler.traces import TraceRequest
from kairos.transport import protocol as p
from kairos.transport.client import AsyncClient, Client, RequestTooLarge, encoded_submit, make_submit
from kairos.transport.replay import replay_requests
from kairos.transport.sockets import make_socket, recv, send
from kairos.transport.worker import Worker


@pytest.fixture()
def router():
    router = recording_router()
    yield router
    router.ctx.destroy(linger=0)


@pytest.fixture()
def fake_router():
    """A bare ROUTER socket standing for the router: what clients send it, and replies."""
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    ctx.destroy(linger=0)


def received(sock, timeout_ms: int = 5000) -> tuple[bytes, p.Message]:
    assert sock.poll(timeout_ms), "nothing arrived"
    got = recv(sock, routed=True)
    return got.identity, got.msg


def test_a_burst_beyond_zeromqs_default_queue_arrives_whole():
    """At the default of 1000 messages a peer, a reader busy for a moment lost the rest."""
    ctx = zmq.Context()
    try:
        server = make_socket(ctx, zmq.ROUTER)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        peer = make_socket(ctx, zmq.DEALER, identity=b"worker")
        peer.connect(f"tcp://127.0.0.1:{port}")
        send(peer, p.Heartbeat("worker", {}))
        received(server)  # the peer is known to the ROUTER socket now
        burst, text = 5000, "x" * 10_000  # beyond what the pipes and the TCP buffers hold
        assert all(send(server, p.Tokens(f"r{i}", 0, [], text, None), b"worker") for i in range(burst))
        ids = []
        while len(ids) < burst and peer.poll(5000):
            ids.append(p.decode(peer.recv()).request_id)
        assert ids == [f"r{i}" for i in range(burst)]
    finally:
        ctx.destroy(linger=0)


def test_a_request_whose_client_is_gone_is_aborted_on_its_workers(router):
    router.on_submit(b"client", p.Submit("r", prompt_token_ids=[1, 2, 3]))
    rid = router.by_client[(b"client", "r")]
    assert (router.requests[rid].prefill, router.requests[rid].decode) == ("p1", "d1")

    def send_multipart(frames, *args, **kwargs):
        if frames[0] == b"client":
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        router.sent.append((frames[0], p.decode(frames[-1])))

    router.socket.send_multipart = send_multipart
    router.sent.clear()
    router.handle(b"p1", p.Tokens(rid, 0, [7], "x", None))
    assert sorted(to for to, msg in router.sent if isinstance(msg, p.Abort) and msg.request_id == rid) == [b"d1", b"p1"]
    assert rid not in router.requests and not router.workers["p1"].requests and not router.workers["d1"].requests
    assert router.counters["aborted"] == 1


def test_a_worker_asking_again_to_register_keeps_its_requests(router):
    """Its Register crossed our answer: the same process, serving the same requests."""
    router.on_submit(b"client", p.Submit("r", prompt_token_ids=[1, 2, 3]))
    rid = router.by_client[(b"client", "r")]
    router.sent.clear()
    router.handle(b"p1", p.Register("p1", "prefill", {}, 64))
    assert rid in router.workers["p1"].requests and router.sent == [(b"p1", p.Registered("p1"))]


def test_a_request_that_cannot_go_on_the_wire_fails_before_it_is_sent():
    with pytest.raises(ValueError, match="not valid Unicode"):
        encoded_submit(make_submit("a lone \ud800 surrogate", "r"))
    with pytest.raises(ValueError, match="not valid Unicode"):
        encoded_submit(make_submit("fine", "r", stop=["\udfff"]))
    with pytest.raises(RequestTooLarge, match="a router takes at most"):
        encoded_submit(make_submit("x" * (p.MAX_CONTROL_MESSAGE_BYTES + 1), "r"))
    encoded_submit(make_submit("x" * (p.MAX_CONTROL_MESSAGE_BYTES - 1000), "r"))  # the limit is the message's


def test_a_stream_left_early_and_a_client_closed_mid_request_abort_at_the_router(fake_router):
    sock, addr = fake_router
    client = Client(addr, timeout_s=5)
    first = client.submit("one", max_tokens=8)
    identity, submit = received(sock)
    assert isinstance(submit, p.Submit) and submit.request_id == first
    send(sock, p.Tokens(first, 0, [5], "a", None), identity)
    for _ in client.stream(first):
        break
    assert received(sock)[1] == p.Abort(first)
    second = client.submit("two", max_tokens=8)
    received(sock)
    client.close()
    assert received(sock)[1] == p.Abort(second)


def test_an_async_stream_left_early_and_a_closed_async_client_abort_too(fake_router):
    sock, addr = fake_router

    async def run():
        client = AsyncClient(addr, timeout_s=5)
        stream = client.stream("one", max_tokens=8)
        task = asyncio.ensure_future(stream.__anext__())
        identity, submit = await asyncio.to_thread(received, sock)
        send(sock, p.Tokens(submit.request_id, 0, [5], "a", None), identity)
        await task
        await stream.aclose()
        assert (await asyncio.to_thread(received, sock))[1] == p.Abort(submit.request_id)
        second = await client.submit("two", max_tokens=8)
        await asyncio.to_thread(received, sock)
        client.close()
        assert (await asyncio.to_thread(received, sock))[1] == p.Abort(second)

    asyncio.run(run())


def test_a_replayed_request_that_times_out_fails_alone(fake_router):
    """The router answers the first request and never the second: the replay reports both."""
    sock, addr = fake_router
    trace = [TraceRequest(0.0, 4, 1), TraceRequest(0.0, 4, 1)]
    answered = []

    def answer_first():
        identity, submit = received(sock)
        answered.append(submit.request_id)
        send(sock, p.Tokens(submit.request_id, 0, [5], "a", "length", 4), identity)
        received(sock)  # the second, never answered

    thread = threading.Thread(target=answer_first)
    thread.start()
    started = time.monotonic()
    done = replay_requests(addr, trace, timeout_s=1.0)
    thread.join()
    assert time.monotonic() - started < 10
    assert sorted((r.output_len, r.error is None) for r in done) == [(0, False), (1, True)]
    assert "no reply from the router" in next(r.error for r in done if r.error)


def test_a_worker_loop_reads_no_socket_that_a_message_before_closed():
    """A router message (WorkerGone, RegisterAgain) can close a decode worker's KV socket that
    the same poll found readable: reading it raised, and the prefill worker died."""
    ctx = zmq.Context()
    try:
        ends = []
        for name in (b"router", b"kv"):
            server = make_socket(ctx, zmq.ROUTER)
            port = server.bind_to_random_port("tcp://127.0.0.1")
            client = make_socket(ctx, zmq.DEALER, identity=b"w")
            client.connect(f"tcp://127.0.0.1:{port}")
            send(client, p.Heartbeat("w", {}))
            received(server)
            send(server, p.Abort(name.decode()), b"w")
            ends.append(client)
        worker = Worker.__new__(Worker)
        worker.router, kv = ends
        worker.poller = zmq.Poller()
        for sock in ends:
            worker.poller.register(sock, zmq.POLLIN)
            assert sock.poll(5000)
        worker.registered, worker.blocked, worker.turn_notes = True, False, {}
        worker.llm = SimpleNamespace(has_unfinished=lambda: False)
        worker.tick = lambda now: None
        worker.idle_poll_ms = lambda: 1000

        def on_router_message(message):
            worker.poller.unregister(kv)
            kv.close(linger=0)

        worker._on_router_message = on_router_message
        worker.handle_socket = lambda sock: recv(sock, routed=False) is not None
        worker.run_once()
        assert kv.closed
    finally:
        ctx.destroy(linger=0)


def test_a_dead_decode_workers_requests_that_streamed_nothing_start_over_on_another(router):
    """Like a dead prefill worker's: placed anew under a new id, so that a first token the old
    attempt's prefill worker sent before its abort arrived is not taken for the new one's. One
    that has streamed a token fails."""
    from kairos.transport.router import WorkerInfo

    router.on_submit(b"client", p.Submit("quiet", prompt_token_ids=[1, 2, 3]))
    router.on_submit(b"client", p.Submit("streaming", prompt_token_ids=[4, 5, 6]))
    quiet, streaming = router.by_client[(b"client", "quiet")], router.by_client[(b"client", "streaming")]
    router.handle(b"p1", p.Tokens(streaming, 0, [9], "z", None))
    router.workers["d2"] = WorkerInfo("d2", "decode", b"d2", {}, 64, "tcp://127.0.0.1:2", time.monotonic())
    router.sent.clear()
    router.worker_died(router.workers["d1"])
    router.dispatch_pending(time.monotonic())
    retried = router.by_client[(b"client", "quiet")]
    assert retried != quiet and quiet not in router.requests and router.requests[retried].decode == "d2"
    assert (b"p1", p.Abort(quiet)) in router.sent and (b"p1", p.Abort(streaming)) in router.sent
    assert any(to == b"p1" and isinstance(m, p.PrefillRequest) and m.request_id == retried for to, m in router.sent)
    failed = [m for to, m in router.sent if to == b"client" and isinstance(m, p.Error)]
    assert [m.request_id for m in failed] == ["streaming"] and "decode worker d1" in failed[0].message
    router.sent.clear()
    router.handle(b"p1", p.Tokens(quiet, 0, [7], "x", None))  # the old attempt's, late
    router.handle(b"p1", p.Tokens(retried, 0, [8], "y", None))
    assert [(m.index, m.token_ids) for to, m in router.sent if to == b"client"] == [(0, [8])]


def test_a_router_that_is_not_there_fails_requests_at_the_connect_timeout_and_one_coming_up_serves_them():
    """Requests sent to an address where no router listens fail as unavailable once the
    client has not connected for its connect timeout (or its reply timeout, if shorter), and
    those sent later at once; a status query raises ConnectionError. A router that comes up
    within the timeout answers what was sent before."""
    from serving import kairos_process

    from kairos.transport.serve import free_port

    addr = f"tcp://127.0.0.1:{free_port()}"
    for timeouts in [dict(timeout_s=60, connect_timeout_s=0.3)] * 5 + [dict(timeout_s=0.3, connect_timeout_s=60)]:
        with Client(addr, **timeouts) as client:
            started = time.monotonic()
            result = client.generate("hello", max_tokens=2)
            assert result.error_code == p.UNAVAILABLE and f"no router at {addr}" in result.error
            assert time.monotonic() - started < 3
    with Client(addr, timeout_s=60, connect_timeout_s=0.3) as client:
        client.generate("hello", max_tokens=2)
        started = time.monotonic()
        assert client.generate("again", max_tokens=2).error_code == p.UNAVAILABLE
        with pytest.raises(ConnectionError, match="no router at"):
            client.status()
        assert time.monotonic() - started < 0.2  # past the timeout: nothing waits in the socket

    async def under_async_client():
        async with AsyncClient(addr, timeout_s=60, connect_timeout_s=0.3) as async_client:
            results = [await async_client.generate("hi", max_tokens=2) for _ in range(5)]
            with pytest.raises(ConnectionError):
                await async_client.status()
            return results

    started = time.monotonic()
    assert all(r.error_code == p.UNAVAILABLE for r in asyncio.run(under_async_client()))
    assert time.monotonic() - started < 3

    port = free_port()
    with Client(f"tcp://127.0.0.1:{port}", timeout_s=60, connect_timeout_s=30) as client:
        router = kairos_process("router", "--port", str(port))  # up after the client connects
        try:
            assert client.status()["workers"] == []
        finally:
            router.kill()
            router.wait(10)


def test_a_peer_that_accepts_and_hangs_up_fails_requests_at_the_connect_timeout():
    """Connection events that keep coming (no handshake ever completes) must not put off the
    connect timeout."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def hang_up():
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except OSError:
                pass

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    addr = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        async def under_async_client():
            async with AsyncClient(addr, timeout_s=30, connect_timeout_s=1.0) as client:
                return await client.generate("hi", max_tokens=2)

        for result in (Client(addr, timeout_s=30, connect_timeout_s=1.0).generate("hi", max_tokens=2),
                       asyncio.run(under_async_client())):
            assert result.error_code == p.UNAVAILABLE and "completed no handshake" in result.error, result
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_restarted_router_serves_the_next_request_of_a_client_that_was_idle_through_it():
    """The drop and the new connection, queued while the client was idle, are taken in before
    its next request is sent: the drop must not fail it."""
    from serving import kairos_process

    from kairos.transport.serve import free_port

    port = free_port()
    first = kairos_process("router", "--port", str(port))
    try:
        first.stdout.readline()
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=30) as client:
            assert client.status()["workers"] == []
            first.kill()
            first.wait(10)
            second = kairos_process("router", "--port", str(port))
            try:
                second.stdout.readline()
                time.sleep(1.0)  # the client reconnects meanwhile, reading nothing
                waiting = client.submit("hello", max_tokens=2)  # no worker: it waits at the router
                assert client.status()["pending"] == 1 and not client.tracked[waiting].done
            finally:
                second.kill()
                second.wait(10)
    finally:
        first.kill()
        first.wait(10)


def test_requests_fail_at_once_when_the_connection_to_the_router_drops():
    """A router that dies (or is restarted, knowing none of them) leaves its clients' requests
    nowhere: they fail as the connection drops, not at the clients' timeout."""
    import signal

    from serving import kairos_process

    from kairos.transport.serve import free_port

    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    router = kairos_process("router", "--port", str(port))
    try:
        router.stdout.readline()  # listening; with no worker, a request waits there
        with Client(addr, timeout_s=60) as client:
            client.status()
            waiting = client.submit("hello", max_tokens=4)

            async def killed_under_async_client():
                async with AsyncClient(addr, timeout_s=60) as async_client:
                    await async_client.status()
                    pending = asyncio.ensure_future(async_client.generate("hi", max_tokens=3))
                    await asyncio.sleep(0.3)
                    router.send_signal(signal.SIGKILL)
                    return await asyncio.wait_for(pending, 10)

            started = time.monotonic()
            async_result = asyncio.run(killed_under_async_client())
            result = client.result(waiting)
            assert time.monotonic() - started < 10
        for r in (async_result, result):
            assert r.error_code == p.UNAVAILABLE and "connection to the router" in r.error, r
    finally:
        router.kill()
        router.wait(10)
