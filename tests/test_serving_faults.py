"""Serving under faults, with real processes: killed workers, stalled transfers, a shutdown,
and a deployment across network namespaces."""

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq
from serving import WORKER_ARGS, Cluster, FakePrefillWorker, decode_stats, free_port, kairos_process, reply

from kairos.engine import LLM, SamplingParams
from kairos.transport import protocol as p
from kairos.transport.kv import OutgoingKV, blocks_per_frame, kv_geometry
from kairos.transport.sockets import make_socket, recv, send

# As long as the workers' 512-token limit allows a 30-token prompt: a stream must still be running
# when the test kills its worker, however fast the decode loop.
LONG = {"max_tokens": 480, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def cluster(tiny_path):
    c = Cluster()
    yield c
    c.stop()


def start_streams(client, n: int, tokens_each: int = 3) -> list:
    """n long requests, each read until it has streamed a few tokens."""
    streams = []
    for i in range(n):
        rid = client.submit([7 + i] * 30, **LONG)
        stream = client.stream(rid)
        for _ in range(tokens_each):
            next(stream)
        streams.append(stream)
    return streams


def drain(stream) -> str | None:
    """The error a stream ends with, or None if it ends normally."""
    try:
        for _ in stream:
            pass
    except Exception as e:  # noqa: BLE001 - the error is what the test inspects
        return str(e)
    return None


def test_killed_decode_worker_fails_its_requests_and_a_new_one_takes_over(cluster):
    cluster.add_worker("prefill")
    decode = cluster.add_worker("decode")
    cluster.wait_for_workers(1, 1)
    with cluster.client() as client:
        streams = start_streams(client, 3)
        decode.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        errors = [drain(s) for s in streams]
        assert time.monotonic() - killed < 5
        assert all(e and "decode worker" in e and "died" in e for e in errors), errors
        assert client.status()["counters"]["failed"] == 3  # the router is up
        cluster.add_worker("decode")
        cluster.wait_for_workers(1, 1)
        assert client.generate("after the crash", max_tokens=4, temperature=0).finish_reason == "length"
    cluster.wait_idle()


def test_killed_prefill_worker_hands_its_queue_to_another_or_fails_it(cluster):
    stopped = cluster.add_worker("prefill")
    survivor = cluster.add_worker("prefill")
    cluster.add_worker("decode")
    cluster.wait_for_workers(2, 1)
    with cluster.client() as client:
        # A frozen worker still looks registered until its heartbeats are missed, so it is
        # given requests that it never starts: they must move to the other worker.
        stopped.send_signal(signal.SIGSTOP)
        results = client.generate([[11 + i] * 20 for i in range(8)], max_tokens=5, temperature=0)
        assert [r.error for r in results] == [None] * 8
        stopped.send_signal(signal.SIGKILL)
        # With no other prefill worker left, a dead worker's requests fail, within 5 s.
        survivor.send_signal(signal.SIGSTOP)
        ids = [client.submit([3] * 10, max_tokens=5) for _ in range(3)]
        survivor.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        errors = [client.result(rid).error for rid in ids]
        assert time.monotonic() - killed < 5
        assert all(e and "prefill worker" in e and "died" in e for e in errors), errors
        cluster.add_worker("prefill")
        cluster.wait_for_workers(1, 1)
        assert client.generate("a new prefill worker", max_tokens=3).error is None
    cluster.wait_idle()


def wait_for_free_prefill_blocks(cluster, timeout_s: float = 5.0) -> None:
    """Until the prefill worker reports every KV block free and no transfer."""
    deadline = time.monotonic() + timeout_s
    with cluster.client() as client:
        while True:
            prefill = next(w for w in client.status()["workers"] if w["role"] == "prefill")
            if prefill["free_blocks"] == prefill["total_blocks"] and prefill["transfers"] == 0:
                return
            assert time.monotonic() < deadline, prefill
            time.sleep(0.1)


class SilentDecodeWorker:
    """Registers as a decode worker and accepts KV offers, but never acknowledges the data (or,
    with make_room=False, never makes room for it)."""

    def __init__(self, router_addr: str, geometry: dict, make_room: bool = True):
        self.make_room = make_room
        self.ctx = zmq.Context()
        self.kv = make_socket(self.ctx, zmq.ROUTER, max_bytes=64 * 2**20)
        kv_port = self.kv.bind_to_random_port("tcp://127.0.0.1")
        self.router = make_socket(self.ctx, zmq.DEALER, identity=b"decode-silent")
        self.router.connect(router_addr)
        send(self.router, p.Register("decode-silent", "decode", geometry, 64, f"tcp://127.0.0.1:{kv_port}"))
        self.received: list[p.Message] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        heartbeat = make_socket(self.ctx, zmq.DEALER, identity=b"decode-silent/heartbeat")
        heartbeat.connect(self.router.getsockopt_string(zmq.LAST_ENDPOINT))
        while not self.stop.is_set():
            send(heartbeat, p.Heartbeat("decode-silent", {"free_blocks": 64}))
            while (got := recv(self.router, routed=False)) is not None:
                self.received.append(got.msg)
            # KV data comes as a header and many frames: take them (and never acknowledge).
            while self.kv.poll(100) and (got := recv(self.kv, routed=True, max_frames=1 << 20,
                                                     max_total_bytes=1 << 34)) is not None:
                self.received.append(got.msg)
                if isinstance(got.msg, p.KVHello):
                    send(self.kv, p.KVHelloOk("decode-silent"), got.identity)
                elif isinstance(got.msg, p.KVOffer) and self.make_room:
                    send(self.kv, p.KVReady(got.msg.transfer_id), got.identity)
        heartbeat.close()

    def close(self):
        self.stop.set()
        self.thread.join()
        self.ctx.destroy(linger=0)


def test_a_transfer_never_acknowledged_fails_the_request_and_frees_prefill_blocks(cluster, tiny_llm):
    cluster.add_worker("prefill")
    silent = SilentDecodeWorker(cluster.addr, kv_geometry(tiny_llm.runner).to_dict())
    try:
        cluster.wait_for_workers(1, 1)
        with cluster.client() as client:
            started = time.monotonic()
            result = client.generate([9] * 40, max_tokens=8, temperature=0)
            assert len(result.token_ids) == 1  # the first token came from the prefill worker
            assert "timed out after 4 s" in result.error
            assert time.monotonic() - started < 10
        assert any(isinstance(m, p.KVData) for m in silent.received)
        assert p.KVCancel(next(m.transfer_id for m in silent.received if isinstance(m, p.KVData)),
                          "timed out") in silent.received
        wait_for_free_prefill_blocks(cluster)
    finally:
        silent.close()


def test_an_offer_the_decode_side_never_makes_room_for_times_out(cluster, tiny_llm):
    """Waiting for room on the decode side is backpressure, but bounded (--offer-timeout): the
    request fails with the reason and the prefill worker's blocks come back."""
    cluster.add_worker("prefill", "--offer-timeout", "2")
    silent = SilentDecodeWorker(cluster.addr, kv_geometry(tiny_llm.runner).to_dict(), make_room=False)
    try:
        cluster.wait_for_workers(1, 1)
        with cluster.client() as client:
            started = time.monotonic()
            result = client.generate([9] * 40, max_tokens=8, temperature=0)
            assert "had no room for the request within 2 s" in result.error
            assert 1.5 < time.monotonic() - started < 8
        offered = next(m for m in silent.received if isinstance(m, p.KVOffer))
        assert p.KVCancel(offered.transfer_id, "timed out") in silent.received
        assert not any(isinstance(m, p.KVData) for m in silent.received)
        wait_for_free_prefill_blocks(cluster)
    finally:
        silent.close()


def made_room(kv: zmq.Socket) -> None:
    """The decode worker's answer to the offer of transfer 't1' is room for it."""
    answer = reply(kv)
    assert isinstance(answer, p.KVReady) and answer.transfer_id == "t1", answer


def offered(fake: FakePrefillWorker, geometry: dict, export: dict | None = None, step_s: float = 0.0):
    """The fake prefill worker's next request, its KV socket after the handshake, and the
    offer of its KV (transfer 't1'), as a real prefill worker whose longest step took step_s
    would make it."""
    req = fake.next_request()
    kv = fake.kv_socket(req.decode_kv_addr)
    kv.send(p.encode(p.KVHello(fake.worker_id, geometry, export)))
    assert isinstance(reply(kv), p.KVHelloOk)
    blocks = -(-len(req.prompt_token_ids) // geometry["block_size"])
    offer = p.KVOffer("t1", req.request_id, req.prompt_token_ids, req.params, req.slo, blocks, step_s=step_s)
    kv.send(p.encode(offer))
    return req, kv, offer


@contextlib.contextmanager
def beside_a_decode_worker(cluster, geometry: dict):
    """A decode worker with the fake prefill worker beside it, and a client; every block of the
    decode worker is back at the end."""
    cluster.add_worker("decode")
    fake = FakePrefillWorker(cluster.addr, geometry)
    try:
        cluster.wait_for_workers(1, 1)
        with cluster.client() as client:
            yield fake, client
        cluster.wait_idle()
    finally:
        fake.close()


def test_a_transfer_that_never_completes_times_out_and_frees_the_blocks(cluster, tiny_llm):
    """A prefill worker that offers a request's KV and then sends nothing: the decode worker's
    reservation times out, it says so on the channel, the request fails, and the blocks come back."""
    geometry = kv_geometry(tiny_llm.runner).to_dict()
    with beside_a_decode_worker(cluster, geometry) as (fake, client):
        rid = client.submit(list(range(1, 101)), max_tokens=5)
        _, kv, _ = offered(fake, geometry)
        made_room(kv)
        started = time.monotonic()
        held = decode_stats(cluster, lambda w: w.get("transfers") == 1)
        assert held["free_blocks"] == held["total_blocks"] - 7 and held["transfers"] == 1
        assert reply(kv) == p.KVCancel("t1", "timed out")
        assert 3 < time.monotonic() - started < 8  # the workers' --transfer-timeout is 4 s
        assert "timed out after 4 s" in client.result(rid).error


def test_the_decode_side_waits_out_the_prefill_workers_longest_step(cluster, tiny_llm):
    """A prefill worker on a CPU reads its KV channel between steps, and its offer says how
    long its steps take (3 s): KV sent 5 s after the decode side said ready, past the 4 s
    --transfer-timeout alone, still lands, and the request decodes to the end. An offer
    claiming steps of over an hour is refused."""
    geometry = kv_geometry(tiny_llm.runner).to_dict()
    with beside_a_decode_worker(cluster, geometry) as (fake, client):
        rid = client.submit(list(range(1, 41)), max_tokens=4, ignore_eos=True)
        req, kv, offer = offered(fake, geometry, step_s=3.0)
        made_room(kv)
        fake.router.send(p.encode(p.Tokens(req.request_id, 0, [7], "")))  # the first token, as prefill sends it
        assert not kv.poll(5000)  # no cancel at 4 s
        per_frame = blocks_per_frame(kv_geometry(tiny_llm.runner), 8 * 2**20)
        frames = OutgoingKV(tiny_llm.runner, list(range(offer.num_blocks)), None).frames(per_frame)
        kv.send_multipart([p.encode(p.KVData("t1", per_frame, 7)), *frames])
        assert reply(kv) == p.KVAck("t1")
        done = client.result(rid)
        assert done.error is None and len(done.token_ids) == 4 and done.token_ids[0] == 7

        rid = client.submit(list(range(1, 21)), max_tokens=2)
        req = fake.next_request()
        kv.send(p.encode(p.KVOffer("t2", req.request_id, req.prompt_token_ids, req.params, req.slo, 2,
                                   step_s=3601.0)))
        answer = reply(kv)
        assert isinstance(answer, p.KVReject) and "steps take 3601.0 s" in answer.message


def test_a_cache_the_decode_worker_cannot_map_leaves_kv_on_the_socket(cluster, tiny_llm):
    """A prefill worker's CUDA IPC export from another host is declined in the handshake; block
    ids in place of KV bytes from such a worker fail the transfer, and its blocks come back."""
    geometry = kv_geometry(tiny_llm.runner).to_dict()
    export = {"host": "elsewhere:0", "device_uuid": "GPU-0", "handle": b"h", "storage_bytes": 1 << 20,
              "storage_offset": 0, "ref_counter_handle": b"r", "ref_counter_offset": 0, "event_handle": b"e",
              "event_sync_required": False, "tensor_offset": 0, "shape": list(tiny_llm.runner.kv_cache.shape)}
    with beside_a_decode_worker(cluster, geometry) as (fake, client):
        rid = client.submit(list(range(1, 21)), max_tokens=5)
        _, kv, _ = offered(fake, geometry, export)
        made_room(kv)
        kv.send(p.encode(p.KVData("t1", 1, 7, block_ids=[0, 1])))
        answer = reply(kv)
        assert isinstance(answer, p.KVCancel) and "not mapped here" in answer.reason
        assert "bad KV transfer" in client.result(rid).error


def test_only_the_assigned_prefill_worker_may_offer_a_requests_kv(cluster, tiny_llm):
    """A peer that knows a request's id but is not the prefill worker the router assigned gets
    its offer refused, and the real transfer goes on; an offer for a request the router never
    assigned here is refused once it has waited for the router's word."""
    geometry = kv_geometry(tiny_llm.runner).to_dict()
    with beside_a_decode_worker(cluster, geometry) as (fake, client):
        rid = client.submit(list(range(1, 41)), max_tokens=5)
        req = fake.next_request()
        intruder = fake.kv_socket(req.decode_kv_addr, identity="intruder")
        intruder.send(p.encode(p.KVHello("intruder", geometry)))
        assert isinstance(reply(intruder), p.KVHelloOk)
        blocks = -(-len(req.prompt_token_ids) // geometry["block_size"])
        intruder.send(p.encode(p.KVOffer("x1", req.request_id, req.prompt_token_ids, req.params, req.slo,
                                         blocks)))
        refusal = reply(intruder)
        assert isinstance(refusal, p.KVReject) and "not assigned to this peer" in refusal.message
        intruder.send(p.encode(p.KVOffer("x2", "made-up", [1, 2, 3], {}, {}, 1)))
        started = time.monotonic()
        refusal = reply(intruder)
        assert isinstance(refusal, p.KVReject) and "not assigned here" in refusal.message
        assert 1.5 < time.monotonic() - started < 4  # it waited for the router's word
        kv = fake.kv_socket(req.decode_kv_addr)
        kv.send(p.encode(p.KVHello(fake.worker_id, geometry)))
        assert isinstance(reply(kv), p.KVHelloOk)
        kv.send(p.encode(p.KVOffer("t1", req.request_id, req.prompt_token_ids, req.params, req.slo, blocks)))
        made_room(kv)  # the assigned worker's transfer is untouched
        client.abort(rid)
        assert reply(kv) == p.KVCancel("t1", "aborted")


def processes_using_port(port: int, exclude: int) -> list[int]:
    """Kairos processes whose command line names this port (as --port P or in an address)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int(proc.name) == exclude:
                continue
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if "kairos.cli" in argv and (str(port) in argv or any(a.endswith(f":{port}") for a in argv)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def start_serve(port: int, *extra: str) -> subprocess.Popen:
    serve = kairos_process("serve", "--port", str(port), *WORKER_ARGS[2:], *extra)
    for line in serve.stdout:
        if "serving at" in line:
            return serve
    raise AssertionError(f"kairos serve exited {serve.wait()} without serving")


def collect_output(proc: subprocess.Popen) -> list[str]:
    """The process's output lines from now on, read in the background (a full pipe would
    block the children writing to it)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def worker_pids(port: int, serve_pid: int, role: str) -> list[int]:
    return [pid for pid in processes_using_port(port, exclude=serve_pid)
            if role in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")]


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find the children")
def test_serve_outlives_a_worker_it_restarts_and_runs_several_of_a_kind(tiny_path):
    """Under serve, a killed decode worker's in-flight requests fail within 5 s, the router
    stays up, and the worker comes back with the KV cache it had; --prefill-workers 2 starts
    two prefill workers."""
    from kairos.transport.client import Client

    port = free_port()
    serve = start_serve(port, "--prefill-workers", "2")
    output = collect_output(serve)
    addr = f"tcp://127.0.0.1:{port}"
    try:
        with Client(addr, timeout_s=30) as client:
            workers = client.status()["workers"]
            assert sorted(w["role"] for w in workers) == ["decode", "prefill", "prefill"]
            blocks = next(w["total_blocks"] for w in workers if w["role"] == "decode")
            time.sleep(1.5)  # serve learns the workers' KV sizes from their heartbeats
            streams = start_streams(client, 4)
            (decode,) = worker_pids(port, serve.pid, "decode")
            os.kill(decode, signal.SIGKILL)
            killed = time.monotonic()
            errors = [drain(stream) for stream in streams]
            assert time.monotonic() - killed < 5
            assert all(e and "decode worker" in e and "died" in e for e in errors), errors
            deadline = time.monotonic() + 90
            while True:
                workers = client.status()["workers"]
                if sum(w["role"] == "decode" for w in workers) == 1:
                    break
                assert time.monotonic() < deadline and serve.poll() is None, output
                time.sleep(0.3)
            restarted = next(w for w in workers if w["role"] == "decode")
            assert restarted["total_blocks"] == blocks
            assert any("the decode process exited with status -9; restarting it" in line for line in output)
            assert client.generate("after the restart", max_tokens=4, temperature=0).finish_reason == "length"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(20) == 0
        assert processes_using_port(port, exclude=serve.pid) == []
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in processes_using_port(port, exclude=serve.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to look for leftover processes")
def test_serve_runs_and_shuts_down_without_orphans(tiny_path):
    port = free_port()
    serve = start_serve(port)
    try:
        children = processes_using_port(port, exclude=serve.pid)
        assert len(children) == 3  # the router and both workers
        from kairos.transport.client import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout_s=30) as client:
            assert client.generate("served", max_tokens=4, temperature=0).finish_reason == "length"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(20) == 0
        assert processes_using_port(port, exclude=serve.pid) == []
        # Killed outright, serve still takes its children with it.
        serve = start_serve(port)
        serve.send_signal(signal.SIGKILL)
        serve.wait()
        deadline = time.monotonic() + 15
        while processes_using_port(port, exclude=serve.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_using_port(port, exclude=serve.pid) == []
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in processes_using_port(port, exclude=serve.pid):
            os.kill(pid, signal.SIGKILL)


def test_curve_keys_admit_listed_workers_and_key_holding_clients_only(tmp_path):
    """With --curve-keys: a client with the server's public key is served and one without it
    is told that no handshake completes; a peer presenting an unlisted key may not register as a worker, and a
    decode worker's KV socket completes no handshake with it."""
    from kairos.transport.client import Client
    from kairos.transport.security import CurveKeys

    keys_dir = str(tmp_path / "keys")
    assert kairos_process("keys", keys_dir).wait(30) == 0
    cluster = Cluster(curve_keys=keys_dir)
    ctx = zmq.Context()
    try:
        cluster.add_worker("prefill")
        cluster.add_worker("decode")
        cluster.wait_for_workers(1, 1)
        with cluster.client() as client:
            assert client.generate("with keys", max_tokens=4, temperature=0).finish_reason == "length"
            kv_addr = next(w["kv_addr"] for w in client.status()["workers"] if w["role"] == "decode")
        with Client(cluster.addr, timeout_s=2) as keyless:
            with pytest.raises(ConnectionError, match="no handshake"):
                keyless.status()
            # ZeroMQ does not try a refused handshake again: later messages fail, not hang.
            started = time.monotonic()
            refused = keyless.generate("no keys", max_tokens=2)
            assert refused.error_code == "unavailable" and "refused this client's handshake" in refused.error
            assert time.monotonic() - started < 1

        stranger, worker = CurveKeys.load(keys_dir, "client"), CurveKeys.load(keys_dir, "worker")

        def dealer(keys, addr, identity):
            sock = make_socket(ctx, zmq.DEALER, identity=identity)
            keys.connect(sock)
            sock.connect(addr)
            return sock

        fake = dealer(stranger, cluster.addr, b"decode-fake")
        fake.send(p.encode(p.Register("decode-fake", "decode", {}, 64, "tcp://127.0.0.1:1")))
        assert fake.poll(5000)
        refusal = p.decode(fake.recv())
        assert isinstance(refusal, p.Error) and "not among the router's worker keys" in refusal.message
        hello = p.encode(p.KVHello("intruder", {"model": "other"}))
        outsider = dealer(stranger, kv_addr, b"intruder")
        outsider.send(hello)
        assert not outsider.poll(2000)  # the handshake failed: nothing gets through either way
        listed = dealer(worker, kv_addr, b"listed")
        listed.send(hello)
        assert listed.poll(5000) and "bad KV geometry" in p.decode(listed.recv()).message
    finally:
        ctx.destroy(linger=0)
        cluster.stop()


# ---- across hosts ------------------------------------------------------------------------------

NAMESPACES = {"router": "kx-router", "prefill": "kx-prefill", "decode": "kx-decode"}
# One veth pair per pair of hosts, each its own subnet: router-prefill, router-decode, prefill-decode.
LINKS = [("router", "prefill", "10.231.1"), ("router", "decode", "10.231.2"), ("prefill", "decode", "10.231.3")]


def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def setup_namespaces() -> dict[tuple[str, str], str]:
    """Three namespaces joined by veth pairs; returns each host's address towards each peer."""
    for name in NAMESPACES.values():
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        ip("netns", "add", name)
        ip("link", "set", "lo", "up", ns=name)
    addrs = {}
    for i, (a, b, subnet) in enumerate(LINKS):
        va, vb = f"kxv{i}a", f"kxv{i}b"
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        for host, dev, octet in ((a, va, 1), (b, vb, 2)):
            ip("link", "set", dev, "netns", NAMESPACES[host])
            ip("addr", "add", f"{subnet}.{octet}/24", "dev", dev, ns=NAMESPACES[host])
            ip("link", "set", dev, "up", ns=NAMESPACES[host])
            addrs[(host, b if host == a else a)] = f"{subnet}.{octet}"
    return addrs


def namespaces_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    for step in (["netns", "add", "kx-probe"], ["link", "add", "kxprobe0", "type", "veth", "peer", "name", "kxprobe1"]):
        probe = subprocess.run(["ip", *step], capture_output=True, text=True)
        if probe.returncode != 0:
            subprocess.run(["ip", "netns", "del", "kx-probe"], capture_output=True)
            return f"cannot set up namespaces joined by veth here ({' '.join(step)}: {probe.stderr.strip()})"
    subprocess.run(["ip", "link", "del", "kxprobe0"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "kx-probe"], capture_output=True)
    return None


@pytest.mark.skipif(bool(reason := namespaces_available()), reason=reason or "")
def test_router_prefill_and_decode_on_separate_hosts(tiny_path, tmp_path):
    """Three hosts, every link under CURVE: the outputs are the offline engine's, and a client
    without the keys is told that no handshake completes."""
    addrs = setup_namespaces()
    in_ns = {role: ("ip", "netns", "exec", ns) for role, ns in NAMESPACES.items()}
    keys_dir = str(tmp_path / "keys")
    assert kairos_process("keys", keys_dir).wait(30) == 0
    cluster = Cluster(host="0.0.0.0", prefix=in_ns["router"], curve_keys=keys_dir)
    try:
        port = cluster.port
        cluster.add_worker("prefill", prefix=in_ns["prefill"],
                           router_addr=f"tcp://{addrs[('router', 'prefill')]}:{port}")
        cluster.add_worker("decode", "--kv-host", addrs[("decode", "prefill")], prefix=in_ns["decode"],
                           router_addr=f"tcp://{addrs[('router', 'decode')]}:{port}")
        prompts = ["across hosts", "the KV goes over a veth pair"]
        script = ("import json, sys; from kairos.transport.client import Client; "
                  f"c = Client('tcp://127.0.0.1:{port}', timeout_s=60, curve_keys={keys_dir!r}); "
                  "import time; t = time.monotonic()\n"
                  "while len(c.status()['workers']) < 2 and time.monotonic() - t < 90: time.sleep(0.3)\n"
                  f"keyless = Client('tcp://127.0.0.1:{port}', timeout_s=2)\n"
                  "try:\n    keyless.status(); sys.exit('a client without the keys was answered')\n"
                  "except ConnectionError as e: assert 'no handshake' in str(e), e\n"
                  f"print(json.dumps([r.to_dict() for r in c.generate({prompts!r}, max_tokens=12, temperature=0)]))")
        out = subprocess.run([*in_ns["router"], os.sys.executable, "-c", script], capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        import json

        got = json.loads(out.stdout.splitlines()[-1])
        want = LLM("tiny", num_kv_blocks=64, max_model_len=512).generate(
            prompts, SamplingParams(max_tokens=12, temperature=0))
        assert [g["token_ids"] for g in got] == [w.token_ids for w in want]
        assert all(g["error"] is None for g in got)
    finally:
        cluster.stop()
        for name in NAMESPACES.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_decode_worker_taking_smaller_kv_frames_than_its_prefill_worker_sends_still_serves(tiny_path, tiny_llm):
    """--kv-frame-mb differs between the two ends: the prefill worker sends frames no larger than
    the decode worker said it takes, where every transfer was refused."""
    cluster = Cluster()
    try:
        cluster.add_worker("prefill", "--kv-frame-mb", "8")
        cluster.add_worker("decode", "--kv-frame-mb", "0.01")
        cluster.wait_for_workers(1, 1)
        prompt = [(7 * i) % 500 + 1 for i in range(300)]
        with cluster.client() as client:
            out = client.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)
        expected = tiny_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
        assert out.error is None and out.token_ids == expected.token_ids
    finally:
        cluster.stop()
