"""Output-length prediction: a quantile upper bound of the lengths seen so far, per request
class, refined as a request runs (conditional on the tokens it has already produced)."""

from __future__ import annotations

import bisect
from collections import deque


class OutputLengthEstimator:
    def __init__(self, quantile: float = 0.9, window: int = 2048, max_classes: int = 256):
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.quantile = quantile
        self.window = window
        # Clients name the classes: a bound keeps the history from growing with every new name.
        self.max_classes = max_classes
        self._recent: dict[str | None, deque[int]] = {}
        self._sorted: dict[str | None, list[int]] = {}
        self.arrays = None  # the lengths as arrays, built by `native` when it needs them

    def observe(self, request_class: str | None, length: int) -> None:
        if request_class not in self._recent and len(self._recent) >= self.max_classes:
            oldest = next(iter(self._recent))  # the class first seen longest ago goes
            del self._recent[oldest], self._sorted[oldest]
        recent = self._recent.setdefault(request_class, deque())
        ordered = self._sorted.setdefault(request_class, [])
        recent.append(length)
        bisect.insort(ordered, length)
        if len(recent) > self.window:
            ordered.pop(bisect.bisect_left(ordered, recent.popleft()))
        self.arrays = None

    def lengths_by_class(self) -> dict[str | None, list[int]]:
        """The recent lengths of each class, sorted (read only)."""
        return self._sorted

    def remaining(self, request_class: str | None, produced: int, max_tokens: int, hint: int | None = None) -> int:
        """Predicted tokens still to come (at least 1): from the client's hint if it gave one,
        else the quantile of this class's lengths among those longer than `produced`; never
        beyond max_tokens, which is also the answer while nothing longer has been seen."""
        cap = max(1, max_tokens - produced)
        if hint is not None:
            return max(1, min(cap, hint - produced))
        ordered = self._sorted.get(request_class, [])
        longer = len(ordered) - bisect.bisect_right(ordered, produced)
        if longer == 0:
            return cap
        length = ordered[len(ordered) - longer + min(longer - 1, int(self.quantile * longer))]
        return max(1, min(cap, length - produced))
