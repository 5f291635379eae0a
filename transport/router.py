"""The router: the one front door. Clients and workers connect to its single socket.

It registers workers, picks a prefill and a decode worker for each request, relays token
streams to clients in order, propagates aborts, and fails the requests of a worker that stops
sending heartbeats with a clear error, within `worker_timeout_s`. A request that has not
streamed anything yet moves to another prefill worker instead, if there is one. Requests wait
at the router while no worker of a kind is registered, for at most `queue_timeout_s`.
"""

from __future__ import annotations

import logging
import secrets
import signal
import time
from dataclasses import dataclass, field, fields

import zmq

from kairos.scheduler.defaults import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS
from kairos.scheduler.metrics import time_per_output_token
from kairos.scheduler.placement import pick_decode_worker, pick_prefill_worker, prompt_tokens
from kairos.scheduler.request import RequestSLO, SamplingParams
from kairos.transport import protocol as p
from kairos.transport.metrics import RouterMetrics
from kairos.transport.security import ANY_KEY, CurveKeys, warn_if_exposed
from kairos.transport.sockets import DEFAULT_HOST, DEFAULT_PORT, broadcast, make_socket, recv, send

SAMPLING_FIELDS = [f.name for f in fields(SamplingParams)]
log = logging.getLogger("kairos.router")

ROLES = ("prefill", "decode")


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    identity: bytes
    geometry: dict
    total_blocks: int
    kv_addr: str | None
    last_seen: float  # any message
    stats: dict = field(default_factory=dict)
    stats_at: float | None = None  # the heartbeat that brought `stats`
    requests: set[str] = field(default_factory=set)  # router request ids assigned here
    # On a prefill worker: the prompt tokens of its requests whose first token has not come back.
    prefill_tokens: dict[str, int] = field(default_factory=dict)
    key: str | None = None  # the CURVE public key it registered with: its every message must carry it

    # What placement goes by (kairos.scheduler.placement).
    @property
    def queued_prompt_tokens(self) -> int:
        return sum(self.prefill_tokens.values())

    @property
    def requests_in_hand(self) -> int:
        return len(self.requests)

    @property
    def free_blocks(self) -> int:
        return self.stats.get("free_blocks", self.total_blocks)


@dataclass
class RoutedRequest:
    rid: str
    client: bytes
    submit: p.Submit
    slo: RequestSLO
    arrival: float
    prefill: str | None = None
    decode: str | None = None
    next_index: int = 0  # the next output position owed to the client
    first_token_at: float | None = None
    last_token_at: float | None = None
    held: dict[int, p.Tokens] = field(default_factory=dict)  # arrived ahead of their turn
    prompt_tokens: int | None = None  # as the worker that finished it counted them


class Router:
    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, worker_timeout_s: float = 2.0,
                 queue_timeout_s: float = 30.0, default_slo: RequestSLO = RequestSLO(),
                 max_prompt_chars: int = MAX_PROMPT_CHARS, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                 keys: CurveKeys | None = None, metrics_port: int | None = None):
        """metrics_port: also serve Prometheus metrics over HTTP on this port (same host)."""
        self.ctx = zmq.Context()
        self.socket = make_socket(self.ctx, zmq.ROUTER)
        self.keys = keys
        if keys is not None:
            self.authenticator = keys.start_authenticator(self.ctx)
            keys.listen(self.socket, ANY_KEY)
        warn_if_exposed(host, keys, "the router")
        if port:
            self.socket.bind(f"tcp://{host}:{port}")
        else:
            port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.addr = f"tcp://{host}:{port}"
        self.worker_timeout_s = worker_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.default_slo = default_slo
        self.max_prompt_chars, self.max_prompt_tokens = max_prompt_chars, max_prompt_tokens
        self.workers: dict[str, WorkerInfo] = {}
        self.requests: dict[str, RoutedRequest] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self.pending: list[str] = []  # waiting for workers
        # Attainment is judged here, on one clock, from arrival to each token's relay.
        self.counters = {"submitted": 0, "completed": 0, "aborted": 0, "failed": 0,
                         "ttft_met": 0, "tpot_met": 0, "deadline_met": 0, "slo_met": 0}
        self.metrics = RouterMetrics(lambda: self.workers.values(),
                                     lambda: {"pending": len(self.pending), "in_flight": len(self.requests)})
        self.metrics_server = self.metrics.serve(host, metrics_port) if metrics_port is not None else None
        self.stopping = False

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        log.info("router listening at %s", self.addr)
        try:
            while not self.stopping:
                self.run_once()
        finally:
            self.close()

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.keys is not None:
            self.authenticator.stop()
        self.ctx.destroy(linger=0)

    def run_once(self, poll_ms: int = 50) -> None:
        if self.socket.poll(poll_ms):
            for _ in range(1024):
                received = recv(self.socket, routed=True)
                if received is None:
                    break
                self.handle(received.identity, received.msg, received.user_id)
        now = time.monotonic()
        for w in [w for w in self.workers.values() if now - w.last_seen > self.worker_timeout_s]:
            self.worker_died(w)
        self.dispatch_pending(now)

    # ---- messages -----------------------------------------------------------------------------

    def handle(self, identity: bytes, msg: p.Message, user_id: str | None = None) -> None:
        """user_id: the sender's CURVE public key, where the router has keys."""
        if isinstance(msg, p.Submit):
            self.on_submit(identity, msg)
        elif isinstance(msg, p.Abort):
            self.on_client_abort(identity, msg.request_id)
        elif isinstance(msg, p.StatusQuery):
            send(self.socket, self.status(), identity)
        elif isinstance(msg, p.MetricsQuery):
            send(self.socket, p.MetricsReport(self.metrics.text()), identity)
        elif isinstance(msg, p.Register):
            self.on_register(identity, msg, user_id)
        else:
            worker = self.worker_by_identity(identity, heartbeat=isinstance(msg, p.Heartbeat))
            if worker is not None and worker.key != user_id:
                # Another peer took a registered worker's socket identity: it is not that worker.
                send(self.socket, p.Error(None, f"unexpected {msg.TYPE} message"), identity)
                return
            if worker is None:
                # A worker the router does not know (the router restarted, or gave it up for
                # dead): it must register again before it serves.
                if isinstance(msg, (p.Heartbeat, p.Tokens, p.StepTokens, p.Error, p.HandedOff)):
                    main_identity = identity.removesuffix(b"/heartbeat") if isinstance(msg, p.Heartbeat) else identity
                    send(self.socket, p.RegisterAgain(), main_identity)
                else:
                    send(self.socket, p.Error(None, f"unexpected {msg.TYPE} message"), identity)
                return
            worker.last_seen = time.monotonic()
            if isinstance(msg, p.Heartbeat):
                problem = p.stats_problem(msg.stats)
                if problem:
                    send(self.socket, p.Error(None, f"heartbeat rejected: {problem}"), identity)
                    return
                worker.stats, worker.stats_at = msg.stats, worker.last_seen
            elif isinstance(msg, p.Tokens):
                self.on_tokens(worker, msg)
            elif isinstance(msg, p.StepTokens):
                try:
                    chunks = msg.chunks()
                except p.ProtocolError as e:
                    send(self.socket, p.Error(None, str(e)), identity)
                    return
                for chunk in chunks:
                    self.on_tokens(worker, chunk)
            elif isinstance(msg, p.Error):
                self.on_worker_error(worker, msg)
            elif isinstance(msg, p.HandedOff):
                r = self.requests.get(msg.request_id)
                # Its KV is on the decode worker: the prefill worker's death no longer concerns it.
                if r is not None and r.decode == worker.worker_id:
                    if r.prefill in self.workers:
                        self.workers[r.prefill].requests.discard(r.rid)
            else:
                send(self.socket, p.Error(None, f"unexpected {msg.TYPE} message from a worker"), identity)

    def worker_by_identity(self, identity: bytes, heartbeat: bool) -> WorkerInfo | None:
        """Workers send heartbeats from a second socket, '<worker id>/heartbeat'."""
        name = identity.decode(errors="replace")
        if heartbeat:
            name = name.removesuffix("/heartbeat")
        w = self.workers.get(name)
        return w if w is not None and w.identity == name.encode() else None

    def on_register(self, identity: bytes, msg: p.Register, user_id: str | None = None) -> None:
        problem = None
        if self.keys is not None and not self.keys.is_worker(user_id):
            problem = "this key is not among the router's worker keys"
        elif msg.role not in ROLES:
            problem = f"unknown worker role {msg.role!r}"
        elif msg.role == "decode" and not msg.kv_addr:
            problem = "a decode worker must give its kv_addr"
        elif identity != msg.worker_id.encode():
            problem = "worker_id must equal the socket identity"
        else:
            other = next((w for w in self.workers.values() if w.worker_id != msg.worker_id), None)
            if other is not None and other.geometry != msg.geometry:
                theirs, ours = msg.geometry, other.geometry
                diffs = [f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}"
                         for k in sorted({*ours, *theirs}) if theirs.get(k) != ours.get(k)]
                # The details go to this log only: a peer that is not yet a worker learns nothing
                # of the cluster's model from the refusal.
                log.warning("refused registration of %s: KV geometry differs: %s", msg.worker_id, "; ".join(diffs))
                send(self.socket, p.Error(None, "this worker's KV geometry differs from the registered workers' "
                                                "(the router's log says how)"), identity)
                return
        if problem:
            log.warning("refused registration of %s: %s", msg.worker_id, problem)
            send(self.socket, p.Error(None, problem), identity)
            return
        known = self.workers.get(msg.worker_id)
        if known is not None and (known.role, known.key) == (msg.role, user_id):
            # It asked again before our answer reached it (ids are drawn afresh by each worker
            # process, so it is the same one): the requests it serves stay on its books.
            known.last_seen = time.monotonic()
        else:
            self.workers[msg.worker_id] = WorkerInfo(msg.worker_id, msg.role, identity, msg.geometry,
                                                     msg.total_blocks, msg.kv_addr, time.monotonic(), key=user_id)
            log.info("registered %s worker %s", msg.role, msg.worker_id)
        send(self.socket, p.Registered(msg.worker_id), identity)

    def on_submit(self, client: bytes, msg: p.Submit) -> None:
        problem, slo, code = None, None, p.INVALID_REQUEST
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            problem = "give exactly one of prompt and prompt_token_ids"
        elif msg.prompt is not None and len(msg.prompt) > self.max_prompt_chars:
            problem = f"the prompt has {len(msg.prompt)} characters; this router takes at most {self.max_prompt_chars}"
            code = p.PROMPT_TOO_LONG
        elif msg.prompt_token_ids is not None and len(msg.prompt_token_ids) > self.max_prompt_tokens:
            problem = (f"the prompt has {len(msg.prompt_token_ids)} tokens; this router takes at most "
                       f"{self.max_prompt_tokens}")
            code = p.PROMPT_TOO_LONG
        elif (client, msg.request_id) in self.by_client:
            problem = f"request id {msg.request_id!r} is already in flight"
        else:
            try:
                slo = RequestSLO.from_dict(msg.slo or {}, self.default_slo)
                SamplingParams(**msg.params)  # checked here, before any worker spends time on it
            except TypeError:
                problem = f"unknown sampling parameters; they are {', '.join(SAMPLING_FIELDS)}"
            except ValueError as e:
                problem = str(e)
        if problem:
            send(self.socket, p.Error(msg.request_id, problem, code), client)
            self.counters["failed"] += 1
            self.metrics.failed(code)
            return
        rid = secrets.token_hex(16)  # unguessable: an id is all a forged transfer or abort would need
        self.requests[rid] = RoutedRequest(rid, client, msg, slo, time.monotonic())
        self.by_client[(client, msg.request_id)] = rid
        self.counters["submitted"] += 1
        self.metrics.received.inc()
        self.pending.append(rid)
        if len(self.pending) == 1:
            # Others waiting means no worker was free at the turn's last look; the turn looks
            # again once its messages are read, rather than at each of a burst's submits.
            self.dispatch_pending(time.monotonic())

    def on_client_abort(self, client: bytes, request_id: str) -> None:
        rid = self.by_client.get((client, request_id))
        r = self.requests.get(rid) if rid is not None else None
        if r is None:
            return  # already over: its final message is on its way
        send(self.socket, p.Tokens(request_id, r.next_index, [], "", "abort"), client)
        self.abort(r)

    def abort(self, r: RoutedRequest) -> None:
        self.tell_workers(r, p.Abort(r.rid))
        self.counters["aborted"] += 1
        self.count_completion(r, "abort")
        self.forget(r)

    def on_tokens(self, worker: WorkerInfo, msg: p.Tokens) -> None:
        r = self.requests.get(msg.request_id)
        if r is None or worker.worker_id not in (r.prefill, r.decode):
            return  # aborted or failed already
        worker.prefill_tokens.pop(r.rid, None)  # the prompt is prefilled
        r.held[msg.index] = msg
        while r.next_index in r.held:
            chunk = r.held.pop(r.next_index)
            if not send(self.socket, p.Tokens(r.submit.request_id, chunk.index, chunk.token_ids, chunk.text,
                                              chunk.finish_reason, chunk.prompt_tokens), r.client):
                # Its client is gone: the workers stop spending steps and KV on it.
                self.abort(r)
                return
            r.next_index += len(chunk.token_ids)
            if chunk.token_ids:
                r.last_token_at = time.monotonic()
                r.first_token_at = r.first_token_at or r.last_token_at
            if chunk.finish_reason is not None:
                if worker.worker_id == r.prefill:
                    # Over at its first token: no KV will come to the decode worker expecting it.
                    self.tell_workers(r, p.Abort(r.rid), skip=r.prefill)
                r.prompt_tokens = chunk.prompt_tokens
                self.counters["completed"] += 1
                self.count_completion(r, chunk.finish_reason)
                self.tell_prefill_workers_of(r)
                self.forget(r)
                return

    def tell_prefill_workers_of(self, r: RoutedRequest) -> None:
        """Every prefill worker learns the output length of a request that ran to its end (its
        prefill policy may rank by predicted lengths, and sees no output but the first token)."""
        if r.prompt_tokens is None or not r.next_index:
            return
        broadcast(self.socket, p.Completed(r.slo.to_dict(), r.prompt_tokens, r.next_index),
                  [w.identity for w in self.workers.values() if w.role == "prefill"])

    def on_worker_error(self, worker: WorkerInfo, msg: p.Error) -> None:
        if msg.request_id is None:
            log.warning("worker %s: %s", worker.worker_id, msg.message)
            return
        r = self.requests.get(msg.request_id)
        if r is not None and worker.worker_id in (r.prefill, r.decode):
            # The reporting worker too: a forged KV transfer fails a request that may also be
            # decoding there, which would go on holding its blocks (an abort of nothing is a no-op).
            self.tell_workers(r, p.Abort(r.rid))
            self.fail(r, msg.message, msg.code if msg.code in p.ERROR_CODES else None)

    def count_completion(self, r: RoutedRequest, finish_reason: str) -> None:
        """Judges a request that ended with its output (to the end, or aborted by its client)
        against its SLOs; the counters count the completed ones only. A request's own SLO is
        TTFT and TPOT for a latency-sensitive one, its deadline for the other kinds (a DAG's
        call by the time its DAG had left when it was sent)."""
        ttft_s = tpot_s = None
        if r.first_token_at is not None:
            ttft_s = r.first_token_at - r.arrival
            tpot_s = time_per_output_token(r.first_token_at, r.last_token_at, r.next_index)
        e2e_s = (r.last_token_at or time.monotonic()) - r.arrival
        ttft_ok = ttft_s is not None and ttft_s <= r.slo.ttft_s
        tpot_ok = tpot_s is None or tpot_s <= r.slo.tpot_s
        deadline_ok = None if r.slo.deadline_ms is None else e2e_s <= r.slo.deadline_ms / 1e3
        if finish_reason != "abort":
            self.counters["ttft_met"] += ttft_ok
            self.counters["tpot_met"] += tpot_ok
            self.counters["deadline_met"] += bool(deadline_ok)
            self.counters["slo_met"] += (ttft_ok and tpot_ok) if r.slo.kind == "latency" else bool(deadline_ok)
        self.metrics.completed(finish_reason, ttft_s, tpot_s, e2e_s, r.prompt_tokens, r.next_index, ttft_ok,
                               tpot_ok, deadline_ok)

    # ---- placement ----------------------------------------------------------------------------

    def dispatch_pending(self, now: float) -> None:
        still = []
        for rid in self.pending:
            r = self.requests.get(rid)
            if r is None:
                continue
            prefill = pick_prefill_worker(w for w in self.workers.values() if w.role == "prefill" and self.free(w))
            decode = pick_decode_worker(w for w in self.workers.values() if w.role == "decode" and self.free(w))
            if prefill is None or decode is None:
                if now - r.arrival > self.queue_timeout_s:
                    missing = " and ".join(role for role, w in (("prefill", prefill), ("decode", decode)) if w is None)
                    self.fail(r, f"no {missing} worker registered and free within {self.queue_timeout_s:g} s",
                              p.UNAVAILABLE)
                else:
                    still.append(rid)
                continue
            r.prefill, r.decode = prefill.worker_id, decode.worker_id
            prefill.requests.add(rid)
            decode.requests.add(rid)
            s = r.submit
            prefill.prefill_tokens[rid] = prompt_tokens(s.prompt, s.prompt_token_ids)
            arrival_unix = time.time() - (now - r.arrival)
            # The decode worker hears first whom to take the KV from (the prefill worker needs
            # a whole step before it can offer it).
            send(self.socket, p.KVExpect(rid, prefill.worker_id), decode.identity)
            send(self.socket, p.PrefillRequest(rid, s.prompt, s.prompt_token_ids, s.params, r.slo.to_dict(),
                                               decode.worker_id, decode.kv_addr, arrival_unix, s.add_special_tokens,
                                               s.max_tokens_must_fit),
                 prefill.identity)
        self.pending = still

    def free(self, w: WorkerInfo) -> bool:
        """Whether a worker may take new requests: alive (it beats) and its serving loop not stuck
        in one turn for longer than a worker may stay silent (a long step, a huge prompt)."""
        return w.stats.get("loop_age_s", 0.0) <= self.worker_timeout_s

    def worker_died(self, w: WorkerInfo) -> None:
        log.warning("%s worker %s sent nothing for %.1f s: dropping it", w.role, w.worker_id, self.worker_timeout_s)
        del self.workers[w.worker_id]
        can_retry = any(o.role == w.role for o in self.workers.values())
        # In arrival order, so that retried requests queue again as they came.
        for r in sorted(filter(None, map(self.requests.get, w.requests)), key=lambda r: r.arrival):
            if can_retry and r.next_index == 0 and not r.held:
                # Nothing streamed yet: it starts over, placed anew (on another worker of the dead
                # one's role), under a new id: a first token its old prefill worker sent before
                # the abort reached it must not pass for the new attempt's.
                self.tell_workers(r, p.Abort(r.rid), skip=w.worker_id)
                self.forget(r)
                r.rid, r.prefill, r.decode = secrets.token_hex(16), None, None
                self.requests[r.rid] = r
                self.by_client[(r.client, r.submit.request_id)] = r.rid
                self.pending.append(r.rid)
            else:
                self.tell_workers(r, p.Abort(r.rid), skip=w.worker_id)
                self.fail(r, f"the {w.role} worker {w.worker_id} serving this request died")
        broadcast(self.socket, p.WorkerGone(w.worker_id), [other.identity for other in self.workers.values()])

    # ---- bookkeeping --------------------------------------------------------------------------

    def tell_workers(self, r: RoutedRequest, msg: p.Message, skip: str | None = None) -> None:
        for worker_id in {r.prefill, r.decode} - {None, skip}:
            w = self.workers.get(worker_id)
            if w is not None:
                send(self.socket, msg, w.identity)

    def fail(self, r: RoutedRequest, message: str, code: str | None = None) -> None:
        send(self.socket, p.Error(r.submit.request_id, message, code), r.client)
        self.counters["failed"] += 1
        self.metrics.failed(code)
        self.forget(r)

    def release(self, r: RoutedRequest) -> None:
        for worker_id in (r.prefill, r.decode):
            if worker_id in self.workers:
                self.workers[worker_id].requests.discard(r.rid)
                self.workers[worker_id].prefill_tokens.pop(r.rid, None)

    def forget(self, r: RoutedRequest) -> None:
        self.release(r)
        self.requests.pop(r.rid, None)
        self.by_client.pop((r.client, r.submit.request_id), None)

    def status(self) -> p.StatusReport:
        now = time.monotonic()
        workers = [{"worker_id": w.worker_id, "role": w.role, "kv_addr": w.kv_addr, "requests": len(w.requests),
                    **({"queued_prompt_tokens": sum(w.prefill_tokens.values())} if w.role == "prefill" else {}),
                    "total_blocks": w.total_blocks, "last_seen_ms": round((now - w.last_seen) * 1e3, 1),
                    "stats_age_ms": None if w.stats_at is None else round((now - w.stats_at) * 1e3, 1), **w.stats}
                   for w in self.workers.values()]
        return p.StatusReport(workers, {**self.counters, "in_flight": len(self.requests)}, len(self.pending))
