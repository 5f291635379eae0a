"""Output-length prediction: quantiles of the lengths seen so far for requests alike (by class
and by prompt length), refined as a request runs (conditional on the tokens it has produced).

Prompt length says much of a request's output even where the two hardly correlate: in the Azure
conversation trace, prompts of 256-511 tokens have a median output of 93 tokens and those of
512-2047 one of about 395, while the log-log correlation is 0.09. So lengths are kept per class
and per half-octave of prompt length, falling back to the class and then to every request while
a bucket has seen too few.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque

NUM_BUCKETS = 64  # half-octaves of prompt lengths up to 2**32


def prompt_bucket(prompt_len: int) -> int:
    """The half-octave a prompt length falls in: 2 * floor(log2 n), plus 1 from n >= 2**(k + 1/2).
    In integers, so that every path puts a length in the same bucket."""
    n = max(1, prompt_len)
    octave = n.bit_length() - 1
    return 2 * octave + (n * n >= 1 << (2 * octave + 1))


def lookup_keys(request_class: str | None, prompt_len: int) -> tuple[tuple, tuple, tuple]:
    """The keys whose lengths predict a request's, most specific first."""
    return (request_class, prompt_bucket(prompt_len)), (request_class,), ()


class OutputLengthEstimator:
    """`quantile` (default 0.9: an upper bound) of the recent lengths of requests alike, among
    those longer than what a request has produced. A key answers once it holds `min_samples`
    such lengths; the last fallback, every request, once it holds one."""

    def __init__(self, quantile: float = 0.9, window: int = 2048, max_keys: int = 1024, min_samples: int = 16):
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if max_keys < 3:
            raise ValueError(f"max_keys must be at least 3 (a request observes three keys), got {max_keys}")
        self.quantile = quantile
        self.window = window
        # Clients name the classes: a bound keeps the history from growing with every new name.
        self.max_keys = max_keys
        self.min_samples = min_samples
        self._recent: OrderedDict[tuple, deque[int]] = OrderedDict()  # least recently observed first
        self._sorted: dict[tuple, list[int]] = {}
        # The lengths as arrays, built by `native` when it needs them: all keys' end to end, and
        # each key's, kept until that key sees a new length.
        self.arrays = None
        self.key_arrays: dict[tuple, object] = {}

    def observe(self, request_class: str | None, prompt_len: int, length: int) -> None:
        for key in lookup_keys(request_class, prompt_len):
            if key in self._recent:
                self._recent.move_to_end(key)
            elif len(self._recent) >= self.max_keys:
                # The key observed longest ago goes (never every request's).
                stale = next(k for k in self._recent if k)
                del self._recent[stale], self._sorted[stale]
                self.key_arrays.pop(stale, None)
            self.key_arrays.pop(key, None)
            recent = self._recent.setdefault(key, deque())
            ordered = self._sorted.setdefault(key, [])
            recent.append(length)
            bisect.insort(ordered, length)
            if len(recent) > self.window:
                ordered.pop(bisect.bisect_left(ordered, recent.popleft()))
        self.arrays = None

    def lengths_by_key(self) -> dict[tuple, list[int]]:
        """The recent lengths under each key, sorted (read only)."""
        return self._sorted

    def remaining(self, request_class: str | None, prompt_len: int, produced: int, max_tokens: int,
                  hint: int | None = None) -> int:
        """Predicted tokens still to come (at least 1): from the client's hint if it gave one,
        else the quantile of the lengths longer than `produced` of the most specific key with
        enough of them; never beyond max_tokens, which is also the answer while nothing longer
        has been seen."""
        cap = max(1, max_tokens - produced)
        if hint is not None:
            return max(1, min(cap, hint - produced))
        q = self.quantile
        for key in lookup_keys(request_class, prompt_len):
            ordered = self._sorted.get(key, ())
            longer = len(ordered) - bisect.bisect_right(ordered, produced)
            if longer >= (self.min_samples if key else 1):
                length = ordered[len(ordered) - longer + min(longer - 1, int(q * longer))]
                return max(1, min(cap, length - produced))
        return cap
