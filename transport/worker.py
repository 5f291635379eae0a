"""What prefill and decode workers share: the engine, the link to the router (registration,
heartbeats with load figures, re-registration) and the event loop that interleaves messages
with engine steps.

Heartbeats come from a thread with a socket of its own, so a long engine step (a big prefill
batch) does not make a live worker look dead. If the router has given a worker up anyway, the
worker drops everything it holds (the router has failed those requests) and registers again."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid

import zmq

from kairos.engine.llm import LLM, StepFailed
from kairos.engine.sequence import Sequence
from kairos.scheduler.request import RequestSLO, SamplingParams
from kairos.transport import protocol as p
from kairos.transport.kv import DEFAULT_FRAME_BYTES, kv_geometry
from kairos.transport.security import CurveKeys
from kairos.transport.sockets import Received, make_socket, recv, send

log = logging.getLogger("kairos.worker")

IDLE_POLL_MS = 20
REGISTER_WARNING_S = 10.0  # how often an unanswered worker says it is still waiting for the router


class Worker:
    role = ""

    def __init__(self, llm: LLM, router_addr: str, transfer_timeout_s: float = 10.0,
                 max_frame_bytes: int = DEFAULT_FRAME_BYTES, step_log: str | None = None,
                 offer_timeout_s: float = 60.0, keys: CurveKeys | None = None):
        self.llm = llm
        self.keys = keys
        self.router_addr = router_addr
        self.transfer_timeout_s = transfer_timeout_s
        self.offer_timeout_s = offer_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.geometry = kv_geometry(llm.runner)
        if max_frame_bytes < self.geometry.bytes_per_block_layer:
            raise ValueError(f"--kv-frame-mb allows frames of {max_frame_bytes} bytes, less than one KV block of "
                             f"one layer ({self.geometry.bytes_per_block_layer} bytes)")
        self.worker_id = f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.ctx = zmq.Context()
        self.authenticator = keys.start_authenticator(self.ctx) if keys is not None else None
        self.router = self.dealer(self.worker_id, router_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.registered = False
        self.stopping = False
        self.blocked = False  # the last step found nothing it could run
        self.counters = {"completed": 0, "aborted": 0, "failed": 0}
        self._last_register = 0.0
        self._unregistered_since: float | None = None  # first registration sent without an answer yet
        self._warn_at = 0.0  # when to say again that the router has not answered
        self._turned_at = time.monotonic()  # when the serving loop last began a turn
        self.longest_step_s = 0.0  # how long this worker may leave its sockets unread
        self.step_log = open(step_log, "a", buffering=1) if step_log else None
        self.turn_notes: dict[str, float] = {}  # a role's own timings for this turn's step-log line
        self._heartbeats = threading.Thread(target=self._send_heartbeats, name="heartbeat", daemon=True)

    # ---- to override --------------------------------------------------------------------------

    def handle_router(self, msg: p.Message) -> None:
        raise NotImplementedError

    def handle_socket(self, sock: zmq.Socket) -> None:
        """Messages on a worker's own sockets (the KV channel)."""

    def tick(self, now: float) -> None:
        """Timeouts and queued work, once per loop."""

    def stats(self) -> dict:
        # The process id lets `kairos serve` tell which of its children a worker is. The loop's
        # age tells a busy worker (heartbeats go on, from their own thread, while one turn runs
        # long) from a dead one (no heartbeats): the router sends a busy one no new requests.
        stats = {**self.llm.load(), **self.counters, "pid": os.getpid(),
                 "loop_age_s": round(time.monotonic() - self._turned_at, 3)}
        cost = self.llm.cost_model
        if cost is not None:  # observed over predicted step time: how far serving is from the profile
            stats["cost_scale"] = {phase: {"mean": m, "spread": d, "observed_s": cost.totals[phase][0],
                                           "predicted_s": cost.totals[phase][1]}
                                   for phase, (m, d) in cost.drift.items()}
        return stats

    def registration(self) -> p.Register:
        return p.Register(self.worker_id, self.role, self.geometry.to_dict(), self.llm.num_total_blocks)

    def reset(self) -> None:
        """Drops every request (the router has failed them all): blocks return to the pool."""
        self.llm.abort_all()

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Warms the engine up (so that no request waits for a kernel to compile), then serves
        until SIGINT or SIGTERM; it registers with the router on its first turn."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        log.info("%s worker warmed up in %.1f s", self.role, self.llm.warm_up())
        log.info("%s worker %s: connecting to the router at %s", self.role, self.worker_id, self.router_addr)
        self._heartbeats.start()
        try:
            while not self.stopping:
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> None:
        now = time.monotonic()
        self._turned_at = now
        if not self.registered and now - self._last_register > 1.0:
            send(self.router, self.registration())
            self._last_register = now
            self._warn_if_unanswered(now)
        busy = self.llm.has_unfinished() and not self.blocked
        turn_started = time.perf_counter()
        self.turn_notes.clear()
        for sock, _ in self.poller.poll(0 if busy else self.idle_poll_ms()):
            # Drain what is waiting, but bounded, so a flood cannot starve the engine.
            for _ in range(256):
                if sock.closed:  # an earlier message dropped its peer (a decode worker gone)
                    break
                if sock is self.router:
                    received = recv(self.router, routed=False)
                    if received is None:
                        break
                    self._on_router_message(received)
                elif not self.handle_socket(sock):
                    break
        self.tick(time.monotonic())
        self.blocked = False
        if self.llm.has_unfinished():
            step_started, tokens_before = time.perf_counter(), self.llm.num_prefill_tokens_computed
            try:
                stepped = self.llm.step()
            except StepFailed as e:
                # One batch's failure must not end the worker, nor the requests outside it.
                log.exception("%s worker %s: %s", self.role, self.worker_id, e)
                self.on_step_failed(e.request_ids, str(e))
                stepped = []
            step_ended = time.perf_counter()
            self.longest_step_s = max(self.longest_step_s, step_ended - step_started)
            self.blocked = stepped is None
            self.on_step(stepped or [])
            if self.step_log is not None:
                self._log_step(turn_started, step_started, step_ended, stepped,
                               self.llm.num_prefill_tokens_computed - tokens_before)

    def _log_step(self, turn_started: float, step_started: float, step_ended: float,
                  stepped: list[Sequence] | None, prefill_tokens: int) -> None:
        """One JSON line per engine step tried: where the loop's time went (messages before the
        step, the step, sending its output after) and the queue and KV around it. Live latency
        that the simulator does not predict shows up here as time outside steps or blocked steps."""
        after_s = time.perf_counter() - step_ended  # before the log's own work below
        stats = self.stats()
        record = {"worker": self.worker_id, "t": time.time(), "messages_s": step_started - turn_started,
                  "step_s": step_ended - step_started, "after_s": after_s,
                  "blocked": stepped is None, "stepped": len(stepped or []), "prefill_tokens": prefill_tokens,
                  **{k: stats[k] for k in ("waiting", "running", "ready", "free_blocks")},
                  **{k: stats[k] for k in ("transfers", "offers_waiting") if k in stats}, **self.turn_notes}
        cost = self.llm.cost_model
        if cost is not None and stepped is not None:
            # The step as the cost model saw it (a decode step's time includes the loop's since
            # the previous one), beside the profile's prediction: serving's own step times.
            record.update(cost.last_step)
        self.step_log.write(json.dumps(record) + "\n")

    def idle_poll_ms(self) -> int:
        """How long an idle loop waits for a message before it ticks again."""
        return IDLE_POLL_MS

    def _send_heartbeats(self) -> None:
        sock = self.dealer(f"{self.worker_id}/heartbeat", self.router_addr)
        try:
            while not self.stopping:
                if self.registered:
                    try:
                        heartbeat = p.Heartbeat(self.worker_id, self.stats())
                    except Exception:  # figures read mid-update by the serving loop
                        # A thread that died here would leave a live worker given up for dead.
                        log.exception("%s worker %s: no heartbeat this time", self.role, self.worker_id)
                    else:
                        send(sock, heartbeat)
                time.sleep(p.HEARTBEAT_INTERVAL_S)
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)

    def on_step(self, stepped: list[Sequence]) -> None:
        """Sends on what an engine step produced."""
        raise NotImplementedError

    def on_step_failed(self, request_ids: list[str], message: str) -> None:
        """The requests of a step that failed: they fail, and their blocks return."""
        for request_id in request_ids:
            self.llm.abort(request_id)
            self.fail(request_id, message)

    def _warn_if_unanswered(self, now: float) -> None:
        """Says so every REGISTER_WARNING_S while the router leaves the registrations unanswered:
        a wrong --router address, or a router not yet up, would otherwise wait in silence."""
        if self._unregistered_since is None:
            self._unregistered_since, self._warn_at = now, now + REGISTER_WARNING_S
        elif now >= self._warn_at:
            self._warn_at = now + REGISTER_WARNING_S
            log.warning("%s worker %s: no answer from the router at %s for %.0f s; still trying", self.role,
                        self.worker_id, self.router_addr, now - self._unregistered_since)

    def _on_router_message(self, received: Received) -> None:
        msg = received.msg
        if isinstance(msg, p.Registered):
            self.registered = True
            self._unregistered_since = None
            log.info("%s worker %s registered", self.role, self.worker_id)
        elif isinstance(msg, p.RegisterAgain):
            # The router answers each message of a worker it does not know so: once this worker
            # is registering again, the answers to its earlier messages say nothing new.
            if self.registered:
                log.warning("the router no longer knows this worker: dropping all requests, registering again")
                self.registered = False
                self.reset()
                self._last_register = 0.0
        elif isinstance(msg, p.Error) and msg.request_id is None and not self.registered:
            raise SystemExit(f"kairos {self.role}: the router refused registration: {msg.message}")
        elif isinstance(msg, p.Error) and msg.request_id is None:
            log.warning("router: %s", msg.message)
        else:
            self.handle_router(msg)

    def _request_stop(self, *_):
        self.stopping = True

    def close(self) -> None:
        self.stopping = True
        if self._heartbeats.is_alive():
            self._heartbeats.join(timeout=2 * p.HEARTBEAT_INTERVAL_S)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.destroy(linger=0)
        if self.step_log is not None:
            self.step_log.close()

    # ---- shared helpers -----------------------------------------------------------------------

    def dealer(self, identity: str, addr: str) -> zmq.Socket:
        """A socket to the router or a decode worker, presenting the worker key under CURVE."""
        sock = make_socket(self.ctx, zmq.DEALER, identity=identity.encode())
        if self.keys is not None:
            self.keys.connect(sock)
        sock.connect(addr)
        return sock

    def make_sequence(self, prompt, prompt_token_ids, params: dict, slo: dict, request_id: str,
                      add_special_tokens: bool = True, max_tokens_must_fit: bool = False) -> Sequence:
        """A validated engine sequence; ValueError (with the reason) for anything it rejects."""
        try:
            sampling = SamplingParams(**params)
            request_slo = RequestSLO.from_dict(slo)
        except TypeError as e:
            raise ValueError(f"bad request fields: {e}") from None
        source = prompt if prompt is not None else prompt_token_ids
        if source is None:
            raise ValueError("the request has neither a prompt nor prompt_token_ids")
        return self.llm.make_sequence(source, sampling, request_id, request_slo, add_special_tokens,
                                      max_tokens_must_fit)

    def send_tokens(self, seqs: list[Sequence]) -> None:
        """The token a step just gave each sequence, with its text (and finish reason, if done),
        in one message."""
        chunks = []
        for seq in seqs:
            done = seq.is_finished
            index, token = seq.latest_output()  # an overlapped step's token may be pending after it
            chunks.append(p.Tokens(seq.request_id, index, [token], seq.take_text_delta(),
                                   seq.finish_reason.value if done else None,
                                   seq.num_prompt_tokens if done else None))
            self.counters["completed"] += done
        if chunks:
            send(self.router, p.StepTokens.of(chunks))

    def fail(self, request_id: str, message: str, code: str | None = None) -> None:
        """code: what kind of failure (protocol.ERROR_CODES), for the client to answer by."""
        self.counters["failed"] += 1
        log.warning("request %s failed: %s", request_id, message)
        send(self.router, p.Error(request_id, message, code))

