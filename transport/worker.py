"""What prefill and decode workers share: the engine, the link to the router (registration,
heartbeats with load figures, re-registration) and the event loop that interleaves messages
with engine steps."""

from __future__ import annotations

import logging
import signal
import time
import uuid

import zmq

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from transport import protocol as p
from transport.kv import DEFAULT_FRAME_BYTES, KVGeometry
from transport.sockets import Received, make_socket, recv, send

log = logging.getLogger("kairos.worker")

HEARTBEAT_INTERVAL_S = 0.25
IDLE_POLL_MS = 20


class Worker:
    role = ""

    def __init__(self, llm: LLM, router_addr: str, transfer_timeout_s: float = 10.0,
                 max_frame_bytes: int = DEFAULT_FRAME_BYTES):
        self.llm = llm
        self.router_addr = router_addr
        self.transfer_timeout_s = transfer_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.geometry = KVGeometry.of(llm.runner)
        self.worker_id = f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.ctx = zmq.Context()
        self.router = make_socket(self.ctx, zmq.DEALER, identity=self.worker_id.encode())
        self.router.connect(router_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.registered = False
        self.stopping = False
        self.counters = {"completed": 0, "aborted": 0, "failed": 0}
        self._last_heartbeat = 0.0
        self._last_register = 0.0

    # ---- to override --------------------------------------------------------------------------

    def handle_router(self, msg: p.Message) -> None:
        raise NotImplementedError

    def handle_socket(self, sock: zmq.Socket) -> None:
        """Messages on a worker's own sockets (the KV channel)."""

    def tick(self, now: float) -> None:
        """Timeouts and queued work, once per loop."""

    def stats(self) -> dict:
        sched = self.llm.scheduler
        return {"waiting": len(sched.waiting), "running": len(sched.running), "ready": len(sched.ready),
                "free_blocks": self.llm.num_free_blocks, "total_blocks": self.llm.num_total_blocks,
                **self.counters}

    def registration(self) -> p.Register:
        return p.Register(self.worker_id, self.role, self.geometry.to_dict(), self.llm.num_total_blocks)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        log.info("%s worker %s: connecting to the router at %s", self.role, self.worker_id, self.router_addr)
        try:
            while not self.stopping:
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> None:
        now = time.monotonic()
        if not self.registered and now - self._last_register > 1.0:
            send(self.router, self.registration())
            self._last_register = now
        busy = self.llm.has_unfinished()
        for sock, _ in self.poller.poll(0 if busy else IDLE_POLL_MS):
            # Drain what is waiting, but bounded, so a flood cannot starve the engine.
            for _ in range(256):
                if sock is self.router:
                    received = recv(self.router, routed=False)
                    if received is None:
                        break
                    self._on_router_message(received)
                elif not self.handle_socket(sock):
                    break
        now = time.monotonic()
        self.tick(now)
        if self.llm.has_unfinished():
            self.step()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S and self.registered:
            send(self.router, p.Heartbeat(self.worker_id, self.stats()))
            self._last_heartbeat = now

    def step(self) -> None:
        raise NotImplementedError

    def _on_router_message(self, received: Received) -> None:
        msg = received.msg
        if isinstance(msg, p.Registered):
            self.registered = True
            log.info("%s worker %s registered", self.role, self.worker_id)
        elif isinstance(msg, p.RegisterAgain):
            self.registered = False
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
        self.ctx.destroy(linger=0)

    # ---- shared helpers -----------------------------------------------------------------------

    def make_sequence(self, prompt, prompt_token_ids, params: dict, request_id: str) -> Sequence:
        """A validated engine sequence; ValueError (with the reason) for anything it rejects."""
        try:
            sampling = SamplingParams(**params)
        except TypeError as e:
            raise ValueError(f"bad sampling params: {e}") from None
        source = prompt if prompt is not None else prompt_token_ids
        if source is None:
            raise ValueError("the request has neither a prompt nor prompt_token_ids")
        return self.llm.make_sequence(source, sampling, request_id)

    def send_tokens(self, seq: Sequence, new_tokens: int) -> None:
        done = seq.is_finished
        send(self.router, p.Tokens(seq.request_id, seq.num_output_tokens - new_tokens,
                                   seq.output_token_ids[-new_tokens:] if new_tokens else [],
                                   seq.take_text_delta(), seq.finish_reason.value if done else None))
        if done:
            self.counters["completed"] += 1

    def fail(self, request_id: str, message: str) -> None:
        self.counters["failed"] += 1
        log.warning("request %s failed: %s", request_id, message)
        send(self.router, p.Error(request_id, message))


def build_llm(model: str, role: str, engine_args: dict) -> LLM:
    if role == "decode":
        # Blocks arrive reserved before their KV does; a prefix match on them would read
        # bytes not yet written. Decode workers only reuse KV they computed themselves.
        engine_args = {**engine_args, "enable_prefix_caching": False}
    llm = LLM(model, **engine_args)
    llm.scheduler.prefill_only = role == "prefill"
    return llm


def engine_config_summary(config: EngineConfig) -> str:
    return f"device={config.device} dtype={config.dtype} backend={config.backend}"
