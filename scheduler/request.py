"""What a request asks for: how its tokens are sampled, and the latency it must be served
within. Torch-free, so that clients, the router, the workers and the simulator share one type
of each, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from kairos.scheduler.defaults import DEFAULT_TPOT_SLO_MS, DEFAULT_TTFT_SLO_MS

MAX_COUNT = 2**31 - 1  # token counts and ids, top-k: what an int32 holds
MAX_TEMPERATURE = 1e4
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_SLO_MS, MAX_SLO_MS = 1e-3, 1e9  # a microsecond to about eleven days
MAX_CLASS_NAME = 256
# Latency-sensitive requests are judged by TTFT and TPOT; throughput-intensive ones by a deadline
# for the whole response; collective ones (the calls of an agent's DAG) by their DAG's deadline.
KINDS = ("latency", "throughput", "collective")


class PromptTooLong(ValueError):
    """A prompt beyond what the serving side takes (its limits, or the model's length)."""


def _integer(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _brief(value) -> str:
    """A value for an error message, cut short: it may come from anyone on the wire."""
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) keeps every token
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # For replaying a trace's output lengths: the output ends here as at the model's own end
    # token. Unlike max_tokens, a cap the scheduling policies bound outputs by, they are not
    # told of it, as they cannot know where a model will stop.
    eos_after: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first field out of bounds. The bounds keep every value
        within what the engine's arrays hold (32-bit counts, 64-bit seeds), so that no request
        can fail a step that other requests share."""
        if not _integer(self.max_tokens, 1, MAX_COUNT):
            raise ValueError(f"max_tokens must be an integer in [1, {MAX_COUNT}], got {_brief(self.max_tokens)}")
        if not (_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], "
                             f"got {_brief(self.temperature)}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {_brief(self.top_p)}")
        if not _integer(self.top_k, -1, MAX_COUNT):
            raise ValueError(f"top_k must be -1 (disabled) or an integer up to {MAX_COUNT}, got {_brief(self.top_k)}")
        if self.seed is not None and not _integer(self.seed, -(2**63), 2**63 - 1):
            raise ValueError(f"seed must be a 64-bit integer, got {_brief(self.seed)}")
        bad = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty strings, got {_brief(bad[0])}")
        if any(not _integer(t, 0, MAX_COUNT) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers in [0, {MAX_COUNT}], got {_brief(self.stop_token_ids)}")
        if self.eos_after is not None and not _integer(self.eos_after, 1, MAX_COUNT):
            raise ValueError(f"eos_after must be an integer in [1, {MAX_COUNT}], got {_brief(self.eos_after)}")

    @property
    def greedy(self) -> bool:
        # Below this, dividing the logits by the temperature overflows float32 (a row of NaN
        # would sample token 0), long before sampling could differ from the argmax.
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True, slots=True)
class RequestSLO:
    """A request's latency targets, in milliseconds, and what the scheduler may know of it.

    The one form an SLO takes from the command line through the wire, the router, the engine's
    sequences, the simulator and the policies. `ttft_s` and `tpot_s` are the targets in seconds,
    the unit of the clocks the policies compare them with."""

    ttft_ms: float = DEFAULT_TTFT_SLO_MS
    tpot_ms: float = DEFAULT_TPOT_SLO_MS
    request_class: str | None = None
    output_len_hint: int | None = None  # the client's guess of its output length
    kind: str = "latency"  # one of KINDS
    # Throughput and collective requests: when the whole response is due, from the request's
    # arrival (a DAG's call: the time its DAG has left when the call is sent).
    deadline_ms: float | None = None
    dag_id: str | None = None  # collective: the DAG it belongs to, and which call of it this is
    dag_stage: int = 0
    ttft_s: float = field(init=False, repr=False, compare=False)
    tpot_s: float = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name, target in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            value = getattr(self, name)
            if not (_number(value) and MIN_SLO_MS <= value <= MAX_SLO_MS):
                raise ValueError(f"the {target} SLO ({name}) must be between {MIN_SLO_MS:g} and {MAX_SLO_MS:g} "
                                 f"milliseconds, got {_brief(value)}")
        if self.request_class is not None and not (isinstance(self.request_class, str)
                                                   and len(self.request_class) <= MAX_CLASS_NAME):
            raise ValueError(f"request_class must be a string of at most {MAX_CLASS_NAME} characters, "
                             f"got {_brief(self.request_class)}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {_brief(self.kind)}")
        deadline = self.deadline_ms
        if deadline is None and self.kind != "latency":
            raise ValueError(f"a {self.kind} request needs deadline_ms")
        if deadline is not None and not (_number(deadline) and MIN_SLO_MS <= deadline <= MAX_SLO_MS):
            raise ValueError(f"deadline_ms must be between {MIN_SLO_MS:g} and {MAX_SLO_MS:g} milliseconds, "
                             f"got {_brief(deadline)}")
        if self.kind == "collective" and not (isinstance(self.dag_id, str) and 0 < len(self.dag_id) <= MAX_CLASS_NAME):
            raise ValueError(f"a collective request needs a dag_id of 1 to {MAX_CLASS_NAME} characters, "
                             f"got {_brief(self.dag_id)}")
        if not _integer(self.dag_stage, 0, MAX_COUNT):
            raise ValueError(f"dag_stage must be an integer in [0, {MAX_COUNT}], got {_brief(self.dag_stage)}")
        hint = self.output_len_hint
        if hint is not None and not _integer(hint, 1, MAX_COUNT):
            raise ValueError(f"output_len_hint must be an integer in [1, {MAX_COUNT}], got {_brief(hint)}")
        object.__setattr__(self, "ttft_s", self.ttft_ms / 1e3)
        object.__setattr__(self, "tpot_s", self.tpot_ms / 1e3)

    @classmethod
    def from_dict(cls, values: dict, defaults: RequestSLO | None = None) -> RequestSLO:
        """The SLO a wire message carries; fields it leaves out (or sends as null) come from
        `defaults`. ValueError names whatever is wrong."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown SLO fields {sorted(unknown)}; an SLO has {sorted(known)}")
        base = defaults or cls()
        return cls(**{name: getattr(base, name) if values.get(name) is None else values[name] for name in known})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


@dataclass(frozen=True)
class FinishedRequest:
    """A request that ran to its end elsewhere, as a prefill policy learns from one (see its
    `finished`): its SLO, prompt and output lengths."""

    slo: RequestSLO
    num_prompt_tokens: int
    num_output_tokens: int

    @classmethod
    def from_report(cls, slo: dict, prompt_tokens, output_tokens) -> FinishedRequest:
        """From a report off the wire. ValueError names whatever is wrong."""
        if not isinstance(slo, dict):
            raise ValueError(f"slo must be a dict, got {_brief(slo)}")
        for name, value in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
            if not _integer(value, 1, MAX_COUNT):
                raise ValueError(f"{name} must be an integer in [1, {MAX_COUNT}], got {_brief(value)}")
        return cls(RequestSLO.from_dict(slo), prompt_tokens, output_tokens)
