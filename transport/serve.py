"""`kairos serve`: a router, one prefill worker and one decode worker on this machine, as child
processes that go down together on Ctrl-C or SIGTERM (and with this process if it is killed)."""

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

from kairos.transport.client import Client

SHUTDOWN_GRACE_S = 5.0


def _die_with_parent() -> None:
    """Runs in each child before exec: on Linux, SIGTERM it if the serve process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class StartupError(RuntimeError):
    """A local cluster's process exited, or its workers did not register, during start-up."""


class ProcessGroup:
    """`kairos` commands as child processes (with -v: logging set-up details)."""

    def __init__(self, verbose: bool = False):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.verbose = verbose

    def start(self, name: str, argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "kairos.cli", *(["-v"] if self.verbose else []), *argv]
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.procs.append((name, subprocess.Popen(cmd, preexec_fn=preexec)))

    def dead(self) -> list[tuple[str, int]]:
        return [(name, proc.returncode) for name, proc in self.procs if proc.poll() is not None]

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_workers(addr: str, wanted: dict[str, int], group: ProcessGroup | None, timeout_s: float,
                     interrupted=lambda: False) -> None:
    """Until the router reports at least `wanted[role]` workers of each role (the router may not
    be up yet); raises if one of `group`'s children exits first."""
    deadline = time.monotonic() + timeout_s
    with Client(addr, timeout_s=1.0) as client:
        while time.monotonic() < deadline and not interrupted():
            if group is not None and group.dead():
                name, code = group.dead()[0]
                raise StartupError(f"the {name} process exited with status {code} during start-up")
            try:
                registered = Counter(w["role"] for w in client.status()["workers"])
                if all(registered[role] >= n for role, n in wanted.items()):
                    return
            except TimeoutError:
                continue
            time.sleep(0.2)
    if not interrupted():
        missing = " and ".join(f"{n} {role}" for role, n in wanted.items())
        raise StartupError(f"the {missing} workers did not register within {timeout_s:g} s")


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
                  startup_timeout_s: float = 300.0):
    """A router on a free loopback port and this many prefill and decode workers, started with
    these arguments (each besides --router) and sharing the cores; yields the router's address
    once all have registered, and stops them all."""
    if min(prefill_workers, decode_workers) < 1:
        raise ValueError(f"a cluster needs at least one prefill and one decode worker, "
                         f"not {prefill_workers} and {decode_workers}")
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    group = ProcessGroup()
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


def serve(host: str, port: int, router_argv: list[str], worker_argv: list[str], prefill_argv: list[str],
          decode_argv: list[str], startup_timeout_s: float, one_at_a_time: bool, verbose: bool = False) -> int:
    """one_at_a_time: start decode only once prefill has registered, so that on a shared GPU
    each sizes its KV cache from what the other really left free."""
    addr = f"tcp://{host}:{port}"
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    def interrupted() -> bool:
        return stop["signal"] is not None

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    group = ProcessGroup(verbose)
    try:
        group.start("router", ["router", "--host", host, "--port", str(port), *router_argv])
        group.start("prefill", ["prefill", "--router", addr, *worker_argv, *prefill_argv])
        if one_at_a_time:
            wait_for_workers(addr, {"prefill": 1}, group, startup_timeout_s, interrupted)
        if not interrupted():
            group.start("decode", ["decode", "--router", addr, "--kv-host", host, *worker_argv, *decode_argv])
            wait_for_workers(addr, {"prefill": 1, "decode": 1}, group, startup_timeout_s, interrupted)
        if not interrupted():
            print(f"kairos: serving at {addr}  (Ctrl-C stops)", flush=True)
        while not interrupted():
            if group.dead():
                name, code = group.dead()[0]
                print(f"kairos: the {name} process exited with status {code}; shutting down", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except StartupError as e:
        print(f"kairos: error: {e}", file=sys.stderr)
        return 1
    finally:
        group.stop()
