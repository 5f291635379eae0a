"""Engine step durations by phase, as a cumulative histogram: a worker reports it in its
heartbeats and the router exposes it as a Prometheus histogram per worker and phase."""

from __future__ import annotations

from bisect import bisect_left

STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StepTimes:
    def __init__(self, buckets: tuple[float, ...] = STEP_SECONDS_BUCKETS):
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}  # phase -> steps per bucket, the last past every bound
        self.sums: dict[str, float] = {}

    def record(self, phase: str, seconds: float) -> None:
        counts = self.counts.setdefault(phase, [0] * (len(self.buckets) + 1))
        counts[bisect_left(self.buckets, seconds)] += 1
        self.sums[phase] = self.sums.get(phase, 0.0) + seconds

    def figures(self) -> dict:
        """{phase: {upper bound ("+Inf" the last): steps at most that long, "sum": seconds}}, in
        the shape of a heartbeat's figures."""
        out = {}
        # A copy: a worker's heartbeat thread reads these while its serving loop records.
        for phase, counts in list(self.counts.items()):
            total, hist = 0, {}
            for bound, count in zip([*map(str, self.buckets), "+Inf"], counts):
                total += count
                hist[bound] = total
            out[phase] = {**hist, "sum": self.sums.get(phase, 0.0)}
        return out
