"""Real router and worker processes on CPU with the tiny model, for the serving tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import zmq

from kairos.transport import protocol as p
from kairos.transport.client import Client
from kairos.transport.serve import free_port  # noqa: F401 - the tests take it from here

# Small enough that 100 concurrent requests run into backpressure and full caches.
# Short steps keep the workers responsive on a busy 2-core machine, and so does one torch thread
# a worker (as `kairos serve` gives each its share of the cores): workers that each spin a
# thread per core beside the test process took 5 s over a 1024-token prefill step, past the
# 4 s transfer timeout.
WORKER_ARGS = ["--model", "tiny", "--num-kv-blocks", "256", "--max-model-len", "512", "--transfer-timeout", "4",
               "--max-num-batched-tokens", "1024", "--cpu-threads", "1"]


def kairos_process(*argv: str, prefix: tuple[str, ...] = (), **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "kairos.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def add_fake_workers(router, geometry: dict | None = None) -> None:
    """Registers a prefill worker p1 and a decode worker d1 with an in-process Router."""
    from kairos.transport.router import WorkerInfo

    for worker_id, role in (("p1", "prefill"), ("d1", "decode")):
        router.workers[worker_id] = WorkerInfo(worker_id, role, worker_id.encode(), geometry or {}, 64,
                                               "tcp://127.0.0.1:1" if role == "decode" else None, time.monotonic())


def recording_router():
    """An in-process Router on a free port with fake workers p1 and d1; what it sends is kept
    in `router.sent` as (identity, message) instead of going out."""
    from kairos.transport import protocol as p
    from kairos.transport.router import Router

    router = Router(port=0)
    add_fake_workers(router)
    router.sent = []
    router.socket.send_multipart = lambda frames, *a, **k: router.sent.append((frames[0], p.decode(frames[-1])))
    return router


def raw_dealer(ctx, addr):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return sock


def reply(sock):
    assert sock.poll(5000), "no reply"
    return p.decode(sock.recv())


def decode_stats(cluster, until=lambda w: True, timeout_s: float = 5.0) -> dict:
    """The decode worker's figures, polled until they satisfy `until` (they lag by a heartbeat)."""
    deadline = time.monotonic() + timeout_s
    with cluster.client() as client:
        while True:
            w = next(w for w in client.status()["workers"] if w["role"] == "decode")
            if until(w) or time.monotonic() > deadline:
                return w
            time.sleep(0.05)


class Cluster:
    """A router and workers; stop() ends them all, killing what does not exit."""

    def __init__(self, host: str = "127.0.0.1", worker_timeout_s: float = 2.0, prefix: tuple[str, ...] = (),
                 curve_keys: str | None = None):
        self.curve_keys = curve_keys
        keys = ["--curve-keys", curve_keys] if curve_keys else []
        self.host = host
        self.port = free_port()
        self.addr = f"tcp://{host}:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, list[subprocess.Popen]] = {"prefill": [], "decode": []}
        self.router = self.spawn("router", "--host", host, "--port", str(self.port),
                                 "--worker-timeout", str(worker_timeout_s), *keys, prefix=prefix)

    def spawn(self, *argv: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        proc = kairos_process(*argv, prefix=prefix)
        self.procs.append(proc)
        return proc

    def add_worker(self, role: str, *extra: str, prefix: tuple[str, ...] = (),
                   router_addr: str | None = None) -> subprocess.Popen:
        keys = ["--curve-keys", self.curve_keys] if self.curve_keys else []
        proc = self.spawn(role, "--router", router_addr or self.addr, *WORKER_ARGS, *keys, *extra, prefix=prefix)
        self.workers[role].append(proc)
        return proc

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.addr, timeout_s=timeout_s, curve_keys=self.curve_keys)

    def wait_for_workers(self, prefill: int, decode: int, timeout_s: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.client(timeout_s=2.0) as client:
            while time.monotonic() < deadline:
                for proc in self.procs:
                    if proc.poll() is not None and proc.returncode not in (-signal.SIGKILL, -signal.SIGSTOP):
                        raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{proc.stdout.read()}")
                try:
                    status = client.status()
                except TimeoutError:
                    continue
                roles = [w["role"] for w in status["workers"]]
                if roles.count("prefill") == prefill and roles.count("decode") == decode:
                    return status
                time.sleep(0.2)
        raise TimeoutError(f"workers did not register: {status}")

    def wait_idle(self, timeout_s: float = 20.0) -> dict:
        """Until every worker reports no requests and all its KV blocks free."""
        with self.client() as client:
            return client.fresh_status(lambda status: all(
                w.get("free_blocks") == w["total_blocks"] and not w.get("running") and not w.get("transfers")
                and not w.get("waiting") and not w.get("ready") for w in status["workers"]), timeout_s)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class FakePrefillWorker:
    """Registers with a router as its prefill worker (or, with role="decode", as a decode
    worker) and beats, but serves nothing: the test takes the requests it is given
    (`next_request`) and plays their KV channel by hand, from `kv_socket` (which carries this
    worker's identity, as a real one's does)."""

    def __init__(self, router_addr: str, geometry: dict, worker_id: str = "prefill-fake", role: str = "prefill"):
        self.worker_id = worker_id
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.DEALER)
        self.router.identity = worker_id.encode()
        self.router.connect(router_addr)
        kv_addr = "tcp://127.0.0.1:9" if role == "decode" else None
        self.router.send(p.encode(p.Register(worker_id, role, geometry, 64, kv_addr)))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(router_addr,), daemon=True)
        self.thread.start()

    def _beat(self, router_addr: str) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.identity = f"{self.worker_id}/heartbeat".encode()
        sock.connect(router_addr)
        while not self.stop.wait(0.2):
            sock.send(p.encode(p.Heartbeat(self.worker_id, {"free_blocks": 64})))
        sock.close(linger=0)

    def next_request(self, timeout_s: float = 30.0, kind: type = p.PrefillRequest) -> p.Message:
        """The next message of this kind from the router."""
        deadline = time.monotonic() + timeout_s
        while self.router.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            msg = p.decode(self.router.recv())
            if isinstance(msg, kind):
                return msg
        raise TimeoutError(f"no {kind.TYPE} message came")

    def kv_socket(self, kv_addr: str, identity: str | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.identity = (identity or self.worker_id).encode()
        sock.connect(kv_addr)
        return sock

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.ctx.destroy(linger=0)
