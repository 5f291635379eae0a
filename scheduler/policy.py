"""The seam between the engine's step scheduler and a scheduling policy.

The step scheduler owns the mechanics (KV blocks, token budgets, preemption). A policy only
decides order: which waiting requests to admit first. A request is anything with an
`arrival_time` attribute (and whatever else a policy reads, such as SLO deadlines).
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence, TypeVar

R = TypeVar("R")


class AdmissionPolicy(Protocol):
    name: str

    def order(self, waiting: Sequence[R], now: float) -> Iterable[R]:
        """The waiting requests, most deserving first."""


class FCFSPolicy:
    """First come, first served."""

    name = "fcfs"

    def order(self, waiting, now):
        return sorted(waiting, key=lambda r: r.arrival_time)


POLICIES = {FCFSPolicy.name: FCFSPolicy}


def get_admission_policy(name: str) -> AdmissionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")
    return POLICIES[name]()
