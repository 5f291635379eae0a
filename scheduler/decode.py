"""Decode policies: which requests whose KV is complete join the running decode batch.

A request here has `arrival_time`, `slo` (a RequestSLO), `num_tokens` (its context),
`num_prompt_tokens`, `num_output_tokens`, `max_tokens` and `first_token_time`. Every policy is
listed in DECODE_POLICIES.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol, Sequence, TypeVar

from kairos.scheduler import native
from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.output_length import OutputLengthEstimator
from kairos.scheduler.registry import PolicyRegistry, PolicySettings

R = TypeVar("R")


class DecodePolicy(Protocol):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for the command line's help
    needs_cost_model: ClassVar[bool]

    @classmethod
    def build(cls, settings: PolicySettings) -> DecodePolicy:
        """The policy, from what the registry knows of the worker."""

    def admit(self, running: Sequence[R], ready: Sequence[R], now: float, free_blocks: int) -> list[R]:
        """The ready requests to add to the running batch now."""

    def split(self, waiting: Sequence[R], running: Sequence[R], now: float) -> tuple[list[R], list[R]]:
        """Requests waiting to join the batch or to move their KV in, as (those that can still
        meet their SLO, in the order they should get room; those that cannot, oldest first).
        A request in the second list would seldom leave it (its wait only grows), so a caller
        with a long queue may set it aside rather than ask again."""

    def order(self, waiting: Sequence[R], running: Sequence[R], now: float) -> list[R]:
        """Who gets room first: split's two lists end to end."""

    def finished(self, request) -> None:
        """A request left the batch (to learn from, e.g. its output length)."""


class ContinuousBatching:
    """The baseline: first come, first admitted, up to a fixed batch size."""

    name = "cb"
    summary = "continuous batching, first come first admitted up to the batch cap (the baseline)"
    needs_cost_model = False

    def __init__(self, max_batch: int):
        self.max_batch = max_batch

    @classmethod
    def build(cls, settings):
        return cls(settings.max_batch)

    def admit(self, running, ready, now, free_blocks):
        return list(ready[: max(0, self.max_batch - len(running))])

    def split(self, waiting, running, now):
        return list(waiting), []

    def order(self, waiting, running, now):
        return list(waiting)

    def finished(self, request) -> None:
        pass


class SlackBatching:
    """Slack-guided adaptive batching. Waiting requests are taken shortest predicted remaining
    output first (by default the median of the lengths of requests alike, by class and prompt
    length: see OutputLengthEstimator), and admitted while the predicted step time of the grown
    batch stays within the tightest step limit (its TPOT SLO less a headroom, below) among the
    requests in it that can still meet their SLO, and a block per sequence remains; so the
    batch size floats with the contexts. Waiting since its first token lowers a request's key
    (`aging_tokens_per_s`): that wait is what its TPOT pays for, while one that waited long for
    its prefill has nothing more to gain from going first here. No request is passed over while
    it heads the queue.

    The limit keeps `headroom` of the SLO back for the time a request waits to join the batch
    and to move its KV, which its TPOT pays for too; but never so much that the batch decodes
    less than `kept_throughput` of what the whole SLO allows. Where a step's fixed cost is most
    of the SLO, a tenth of the SLO is most of the room the batch has to grow: 90% of a 30 ms SLO
    over a 25.5 ms fixed cost held the batch near 64 sequences where about 190 fit, the worker
    decoded 2300 tokens/s where 5700 arrived, and E2E attainment fell to 26% where continuous
    batching kept 60%. Where the fixed cost is small the margin costs little throughput and
    keeps requests that waited on time: with a 6 ms fixed cost and a 20 ms SLO under overload,
    90% of the SLO met 90% of TPOTs, the whole SLO 66%.

    Under overload some requests must miss. A request is lost once the time since its first
    token (which started its TPOT clock) plus its predicted remaining tokens at the steps to
    come exceed its TPOT budget. (Judged at the median, such a request misses more often than
    not; judged at the 90th percentile, too few were written off: in the decode-bound Azure
    conversation sweep with max_tokens 4096, 8 points less TPOT attainment where the baseline
    attains 40-80%.) The steps to come are the running batch's, but no longer than its recent
    mean (`lost_step`): this policy fills the batch up to its step limit, and a request judged
    at that peak would be written off with a slack of a tenth of its SLO per token, though the
    batch turns over as short requests finish (simulated on two CPU cores with a 20 ms TPOT
    SLO, four in five requests so judged still made their SLO). Lost requests wait behind every
    feasible one, for the batch and for KV room alike, and are taken oldest first; without this
    an overload makes every waiting request late in turn, since each one waits behind the
    earlier late ones. A lost request, waiting or running, does not bound the step: it misses
    whatever the batch does, and a bound for it would only slow the batch's throughput when the
    load needs it most (while every running request is lost, the batch grows as continuous
    batching's would, up to `max_batch`).

    With the batch at its step limit, a feasible request that the next step would still serve in
    time but that waiting through it would lose joins all the same (`rescue`): waiting, it would
    be lost for certain, and then wait behind every feasible request; joining, it lengthens the
    step by one sequence's cost. Near capacity a burst otherwise falls whole on the requests
    that arrive in it: with a 30 ms TPOT SLO over a 25.5 ms fixed step cost, 8115 of 9993 misses
    had waited over a second to join, where continuous batching kept every wait under 52 ms and
    spread the burst's cost thinly over the running batch (simulated at 27.7 req/s, E2E
    attainment 48.4% without the rescue, 54.0% with it, continuous batching 59.7%; with a 6 ms
    fixed cost and a 20 ms SLO under overload, 88.6% and 90.2% of TPOTs met, 62.1%)."""

    name = "kairos"
    summary = "slack-guided batching: admit while the step fits the tightest TPOT, short outputs first"
    needs_cost_model = True
    native_admission = True  # long batches and queues take the compiled walk: this class's order and TPOT limits

    def __init__(self, cost: CostModel, max_batch: int, estimator: OutputLengthEstimator | None = None,
                 aging_tokens_per_s: float = 100.0, headroom: float = 0.9, kept_throughput: float = 0.97,
                 step_memory_s: float = 1.0, rescue: bool = True):
        self.cost = cost
        self.max_batch = max_batch
        self.estimator = estimator or OutputLengthEstimator(quantile=0.5)
        self.aging_tokens_per_s = aging_tokens_per_s
        self.headroom = headroom
        self.kept_throughput = kept_throughput
        self.step_memory_s = step_memory_s  # how far back the mean step of `lost_step` looks
        self.rescue = rescue  # whether requests about to be lost join past the step limit (see rescued)
        self.mean_step = math.nan  # time-decayed mean of the running batch's predicted step
        self._step_seen = (0.0, 0.0)  # (when, the predicted step then)

    @classmethod
    def build(cls, settings):
        return cls(settings.cost, settings.max_batch)

    def remaining(self, r) -> int:
        slo = r.slo
        return self.estimator.remaining(slo.request_class, r.num_prompt_tokens, r.num_output_tokens, r.max_tokens,
                                        slo.output_len_hint)

    def lost(self, r, now: float, step: float, remaining: int | None = None) -> bool:
        """Whether r misses its TPOT SLO even if every step from now on takes `step` seconds."""
        remaining = self.remaining(r) if remaining is None else remaining
        budget = r.slo.tpot_s * (r.num_output_tokens - 1 + remaining)
        return (now - r.first_token_time) + remaining * step > budget

    def step_time(self, running) -> float:
        return self.cost.decode_time(max(1, len(running)), sum(r.num_tokens for r in running))

    def lost_step(self, step: float, now: float) -> float:
        """The step that judges waiting requests lost: the running batch's predicted `step`, or
        the batch's mean predicted step over about the last `step_memory_s` if shorter. Each
        prediction counts for the time it held, so the mean does not depend on how often the
        policy is asked."""
        seen_at, held = self._step_seen
        if math.isnan(self.mean_step):
            self.mean_step = step
        elif now > seen_at:
            self.mean_step += (held - self.mean_step) * -math.expm1((seen_at - now) / self.step_memory_s)
        self._step_seen = (now, step)
        return min(step, self.mean_step)

    def split(self, waiting, running, now):
        """Feasible requests shortest predicted remaining output first (aged); lost ones oldest
        first."""
        step = self.lost_step(self.step_time(running), now)
        if native.ENABLED and len(waiting) >= native.MIN_REQUESTS:
            return native.slack_split(waiting, now, step, self.aging_tokens_per_s, self.estimator)
        aging = self.aging_tokens_per_s
        return self.split_by(waiting, now, step, lambda r, remaining: remaining - aging * (now - r.first_token_time))

    def split_by(self, waiting, now: float, step: float, key) -> tuple[list, list]:
        """(the feasible requests by key(request, predicted remaining tokens), smallest first;
        the lost ones, oldest first) at steps of `step` seconds."""
        feasible, lost = [], []
        for r in waiting:
            remaining = self.remaining(r)
            if self.lost(r, now, step, remaining):
                lost.append(r)
            else:
                feasible.append((key(r, remaining), r))
        feasible.sort(key=lambda item: item[0])
        lost.sort(key=lambda r: r.arrival_time)
        return [r for _, r in feasible], lost

    def order(self, waiting, running, now):
        feasible, lost = self.split(waiting, running, now)
        return feasible + lost

    def step_limit(self, r, lost: bool) -> float:
        """The longest step r lets the batch take: its TPOT SLO less the headroom (see the
        class), or no limit if it is lost or if even a batch of one with its context would miss
        the SLO."""
        tpot = r.slo.tpot_s
        if lost or self.cost.decode_time(1, r.num_tokens) > tpot:
            return math.inf
        return min(tpot, max(tpot * self.headroom, self.cost.decode_limit_keeping(tpot, self.kept_throughput)))

    def _tightest(self, running, now: float, step: float) -> float:
        """The smallest step_limit of the running batch (inf for none), each request judged lost
        or not at steps of `step` seconds."""
        if self.native_admission and native.ENABLED and len(running) >= native.MIN_REQUESTS:
            return native.tightest_step_limit(running, now, step, self.estimator, self.cost, self.headroom,
                                              self.kept_throughput)
        return min((self.step_limit(r, self.lost(r, now, step)) for r in running), default=math.inf)

    def admit(self, running, ready, now, free_blocks):
        alpha, beta, gamma = self.cost.decode
        batch = len(running)
        # An empty batch always takes its head: with nothing running, no block can come free
        # but by its growing (which preempts ready sequences for blocks, if it must).
        if not ready or batch >= self.max_batch or (batch and free_blocks < batch + 1):
            return []
        context = sum(r.num_tokens for r in running)
        step = self.lost_step(self.cost.decode_time(max(1, batch), context), now)  # step_time, sums at hand
        tightest = self._tightest(running, now, step)
        if self.native_admission and native.ENABLED and len(ready) >= native.MIN_REQUESTS:
            return native.slack_admission(ready, now, step, self.aging_tokens_per_s, self.estimator,
                                          batch, context, tightest, self.max_batch, free_blocks, self.cost,
                                          self.headroom, self.kept_throughput, self.rescue)
        feasible, lost = self.split(ready, running, now)
        admitted = []
        for r in feasible + lost:
            if batch >= self.max_batch or (batch and free_blocks < batch + 1):
                break
            slo = min(tightest, self.step_limit(r, len(admitted) >= len(feasible)))
            if batch and alpha + beta * (batch + 1) + gamma * (context + r.num_tokens) > slo:
                break  # the head waits for room rather than being overtaken
            admitted.append(r)
            batch, context, tightest = batch + 1, context + r.num_tokens, slo
        if self.rescue and len(admitted) < len(feasible):
            admitted += self.rescued(feasible[len(admitted):], now, batch, context, free_blocks)
        return admitted

    def rescued(self, refused, now: float, batch: int, context: int, free_blocks: int) -> list:
        """Of the feasible requests the step limit keeps out (in the order they would join), those
        that the batch's next step would still serve in time but that waiting through it would
        lose, both judged at steps as long as that one: they join all the same, while the batch
        and the blocks have room (see the class)."""
        step = self.cost.decode_time(batch, context)
        taken = []
        for r in refused:
            if len(taken) >= min(self.max_batch, free_blocks) - batch:
                break
            remaining = self.remaining(r)
            if not self.lost(r, now, step, remaining) and self.lost(r, now + step, step, remaining):
                taken.append(r)
        return taken

    def finished(self, request) -> None:
        self.estimator.observe(request.slo.request_class, request.num_prompt_tokens, request.num_output_tokens)


DECODE_POLICIES = PolicyRegistry("decode", ContinuousBatching, SlackBatching)
