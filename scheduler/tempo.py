"""Tempo-style service-gain scheduling for mixed workloads: latency-sensitive requests (TTFT and
TPOT SLOs), throughput-intensive ones (a deadline for the whole response) and collective ones
(the calls of an agent's DAG, one deadline for the whole DAG).

A request's service gain is the output it delivers in time: its tokens if it meets its SLO,
nothing if not; a collective call carries its DAG's, since the DAG's output arrives in time or
not at all. Finishing well before a deadline gains nothing more, so the policies give each
request only the service it needs, and when not every request can be served in time they keep
those of the highest gain density: gain per second of predicted remaining work. Remaining
output comes from a conservative quantile upper bound (the 95th percentile of the lengths of
requests alike, by class and prompt length: OutputLengthEstimator), refined as tokens arrive;
a DAG's calls still to come, from the lengths of the DAGs seen so far.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict

from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.decode import DECODE_POLICIES, SlackBatching
from kairos.scheduler.output_length import OutputLengthEstimator
from kairos.scheduler.prefill import PREFILL_POLICIES, _Predicting

# How long a DAG's call takes until some have finished (seconds); and the decode batch whose
# step time paces a request's tokens before it has joined a batch.
DEFAULT_CALL_S = 2.0
PACING_BATCH, PACING_CONTEXT = 16, 1024


class Service:
    """What the Tempo policies share: output and DAG-length prediction, the time a request has,
    its gain and its gain density."""

    MAX_DAGS = 4096

    def __init__(self, cost: CostModel, predictor: OutputLengthEstimator | None = None):
        self.cost = cost
        self.predictor = predictor or OutputLengthEstimator(0.95, window=4096)
        self.call_s = DEFAULT_CALL_S  # mean time of a DAG's call, from those finished
        # Calls seen per DAG (the highest stage + 1), recent DAGs only, and those counts sorted:
        # the lengths of DAGs alike, which a DAG's calls still to come are predicted from.
        self.dag_calls: OrderedDict[str, int] = OrderedDict()
        self.dag_lengths: list[int] = []

    def remaining(self, r) -> int:
        """Predicted output tokens still to come (at least 1)."""
        slo = r.slo
        return self.predictor.remaining(slo.request_class, r.num_prompt_tokens, r.num_output_tokens, r.max_tokens,
                                        slo.output_len_hint)

    def saw(self, r) -> None:
        """Notes a collective call's stage: how many calls its DAG has had so far."""
        slo = r.slo
        calls, seen = slo.dag_stage + 1, self.dag_calls.pop(slo.dag_id, 0)
        self.dag_calls[slo.dag_id] = max(seen, calls)
        if calls > seen:
            if seen:
                self.dag_lengths.pop(bisect.bisect_left(self.dag_lengths, seen))
            bisect.insort(self.dag_lengths, calls)
        if len(self.dag_calls) > self.MAX_DAGS:
            _, oldest = self.dag_calls.popitem(last=False)
            self.dag_lengths.pop(bisect.bisect_left(self.dag_lengths, oldest))

    def calls_after(self, r) -> int:
        """A collective call's predicted calls still to come in its DAG: the 90th percentile of
        the lengths of the DAGs seen with more calls than this one's stage, less its own."""
        stage = r.slo.dag_stage
        lengths = self.dag_lengths
        start = bisect.bisect_right(lengths, stage + 1)
        longer = len(lengths) - start
        return lengths[start + min(longer - 1, int(0.9 * longer))] - stage - 1 if longer else 0

    def due(self, r) -> float:
        """When the whole response must be out: a throughput request's deadline, a collective
        call's share of its DAG's (the deadline less the calls predicted after it); inf for a
        latency-sensitive request, which is paced per token instead."""
        slo = r.slo
        if slo.kind == "latency":
            return math.inf
        after = self.calls_after(r) * self.call_s if slo.kind == "collective" else 0.0
        return r.arrival_time + slo.deadline_ms / 1e3 - after

    def gain(self, r) -> float:
        """Tokens delivered if in time: the predicted output, a collective call's counted for
        each call of its DAG that hangs on it."""
        tokens = r.num_output_tokens + self.remaining(r)
        return tokens * (1 + self.calls_after(r)) if r.slo.kind == "collective" else tokens

    def token_time(self) -> float:
        return self.cost.decode_time(PACING_BATCH, PACING_BATCH * PACING_CONTEXT)

    def learn_length(self, r) -> None:
        """A request finished: its output length."""
        self.predictor.observe(r.slo.request_class, r.num_prompt_tokens, r.num_output_tokens)

    def learn(self, r, now: float) -> None:
        """A request finished (at `now`): its output length, and for a DAG's call the time a
        call takes."""
        self.learn_length(r)
        if r.slo.kind == "collective":
            self.call_s += 0.05 * ((now - r.arrival_time) - self.call_s)


class TempoPrefill(_Predicting):
    """Earliest first-token deadline first: a latency-sensitive request's TTFT; for the others,
    the latest start that still lets their predicted output finish by their due time (a request
    with time to spare waits while others need the prefill). When a prompt would be late, the
    kept prompt of the lowest gain density gives way to it if its density is higher (the walk
    keeps the most gain it can); the demoted prompts follow, densest first, and last those
    whose first token is already overdue, oldest first."""

    name = "tempo"
    summary = "Tempo: earliest first-token deadline, the least gain density demoted when late"
    # Its deadlines are not arrival + TTFT, nor its late prompts in arrival order: the simulator
    # may not set prompts aside by their TTFT as it does for kairos and mh.
    demotes_expired = False

    def __init__(self, cost: CostModel, token_budget: int, service: Service | None = None,
                 max_wait_s: float | None = None):
        super().__init__(cost, token_budget, max_wait_s)
        self.service = service or Service(cost)

    @classmethod
    def build(cls, settings):
        return cls(settings.cost, settings.token_budget, max_wait_s=settings.max_prefill_wait_s)

    def first_token_due(self, r) -> float:
        s = self.service
        if r.slo.kind == "latency":
            return r.arrival_time + r.slo.ttft_s
        return s.due(r) - s.remaining(r) * s.token_time()

    def finished(self, request) -> None:
        # Its output length only. The time a DAG's call takes, learned here too, fed back: under
        # load calls take longer, the calls still to come take more of their DAG's deadline, more
        # of a DAG's prompts are found overdue and put last, and calls take longer still (in
        # tempo_mixed with max_tokens 4096, DAG attainment fell from 49% to 22% at 6x).
        self.service.learn_length(request)

    def density(self, r, own_s: float) -> float:
        return self.service.gain(r) / (own_s + self.service.remaining(r) * self.service.token_time())

    def split(self, waiting, now):
        for r in waiting:
            if r.slo.kind == "collective":
                self.service.saw(r)
        fixed, budget = self.cost.prefill[0], self.token_budget
        jobs = sorted(((self.first_token_due(r), own, tokens, r) for _, own, tokens, r in self.jobs(waiting)),
                      key=lambda j: j[0])
        densities = [self.density(r, own) for _, own, _, r in jobs]
        t, step_tokens = now, budget  # the first prompt opens a step
        kept: list[tuple[float, int, float]] = []  # min-heap of (density, index, time it added)
        late: set[int] = set()
        for i, (due, own, tokens, _) in enumerate(jobs):
            opens_step = step_tokens + tokens > budget
            added = own + (fixed * -(-tokens // budget) if opens_step else 0.0)
            if t + added <= due:
                heapq.heappush(kept, (densities[i], i, added))
                t, step_tokens = t + added, ((tokens - 1) % budget + 1 if opens_step else step_tokens + tokens)
            elif kept and kept[0][0] < densities[i] and t - kept[0][2] + added <= due:
                _, victim, freed = heapq.heapreplace(kept, (densities[i], i, added))
                late.add(victim)
                t += added - freed
            else:
                late.add(i)
        on_time = [job[3] for i, job in enumerate(jobs) if i not in late]
        # A prompt whose first token is due already has no gain left to keep: it goes behind
        # every prompt that still has some, oldest first, so that it cannot sink them.
        hopeless = sorted((i for i in late if jobs[i][0] < now), key=lambda i: jobs[i][3].arrival_time)
        still = sorted((i for i in late if jobs[i][0] >= now), key=lambda i: -densities[i])
        return on_time, [jobs[i][3] for i in still + hopeless]


class TempoDecode(SlackBatching):
    """Slack-guided batching in service terms. A latency-sensitive request bounds the step by its
    TPOT, as under `kairos`; a throughput or collective one only by the pace its due time needs
    (its time left over its predicted tokens), so requests with time to spare let the batch grow
    rather than being served faster than they need. Waiting requests are taken by gain density
    (gain over predicted remaining tokens); those that can no longer meet their SLO go last,
    oldest first."""

    name = "tempo"
    summary = "Tempo: admit by gain density, each request bounding the step only as its SLO needs"
    native_admission = False  # its step limits are the service's, not the compiled TPOT walk's

    def __init__(self, cost: CostModel, max_batch: int, service: Service | None = None):
        # No request joins past the step limit: here most limits are paces that requests with
        # time to spare set, and going past them made those requests late in turn (simulated
        # mixed workload at 6x and 7x: 22 to 29% less service goodput, DAGs 53% to 32% on time).
        super().__init__(cost, max_batch, rescue=False)
        self.service = service or Service(cost)
        self.now = 0.0  # of the decision being made: a due time's pace depends on it

    @classmethod
    def build(cls, settings):
        return cls(settings.cost, settings.max_batch)

    def remaining(self, r) -> int:
        return self.service.remaining(r)

    def step_limit(self, r, lost: bool) -> float:
        if r.slo.kind == "latency":
            return super().step_limit(r, lost)
        pace = (self.service.due(r) - self.now) / self.remaining(r)
        return pace * self.headroom if not lost and pace > self.cost.decode_time(1, r.num_tokens) else math.inf

    def lost(self, r, now, step, remaining=None):
        if r.slo.kind == "latency":
            return super().lost(r, now, step, remaining)
        return now + (self.remaining(r) if remaining is None else remaining) * step > self.service.due(r)

    def split(self, waiting, running, now):
        self.now = now
        for r in waiting:
            if r.slo.kind == "collective":
                self.service.saw(r)
        return self.split_by(waiting, now, self.lost_step(self.step_time(running), now),
                             lambda r, remaining: -self.service.gain(r) / remaining)

    def admit(self, running, ready, now, free_blocks):
        self.now = now
        return super().admit(running, ready, now, free_blocks)

    def finished(self, request) -> None:
        self.service.learn(request, request.finish_time)


PREFILL_POLICIES.register(TempoPrefill)
DECODE_POLICIES.register(TempoDecode)
