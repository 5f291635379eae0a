"""`kairos api`: the OpenAI-compatible HTTP front door. It is one more client of the router: one
ZeroMQ connection (`AsyncClient`) with every HTTP request in flight on it, and no torch.

    POST /v1/completions        prompt: text, texts, token ids or lists of them; SSE with `stream`
    POST /v1/chat/completions   messages, rendered with the model's chat template
    GET  /v1/models, /health (503 until a prefill and a decode worker are registered), /metrics

SLOs travel per request in extension fields of the body (`extra_body` in the openai client):
`ttft_slo_ms`, `tpot_slo_ms`, `output_len_hint`, `request_class`, and for the Tempo policies
`kind`, `deadline_ms`, `dag_id`, `dag_stage`; the router's defaults stand for those left out.
Errors have the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, with 400 for
bad parameters (the native client's checks, `make_submit`), 404 for another model, 413 for a
body or prompt too long, 503 when no worker is up, 504 when a request gets no token in
`timeout_s`. A client that goes away aborts its requests."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from kairos.scheduler.request import MAX_COUNT
from kairos.transport import protocol as p
from kairos.transport.chat import ChatTemplate, ChatTemplateError
from kairos.transport.client import AsyncClient, RequestFailed, RequestTooLarge, encoded_submit, make_submit

log = logging.getLogger("kairos.api")

DEFAULT_MAX_BODY_BYTES = 32 * 2**20  # a prompt at the router's default limits fits, escaped
HEALTH_TIMEOUT_S = 2.0
WORKERS_FRESH_S = 1.0  # how old a look at the registered workers may be when a request relies on it
# A prompt beyond the model's length is a 400, as OpenAI's and vLLM's (clients detect a context
# overflow by it), under OpenAI's code for it.
STATUS_OF_CODE = {p.INVALID_REQUEST: 400, p.PROMPT_TOO_LONG: 400, p.UNAVAILABLE: 503}
HTTP_CODE_OF_CODE = {p.PROMPT_TOO_LONG: "context_length_exceeded"}
MAX_CHOICES = 128  # n: copies of a request in one call


class APIError(Exception):
    """An answer in the OpenAI error shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable_error",
             504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        # OpenAI's clients retry a 5xx by default; a timed-out request retried twice would land
        # three times the load on a cluster that is already behind.
        headers = {"x-should-retry": "false"} if self.status == 504 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


# ---- request bodies -----------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict: a string is not a number here, nor a number a string; an unknown field is refused
    # rather than silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    # Optional fields take null as "the default", as OpenAI's API and its clients use it.
    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # 1
    top_p: float | None = None  # 1
    top_k: int | None = None  # -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: int | None = None  # 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # OpenAI fields taken at their neutral values only (the engine has no such sampling).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Kairos's extensions: the request's SLOs and what its scheduler may know of it.
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    output_len_hint: int | None = None
    request_class: str | None = None
    kind: str | None = None  # latency (the default), throughput or collective
    deadline_ms: float | None = None
    dag_id: str | None = None
    dag_stage: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    # Other fields a template may read (name, tool_call_id, ...) pass through to it.
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict | None = None  # extra values the template reads (enable_thinking, ...)


def _unsupported(body: _Request) -> None:
    """Refuses, by name, the OpenAI features the engine does not have, when asked for."""
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "echo": False, "top_logprobs": 0, "tools": [],
               "tool_choice": "none"}
    for name, value in body:
        if name in neutral and value not in (None, neutral[name]):
            raise APIError(400, f"{name}={value!r} is not supported by this server", name, "unsupported")
        if name in ("logit_bias", "suffix") and value:
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported")
    # Chat's logprobs is a flag (false is neutral); completions' a count, where even 0 asks for some.
    logprobs = getattr(body, "logprobs", None)
    if logprobs is not None and logprobs is not False:
        raise APIError(400, f"logprobs={logprobs!r} is not supported by this server", "logprobs", "unsupported")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES:
        raise APIError(400, f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
    best_of = getattr(body, "best_of", None)
    if best_of not in (None, n):
        raise APIError(400, "best_of other than n is not supported by this server", "best_of", "unsupported")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only for stream=true", "stream_options")
    fmt = getattr(body, "response_format", None)
    if fmt not in (None, {"type": "text"}):
        raise APIError(400, "response_format other than text is not supported", "response_format", "unsupported")


def _options(body: _Request, max_tokens: int | None, default_max_tokens: int) -> dict:
    slo = {"ttft_ms": body.ttft_slo_ms, "tpot_ms": body.tpot_slo_ms, "output_len_hint": body.output_len_hint,
           "request_class": body.request_class, "kind": body.kind, "deadline_ms": body.deadline_ms,
           "dag_id": body.dag_id, "dag_stage": body.dag_stage}
    return {"max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": -1 if body.top_k is None else body.top_k,
            "seed": body.seed, "stop": body.stop, "stop_token_ids": body.stop_token_ids,
            "ignore_eos": bool(body.ignore_eos), "slo": {k: v for k, v in slo.items() if v is not None} or None}


def _copies(prompts: list, n: int | None, seed: int | None) -> list[tuple[object, dict]]:
    """Each prompt n times (choice prompt * n + j), copy j drawing from seed + j where a seed is
    given, so that seeded copies differ and still repeat."""
    n = n or 1
    return [(prompt, {} if seed is None else {"seed": seed + j}) for prompt in prompts for j in range(n)]


def _validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, named by the field's path (without the names of the
    types a field may take, which pydantic puts in the path)."""
    errors = e.errors()
    first = errors[0]
    param = ""
    for part in first["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool"):
            param += f".{part}" if param else part
    param = param or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {param}", param)
    alternatives = sum(1 for err in errors if err["loc"][:1] == first["loc"][:1]) > 1
    kind = "wrong type for any of its accepted forms" if alternatives else first["msg"]
    return APIError(400, f"{param}: {kind}" if param else kind, param)


def _prompts(prompt) -> list[str | list[int]]:
    """A completion request's prompts: one text, texts, one list of token ids, or lists of them."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    return list(prompt) if isinstance(prompt[0], (str, list)) else [prompt]


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's


def _chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as a template reads them, each content a text (parts of type text joined)."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise APIError(400, f"role must be one of {', '.join(CHAT_ROLES)}, not {m.role!r}", f"messages[{i}].role")
        message = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise APIError(400, "only text content parts are supported", f"messages[{i}].content")
            message["content"] = "".join(part["text"] for part in content)
        elif content is None:
            message["content"] = ""
        out.append(message)
    return out


# ---- the merged streams of one HTTP request -----------------------------------------------------


@dataclass
class Choice:
    index: int
    request_id: str
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None


class RequestGroup:
    """The requests of one HTTP call (`copies` of each prompt, side by side), their chunks merged
    in arrival order; `close` aborts those not finished (the HTTP client went away, or one of
    them failed)."""

    def __init__(self, client: AsyncClient, request_ids: list[str], background: set, copies: int = 1):
        self.client, self.background, self.copies = client, background, copies
        self.choices = [Choice(i, rid) for i, rid in enumerate(request_ids)]
        self.open = set(range(len(request_ids)))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pumps = [asyncio.create_task(self._pump(c)) for c in self.choices]

    async def _pump(self, choice: Choice) -> None:
        try:
            async for chunk in self.client.chunks(choice.request_id):
                self.queue.put_nowait((choice, chunk))
        except (RequestFailed, TimeoutError, RuntimeError) as e:
            self.queue.put_nowait((choice, e))

    async def next(self) -> tuple[Choice, p.Tokens]:
        """The next chunk of any of them; raises APIError for a failure."""
        choice, item = await self.queue.get()
        if isinstance(item, Exception):
            if isinstance(item, RequestFailed):  # over at the router too; one timed out is not
                self.open.discard(choice.index)
            raise _api_error(item)
        choice.text += item.text
        choice.completion_tokens += len(item.token_ids)
        if item.finish_reason is not None:
            choice.finish_reason, choice.prompt_tokens = item.finish_reason, item.prompt_tokens or 0
            self.open.discard(choice.index)
        return choice, item

    async def finish(self) -> list[Choice]:
        while self.open:
            await self.next()
        return self.choices

    def close(self) -> None:
        for task in self.pumps:
            task.cancel()
        for index in self.open:
            task = asyncio.ensure_future(self.client.abort(self.choices[index].request_id))
            self.background.add(task)  # held until sent: the loop keeps only weak references
            task.add_done_callback(self.background.discard)
        self.open.clear()

    def usage(self) -> dict:
        # A prompt counts once however many copies of it ran, as OpenAI's and vLLM's usage does.
        prompt = sum(c.prompt_tokens for c in self.choices[:: self.copies])
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _api_error(e: Exception) -> APIError:
    if isinstance(e, RequestFailed):
        return APIError(STATUS_OF_CODE.get(e.code, 500), e.message, code=HTTP_CODE_OF_CODE.get(e.code, e.code))
    if isinstance(e, TimeoutError):
        return APIError(504, f"the request timed out: {e}", code="timeout")
    if isinstance(e, ConnectionError):
        return APIError(503, str(e), code="unavailable")
    return APIError(500, f"the connection to the router failed: {e}")


async def _answer_api_error(_request: Request, e: APIError) -> JSONResponse:
    return e.response()


async def _answer_client_gone(_request: Request, _e) -> Response:
    """A client that disconnected (its requests aborted) gets nothing: 499, as nginx logs it."""
    return Response(status_code=499)


async def _answer_not_found(request: Request, _e) -> JSONResponse:
    return APIError(404, f"no such endpoint: {request.url.path}", code="not_found").response()


async def _answer_not_allowed(request: Request, _e) -> JSONResponse:
    return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the server ---------------------------------------------------------------------------------


class _Gate:
    """ASGI middleware: counts responses by endpoint and status, and with an API key, answers
    401 to a /v1 request without `Authorization: Bearer <key>`."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, counter: Counter, api_key: str | None):
        self.app, self.counter, self.api_key = app, counter, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if self.api_key is not None and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = APIError(401, "a valid API key is needed (Authorization: Bearer <key>)",
                                 code="invalid_api_key")
                return await error.response()(scope, receive, counted)
        await self.app(scope, receive, counted)


class OpenAIServer:
    """model: the name requests give (and /v1/models lists); chat_template: the model's, or
    None (chat requests then get a 400); api_key: if set, what /v1 requests must present."""

    def __init__(self, router_addr: str, model: str, chat_template: ChatTemplate | None, timeout_s: float = 300.0,
                 curve_keys: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 api_key: str | None = None):
        self.router_addr, self.model, self.chat_template = router_addr, model, chat_template
        self.timeout_s, self.curve_keys, self.max_body_bytes = timeout_s, curve_keys, max_body_bytes
        self.api_key = api_key
        self.client: AsyncClient | None = None
        self.background: set = set()
        self._workers_seen: tuple[float, list[str]] | None = None  # (when, roles registered)
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.http_requests = Counter("kairos:http_requests", "HTTP requests of the API server, by endpoint and "
                                     "status code.", ["endpoint", "status"], registry=self.registry)
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_app):
            self.client = AsyncClient(self.router_addr, timeout_s=self.timeout_s, curve_keys=self.curve_keys)
            try:
                yield
            finally:
                self.client.close()

        app = FastAPI(title="Kairos", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_exception_handler(APIError, _answer_api_error)
        app.add_exception_handler(ClientGone, _answer_client_gone)
        app.add_exception_handler(ClientDisconnect, _answer_client_gone)  # gone while the body was read
        app.add_exception_handler(404, _answer_not_found)
        app.add_exception_handler(405, _answer_not_allowed)
        app.add_middleware(_Gate, counter=self.http_requests, api_key=self.api_key)
        return app

    # ---- endpoints --------------------------------------------------------------------------

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "kairos"}]}

    async def health(self) -> JSONResponse:
        roles = await self._registered_roles(max_age_s=0.0)
        return JSONResponse({"status": "ok", "prefill_workers": roles.count("prefill"),
                             "decode_workers": roles.count("decode")})

    async def _registered_roles(self, max_age_s: float) -> list[str]:
        """The roles of the workers registered at the router, as seen at most max_age_s ago;
        APIError 503 unless a prefill and a decode worker are among them."""
        now = time.monotonic()
        if self._workers_seen is None or now - self._workers_seen[0] > max_age_s:
            try:
                status = await asyncio.wait_for(self.client.status(), HEALTH_TIMEOUT_S)
            except (TimeoutError, asyncio.TimeoutError, ConnectionError):
                raise APIError(503, f"the router at {self.router_addr} does not answer", code="unavailable") from None
            self._workers_seen = (now, [w["role"] for w in status["workers"]])
        roles = self._workers_seen[1]
        missing = [role for role in ("prefill", "decode") if role not in roles]
        if missing:
            raise APIError(503, f"no {' and no '.join(missing)} worker is registered", code="unavailable")
        return roles

    async def metrics(self) -> Response:
        try:
            router = await self.client.metrics()
        except (TimeoutError, ConnectionError):
            raise APIError(503, f"the router at {self.router_addr} does not answer", code="unavailable") from None
        text = router + generate_latest(self.registry).decode()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        prompts = _prompts(body.prompt)
        # A max_tokens given must fit beside the prompt, as OpenAI's and vLLM's APIs require.
        options = {**_options(body, body.max_tokens, 16), "max_tokens_must_fit": body.max_tokens is not None}
        group = await self._submit(_copies(prompts, body.n, options.pop("seed")), options, body.n or 1)
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(choice: Choice, text: str, finish_reason: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model,
                    "choices": [{"index": choice.index, "text": text, "logprobs": None,
                                 "finish_reason": finish_reason}]}

        if body.stream:
            return await self._stream(request, group, body, cid, created, "text_completion",
                                      lambda choice, tokens: chunk(choice, tokens.text, tokens.finish_reason))
        choices = await self._finish(request, group)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": self.model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for c in choices],
            "usage": group.usage()})

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatRequest)
        if self.chat_template is None:
            raise APIError(400, f"the model {self.model} has no chat template: use /v1/completions",
                           "messages", "no_chat_template")
        try:
            prompt = self.chat_template.render(_chat_messages(body.messages), **(body.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        # Unbounded unless asked: the output ends at the model's length ("length"), as OpenAI's does.
        # One asked for must fit beside the prompt.
        options = {**_options(body, max_tokens, MAX_COUNT), "add_special_tokens": False,
                   "max_tokens_must_fit": max_tokens is not None}
        group = await self._submit(_copies([prompt], body.n, options.pop("seed")), options, body.n or 1)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        started = set()

        def chunk(choice: Choice, tokens: p.Tokens) -> dict:
            delta = {"content": tokens.text}
            if choice.index not in started:
                started.add(choice.index)
                delta = {"role": "assistant", **delta}
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                    "choices": [{"index": choice.index, "delta": delta, "logprobs": None,
                                 "finish_reason": tokens.finish_reason}]}

        if body.stream:
            return await self._stream(request, group, body, cid, created, "chat.completion.chunk", chunk)
        choices = await self._finish(request, group)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": self.model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": group.usage()})

    # ---- helpers ----------------------------------------------------------------------------

    async def _parse(self, request: Request, model: type[_Request]) -> _Request:
        """The body, read up to the size limit, as `model`; APIError says what is wrong."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"the body has {declared} bytes; this server takes at most {self.max_body_bytes}",
                           code="body_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body_bytes:
                raise APIError(413, f"the body exceeds {self.max_body_bytes} bytes", code="body_too_large")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the body nests too deeply", code="invalid_json") from None
        try:
            body = model.model_validate(raw)
        except ValidationError as e:
            raise _validation_error(e) from None
        if body.model != self.model:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model!r}",
                           "model", "model_not_found")
        _unsupported(body)
        return body

    async def _submit(self, prompts: list[tuple[str | list[int], dict]], options: dict, copies: int) -> RequestGroup:
        """Checks every request (`copies` of each prompt in a row), then sends them; APIError for
        a bad one (none is sent then)."""
        try:
            for prompt, extra in prompts:
                encoded_submit(make_submit(prompt, "check", **options, **extra))
        except RequestTooLarge as e:
            raise APIError(413, str(e), code="request_too_large") from None
        except ValueError as e:
            message = str(e)
            param = message.split()[0] if message.split()[0] in options else None
            raise APIError(400, message, param) from None
        # At once, not after the router's queue timeout: an HTTP client retries a 503 elsewhere.
        await self._registered_roles(WORKERS_FRESH_S)
        ids = []
        for prompt, extra in prompts:
            ids.append(await self.client.submit(prompt, f"http-{secrets.token_hex(12)}", **options, **extra))
        return RequestGroup(self.client, ids, self.background, copies)

    async def _finish(self, request: Request, group: RequestGroup) -> list[Choice]:
        try:
            return await self._unless_gone(request, group.finish())
        finally:
            group.close()

    async def _unless_gone(self, request: Request, awaitable):
        """Awaits it, or raises ClientGone (and cancels it) as soon as the HTTP client disconnects."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            raise ClientGone()
        finally:
            task.cancel()
            gone.cancel()

    async def _stream(self, request: Request, group: RequestGroup, body: _Request, cid: str, created: int,
                      obj: str, make_chunk) -> Response:
        """Server-sent events. The status waits for each request's first message, so that a
        request refused downstream (too long a prompt, no worker) gets its error status."""
        first = []
        try:
            pending = set(range(len(group.choices)))
            while pending:
                choice, tokens = await self._unless_gone(request, group.next())
                first.append((choice, tokens))
                pending.discard(choice.index)
        except BaseException:
            group.close()
            raise
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events():
            try:
                for choice, tokens in first:
                    yield _sse(make_chunk(choice, tokens))
                while group.open:
                    choice, tokens = await group.next()
                    yield _sse(make_chunk(choice, tokens))
                if include_usage:
                    yield _sse({"id": cid, "object": obj, "created": created, "model": self.model,
                                "choices": [], "usage": group.usage()})
            except APIError as e:
                yield _sse(e.body())
            finally:
                group.close()
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. The body is read by then, so the server's next
    message is the disconnect, which it sends the moment the connection closes: waiting for it
    aborts a vanished client's requests at once, where polling would leave them running a while."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run_api(router_addr: str, host: str, port: int, model: str, served_name: str | None = None,
            timeout_s: float = 300.0, curve_keys: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
            api_key: str | None = None, verbose: bool = False) -> None:
    import uvicorn

    if api_key is None and not _is_loopback(host):
        log.warning("!!! the HTTP API binds %s WITHOUT an API key: anyone who can reach it can submit requests. "
                    "Use --api-key (or KAIROS_API_KEY), and TLS in front of it. !!!", host)
    server = OpenAIServer(router_addr, served_name or model, ChatTemplate.for_model(model), timeout_s, curve_keys,
                          max_body_bytes, api_key)
    print(f"kairos api: serving {server.model} at http://{host}:{port}/v1 (router {router_addr})", flush=True)
    uvicorn.run(server.app, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose,
                timeout_graceful_shutdown=5)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
