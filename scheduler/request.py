"""What a request asks for: how its tokens are sampled, and the latency it must be served
within. Torch-free, so that clients, the router, the workers and the simulator share one type
of each, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from kairos.scheduler.defaults import DEFAULT_TPOT_SLO_MS, DEFAULT_TTFT_SLO_MS


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
    ttft_s: float = field(init=False, repr=False, compare=False)
    tpot_s: float = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name, target in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise ValueError(f"the {target} SLO ({name}) must be a positive number of milliseconds, got {value!r}")
        if self.request_class is not None and not isinstance(self.request_class, str):
            raise ValueError(f"request_class must be a string, got {self.request_class!r}")
        hint = self.output_len_hint
        if hint is not None and not (isinstance(hint, int) and not isinstance(hint, bool) and hint > 0):
            raise ValueError(f"output_len_hint must be a positive integer, got {hint!r}")
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
