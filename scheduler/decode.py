"""Decode policies: which requests whose KV is complete join the running decode batch.

A request here has `arrival_time`, `tpot_slo` (seconds), `num_tokens` (its context),
`num_output_tokens`, `max_tokens`, `request_class` and `output_len_hint` (or None).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, TypeVar

from scheduler.cost_model import CostModel
from scheduler.output_length import OutputLengthEstimator

R = TypeVar("R")


class DecodePolicy(Protocol):
    name: str

    def admit(self, running: Sequence[R], ready: Sequence[R], now: float, free_blocks: int) -> list[R]:
        """The ready requests to add to the running batch now."""

    def finished(self, request) -> None:
        """A request left the batch (to learn from, e.g. its output length)."""


class ContinuousBatching:
    """The baseline: first come, first admitted, up to a fixed batch size."""

    name = "cb"

    def __init__(self, max_batch: int):
        self.max_batch = max_batch

    def admit(self, running, ready, now, free_blocks):
        return list(ready[: max(0, self.max_batch - len(running))])

    def finished(self, request) -> None:
        pass


class SlackBatching:
    """Slack-guided adaptive batching. Waiting requests are taken shortest predicted remaining
    output first, and admitted while the predicted step time of the grown batch stays within
    the tightest TPOT SLO in it and a block of headroom per sequence remains; so the batch size
    floats with the contexts. Waiting lowers a request's key (`aging_tokens_per_s`), and no
    request is passed over while it heads the queue, so none waits forever. A request whose SLO
    no batch could meet does not constrain the others."""

    name = "kairos"

    def __init__(self, cost: CostModel, max_batch: int, estimator: OutputLengthEstimator | None = None,
                 aging_tokens_per_s: float = 100.0):
        self.cost = cost
        self.max_batch = max_batch
        self.estimator = estimator or OutputLengthEstimator()
        self.aging_tokens_per_s = aging_tokens_per_s

    def remaining(self, r) -> int:
        return self.estimator.remaining(r.request_class, r.num_output_tokens, r.max_tokens, r.output_len_hint)

    def effective_slo(self, r) -> float:
        return r.tpot_slo if self.cost.decode_time(1, r.num_tokens) <= r.tpot_slo else math.inf

    def admit(self, running, ready, now, free_blocks):
        alpha, beta, gamma = self.cost.decode
        lone = alpha + beta  # a batch of one, before its context
        batch = len(running)
        context = sum(r.num_tokens for r in running)
        tightest = min((r.tpot_slo for r in running if lone + gamma * r.num_tokens <= r.tpot_slo), default=math.inf)
        aging = self.aging_tokens_per_s
        queue = sorted(ready, key=lambda r: self.remaining(r) - aging * (now - r.arrival_time))
        admitted = []
        for r in queue:
            if batch >= self.max_batch or free_blocks < batch + 1:
                break
            slo = min(tightest, r.tpot_slo if lone + gamma * r.num_tokens <= r.tpot_slo else math.inf)
            if batch and alpha + beta * (batch + 1) + gamma * (context + r.num_tokens) > slo:
                break  # the head waits for room rather than being overtaken
            admitted.append(r)
            batch, context, tightest = batch + 1, context + r.num_tokens, slo
        return admitted

    def finished(self, request) -> None:
        self.estimator.observe(request.request_class, request.num_output_tokens)


DECODE_POLICIES = ("cb", "kairos")


def get_decode_policy(name: str, max_batch: int, cost: CostModel | None = None) -> DecodePolicy:
    if name == "cb":
        return ContinuousBatching(max_batch)
    if name == "kairos":
        if cost is None:
            raise ValueError("the kairos decode policy needs a cost model (a step-time profile)")
        return SlackBatching(cost, max_batch)
    raise ValueError(f"unknown decode policy {name!r}; available: {', '.join(DECODE_POLICIES)}")
