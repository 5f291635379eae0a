"""The wire protocol: typed messages encoded as msgpack maps, validated on receipt.

Every message is a map with the protocol version `v`, its `type`, and exactly the fields of its
class, each checked against the field's annotation. Nothing but msgpack goes on the wire (never
pickle); raw KV bytes travel as extra frames after a `KVData` header, never inside a map (or,
between workers on one GPU, not at all: see transport.kv).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 11
# Control messages (requests, tokens, status) are small; the largest is a long prompt's ids.
MAX_CONTROL_MESSAGE_BYTES = 16 * 2**20
HEARTBEAT_INTERVAL_S = 0.25  # how often a worker tells the router it is alive
# No message nests lists and maps deeper than a worker's stats (map of phase, map of figures).
MAX_NESTING = 8
# The longest step a KV peer may declare (KVOffer.step_s, KVReady.step_s), seconds: a worker
# whose steps take longer is hung, and one claiming so is refused rather than waited for.
MAX_PEER_STEP_S = 3600.0
MAX_PEER_AGE_S = 86400.0


def check_peer_step(step_s: float) -> None:
    """Raises ValueError where a KV peer's declared step (KVOffer.step_s, KVReady.step_s) is
    not one to wait for."""
    if not 0 <= step_s <= MAX_PEER_STEP_S:
        raise ValueError(f"a worker whose steps take {step_s} s, outside 0..{MAX_PEER_STEP_S:g}")


def peer_age(seconds: float) -> float:
    """A time span a peer measured on its own clock (how long ago a request arrived, or its first
    token was sampled), as this side may take it: never negative, nor over MAX_PEER_AGE_S."""
    return min(max(seconds, 0.0), MAX_PEER_AGE_S) if math.isfinite(seconds) else 0.0


class ProtocolError(ValueError):
    """A message that is not valid Kairos protocol."""


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVGeometry:
    """What must agree between a prefill and a decode worker for KV bytes to mean the same; on
    the wire as a map of these fields (registration, the KV handshake)."""

    model: str  # architecture and shape: the same weights are the operator's promise
    dtype: str  # one of DTYPE_BYTES
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_dict(cls, d: dict) -> KVGeometry:
        try:
            geometry = cls(**d)
        except TypeError as e:
            raise ValueError(f"bad KV geometry {d!r}: {e}") from None
        if geometry.dtype not in DTYPE_BYTES:
            raise ValueError(f"bad KV geometry: dtype {geometry.dtype!r} is not one of {list(DTYPE_BYTES)}")
        return geometry

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def mismatch(self, other: KVGeometry) -> str | None:
        """None if the two agree, else a sentence naming every difference."""
        diffs = [f"{k} {v!r} vs {getattr(other, k)!r}" for k, v in self.to_dict().items() if getattr(other, k) != v]
        return f"KV geometry differs: {'; '.join(diffs)}" if diffs else None

    @property
    def bytes_per_block_layer(self) -> int:
        """Bytes of K (or of V) of one block in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V of one block across all layers: what a transfer moves per block."""
        return 2 * self.num_layers * self.bytes_per_block_layer


MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message:
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.TYPE in MESSAGE_TYPES:
            raise TypeError(f"message type {cls.TYPE!r} is defined twice")
        MESSAGE_TYPES[cls.TYPE] = cls


# ---- client <-> router --------------------------------------------------------------------------


@dataclass
class Submit(Message):
    TYPE = "submit"
    request_id: str
    prompt: str | None = None  # text, or
    prompt_token_ids: list[int] | None = None
    params: dict = field(default_factory=dict)  # SamplingParams fields
    slo: dict | None = None  # RequestSLO fields; the router's defaults for those absent
    group_id: str | None = None
    # False for a text that already holds them (a rendered chat template begins with its BOS).
    add_special_tokens: bool = True
    # Refuse (prompt_too_long) a prompt that leaves less room than max_tokens under the model's
    # length, rather than end its output there.
    max_tokens_must_fit: bool = False


@dataclass
class Abort(Message):
    TYPE = "abort"
    request_id: str


@dataclass
class Tokens(Message):
    """New output tokens of a request, from position `index` of its output, with their text.
    The last message of a request carries its finish reason, and, from the worker that
    finished it, the prompt's length in tokens (for usage figures)."""
    TYPE = "tokens"
    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None


@dataclass
class StepTokens(Message):
    """What one engine step gave its requests, in one message from a worker to the router
    (one message per request cost the worker's loop a send each): per request, the fields of
    a Tokens, in columns of equal length."""
    TYPE = "step_tokens"
    request_ids: list[str]
    indexes: list[int]
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: list[int | None] | None = None  # None: none of them finished

    @classmethod
    def of(cls, chunks: list[Tokens]) -> StepTokens:
        prompt_tokens = [c.prompt_tokens for c in chunks]
        return cls([c.request_id for c in chunks], [c.index for c in chunks], [c.token_ids for c in chunks],
                   [c.text for c in chunks], [c.finish_reason for c in chunks],
                   prompt_tokens if any(n is not None for n in prompt_tokens) else None)

    def chunks(self) -> list[Tokens]:
        prompt_tokens = self.prompt_tokens if self.prompt_tokens is not None else [None] * len(self.request_ids)
        columns = (self.request_ids, self.indexes, self.token_ids, self.texts, self.finish_reasons, prompt_tokens)
        if len({len(c) for c in columns}) != 1:
            raise ProtocolError(f"{self.TYPE}: columns of unequal length {[len(c) for c in columns]}")
        return [Tokens(*row) for row in zip(*columns)]


# What kind of failure an Error reports, for a front end to answer in its own terms (an HTTP
# status); None is any other failure of the serving side.
INVALID_REQUEST = "invalid_request"  # bad parameters: the sender's mistake
PROMPT_TOO_LONG = "prompt_too_long"  # beyond the router's limits or the model's length
UNAVAILABLE = "unavailable"  # no worker registered and free in time
ERROR_CODES = (INVALID_REQUEST, PROMPT_TOO_LONG, UNAVAILABLE)


@dataclass
class Error(Message):
    """A failed request (request_id set), or a message that could not be served."""
    TYPE = "error"
    request_id: str | None
    message: str
    code: str | None = None  # one of ERROR_CODES, or None


@dataclass
class StatusQuery(Message):
    TYPE = "status_query"


@dataclass
class StatusReport(Message):
    TYPE = "status"
    workers: list[dict]
    counters: dict
    pending: int


@dataclass
class MetricsQuery(Message):
    TYPE = "metrics_query"


@dataclass
class MetricsReport(Message):
    """The router's metrics in the Prometheus text format."""
    TYPE = "metrics"
    text: str


# ---- workers <-> router -------------------------------------------------------------------------


@dataclass
class Register(Message):
    TYPE = "register"
    worker_id: str
    role: str  # "prefill" | "decode"
    geometry: dict  # KVGeometry fields
    total_blocks: int
    kv_addr: str | None = None  # decode workers: where prefill workers send KV


@dataclass
class Registered(Message):
    TYPE = "registered"
    worker_id: str


@dataclass
class RegisterAgain(Message):
    """The router does not know this worker (it restarted, or declared the worker dead)."""
    TYPE = "register_again"


def stats_problem(stats: dict) -> str | None:
    """What is wrong with a worker's heartbeat figures, or None: each is a finite number >= 0
    (`free_blocks` an integer), or a map of such figures two levels deep at most (the cost
    model's drift by phase), under a name of at most 64 characters."""
    stack = [(stats, 0)]
    while stack:
        figures, depth = stack.pop()
        for name, value in figures.items():
            if not isinstance(name, str) or len(name) > 64:
                return f"a figure named {_brief(name)}"
            if isinstance(value, dict) and depth < 2:
                stack.append((value, depth + 1))
            elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf):
                return f"{name} is {_brief(value)}, not a finite number >= 0"
    if not isinstance(stats.get("free_blocks", 0), int):
        return "free_blocks is not an integer"
    return None


@dataclass
class Heartbeat(Message):
    TYPE = "heartbeat"
    worker_id: str
    stats: dict


@dataclass
class PrefillRequest(Message):
    TYPE = "prefill"
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: dict
    slo: dict  # RequestSLO fields
    decode_worker_id: str
    decode_kv_addr: str
    # When the router received it (Unix seconds): SLO clocks start there, not when the worker
    # gets round to reading its socket (after the step it is running). Hosts need NTP.
    arrival_unix: float
    add_special_tokens: bool = True
    max_tokens_must_fit: bool = False


@dataclass
class KVExpect(Message):
    """Router -> decode worker: the KV of this request will come from this prefill worker, and
    from no other (a transfer is bound to the prefill worker the router assigned)."""
    TYPE = "kv_expect"
    request_id: str
    prefill_worker_id: str


@dataclass
class HandedOff(Message):
    """Decode worker -> router: the request's KV is complete and it is decoding here."""
    TYPE = "handed_off"
    request_id: str


@dataclass
class WorkerGone(Message):
    TYPE = "worker_gone"
    worker_id: str


@dataclass
class Completed(Message):
    """Router -> prefill workers: a request ran to its end (stop or length), so that policies
    which predict output lengths learn them where prefill is scheduled too: its SLO (RequestSLO
    fields), prompt and output lengths."""
    TYPE = "completed"
    slo: dict
    prompt_tokens: int
    output_tokens: int


# ---- prefill worker <-> decode worker (the KV channel) ------------------------------------------


@dataclass
class KVHello(Message):
    TYPE = "kv_hello"
    worker_id: str
    geometry: dict
    cuda_ipc: dict | None = None  # the prefill worker's KV cache as a CUDA IPC export (transport.kv)


@dataclass
class KVHelloOk(Message):
    TYPE = "kv_hello_ok"
    worker_id: str
    cuda_ipc: bool = False  # the decode worker mapped the export: transfers name blocks, not bytes
    max_frame_bytes: int | None = None  # the largest KV frame the decode worker takes (--kv-frame-mb)


@dataclass
class KVOffer(Message):
    TYPE = "kv_offer"
    transfer_id: str
    request_id: str
    prompt_token_ids: list[int]
    params: dict
    slo: dict
    num_blocks: int
    # The prefill worker's longest step so far, seconds: on a CPU it reads this channel only
    # between steps, so the decode side waits this long beyond its transfer timeout for the KV.
    step_s: float = 0.0
    # Seconds since the router received the request, as the offer leaves: the decode policy's
    # clocks run from the request's arrival, not from the offer's.
    age_s: float = 0.0


@dataclass
class KVReady(Message):
    TYPE = "kv_ready"
    transfer_id: str
    # The decode worker's longest step so far, seconds: it takes the KV in and acknowledges it
    # between steps, so the prefill side waits this long beyond its transfer timeout for the ack.
    step_s: float = 0.0


@dataclass
class KVReject(Message):
    TYPE = "kv_reject"
    transfer_id: str
    message: str


@dataclass
class KVData(Message):
    """Header of a KV transfer; the raw frames follow in the same multipart message, or, over
    CUDA IPC, `block_ids` names the prefill worker's blocks for the decode worker to copy. It
    carries the request's first token: the offer goes out as the step that computes the KV
    starts, before that token is sampled."""
    TYPE = "kv_data"
    transfer_id: str
    blocks_per_frame: int
    first_token: int
    block_ids: list[int] | None = None
    first_token_age_s: float = 0.0  # seconds since it was sampled: TPOT runs from then


@dataclass
class KVAck(Message):
    TYPE = "kv_ack"
    transfer_id: str


@dataclass
class KVCancel(Message):
    TYPE = "kv_cancel"
    transfer_id: str
    reason: str


# ---- encoding -----------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    body = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    for f in dataclasses.fields(msg):
        body[f.name] = getattr(msg, f.name)
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes | memoryview, max_bytes: int = MAX_CONTROL_MESSAGE_BYTES) -> Message:
    """Parses and validates one message; raises ProtocolError saying what is wrong."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"malformed message: not msgpack ({type(e).__name__}: {_brief(str(e))})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"malformed message: expected a map, got {type(body).__name__}")
    too_deep = _nesting_beyond(body, MAX_NESTING)
    if too_deep:
        raise ProtocolError(f"malformed message: {too_deep}")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_brief(version)} is not supported (this end speaks {PROTOCOL_VERSION})")
    type_name = body.pop("type", None)
    cls = MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_brief(type_name)}")
    hints = _field_types(cls)
    unknown = set(body) - set(hints)
    if unknown:
        raise ProtocolError(f"{type_name}: unknown fields {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{type_name}: missing field {f.name!r}")
        elif not _matches(body[f.name], hints[f.name]):
            raise ProtocolError(f"{type_name}.{f.name}: expected {_describe(hints[f.name])}, "
                                f"got {type(body[f.name]).__name__}")
    return cls(**body)


_HINTS: dict[type, dict[str, Any]] = {}


def _brief(value: Any) -> str:
    """A value for an error message: a short repr of a scalar, the type name of anything else
    (a reply must neither grow with nor recurse into what a peer sent)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__}"


def _nesting_beyond(body: dict, limit: int) -> str | None:
    """Why the message nests containers deeper than `limit`, or None. Iterative, so that no
    depth a peer sends can exhaust the stack."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return f"containers nested deeper than {limit}"
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, (list, dict)))
    return None


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
        _HINTS[cls].pop("TYPE", None)
    return _HINTS[cls]


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is list:
        return isinstance(value, list)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
