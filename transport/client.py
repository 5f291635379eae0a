"""Clients of a Kairos router: `Client` (blocking) and `AsyncClient` (asyncio), each able to
keep many requests in flight on one connection.

    client = Client("tcp://127.0.0.1:7100")
    rid = client.submit("Hello", max_tokens=32, temperature=0, slo={"ttft_ms": 500})
    for chunk in client.stream(rid):
        print(chunk.text, end="", flush=True)

Timings (`ttft_ms`, `token_times_ms`) are taken on the client's clock, from the moment the
request was sent. Nothing here needs torch: a client machine needs only pyzmq and msgpack.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Iterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from kairos.scheduler.request import RequestSLO, SamplingParams
from kairos.transport import protocol as p
from kairos.transport.security import CurveKeys
from kairos.transport.sockets import DEFAULT_ROUTER, make_socket

ABORT_LINGER_MS = 200  # how long a closing client may take to get its aborts out
# How long requests wait for a connection to the router (one not up yet, or restarting) before
# they fail as unavailable: a router that is not there fails them in seconds, not at the reply
# timeout.
CONNECT_TIMEOUT_S = 10.0
CONNECT_CHECK_S = 0.25  # how often an asyncio client not connected in time fails what waits
# Connected means the ZeroMQ handshake done (where the router requires CURVE, with the keys
# right): a TCP connection alone may still be refused.
CONNECTION_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
CURVE_HINT = "(where it requires CURVE, are this client's keys the cluster's?)"


class RequestTooLarge(ValueError):
    """A request over the size of a message a router takes."""


class RequestFailed(RuntimeError):
    """code: what kind of failure (protocol.ERROR_CODES), or None."""

    def __init__(self, request_id: str, message: str, code: str | None = None):
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id, self.message, self.code = request_id, message, code


@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    ttft_ms: float | None = None
    token_times_ms: list[float] = field(default_factory=list)  # per token, since the request was sent
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # the prompt's length, as the serving side tokenized it
    error: str | None = None
    error_code: str | None = None  # see RequestFailed

    def to_dict(self) -> dict:
        return asdict(self)


class _Tracked:
    """One request's progress on the client side."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.sent_at = time.perf_counter()
        self.completion = Completion(request_id)
        self.chunks: deque[p.Tokens | p.Error] = deque()
        self.done = False

    def record(self, msg: p.Tokens | p.Error) -> None:
        c = self.completion
        if isinstance(msg, p.Error):
            c.error, c.error_code = msg.message, msg.code
            self.done = True
        else:
            ms = (time.perf_counter() - self.sent_at) * 1e3
            if msg.token_ids and c.ttft_ms is None:
                c.ttft_ms = ms
            c.token_ids += msg.token_ids
            c.token_times_ms += [ms] * len(msg.token_ids)
            c.text += msg.text
            if msg.finish_reason is not None:
                c.finish_reason, c.prompt_tokens = msg.finish_reason, msg.prompt_tokens
                self.done = True
        self.chunks.append(msg)

    def received(self) -> Iterator[p.Tokens]:
        """The chunks received and not yet handed out; raises RequestFailed at an error."""
        while self.chunks:
            chunk = self.chunks.popleft()
            if isinstance(chunk, p.Error):
                raise RequestFailed(self.request_id, chunk.message, chunk.code)
            yield chunk


def make_submit(prompt: str | list[int], request_id: str, *, max_tokens: int = 16, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = -1, seed: int | None = None, stop: list[str] | str | None = None,
                stop_token_ids: list[int] | None = None, ignore_eos: bool = False, eos_after: int | None = None,
                slo: RequestSLO | dict | None = None, group_id: str | None = None,
                add_special_tokens: bool = True, max_tokens_must_fit: bool = False) -> p.Submit:
    """Checks a request's values here, so a bad one fails before it is sent (ValueError, saying
    what is wrong). `slo` is a RequestSLO, or a dict of some of its fields (ttft_ms, tpot_ms,
    request_class, output_len_hint), the router's defaults standing for the rest.
    add_special_tokens: False for a text prompt that holds them already (a rendered chat).
    max_tokens_must_fit: the request fails (prompt_too_long) if its prompt leaves less room than
    max_tokens under the model's length, rather than its output ending there ("length"), as
    OpenAI's and vLLM's APIs refuse it."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=[] if stop is None else stop, stop_token_ids=stop_token_ids or [],
                            ignore_eos=ignore_eos, eos_after=eos_after)
    if isinstance(slo, RequestSLO):
        slo = slo.to_dict()
    elif slo is not None:
        RequestSLO.from_dict(slo)  # the fields given are checked; the router fills in the rest
    if isinstance(prompt, str):
        text, ids = prompt, None
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        text, ids = None, prompt
    else:
        raise ValueError("a prompt is a string or a non-empty list of token ids")
    return p.Submit(request_id, text, ids, asdict(params), slo, group_id, add_special_tokens, max_tokens_must_fit)


def encoded_submit(msg: p.Submit) -> bytes:
    """The request as it goes on the wire; ValueError where it cannot go: text that is not
    valid Unicode, or more bytes than a router takes in one message (which ZeroMQ would drop
    by disconnecting the sender, and every request in flight on it with it)."""
    try:
        data = p.encode(msg)
    except UnicodeEncodeError as e:
        raise ValueError(f"the request holds text that is not valid Unicode ({e.reason} at character "
                         f"{e.start} of {e.object[max(0, e.start - 20) : e.start + 1]!r})") from None
    if len(data) > p.MAX_CONTROL_MESSAGE_BYTES:
        raise RequestTooLarge(f"the request is {len(data)} bytes as sent; a router takes at most "
                         f"{p.MAX_CONTROL_MESSAGE_BYTES} (a shorter prompt fits)")
    return data


def status_dict(report: p.StatusReport) -> dict:
    return {"workers": report.workers, "counters": report.counters, "pending": report.pending}


class _Base:
    def __init__(self, addr: str, timeout_s: float, connect_timeout_s: float):
        self.addr = addr
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connected = False
        self.unconnected_since = time.monotonic()
        self.reached = False  # whether a TCP connection ever came up
        self.tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self) & 0xFFFF:x}"

    def _new_request(self, prompt, request_id: str | None, options: dict) -> tuple[bytes, _Tracked]:
        """The request's message, checked and encoded, and its tracker (not yet filed)."""
        request_id = request_id or f"{self._prefix}-{next(self._ids)}"
        if request_id in self.tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        return encoded_submit(make_submit(prompt, request_id, **options)), _Tracked(request_id)

    def _unfinished(self) -> list[str]:
        return [rid for rid, tracked in self.tracked.items() if not tracked.done]

    def _route(self, data: bytes) -> p.Message:
        """Files a request's message under its request, and returns the message."""
        msg = p.decode(data)
        if isinstance(msg, (p.Tokens, p.Error)) and msg.request_id in self.tracked:
            self.tracked[msg.request_id].record(msg)
        elif isinstance(msg, p.Error) and msg.request_id is None:
            raise RuntimeError(f"the router at {self.addr} rejected a message: {msg.message}")
        return msg

    def _connect(self, sock: zmq.Socket, curve_keys: str | None) -> zmq.Socket:
        if curve_keys is not None:
            CurveKeys.load(curve_keys, "client").connect(sock)
        sock.connect(self.addr)
        return sock

    def _timeout_error(self) -> TimeoutError:
        return TimeoutError(f"no reply from the router at {self.addr} within {self.timeout_s:g} s")

    def _on_connection_event(self, event: dict) -> bool:
        """Follows the connection's state; whether it dropped. When it drops (the router died,
        or was restarted and knows none of them), every request still running fails now rather
        than at its timeout."""
        if event["event"] == zmq.EVENT_CONNECTED:
            self.reached = True
            return False
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected = True
            return False
        if not self.connected:  # a handshake refused
            return False
        self.connected, self.unconnected_since, self.reached = False, time.monotonic(), False
        self._fail(self._unfinished(), f"the connection to the router at {self.addr} was lost, and the request with it")
        return True

    def _fail(self, request_ids: list[str], message: str) -> None:
        """These requests fail as unavailable: the router cannot be reached."""
        for rid in request_ids:
            self.tracked[rid].record(p.Error(rid, message, p.UNAVAILABLE))

    def _follow_events(self, events: zmq.Socket) -> bool:
        """Takes in the connection events queued so far (events: a blocking view of the monitor
        socket), so that a request is judged by the connection as it is now, not by a drop
        from before it was sent; whether the connection dropped."""
        dropped = False
        while events.poll(0):
            dropped |= self._on_connection_event(recv_monitor_message(events))
        return dropped

    def _connect_deadline(self) -> float | None:
        """When waiting for a connection stops (monotonic seconds); None while connected."""
        return None if self.connected else self.unconnected_since + self.connect_timeout_s

    def _past_connect_deadline(self) -> bool:
        deadline = self._connect_deadline()
        return deadline is not None and time.monotonic() >= deadline

    def _unsent(self, tracked: _Tracked) -> bool:
        """Fails a request about to be sent where the router has been unreachable for
        connect_timeout_s already: it would only wait in the socket's queue. Whether it did."""
        if self._past_connect_deadline():
            self._fail([tracked.request_id], str(self._unreachable_error()))
        return tracked.done

    def _unsendable(self, tracked: _Tracked | None = None) -> ConnectionError:
        """ZeroMQ has no connection to queue a message on: the router refused this client's
        handshake, which is not tried again. Fails the request, if one is given."""
        error = ConnectionError(f"cannot send to the router at {self.addr}: it refused this client's handshake "
                                f"{CURVE_HINT}")
        if tracked is not None:
            self._fail([tracked.request_id], str(error))
        return error

    def _unreachable_error(self) -> ConnectionError:
        waited = time.monotonic() - self.unconnected_since
        if self.reached:
            return ConnectionError(f"the router at {self.addr} completed no handshake with this client in "
                                   f"{waited:.1f} s {CURVE_HINT}")
        return ConnectionError(f"no router at {self.addr}: not connected in {waited:.1f} s")

    def _fail_unreachable(self) -> bool:
        """Fails the running requests, the router being unreachable; whether there were any."""
        unfinished = self._unfinished()
        self._fail(unfinished, str(self._unreachable_error()))
        return bool(unfinished)


class Client(_Base):
    """curve_keys: the cluster's keys folder (`kairos keys`), where the router requires CURVE;
    only its server.key is read."""

    def __init__(self, addr: str = DEFAULT_ROUTER, timeout_s: float = 60.0, curve_keys: str | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S):
        super().__init__(addr, timeout_s, connect_timeout_s)
        self.ctx = zmq.Context()
        self.socket = make_socket(self.ctx, zmq.DEALER)
        self.connection_events = self.socket.get_monitor_socket(CONNECTION_EVENTS)  # before it can connect
        self._connect(self.socket, curve_keys)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.connection_events, zmq.POLLIN)

    def submit(self, prompt: str | list[int], request_id: str | None = None, **options) -> str:
        """Sends a request (options: see `make_submit`) and returns its id at once."""
        data, tracked = self._new_request(prompt, request_id, options)
        self._follow_events(self.connection_events)
        self.tracked[tracked.request_id] = tracked
        tracked.sent_at = time.perf_counter()
        if not self._unsent(tracked):
            try:
                self.socket.send(data, zmq.NOBLOCK)
            except zmq.Again:
                self._unsendable(tracked)
        return tracked.request_id

    def stream(self, request_id: str) -> Iterator[p.Tokens]:
        """The request's token chunks as they arrive; raises RequestFailed on an error. Left
        before its end (a break, an exception, a timeout), the request is aborted."""
        tracked = self.tracked[request_id]
        try:
            while True:
                yield from tracked.received()
                if tracked.done:
                    return
                self._receive()
        finally:
            if not tracked.done and not self.socket.closed:
                self.abort(request_id)
            self.tracked.pop(request_id, None)

    def result(self, request_id: str) -> Completion:
        """Waits for the request to end; failures are in the completion's `error`."""
        tracked = self.tracked[request_id]
        while not tracked.done:
            self._receive()
        self.tracked.pop(request_id, None)
        return tracked.completion

    def generate(self, prompts: str | list[int] | list, **options) -> Completion | list[Completion]:
        """One prompt gives one Completion; a list of prompts runs concurrently."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        ids = [self.submit(prompt, **options) for prompt in ([prompts] if single else prompts)]
        results = [self.result(rid) for rid in ids]
        return results[0] if single else results

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(zmq.Again):  # no connection: nothing runs there to abort
            self.socket.send(p.encode(p.Abort(request_id)), zmq.NOBLOCK)

    def status(self) -> dict:
        """The router's status; ConnectionError if it is unreachable, TimeoutError if silent."""
        self._follow_events(self.connection_events)
        if self._past_connect_deadline():
            raise self._unreachable_error()
        try:
            self.socket.send(p.encode(p.StatusQuery()), zmq.NOBLOCK)
        except zmq.Again:
            raise self._unsendable() from None
        while not isinstance(msg := self._receive(), p.StatusReport):
            pass
        return status_dict(msg)

    def fresh_status(self, until=None, timeout_s: float = 20.0) -> dict:
        """The router's status once every worker has reported since this call, and `until`
        holds of it if given. Workers report their figures in heartbeats, so a status taken at
        once may miss their latest steps and requests (and show a busy worker idle)."""
        asked = time.monotonic()
        while True:
            sent = time.monotonic()
            status = self.status()
            # Each report reached the router stats_age_ms before it answered, so after
            # `sent - stats_age_ms`; the margin covers the report's trip from its worker.
            fresh = all(w["stats_age_ms"] is not None and sent - w["stats_age_ms"] / 1e3 > asked + 0.02
                        for w in status["workers"])
            if fresh and (until is None or until(status)):
                return status
            if time.monotonic() - asked > timeout_s:
                raise TimeoutError(f"no report since the last {timeout_s} s from every worker fits: {status}")
            time.sleep(0.05)

    def _receive(self) -> p.Message | None:
        """The next message, or None if the running requests failed meanwhile (the connection
        to the router dropped, or never came up in time). ConnectionError when the router is
        unreachable (not connected through either timeout) and no request was running,
        TimeoutError when it is connected and silent for timeout_s."""
        reply_deadline = time.monotonic() + self.timeout_s
        while True:
            connect_deadline = self._connect_deadline()
            until = reply_deadline if connect_deadline is None else min(reply_deadline, connect_deadline)
            # Rounded up: a poll that returned before the deadline would be taken for a timeout.
            ready = dict(self.poller.poll(max(0, math.ceil((until - time.monotonic()) * 1e3))))
            if self.socket in ready:
                return self._route(self.socket.recv())
            if self.connection_events in ready:
                if self._on_connection_event(recv_monitor_message(self.connection_events)):
                    return None
                continue
            now = time.monotonic()
            if not self.connected and now >= until:
                if self._fail_unreachable():
                    return None
                raise self._unreachable_error()
            if now >= reply_deadline:
                raise self._timeout_error()

    def close(self) -> None:
        """Aborts the requests still running (their output would go nowhere) and disconnects."""
        unfinished = self._unfinished()
        for request_id in unfinished:
            self.abort(request_id)
        # Long enough for the aborts to leave, not to wait on a router that is gone.
        self.ctx.destroy(linger=ABORT_LINGER_MS if unfinished else 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Base):
    """The asyncio client: `async for chunk in client.stream(prompt, ...)`. One reader task
    files incoming messages under their requests."""

    def __init__(self, addr: str = DEFAULT_ROUTER, timeout_s: float = 60.0, curve_keys: str | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S):
        super().__init__(addr, timeout_s, connect_timeout_s)
        self.ctx = zmq.asyncio.Context()
        self.socket = make_socket(self.ctx, zmq.DEALER)
        self.connection_events = self.socket.get_monitor_socket(CONNECTION_EVENTS)  # before it can connect
        self._connect(self.socket, curve_keys)
        # Blocking views, read without awaiting: the events before a request is sent, the
        # messages the reader has not read yet when the connection drops.
        self._events_now = zmq.Socket.shadow(self.connection_events.underlying)
        self._socket_now = zmq.Socket.shadow(self.socket.underlying)
        self._wakeups: dict[str, asyncio.Event] = {}
        # Callers awaiting a status or metrics report, first asked first answered (the router
        # answers in the order it is asked).
        self._replies: dict[type, deque[asyncio.Future]] = {p.StatusReport: deque(), p.MetricsReport: deque()}
        self._reader: asyncio.Task | None = None
        self._failure: BaseException | None = None
        self._watcher: asyncio.Task | None = None

    async def stream(self, prompt: str | list[int], request_id: str | None = None,
                     **options) -> AsyncIterator[p.Tokens]:
        """The request's token chunks as they arrive; raises RequestFailed on an error."""
        tracked = await self._start(prompt, request_id, options)
        async for chunk in self._chunks(tracked):
            yield chunk

    async def submit(self, prompt: str | list[int], request_id: str | None = None, **options) -> str:
        """Sends a request (options: see `make_submit`) and returns its id; `chunks` streams it."""
        return (await self._start(prompt, request_id, options)).request_id

    def chunks(self, request_id: str) -> AsyncIterator[p.Tokens]:
        """A submitted request's token chunks as they arrive; raises RequestFailed on an error."""
        return self._chunks(self.tracked[request_id])

    async def generate(self, prompt: str | list[int], request_id: str | None = None, **options) -> Completion:
        """Waits for the request to end; failures are in the completion's `error`."""
        tracked = await self._start(prompt, request_id, options)
        try:
            async for _ in self._chunks(tracked):
                pass
        except RequestFailed:
            pass
        return tracked.completion

    async def _start(self, prompt, request_id: str | None, options: dict) -> _Tracked:
        data, tracked = self._new_request(prompt, request_id, options)
        self.tracked[tracked.request_id] = tracked
        self._wakeups[tracked.request_id] = asyncio.Event()
        self._ensure_reader()
        self._follow_events(self._events_now)
        tracked.sent_at = time.perf_counter()
        if not self._unsent(tracked):
            try:
                await self.socket.send(data, flags=zmq.NOBLOCK)
            except zmq.Again:
                self._unsendable(tracked)
        return tracked

    async def _chunks(self, tracked: _Tracked) -> AsyncIterator[p.Tokens]:
        rid = tracked.request_id
        wake = self._wakeups[rid]
        try:
            while True:
                for chunk in tracked.received():
                    yield chunk
                if tracked.done:
                    return
                if self._failure is not None:
                    raise self._failure
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), self.timeout_s)
                except asyncio.TimeoutError:
                    raise self._timeout_error() from None
        finally:
            self.tracked.pop(rid, None)
            self._wakeups.pop(rid, None)
            if not tracked.done and not self.socket.closed:
                # Left before its end (a break, a cancelled task, a timeout): nobody reads on.
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(zmq.Again):  # no connection: nothing runs there to abort
            await self.socket.send(p.encode(p.Abort(request_id)), flags=zmq.NOBLOCK)

    async def status(self) -> dict:
        return status_dict(await self._ask(p.StatusQuery(), p.StatusReport))

    async def metrics(self) -> str:
        """The router's Prometheus metrics, in the text format."""
        return (await self._ask(p.MetricsQuery(), p.MetricsReport)).text

    async def _ask(self, query: p.Message, reply: type) -> p.Message:
        """The router's answer; ConnectionError if it is unreachable, TimeoutError if silent."""
        self._ensure_reader()
        self._follow_events(self._events_now)
        if self._past_connect_deadline():
            raise self._unreachable_error()
        future = asyncio.get_running_loop().create_future()
        self._replies[reply].append(future)
        try:
            await self.socket.send(p.encode(query), flags=zmq.NOBLOCK)
            return await asyncio.wait_for(future, self.timeout_s)
        except zmq.Again:
            raise self._unsendable() from None
        except asyncio.TimeoutError:
            raise self._timeout_error() from None
        finally:
            if future in self._replies[reply]:  # a reply coming late goes to the next caller
                self._replies[reply].remove(future)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._failure = None  # what broke the last reader failed the streams waiting then
            self._reader = asyncio.get_running_loop().create_task(self._read())
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Fails the running requests whenever the connection to the router drops, and, while
        it has not come up for connect_timeout_s, every request and query."""
        while True:
            deadline, timeout = self._connect_deadline(), None
            if deadline is not None:  # wake at the deadline, and every CONNECT_CHECK_S past it
                left = deadline - time.monotonic()
                timeout = left if 0 < left < CONNECT_CHECK_S else CONNECT_CHECK_S
            try:
                event = await asyncio.wait_for(recv_monitor_message(self.connection_events), timeout)
                if event["event"] == zmq.EVENT_DISCONNECTED and self.connected:
                    # What the router sent before it went comes first: a request that ended
                    # then is not failed.
                    with contextlib.suppress(RuntimeError, p.ProtocolError):  # a broken message ends the drain
                        while self._socket_now.poll(0):
                            self._deliver(self._socket_now.recv())
                dropped = self._on_connection_event(event)
            except asyncio.TimeoutError:
                dropped = False
            if self._past_connect_deadline():
                dropped |= self._fail_unreachable()
                for waiting in self._replies.values():
                    while waiting:
                        future = waiting.popleft()
                        if not future.done():
                            future.set_exception(self._unreachable_error())
            if dropped:
                for wake in self._wakeups.values():
                    wake.set()

    async def _read(self) -> None:
        try:
            while True:
                self._deliver(await self.socket.recv())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken reader must not leave streams waiting forever
            self._failure = e
            for wake in self._wakeups.values():
                wake.set()

    def _deliver(self, data: bytes) -> None:
        """Files a message from the router and wakes whoever waits for it."""
        msg = self._route(data)
        waiting = self._replies.get(type(msg))
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(msg)
                break
        wake = self._wakeups.get(getattr(msg, "request_id", None))
        if wake is not None:
            wake.set()

    def close(self) -> None:
        """Aborts the requests still running (their output would go nowhere) and disconnects."""
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        unfinished = self._unfinished()
        if unfinished:
            # Sent at once, outside the event loop, which may not run again before the end.
            now = zmq.Socket.shadow(self.socket.underlying)
            for request_id in unfinished:
                now.send(p.encode(p.Abort(request_id)), flags=zmq.NOBLOCK)
        self.ctx.destroy(linger=ABORT_LINGER_MS if unfinished else 0)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
