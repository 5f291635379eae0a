"""A discrete-event model of disaggregated serving that runs the workers' own policy objects.

Prefill workers take requests in their prefill policy's order into steps under a token budget,
as the engine does: a prompt longer than what is left of the budget is cut to fill it (chunked
prefill) if it opens the step, and otherwise to what the policy's `chunk` allows, a chunk
closing the step; a prompt part-way through is ranked by the policy with the waiting ones. A
prompt holds its worker's KV from admission until its transfer lands, and a worker whose KV
is full admits nothing new: a prompt starts only if all the KV it will need fits beside what
the started prompts still need, as in the engine, so a started prompt always finishes. A step
lasts what the cost model predicts. Each prompt's KV then
moves to a decode worker at the KV bandwidth, once that worker has room for it (backpressure,
as in the real workers). As in
the real workers, a prompt's offer goes out as the step that completes it starts, so its KV may
leave as that step ends; KV cleared while its prefill worker is in a later step leaves at once
on a GPU (`kv_sent_during_steps`), when the step ends on a CPU; a decode worker's inbound link
carries one transfer at a time, and it has at most `max_inflight_transfer_bytes` of KV under way (one
transfer at least). A decode worker admits ready requests through its decode policy and runs
steps whose length the cost model predicts; every running request gains a token per step.
Decode KV is kept in blocks as the engine keeps it: a transfer reserves its prompt's blocks
(while a block per running or ready sequence stays spare), a sequence takes a new block each
time its context crosses a block boundary, and a step short of blocks preempts the newest
sequences, which then recompute their prompt and output on the decode worker in prefill steps
that go before decode steps (each starting once the blocks for all of it are free). A request
that could not run even alone, its prompt at least the KV cache, is refused at once, as the
engine refuses it; its output is cut where the cache ends, as the engine's is. Requests are
placed as the router places them. Prefix-cache hits come from Mooncake `hash_ids` (an LRU of
blocks per prefill worker). Pure Python.

Served steps are not all alike: `prefill_jitter` and `decode_jitter` spread each step's length
around the cost model (lognormal, with that mean relative deviation, as `kairos status` reports
it per worker and phase). The policies then predict through a CalibratedCostModel fed with
every simulated step, as the workers' policies are fed with every real one.

Workers that share one device (1P1D on one GPU, or on a CPU's cores) slow each other:
`prefill_beside_decode` is how much longer a prefill step takes while a decode worker is busy,
and `decode_beside_prefill` the same for decode steps beside prefill. A step then runs at the
slower pace while the other role is busy and at its own while it is not (its pace changes the
moment the other role starts or stops), so a step's length follows the load on the other side,
which one fixed scale cannot carry.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import operator
import random
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kairos.scheduler import defaults
from kairos.scheduler.cost_model import CalibratedCostModel, CostModel
from kairos.scheduler.decode import DECODE_POLICIES
from kairos.scheduler.metrics import metrics, service_metrics
from kairos.scheduler.placement import pick_decode_worker, pick_prefill_worker
from kairos.scheduler.prefill import PREFILL_POLICIES
from kairos.scheduler.registry import PolicySettings
from kairos.scheduler.request import MIN_SLO_MS
from kairos.scheduler.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest


@dataclass
class SimConfig:
    prefill_workers: int = 1
    decode_workers: int = 1
    prefill_policy: str = "fcfs"
    decode_policy: str = "cb"
    token_budget: int = defaults.TOKEN_BUDGET  # prefill tokens per step
    max_batch: int = defaults.MAX_BATCH  # decode sequences per step
    kv_capacity_tokens: int = 400_000  # per worker
    kv_bytes_per_token: int = 131_072
    kv_bandwidth_gb_s: float = 25.0  # prefill -> decode
    # per decode worker, from its "ready" to the KV landing
    max_inflight_transfer_bytes: int = defaults.MAX_INFLIGHT_TRANSFER_BYTES
    block_size: int = defaults.BLOCK_SIZE
    prefill_jitter: float = 0.0  # mean relative deviation of a step's length from the cost model
    decode_jitter: float = 0.0
    # Co-located workers' contention: a step's length over its length alone while a worker of
    # the other role is busy (1.0: on devices of their own).
    prefill_beside_decode: float = 1.0
    decode_beside_prefill: float = 1.0
    seed: int = 0
    # Prefill workers on a GPU take decode workers' answers while a step runs (the host is
    # free), so KV made ready then leaves at once; on a CPU the step holds the host, and the
    # KV leaves when the step ends.
    kv_sent_during_steps: bool = True
    # The max_tokens clients set. None: each request's own output length, which is how a replay
    # makes a trace's lengths happen (with ignore_eos), and which the policies' output-length
    # bound is capped by, so that it knows every length under its quantile. A number: a cap as
    # clients set one, the output ending at the trace's length (or the cap, if shorter).
    max_tokens: int | None = None
    # A prompt the prefill policy demoted goes first once it has waited this long (None: never).
    max_prefill_wait_s: float | None = None


def measured_on_gpu(profile: dict) -> bool:
    """Whether a step-time profile's steps ran on a GPU (the profiler names a CPU '<arch> CPU'):
    a GPU worker's host is free while a step runs, a CPU worker's is not."""
    return not str(profile.get("device", "")).endswith("CPU")


def check_config(config: SimConfig) -> None:
    """A clear error for settings no system could have (named as `kairos simulate` names them)."""
    at_least = {"--prefill-workers": (config.prefill_workers, 1), "--decode-workers": (config.decode_workers, 1),
                "--token-budget": (config.token_budget, 1), "--max-batch": (config.max_batch, 1),
                "--kv-capacity-tokens": (config.kv_capacity_tokens, config.block_size),
                "--max-inflight-transfer-mb": (config.max_inflight_transfer_bytes, 0),
                "block size": (config.block_size, 1), "KV bytes per token": (config.kv_bytes_per_token, 1)}
    for name, (value, low) in at_least.items():
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if not config.kv_bandwidth_gb_s > 0:
        raise ValueError(f"--kv-bandwidth-gb-s must be positive, got {config.kv_bandwidth_gb_s}")
    if min(config.prefill_jitter, config.decode_jitter) < 0:
        raise ValueError("step-time jitter must be >= 0")
    if config.max_tokens is not None and config.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, not {config.max_tokens}")
    if config.max_prefill_wait_s is not None and not config.max_prefill_wait_s > 0:
        raise ValueError(f"--max-prefill-wait-s must be positive, not {config.max_prefill_wait_s}")
    if min(config.prefill_beside_decode, config.decode_beside_prefill) < 1:
        raise ValueError("--colocated-slowdown values must be at least 1: a step beside the other role's "
                         "is not faster than alone")


class SimRequest:
    """A request as the policies see it (the attribute names of engine.Sequence)."""

    __slots__ = ("trace", "arrival_time", "slo", "prompt_len", "output_len", "cached",
                 "computed", "max_tokens", "first_token_time",
                 "finish_time", "worker", "join_step", "source", "outputs_at_join", "decoding", "crossing",
                 "epoch", "recomputed", "refused", "dag_start", "dependents", "cached_blocks", "cache_segment")

    def __init__(self, trace: TraceRequest):
        self.trace = trace
        self.arrival_time = trace.arrival
        self.slo = trace.slo
        self.prompt_len = trace.prompt_len
        self.output_len = trace.output_len
        self.max_tokens = trace.output_len  # replayed traces cap generation at their length
        self.cached = 0  # prompt tokens found in the prefix cache
        self.computed = 0  # prompt tokens prefilled (or cached) so far
        self.first_token_time = math.nan
        self.finish_time = math.nan
        self.worker: DecodeSim | None = None  # the decode worker the router assigned it
        self.join_step = 0  # the worker's decode step count when it (last) joined the batch
        self.outputs_at_join = 1  # the first token comes from prefill
        self.decoding = False  # in its decode worker's running batch
        self.crossing = 0  # the decode step (mod block size) at which it takes a new block
        self.epoch = 0  # how often it was preempted (its earlier finish predictions are void)
        self.recomputed = 0  # after a preemption: tokens whose KV is computed again
        self.source: PrefillSim | None = None  # the prefill worker holding its KV
        self.refused = False  # too long to run at all: failed with an error at arrival
        self.dag_start = trace.arrival  # a DAG's call: when the DAG's first call arrived
        self.dependents: list[SimRequest] = []  # the DAG's calls sent once this one ends
        # Preempted on a decode worker: its KV blocks still cached there (free, not yet reused),
        # which its recomputation finds, and the free-list segment that holds them.
        self.cached_blocks = 0
        self.cache_segment: list | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_len

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.prompt_len - self.computed

    @property
    def num_output_tokens(self) -> int:
        return self.outputs_at_join + (self.worker.steps - self.join_step if self.decoding else 0)

    @property
    def num_tokens(self) -> int:
        if self.computed < self.prompt_len:  # prefilling: its context once the prompt is in
            return self.prompt_len
        # The policies read this for every running request at every step: spelt out, not via
        # num_output_tokens, it costs one attribute chain less.
        return self.prompt_len + self.outputs_at_join + (self.worker.steps - self.join_step if self.decoding else 0)


@dataclass
class StepUnderWay:
    """A worker's step between its start and its end event. Where co-located workers contend,
    the end moves whenever the step's pace changes: `token` tells the live end event from the
    ones it replaced."""
    then: object  # then(worker, *args) handles the end
    args: tuple
    observe: tuple | None  # (the policy's observe method, *the step's shape): fed the step's length
    started: float
    alone_left: float  # seconds of it left at its own pace, as of `since`
    since: float
    pace: float  # its length over its length alone, for now
    token: int


@dataclass
class PrefillSim:
    policy: object
    model: CostModel | CalibratedCostModel  # what the policy predicts with
    capacity_tokens: int
    waiting: list = field(default_factory=list)
    # Waiting prompts whose TTFT deadline has passed, newest first, for a policy that demotes
    # them by arrival (one with `split`): kept aside so an overload's queue is not sorted every step.
    expired: list = field(default_factory=list)
    prefilling: list = field(default_factory=list)  # admitted, prompt part-way through (chunked)
    held: int = 0  # tokens of KV its prompts hold until their transfers land
    busy: bool = False
    queued_prompt_tokens: int = 0  # prompt tokens of the requests sent here whose first token is not out
    requests_in_hand: int = 0  # sent here, and neither finished nor handed to a decode worker
    cache: OrderedDict = field(default_factory=OrderedDict)  # hash id -> None, LRU order
    cleared: list = field(default_factory=list)  # (decode worker, request) to send once this step ends
    prefilled_tokens: int = 0  # prompt tokens computed (recomputation would show as more than the prompts')
    step: StepUnderWay | None = None


@dataclass
class DecodeSim:
    policy: object
    model: CostModel | CalibratedCostModel
    capacity_blocks: int
    block_size: int
    running: list = field(default_factory=list)  # in the order they joined: the newest is preempted first
    ready: list = field(default_factory=list)
    pending: deque = field(default_factory=deque)  # prefilled, waiting for room to transfer into
    # Of those, the ones the policy has given up on for their SLO: a heap by arrival, served
    # once no other waits (set aside so that a long overload does not re-sort them every step).
    given_up: list = field(default_factory=list)
    finishing: list = field(default_factory=list)  # heap of (finish step, seq, request, its epoch)
    preempted: list = field(default_factory=list)  # to recompute, by arrival
    crossings: list = field(default_factory=list)  # running sequences by the step (mod block size) they take a block
    steps: int = 0  # decode steps run
    context: int = 0  # sum of running contexts
    used_blocks: int = 0  # held by running, ready, recomputing and incoming sequences
    # The free blocks in the order the engine hands them out (freed longest ago first), as
    # [preempted sequence whose cached KV they hold, or None; how many] segments.
    free_fifo: deque = field(default_factory=deque)
    requests_in_hand: int = 0  # placed here and not finished
    preemptions: int = 0
    link_free_at: float = 0.0  # when the inbound KV link has carried what it was given
    inflight_bytes: int = 0  # of the transfers between "ready" and landing
    incoming: int = 0  # those transfers: their blocks are reserved
    busy: bool = False
    tokens_out: int = 0
    recomputed_tokens: int = 0  # prompt and output tokens computed again after preemptions
    step: StepUnderWay | None = None

    @property
    def free_blocks(self) -> int:
        return self.capacity_blocks - self.used_blocks


class Simulator:
    def __init__(self, config: SimConfig, cost: CostModel):
        check_config(config)
        self.config = config
        self.cost = cost
        self.rng = random.Random(config.seed)
        # Lognormal factors of mean 1 whose mean absolute deviation is about the jitter asked.
        self.jittered = config.prefill_jitter > 0 or config.decode_jitter > 0
        self.sigma = {"prefill": config.prefill_jitter * math.sqrt(math.pi / 2),
                      "decode": config.decode_jitter * math.sqrt(math.pi / 2)}
        self.contended = config.prefill_beside_decode != 1.0 or config.decode_beside_prefill != 1.0
        self.roles_busy = (False, False)  # (a prefill worker, a decode worker), as the paces last saw them
        self._tokens = itertools.count()
        # Each worker's policy predicts through its own model, as each real worker calibrates its own.
        models = [self._policy_cost() for _ in range(config.prefill_workers + config.decode_workers)]
        settings = [PolicySettings(m, config.token_budget, config.max_batch, config.max_prefill_wait_s)
                    for m in models]
        self.prefills = [PrefillSim(PREFILL_POLICIES.build(config.prefill_policy, ps), ps.cost,
                                    config.kv_capacity_tokens) for ps in settings[:config.prefill_workers]]
        self.decodes = [DecodeSim(DECODE_POLICIES.build(config.decode_policy, ds), ds.cost,
                                  config.kv_capacity_tokens // config.block_size, config.block_size,
                                  crossings=[0] * config.block_size)
                        for ds in settings[config.prefill_workers:]]
        for d in self.decodes:
            d.free_fifo.append([None, d.capacity_blocks])
        self.events: list = []
        self._seq = itertools.count()
        self.now = 0.0

    def _policy_cost(self):
        return CalibratedCostModel(self.cost) if self.jittered or self.contended else self.cost

    def step_length(self, phase: str, predicted: float) -> float:
        sigma = self.sigma[phase]
        return predicted * math.exp(self.rng.gauss(-sigma**2 / 2, sigma)) if sigma else predicted

    def at(self, t: float, handler, *args) -> None:
        heapq.heappush(self.events, (t, next(self._seq), handler, args))

    def run(self, trace: list[TraceRequest]) -> list[SimRequest]:
        requests = [SimRequest(r) for r in trace]
        for r in requests:
            if r.trace.after is None:
                self.at(r.arrival_time, self.arrive, r)
            else:
                requests[r.trace.after].dependents.append(r)
        while self.events:
            self.now, _, handler, args = heapq.heappop(self.events)
            handler(*args)
            if self.contended:
                self.repace()
        return requests

    # ---- steps ----------------------------------------------------------------------------------

    def pace(self, w: PrefillSim | DecodeSim) -> float:
        """w's step length over its length alone, as the other role's workers are now. A decode
        worker's recomputation steps count as its steps."""
        if isinstance(w, PrefillSim):
            return self.config.prefill_beside_decode if any(d.busy for d in self.decodes) else 1.0
        return self.config.decode_beside_prefill if any(p.busy for p in self.prefills) else 1.0

    def start_step(self, w: PrefillSim | DecodeSim, seconds: float, observe: tuple | None, then, *args) -> None:
        """w runs a step that takes `seconds` alone; `then(w, *args)` handles its end, after the
        policy has observed its length (`observe`, where the policy calibrates)."""
        w.busy = True
        if not self.contended:  # its length is known now: no end to move
            if observe is not None:
                method, *shape = observe
                method(*shape, seconds)
            self.at(self.now + seconds, then, w, *args)
            return
        w.step = StepUnderWay(then, args, observe, self.now, seconds, self.now, self.pace(w), next(self._tokens))
        self.at(self.now + seconds * w.step.pace, self.end_step, w, w.step.token)

    def end_step(self, w: PrefillSim | DecodeSim, token: int) -> None:
        step = w.step
        if step is None or step.token != token:
            return  # an end its step's pace has moved since
        w.step = None
        if step.observe is not None:
            observe, *shape = step.observe
            observe(*shape, self.now - step.started)
        step.then(w, *step.args)

    def repace(self) -> None:
        """Where a role has started or stopped being busy, the other role's steps under way go
        on at their new pace: what is left of each, at its own pace, is carried to a new end."""
        busy = (any(p.busy for p in self.prefills), any(d.busy for d in self.decodes))
        if busy == self.roles_busy:
            return
        self.roles_busy = busy
        for w in (*self.prefills, *self.decodes):
            step = w.step
            if step is None:
                continue
            pace = self.pace(w)
            if pace != step.pace:
                step.alone_left -= (self.now - step.since) / step.pace
                step.since, step.pace, step.token = self.now, pace, next(self._tokens)
                self.at(self.now + step.alone_left * pace, self.end_step, w, step.token)

    # ---- prefill --------------------------------------------------------------------------------

    def arrive(self, r: SimRequest) -> None:
        max_len = self.config.kv_capacity_tokens // self.config.block_size * self.config.block_size
        if r.prompt_len >= max_len:
            self.refuse(r)
            return
        room = max_len - r.prompt_len
        cap = room if self.config.max_tokens is None else min(self.config.max_tokens, room)
        r.output_len = min(r.output_len, cap)
        r.max_tokens = r.output_len if self.config.max_tokens is None else cap
        worker = pick_prefill_worker(self.prefills)  # as the router places it
        worker.requests_in_hand += 1
        r.worker = pick_decode_worker(self.decodes)
        r.worker.requests_in_hand += 1
        if r.trace.hash_ids:
            hits = 0
            for h in r.trace.hash_ids:
                if h not in worker.cache:
                    break
                hits += 1
            # The last token is always computed (its logits are needed).
            r.cached = r.computed = min(hits * MOONCAKE_BLOCK_TOKENS, r.prompt_len - 1)
        worker.waiting.append(r)
        worker.queued_prompt_tokens += r.prompt_len
        if not worker.busy:
            self.start_prefill(worker)

    def refuse(self, r: SimRequest) -> None:
        """r fails at once, and the DAG calls that wait for it are never sent."""
        r.refused = True
        for d in r.dependents:
            self.refuse(d)

    def finish(self, r: SimRequest) -> None:
        """r has its last token; a DAG's next call is sent a tool's time later, with the time its
        DAG has left as its deadline (a call without one, as a closed-loop client's next
        request, keeps its SLO). Every prefill policy learns of it, as the router tells every
        prefill worker."""
        r.finish_time = self.now
        for w in self.prefills:
            w.policy.finished(r)
        for d in r.dependents:
            d.arrival_time, d.dag_start = self.now + d.trace.arrival, r.dag_start
            if d.trace.slo.deadline_ms is not None:
                left_ms = d.trace.slo.deadline_ms - (d.arrival_time - d.dag_start) * 1e3
                d.slo = replace(d.trace.slo, deadline_ms=max(MIN_SLO_MS, left_ms))
            self.at(d.arrival_time, self.arrive, d)

    def start_prefill(self, w: PrefillSim) -> None:
        """Starts a step: prompts waiting or part-way through, in the policy's order, each taking
        what is left of the token budget. A new prompt takes the KV for all its tokens as it
        starts, if that fits (once one does not, no later one starts: it would overtake it);
        one part-way through has its KV already."""
        budget = self.config.token_budget
        batch: list[tuple[SimRequest, int]] = []
        started = len(w.prefilling)

        def add(r: SimRequest) -> bool:
            nonlocal budget
            n = min(r.num_uncomputed_tokens, budget)
            if n < r.num_uncomputed_tokens and batch:
                n = w.policy.chunk(batch, r, n, self.now)
            if n == 0:
                return False
            w.prefilled_tokens += n
            # A chunk closes the step.
            budget = 0 if n < r.num_uncomputed_tokens else budget - n
            batch.append((r, n))
            return True

        if w.waiting or w.prefilling or w.expired:
            admitted = []
            admitting = True
            for r in self.prefill_order(w):
                if budget == 0:
                    break
                if r.computed != r.cached:  # part-way through
                    add(r)
                    continue
                need = r.prompt_len - r.cached
                admitting = admitting and started < self.config.max_batch and w.held + need <= w.capacity_tokens
                if admitting and add(r):
                    w.held += need
                    admitted.append(r)
                    started += 1
                else:
                    admitting = False
            chosen = set(map(id, admitted))
            w.waiting = [r for r in w.waiting if id(r) not in chosen]
            while w.expired and id(w.expired[-1]) in chosen:  # taken oldest first
                w.expired.pop()
            w.prefilling.extend(admitted)
        if not batch:
            w.busy = False
            self.send_cleared(w)  # an idle worker answers at once
            return
        self.prefill_step(w, [(n, r.computed + n) for r, n in batch], self.prefill_done, batch)

    def prefill_step(self, w: PrefillSim | DecodeSim, prompts: list[tuple[int, int]], then, batch) -> None:
        """Runs a prefill step of `prompts` ((new tokens, context after) each) on w; `then(w,
        batch)` handles its end."""
        seconds = self.step_length("prefill", self.cost.prefill_time(prompts))
        observe = (w.model.observe_prefill, prompts) if self.jittered or self.contended else None
        self.start_step(w, seconds, observe, then, batch)

    def prefill_order(self, w: PrefillSim) -> Iterable[SimRequest]:
        """The prompts in the worker's policy's order. A policy that demotes expired prompts
        ranks only those whose deadline has not passed; the expired ones follow its late ones,
        by arrival, but for those past its wait limit, which go first with its own."""
        if not w.policy.demotes_expired:
            return w.policy.order(w.prefilling + w.waiting, self.now)
        in_time = []
        for r in w.waiting:
            if r.arrival_time + r.slo.ttft_s < self.now:
                bisect.insort(w.expired, r, key=lambda q: -q.arrival_time)
            else:
                in_time.append(r)
        w.waiting = in_time
        on_time, late = w.policy.split(w.prefilling + w.waiting, self.now)
        overdue, late = w.policy.past_wait_limit(late, self.now)
        cut = len(w.expired)  # w.expired is newest first: those past the wait limit are its tail
        if w.policy.max_wait_s is not None:
            cut = bisect.bisect_left(w.expired, w.policy.max_wait_s - self.now, key=lambda q: -q.arrival_time)
        by_arrival = operator.attrgetter("arrival_time")
        return itertools.chain(heapq.merge(overdue, reversed(w.expired[cut:]), key=by_arrival), on_time,
                               heapq.merge(late, (w.expired[i] for i in range(cut - 1, -1, -1)), key=by_arrival))

    def prefill_done(self, w: PrefillSim, batch: list[tuple[SimRequest, int]]) -> None:
        capacity_blocks = self.config.kv_capacity_tokens // MOONCAKE_BLOCK_TOKENS
        self.send_cleared(w)
        for r, n in batch:
            r.computed += n
        done = [r for r, _ in batch if r.computed == r.prompt_len]
        if done:
            finished = set(map(id, done))
            w.prefilling = [r for r in w.prefilling if id(r) not in finished]
        # Between steps: the decode side has weighed these prompts' offers during this one,
        # so the KV of those it has room for leaves now, not after the next step.
        w.busy = False
        offered = {}
        for r in done:
            r.first_token_time = self.now
            r.source = w
            w.queued_prompt_tokens -= r.prompt_len
            for h in r.trace.hash_ids:
                w.cache[h] = None
                w.cache.move_to_end(h)
            while len(w.cache) > capacity_blocks:
                w.cache.popitem(last=False)
            if r.output_len <= 1:
                self.finish(r)
                r.worker.requests_in_hand -= 1
                w.requests_in_hand -= 1
                w.held -= r.prompt_len - r.cached
            else:
                offered.setdefault(id(r.worker), (r.worker, []))[1].append(r)
        for d, requests in offered.values():
            self.offer(d, requests)
        self.start_prefill(w)

    # ---- transfer and decode --------------------------------------------------------------------

    def offer(self, d: DecodeSim, requests: list[SimRequest]) -> None:
        """Offers made together (a step's prompts) are ranked together, as the decode worker
        ranks every offer it has taken in when it looks for room."""
        d.pending.extend(requests)  # backpressure: what does not go now waits on the prefill side
        self.transfer_waiting(d)

    def take(self, d: DecodeSim, n: int) -> None:
        """n free blocks go into use, those freed longest ago first (as the engine's free list
        gives them out): a preempted sequence loses cached blocks as they are taken, its last
        ones first (the engine frees a sequence's blocks tail first)."""
        d.used_blocks += n
        while n > 0 and d.free_fifo:
            segment = d.free_fifo[0]
            taken = min(n, segment[1])
            segment[1] -= taken
            n -= taken
            if segment[0] is not None:
                segment[0].cached_blocks -= taken
            if not segment[1]:
                d.free_fifo.popleft()

    def give(self, d: DecodeSim, kv_tokens: int, preempted: SimRequest | None = None) -> None:
        """Frees the blocks of kv_tokens tokens of KV. A preempted sequence's full blocks stay
        cached (the engine keeps their hashes) until taken; a partial one holds nothing a prefix
        match could find."""
        full = kv_tokens // d.block_size if preempted is not None else 0
        for owner, n in ((None, self.blocks(d, kv_tokens) - full), (preempted, full)):
            if n:
                d.used_blocks -= n
                segment = [owner, n]
                d.free_fifo.append(segment)
                if owner is not None:
                    owner.cached_blocks, owner.cache_segment = n, segment

    def transfer(self, d: DecodeSim, r: SimRequest) -> None:
        """The decode worker has reserved room: the KV leaves as soon as its prefill worker is
        between steps."""
        self.take(d, self.blocks(d, r.prompt_len))
        d.inflight_bytes += self.kv_bytes(r)
        d.incoming += 1
        if r.source is not None and r.source.busy and not self.config.kv_sent_during_steps:
            r.source.cleared.append((d, r))
        else:
            self.send_kv(d, r)

    def send_cleared(self, w: PrefillSim) -> None:
        """The prefill worker is between steps: the KV cleared meanwhile leaves now."""
        cleared, w.cleared = w.cleared, []
        for d, r in cleared:
            self.send_kv(d, r)

    def send_kv(self, d: DecodeSim, r: SimRequest) -> None:
        seconds = self.kv_bytes(r) / (self.config.kv_bandwidth_gb_s * 1e9)
        d.link_free_at = max(self.now, d.link_free_at) + seconds
        self.at(d.link_free_at, self.transfer_done, d, r)

    def transfer_done(self, d: DecodeSim, r: SimRequest) -> None:
        d.ready.append(r)
        d.inflight_bytes -= self.kv_bytes(r)
        d.incoming -= 1
        self.transfer_waiting(d)  # room in flight has freed
        if not d.busy:
            self.decode_step(d)
        w = r.source
        w.held -= r.prompt_len - r.cached  # the KV has landed: the prefill worker frees it
        w.requests_in_hand -= 1
        if not w.busy:
            self.start_prefill(w)  # in case it waited for room

    def transfer_waiting(self, d: DecodeSim) -> None:
        """Ranks the waiting KV by the decode policy, then moves it in while there is room, as
        the decode worker does whenever room may have come (an offer, a landing, a finish); not
        while the KV under way leaves no room, when nothing could go."""
        if d.pending and d.inflight_bytes < self.config.max_inflight_transfer_bytes:
            feasible, lost = d.policy.split(d.pending, d.running, self.now)
            for r in lost:
                heapq.heappush(d.given_up, (r.arrival_time, next(self._seq), r))
            d.pending = deque(feasible)
        self.move_in(d)

    def kv_bytes(self, r: SimRequest) -> int:
        return r.prompt_len * self.config.kv_bytes_per_token

    @staticmethod
    def blocks(d: DecodeSim, tokens: int) -> int:
        return -(-tokens // d.block_size)

    def fits(self, d: DecodeSim, r: SimRequest) -> bool:
        """Whether r's KV may go under way: blocks for its prompt with one spare per running,
        ready or incoming sequence and all those that preempted sequences not yet recomputing
        need (an empty worker takes anything), and room in flight (one transfer can always go)."""
        spare = len(d.running) + len(d.ready) + d.incoming
        spare += sum(self.blocks(d, q.num_tokens) for q in d.preempted if not q.recomputed)
        room = d.used_blocks + self.blocks(d, r.prompt_len) + spare <= d.capacity_blocks or not d.used_blocks
        return room and (not d.inflight_bytes
                         or d.inflight_bytes + self.kv_bytes(r) <= self.config.max_inflight_transfer_bytes)

    def move_in(self, d: DecodeSim) -> None:
        """Moves waiting KV in, in its last ranking, while it fits."""
        while d.pending and self.fits(d, d.pending[0]):
            self.transfer(d, d.pending.popleft())
        while not d.pending and d.given_up and self.fits(d, d.given_up[0][2]):
            self.transfer(d, heapq.heappop(d.given_up)[2])

    def decode_step(self, d: DecodeSim) -> None:
        """Starts the worker's next step (the previous one, if any, has just ended): a step
        recomputing preempted sequences if one can go, as the engine puts prefill first, else a
        decode step."""
        if d.preempted and self.recompute_step(d):
            return
        if d.ready:
            free_blocks = d.capacity_blocks - d.used_blocks
            admitted = d.policy.admit(d.running, d.ready, self.now, free_blocks)
            if admitted:
                chosen = set(map(id, admitted))
                d.ready = [r for r in d.ready if id(r) not in chosen]
                for r in admitted:
                    self.join(d, r)
        if not d.running:
            d.busy = False
            return
        self.grow(d)
        seconds = self.step_length("decode", self.cost.decode_time(len(d.running), d.context))
        observe = (d.model.observe_decode, len(d.running), d.context) if self.jittered or self.contended else None
        self.start_step(d, seconds, observe, self.decode_step_done)

    def join(self, d: DecodeSim, r: SimRequest) -> None:
        """r joins the running batch with its KV (all but its last token's) in place."""
        r.join_step, r.decoding = d.steps, True
        d.running.append(r)
        d.context += r.num_tokens
        # Its context before a step is num_tokens - 1; a step whose context sits on a block
        # boundary needs a new block for the token it writes.
        r.crossing = (d.steps - (r.num_tokens - 1)) % d.block_size
        d.crossings[r.crossing] += 1
        heapq.heappush(d.finishing, (d.steps + r.output_len - r.outputs_at_join, next(self._seq), r, r.epoch))

    def leave(self, d: DecodeSim, r: SimRequest, preempted: bool = False) -> None:
        """r leaves the running batch and gives back its blocks (a preempted one's stay cached)."""
        d.context -= r.num_tokens
        self.give(d, r.num_tokens - 1, r if preempted else None)  # its KV: all but the last token's
        d.crossings[r.crossing] -= 1
        r.outputs_at_join = r.num_output_tokens
        r.decoding = False

    def grow(self, d: DecodeSim) -> None:
        """Gives a block to every running sequence that crosses a block boundary this step,
        preempting the newest sequences while the blocks fall short, then the newest ready
        ones (as the engine does)."""
        phase = d.steps % d.block_size
        while d.crossings[phase] > d.capacity_blocks - d.used_blocks and (len(d.running) > 1 or d.ready):
            if len(d.running) > 1:
                victim = d.running.pop()
                self.leave(d, victim, preempted=True)
                victim.epoch += 1
            else:
                victim = d.ready.pop()
                self.give(d, victim.prompt_len, victim)
            victim.recomputed = 0
            d.preemptions += 1
            bisect.insort(d.preempted, victim, key=lambda q: q.arrival_time)
        self.take(d, d.crossings[phase])

    def recompute_step(self, d: DecodeSim) -> bool:
        """Starts a prefill step that computes preempted sequences' KV again (their prompt and
        the output so far), oldest first and chunked to the token budget. As the engine starts a
        prompt, a sequence starts recomputing only if the blocks for all of it are free (it
        takes them at once) and the batch has a seat; one part-way through goes on. What is left
        of its KV in the cache is taken back, not computed again (the last token always is)."""
        budget = self.config.token_budget
        batch = []
        seats = self.config.max_batch - len(d.running)
        for r in d.preempted:
            if budget == 0:
                break
            total = r.num_tokens
            if not r.recomputed:
                if len(batch) >= seats or self.blocks(d, total) > d.capacity_blocks - d.used_blocks:
                    break
                cached = min(r.cached_blocks, (total - 1) // d.block_size)
                if r.cache_segment is not None:
                    r.cache_segment[0] = None  # the engine's prefix match takes them out of the free list
                    r.cache_segment[1] -= cached
                    d.used_blocks += cached
                r.cached_blocks, r.cache_segment = 0, None
                r.recomputed = cached * d.block_size
                self.take(d, self.blocks(d, total) - cached)
            n = min(total - r.recomputed, budget)
            budget -= n
            d.recomputed_tokens += n
            batch.append((r, n))
        if not batch:
            return False
        self.prefill_step(d, [(n, r.recomputed + n) for r, n in batch], self.recompute_done, batch)
        return True

    def recompute_done(self, d: DecodeSim, batch: list[tuple[SimRequest, int]]) -> None:
        for r, n in batch:
            r.recomputed += n
            if r.recomputed < r.num_tokens:
                continue
            d.preempted.remove(r)
            r.outputs_at_join += 1  # the step samples its next token
            d.tokens_out += 1
            if r.num_output_tokens < r.output_len:
                self.join(d, r)  # with the blocks it holds (num_tokens - 1 tokens of KV)
            else:
                self.finish(r)
                d.requests_in_hand -= 1
                self.give(d, r.recomputed)
                d.policy.finished(r)
                if d.pending or d.given_up:
                    self.transfer_waiting(d)
        self.decode_step(d)

    def decode_step_done(self, d: DecodeSim) -> None:
        d.steps += 1
        d.context += len(d.running)
        d.tokens_out += len(d.running)
        done = []
        while d.finishing and d.finishing[0][0] <= d.steps:
            _, _, r, epoch = heapq.heappop(d.finishing)
            if epoch == r.epoch:
                done.append(r)
        if done:
            finished = set(map(id, done))
            d.running = [r for r in d.running if id(r) not in finished]
            for r in done:
                self.finish(r)
                d.requests_in_hand -= 1
                self.leave(d, r)
                d.policy.finished(r)
            if d.pending or d.given_up:
                self.transfer_waiting(d)
        self.decode_step(d)


def simulate(trace: list[TraceRequest], config: SimConfig, cost: CostModel) -> dict:
    """The SLO report of the trace's run. A refused request (longer than a worker's KV cache)
    counts as a miss of every SLO."""
    sim = Simulator(config, cost)
    return simulation_report(sim, sim.run(trace))


def simulation_report(sim: Simulator, requests: list[SimRequest]) -> dict:
    """The SLO report of a finished simulation of these requests (see `simulate`)."""
    config = sim.config
    served = [r for r in requests if not r.refused]
    unfinished = [r for r in served if math.isnan(r.finish_time)]
    if unfinished:  # a stall: a bug of the simulator or a policy, never a result
        raise RuntimeError(f"{len(unfinished)} requests never finished in the simulation")
    if not served:
        raise ValueError(f"every request's prompt is longer than the KV cache ({config.kv_capacity_tokens} tokens)")
    result = metrics(served, sum(d.tokens_out for d in sim.decodes))
    for key in ("ttft_attainment", "tpot_attainment", "e2e_attainment"):
        result[key] = result[key] * len(served) / len(requests)
    if any(r.slo.kind != "latency" for r in requests):
        result["service"] = service_metrics(requests)
    return {**result, "refused": len(requests) - len(served), "preemptions": sum(d.preemptions for d in sim.decodes),
            "recomputed_tokens": sum(d.recomputed_tokens for d in sim.decodes)}
