"""Prefill policies: the order in which waiting prompts are admitted to prefill steps.

A request here is anything with `arrival_time`, `slo` (a RequestSLO), `num_uncomputed_tokens`
(prompt tokens still to prefill) and `num_tokens` (its context once they are). The step
scheduler admits in the returned order under its token budget. Every policy is listed in
PREFILL_POLICIES.
"""

from __future__ import annotations

import heapq
import math
from typing import ClassVar, Protocol, Sequence, TypeVar

from kairos.scheduler import native
from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.registry import PolicyRegistry, PolicySettings

R = TypeVar("R")


class PrefillPolicy(Protocol):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for the command line's help
    needs_cost_model: ClassVar[bool]
    # Whether a prompt whose TTFT deadline has passed goes behind every prompt still in time,
    # by arrival, whatever else waits: a caller may then keep such prompts aside (see split).
    demotes_expired: ClassVar[bool]

    @classmethod
    def build(cls, settings: PolicySettings) -> PrefillPolicy:
        """The policy, from what the registry knows of the worker."""

    def order(self, waiting: Sequence[R], now: float) -> list[R]:
        """The waiting requests, the one to prefill first at the front: split's two lists end
        to end."""

    def split(self, waiting: Sequence[R], now: float) -> tuple[list[R], list[R]]:
        """(the requests to prefill first, in order; those it has demoted, oldest first)."""

    def chunk(self, step: Sequence[tuple[R, int]], candidate: R, room: int, now: float) -> int:
        """How many of candidate's prompt tokens (0 to room) close the step as a chunk, the rest
        going to later steps, when its whole remaining prompt does not fit the `room` left of
        the token budget. `step` holds the (request, tokens) already in the step."""

    def finished(self, request) -> None:
        """A request ran to its end, here or on a decode worker (to learn from, e.g. its output
        length): it has `slo`, `num_prompt_tokens` and `num_output_tokens`."""


def deadline(r) -> float:
    return r.arrival_time + r.slo.ttft_s


class FCFSPolicy:
    """First come, first served: the baseline."""

    name = "fcfs"
    summary = "first come, first served (the baseline)"
    needs_cost_model = False
    demotes_expired = False

    @classmethod
    def build(cls, settings):
        return cls()

    def order(self, waiting, now):
        return sorted(waiting, key=lambda r: r.arrival_time)

    def split(self, waiting, now):
        return self.order(waiting, now), []

    def chunk(self, step, candidate, room, now):
        return room  # every step full, as vLLM and SGLang run chunked prefill

    def finished(self, request) -> None:
        pass


class EDFPolicy:
    """Earliest TTFT deadline first."""

    name = "edf"
    summary = "earliest TTFT deadline first"
    needs_cost_model = False
    demotes_expired = False

    @classmethod
    def build(cls, settings):
        return cls()

    def order(self, waiting, now):
        return sorted(waiting, key=deadline)

    def split(self, waiting, now):
        return self.order(waiting, now), []

    def chunk(self, step, candidate, room, now):
        return 0  # with no step times to go by, a chunk could make the step's prompts late

    def finished(self, request) -> None:
        pass


class _Predicting:
    """Walks a candidate order, predicting when each prompt's prefill would finish: prompts go
    whole into steps of at most `token_budget` tokens (a longer one alone into as many steps
    as it needs), each step paying the fixed cost once.

    A demoted prompt waits while prompts that can still make their deadlines keep coming, which
    under a steady load (closed-loop clients) can be minutes. With `max_wait_s`, one that has
    waited that long goes before them, oldest first: a bound on every wait, paid for in
    deadlines met."""

    needs_cost_model = True
    demotes_expired = True

    def __init__(self, cost: CostModel, token_budget: int, max_wait_s: float | None = None):
        self.cost = cost
        self.token_budget = token_budget
        self.max_wait_s = max_wait_s

    @classmethod
    def build(cls, settings):
        return cls(settings.cost, settings.token_budget, settings.max_prefill_wait_s)

    def jobs(self, waiting) -> list[tuple[float, float, int, object]]:
        """(deadline, own prefill time, tokens, request) per request; computed once per call."""
        _, b, c = self.cost.prefill
        return [(r.arrival_time + r.slo.ttft_s,
                 b * r.num_uncomputed_tokens + c * r.num_uncomputed_tokens * r.num_tokens,
                 r.num_uncomputed_tokens, r) for r in waiting]

    def order(self, waiting, now):
        on_time, late = self.split(waiting, now)
        overdue, late = self.past_wait_limit(late, now)
        return overdue + on_time + late

    def past_wait_limit(self, late: list, now: float) -> tuple[list, list]:
        """(the demoted prompts that have waited max_wait_s, oldest first; the others, in order)."""
        if self.max_wait_s is None:
            return [], late
        since = now - self.max_wait_s
        overdue = sorted((r for r in late if r.arrival_time <= since), key=lambda r: r.arrival_time)
        return overdue, [r for r in late if r.arrival_time > since] if overdue else late

    def finished(self, request) -> None:
        pass

    def chunk(self, step, candidate, room, now):
        """The largest chunk that every prompt the step finishes in time still finishes in time
        with (by the predicted step length): a chunk finishes no prompt, so it may only use the
        slack of those the step does finish. Prompts the step finishes late do not limit it, nor
        does the candidate's own deadline: a chunk only does its work sooner, and even a prompt
        that will be late must be prefilled, so budget left idle under overload is lost."""
        prompts = [(n, r.num_tokens - r.num_uncomputed_tokens + n) for r, n in step]
        length = self.cost.prefill_time(prompts)
        limit = min((deadline(r) - now for r, n in step
                     if n == r.num_uncomputed_tokens and now + length <= deadline(r)), default=math.inf)
        computed = candidate.num_tokens - candidate.num_uncomputed_tokens

        def fits(tokens: int) -> bool:
            return self.cost.prefill_time(prompts + [(tokens, computed + tokens)]) <= limit

        if fits(room):
            return room
        low, high = 0, room - 1  # fits(low) holds; the answer lies in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low

    def split(self, waiting, now) -> tuple[list, list]:
        """(the prompts predicted on time, in prefill order; the late ones, oldest first). A
        prompt whose deadline has passed is late in any order and takes none of the predicted
        time, so the order of a queue is that of its prompts still in time, with the expired
        ones merged into the late by arrival (up to equal arrival times): a caller with an
        overload's long queue may keep the expired aside instead of sorting them every step."""
        raise NotImplementedError

    def split_on_time(self, jobs, now: float, drop_longest: bool) -> tuple[list, list]:
        """(on time, late) requests when prefilled in this order. A prompt that would finish late
        is moved to `late`: itself, or with drop_longest the kept prompt that added the most
        predicted time, when it added more (Moore-Hodgson)."""
        fixed, budget = self.cost.prefill[0], self.token_budget
        t, step_tokens = now, budget  # the first prompt opens a step
        costliest: list[tuple[float, int]] = []  # max-heap of kept jobs by the time each added
        late: set[int] = set()
        for i, (due, own, tokens, _) in enumerate(jobs):
            opens_step = step_tokens + tokens > budget
            added = own + (fixed * -(-tokens // budget) if opens_step else 0.0)
            if t + added <= due:
                heapq.heappush(costliest, (-added, i))
                t, step_tokens = t + added, ((tokens - 1) % budget + 1 if opens_step else step_tokens + tokens)
            elif drop_longest and costliest and -costliest[0][0] > added:
                # Giving up the costliest kept prompt saves the most time for everyone after it.
                neg_added, victim = heapq.heapreplace(costliest, (-added, i))
                late.add(victim)
                t += added + neg_added
            else:
                late.add(i)
        on_time = [job[3] for i, job in enumerate(jobs) if i not in late]
        demoted = sorted((jobs[i][3] for i in sorted(late)), key=lambda r: r.arrival_time)
        return on_time, demoted

    def split_by(self, waiting, now: float, least_slack: bool) -> tuple[list, list]:
        """split, ordered by least slack (deadline less own prefill time) or else by deadline,
        then walked by split_on_time (Moore-Hodgson unless least_slack): by `native` for a
        long queue, its numbers gathered into arrays once."""
        if not (native.ENABLED and len(waiting) >= native.MIN_REQUESTS):
            jobs = sorted(self.jobs(waiting), key=(lambda j: j[0] - j[1]) if least_slack else (lambda j: j[0]))
            return self.split_on_time(jobs, now, drop_longest=not least_slack)
        return native.on_time_split(waiting, now, self.cost.prefill, self.token_budget, least_slack)


class KairosPolicy(_Predicting):
    """Urgency: least slack first, where slack = deadline - (now + predicted wait + predicted
    prefill). A prompt predicted to miss its deadline in that order is demoted behind every
    feasible one (in arrival order): it still completes, but it no longer delays prompts that
    can make it."""

    name = "kairos"
    summary = "least TTFT slack first, prompts predicted late demoted behind the rest"

    def split(self, waiting, now):
        return self.split_by(waiting, now, least_slack=True)


class MooreHodgsonPolicy(_Predicting):
    """Earliest deadline first, but whenever a prompt would be late, the kept prompt costing the
    most time is demoted instead: on one machine this maximises the number of deadlines met
    (Moore-Hodgson). Demoted prompts follow in arrival order."""

    name = "mh"
    summary = "Moore-Hodgson: the most TTFT deadlines met"

    def split(self, waiting, now):
        return self.split_by(waiting, now, least_slack=False)


PREFILL_POLICIES = PolicyRegistry("prefill", FCFSPolicy, EDFPolicy, KairosPolicy, MooreHodgsonPolicy)
