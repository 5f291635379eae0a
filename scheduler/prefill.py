"""Prefill policies: the order in which waiting prompts are admitted to prefill steps.

A request here is anything with `arrival_time`, `ttft_slo` (seconds), `num_uncomputed_tokens`
(prompt tokens still to prefill) and `num_tokens` (its context once they are). The step
scheduler admits in the returned order under its token budget.
"""

from __future__ import annotations

import heapq
from typing import Protocol, Sequence, TypeVar

from scheduler.cost_model import CostModel

R = TypeVar("R")


class PrefillPolicy(Protocol):
    name: str

    def order(self, waiting: Sequence[R], now: float) -> list[R]:
        """The waiting requests, the one to prefill first at the front."""


def deadline(r) -> float:
    return r.arrival_time + r.ttft_slo


class FCFSPolicy:
    """First come, first served: the baseline."""

    name = "fcfs"

    def order(self, waiting, now):
        return sorted(waiting, key=lambda r: r.arrival_time)


class EDFPolicy:
    """Earliest TTFT deadline first."""

    name = "edf"

    def order(self, waiting, now):
        return sorted(waiting, key=deadline)


class _Predicting:
    """Walks a candidate order, predicting when each prompt's prefill would finish: prompts go
    into steps of at most `token_budget` tokens, each step paying the fixed cost once."""

    def __init__(self, cost: CostModel, token_budget: int):
        self.cost = cost
        self.token_budget = token_budget

    def own_time(self, r) -> float:
        return self.cost.prefill_marginal(r.num_uncomputed_tokens, r.num_tokens)

    def split_on_time(self, candidates, now: float, drop_longest: bool):
        """(on time, late) when prefilled in this order. A prompt that would finish late is moved
        to `late`: itself, or with drop_longest the longest prompt kept so far (Moore-Hodgson)."""
        fixed = self.cost.prefill[0]
        t, step_tokens = now, self.token_budget  # the first prompt opens a step
        kept: list = []
        longest: list[tuple[float, int, object]] = []  # max-heap of kept prompts by own time
        late = []
        for i, r in enumerate(candidates):
            tokens = r.num_uncomputed_tokens
            opens_step = step_tokens + tokens > self.token_budget
            own = self.own_time(r)
            t_new = t + own + (fixed if opens_step else 0.0)
            if t_new <= deadline(r):
                kept.append(r)
                heapq.heappush(longest, (-own, i, r))
                t, step_tokens = t_new, (tokens if opens_step else step_tokens + tokens)
            elif drop_longest and longest and -longest[0][0] > own:
                # Giving up the longest kept prompt saves the most time for everyone after it.
                neg_own, _, victim = heapq.heappop(longest)
                kept.remove(victim)
                late.append(victim)
                kept.append(r)
                heapq.heappush(longest, (-own, i, r))
                t = t_new + neg_own
            else:
                late.append(r)
        return kept, late


class KairosPolicy(_Predicting):
    """Urgency: least slack first, where slack = deadline - (now + predicted wait + predicted
    prefill). A prompt predicted to miss its deadline in that order is demoted behind every
    feasible one (in arrival order): it still completes, but it no longer delays prompts that
    can make it."""

    name = "kairos"

    def order(self, waiting, now):
        by_latest_start = sorted(waiting, key=lambda r: deadline(r) - self.own_time(r))
        on_time, late = self.split_on_time(by_latest_start, now, drop_longest=False)
        return on_time + sorted(late, key=lambda r: r.arrival_time)


class MooreHodgsonPolicy(_Predicting):
    """Earliest deadline first, but whenever a prompt would be late, the longest prompt kept so
    far is demoted instead: on one machine this maximises the number of deadlines met
    (Moore-Hodgson). Demoted prompts follow in arrival order."""

    name = "mh"

    def order(self, waiting, now):
        on_time, late = self.split_on_time(sorted(waiting, key=deadline), now, drop_longest=True)
        return on_time + sorted(late, key=lambda r: r.arrival_time)


PREFILL_POLICIES = {p.name: p for p in (FCFSPolicy, EDFPolicy, KairosPolicy, MooreHodgsonPolicy)}
PREDICTING_PREFILL_POLICIES = {name for name, cls in PREFILL_POLICIES.items() if issubclass(cls, _Predicting)}


def get_prefill_policy(name: str, cost: CostModel | None = None, token_budget: int = 8192) -> PrefillPolicy:
    if name not in PREFILL_POLICIES:
        raise ValueError(f"unknown prefill policy {name!r}; available: {', '.join(PREFILL_POLICIES)}")
    cls = PREFILL_POLICIES[name]
    if issubclass(cls, _Predicting):
        if cost is None:
            raise ValueError(f"the {name} prefill policy needs a cost model (a step-time profile)")
        return cls(cost, token_budget)
    return cls()
