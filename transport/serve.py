"""`kairos serve`: a router and prefill and decode workers on this machine, as child processes
that go down together on Ctrl-C or SIGTERM (and with this process if it is killed). A child
that dies is started again, after a backoff, while the rest serve on."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

from kairos.transport.client import Client

SHUTDOWN_GRACE_S = 5.0
MAX_BACKOFF_S = 30.0
RESTART_RESET_S = 60.0  # a child that ran this long starts its backoff over


PARENT_ENV = "KAIROS_SERVE_PID"  # in the environment of serve's children: they go down with it


def die_with_parent() -> None:
    """In a child of `kairos serve`, on Linux: SIGTERM this process when serve dies. The child
    asks for it itself, first thing: asked between fork and exec, a parent with threads (ZeroMQ's)
    could deadlock the child before it ran."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # serve died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)


class StartupError(RuntimeError):
    """A local cluster's process exited, or its workers did not register, during start-up."""


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    started: float
    backoff_s: float = 0.0  # the delay before its last restart
    restart_at: float | None = None  # set while it is dead and waiting to start again
    kv_blocks: int | None = None  # its KV cache once registered: a restart asks for as many

    @property
    def is_worker(self) -> bool:
        return self.argv[0] in ("prefill", "decode")


class ProcessGroup:
    """`kairos` commands as child processes (with -v: logging set-up details)."""

    def __init__(self, verbose: bool = False):
        self.children: list[Child] = []
        self.verbose = verbose

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "kairos.cli", *(["-v"] if self.verbose else []), *argv]
        return subprocess.Popen(cmd, env={**os.environ, PARENT_ENV: str(os.getpid())})

    def start(self, name: str, argv: list[str]) -> None:
        self.children.append(Child(name, argv, self._spawn(argv), time.monotonic()))

    def dead(self) -> list[tuple[str, int]]:
        return [(c.name, c.proc.returncode) for c in self.children if c.proc.poll() is not None]

    def supervise(self, now: float) -> None:
        """Schedules a dead child's restart, after a backoff that doubles (1 s to 30 s) while it
        keeps dying within a minute of starting, and restarts those whose time has come. A
        worker comes back with the KV cache it had: on a shared GPU, sizing it again from free
        memory would count the other workers' share as its own."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None and c.restart_at is None:
                c.backoff_s = 1.0 if now - c.started > RESTART_RESET_S else min(MAX_BACKOFF_S, 2 * c.backoff_s or 1.0)
                c.restart_at = now + c.backoff_s
                print(f"kairos: the {c.name} process exited with status {code}; restarting it in {c.backoff_s:g} s",
                      file=sys.stderr, flush=True)
            elif c.restart_at is not None and now >= c.restart_at:
                blocks = ["--num-kv-blocks", str(c.kv_blocks)] if c.kv_blocks is not None else []
                c.proc, c.started, c.restart_at = self._spawn([*c.argv, *blocks]), now, None

    def learn_kv_blocks(self, workers: list[dict]) -> None:
        """Notes each worker child's KV cache size from the router's status (workers report
        their process id)."""
        by_pid = {w.get("pid"): w.get("total_blocks") for w in workers}
        for c in self.children:
            if c.kv_blocks is None and isinstance(by_pid.get(c.proc.pid), int):
                c.kv_blocks = by_pid[c.proc.pid]

    def stop(self) -> None:
        for c in reversed(self.children):
            if c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()


def wait_for_workers(addr: str, wanted: dict[str, int], group: ProcessGroup | None, timeout_s: float,
                     interrupted=lambda: False, curve_keys: str | None = None) -> None:
    """Until the router reports at least `wanted[role]` workers of each role (the router may not
    be up yet); raises if one of `group`'s children exits first."""
    deadline = time.monotonic() + timeout_s
    with Client(addr, timeout_s=1.0, curve_keys=curve_keys) as client:
        while time.monotonic() < deadline and not interrupted():
            if group is not None and group.dead():
                name, code = group.dead()[0]
                raise StartupError(f"the {name} process exited with status {code} during start-up")
            try:
                registered = Counter(w["role"] for w in client.status()["workers"])
                if all(registered[role] >= n for role, n in wanted.items()):
                    return
            except (TimeoutError, ConnectionError):  # the router is still coming up
                pass
            time.sleep(0.2)
    if not interrupted():
        missing = " and ".join(f"{n} {role}" for role, n in wanted.items())
        raise StartupError(f"the {missing} workers did not register within {timeout_s:g} s")


def wait_until_healthy(url: str, timeout_s: float, exited=lambda: None) -> None:
    """Until the HTTP API at url answers /health with 200 (workers registered); raises
    StartupError if `exited()` returns a reason first (its process is gone) or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = exited()
        if reason:
            raise StartupError(reason)
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise StartupError(f"{url} was not healthy within {timeout_s:g} s")


def cpu_share(processes: int) -> int:
    """Cores per process when this many busy processes share the machine. Each torch process
    otherwise starts one thread per core, and oversubscribed threads spin against each other:
    on 2 cores, two such workers make a 6 ms prefill take over 300 ms."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(prefill_argv: list[str], decode_argv: list[str], prefill_workers: int = 1, decode_workers: int = 1,
                  startup_timeout_s: float = 300.0, group: ProcessGroup | None = None):
    """A router on a free loopback port and this many prefill and decode workers, started with
    these arguments (each besides --router) and sharing the cores; yields the router's address
    once all have registered, and stops them all. Pass `group` to see the processes (router
    first, then the workers in order)."""
    if min(prefill_workers, decode_workers) < 1:
        raise ValueError(f"a cluster needs at least one prefill and one decode worker, "
                         f"not {prefill_workers} and {decode_workers}")
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    group = group if group is not None else ProcessGroup()
    try:
        group.start("router", ["router", "--port", str(port)])
        # The caller's own --cpu-threads, coming later, wins.
        threads = ["--cpu-threads", str(cpu_share(prefill_workers + decode_workers))]
        for role, count, argv in (("prefill", prefill_workers, prefill_argv), ("decode", decode_workers, decode_argv)):
            for i in range(count):
                group.start(f"{role} {i + 1}" if count > 1 else role, [role, "--router", addr, *threads, *argv])
        wait_for_workers(addr, {"prefill": prefill_workers, "decode": decode_workers}, group, startup_timeout_s)
        yield addr
    finally:
        group.stop()


def serve(host: str, port: int, router_argv: list[str], worker_argv: list[str], prefill_argv: list[list[str]],
          decode_argv: list[list[str]], startup_timeout_s: float, one_at_a_time: bool, verbose: bool = False,
          curve_keys: str | None = None, api_argv: list[str] | None = None) -> int:
    """Starts a worker per entry of prefill_argv and decode_argv (each its own arguments) and
    serves until SIGINT or SIGTERM, restarting any child that dies. one_at_a_time: start each
    worker once the one before has registered, so that on a shared GPU each sizes its KV cache
    from what the others really left free. api_argv: also run `kairos api` with these arguments
    (from the start: its /health says when the workers are up)."""
    addr = f"tcp://{host}:{port}"
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    def interrupted() -> bool:
        return stop["signal"] is not None

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    group = ProcessGroup(verbose)
    wanted = Counter()
    try:
        group.start("router", ["router", "--host", host, "--port", str(port), *router_argv])
        if api_argv is not None:
            group.start("api", api_argv)
        workers = [("prefill", ["prefill", "--router", addr, *worker_argv, *argv]) for argv in prefill_argv]
        workers += [("decode", ["decode", "--router", addr, "--kv-host", host, *worker_argv, *argv])
                    for argv in decode_argv]
        for role, argv in workers:
            if interrupted():
                break
            wanted[role] += 1
            count = len(prefill_argv if role == "prefill" else decode_argv)
            group.start(f"{role} {wanted[role]}" if count > 1 else role, argv)
            if one_at_a_time:
                wait_for_workers(addr, wanted, group, startup_timeout_s, interrupted, curve_keys)
        if not interrupted():
            wait_for_workers(addr, wanted, group, startup_timeout_s, interrupted, curve_keys)
        if not interrupted():
            print(f"kairos: serving at {addr}  (Ctrl-C stops)", flush=True)
        with Client(addr, timeout_s=1.0, curve_keys=curve_keys) as client:
            while not interrupted():
                group.supervise(time.monotonic())
                if any(c.kv_blocks is None for c in group.children if c.is_worker):
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        group.learn_kv_blocks(client.status()["workers"])
                time.sleep(0.2)
        return 0
    except StartupError as e:
        print(f"kairos: error: {e}", file=sys.stderr)
        return 1
    finally:
        group.stop()
