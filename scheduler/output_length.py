"""Output-length prediction: a quantile upper bound of the lengths seen so far, per request
class, refined as a request runs (conditional on the tokens it has already produced)."""

from __future__ import annotations

import bisect
from collections import deque

import numpy as np


class OutputLengthEstimator:
    def __init__(self, quantile: float = 0.9, window: int = 2048):
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.quantile = quantile
        self.window = window
        self._recent: dict[str | None, deque[int]] = {}
        self._sorted: dict[str | None, list[int]] = {}
        self._arrays: tuple[dict, np.ndarray, np.ndarray] | None = None

    def observe(self, request_class: str | None, length: int) -> None:
        recent = self._recent.setdefault(request_class, deque())
        ordered = self._sorted.setdefault(request_class, [])
        recent.append(length)
        bisect.insort(ordered, length)
        if len(recent) > self.window:
            ordered.pop(bisect.bisect_left(ordered, recent.popleft()))
        self._arrays = None

    def arrays(self) -> tuple[dict, np.ndarray, np.ndarray]:
        """The lengths seen, for `native.remaining_outputs`: (class -> index, every class's
        sorted lengths end to end, where each class starts and the last ends). A class never
        seen maps to len(index), an empty range."""
        if self._arrays is None:
            classes = list(self._sorted)
            starts = np.cumsum([0] + [len(self._sorted[c]) for c in classes] + [0])
            lengths = np.fromiter((n for c in classes for n in self._sorted[c]), dtype=np.int64, count=int(starts[-1]))
            self._arrays = ({c: i for i, c in enumerate(classes)}, lengths, starts.astype(np.int64))
        return self._arrays

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
