"""Compiled loops for the scheduling work that grows with the number of requests: predicted
remaining outputs, TPOT feasibility and ranking for decode admission, and the walk that finds
which prompts prefill on time.

The policies read each request's numbers as arrays (`request_queue.columns_of`: kept by a
RequestQueue, or gathered once per decision) and hand them here;
numba compiles these functions (cached on disk), importing only when one is first called, so
that processes which never rank a long queue do not pay for it. `warm_up` compiles them ahead
of serving. Without numba, or with KAIROS_NUMBA=0, the policies keep to their plain-Python
paths, which decide exactly the same: the tests hold the two to that.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

from kairos.scheduler.output_length import NUM_BUCKETS
from kairos.scheduler.request_queue import columns_of

try:
    import numpy as np
except ImportError:  # the scheduler runs without numpy, on its plain-Python paths
    np = None

ENABLED = os.environ.get("KAIROS_NUMBA", "1") != "0" and importlib.util.find_spec("numba") is not None
# Below this many requests, gathering arrays costs more than the plain-Python paths do.
MIN_REQUESTS = 32

_FUNCTIONS = []


def compiled(fn):
    """Marks fn for numba. Until the first call of any marked function, each is a stand-in that
    compiles them all (numba resolves the calls between them when it compiles the caller)."""
    if not ENABLED:
        return fn
    _FUNCTIONS.append(fn)

    @functools.wraps(fn)
    def first_call(*args):
        _compile_all()
        return globals()[fn.__name__](*args)

    return first_call


def _compile_all() -> None:
    from numba import njit

    for fn in _FUNCTIONS:
        globals()[fn.__name__] = njit(cache=True, nogil=True)(fn)


def warm_up() -> None:
    """Compiles (or loads from the disk cache) every function for the types the policies pass."""
    if not ENABLED:
        return
    ints, floats = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float64)
    remaining_outputs(ints, ints + 1, ints - 1, np.zeros((1, 3), dtype=np.int64), ints, np.zeros(2, dtype=np.int64),
                      16, 0.9)
    slack_order(0.0, 0.0, 0.0, floats, floats, floats, ints, ints + 1)
    late_prompts(floats, floats, ints + 1, 0.0, 8192, 0.0, True)
    admission_prefix(0, 0, math.inf, ints, floats, 256, 1000, 0.0, 0.0, 0.0)


@compiled
def remaining_outputs(produced, max_tokens, hint, pools, lengths, starts, min_samples, quantile):
    """Predicted tokens still to come per request (OutputLengthEstimator.remaining): its hint
    (-1 for none), else the quantile of the lengths above what it has produced in the first of
    its pools (pools[i]: most specific first; pool p's sorted lengths are lengths[starts[p]:
    starts[p + 1]]) that holds enough of them (min_samples, one in the last), at most its
    max_tokens."""
    out = np.empty(produced.shape[0], dtype=np.int64)
    levels = pools.shape[1]
    for i in range(produced.shape[0]):
        cap = max(1, max_tokens[i] - produced[i])
        out[i] = cap
        if hint[i] >= 0:
            out[i] = max(1, min(cap, hint[i] - produced[i]))
            continue
        for level in range(levels):
            p = pools[i, level]
            ordered = lengths[starts[p]:starts[p + 1]]
            longer = ordered.shape[0] - np.searchsorted(ordered, produced[i], side="right")
            if longer >= (min_samples if level < levels - 1 else 1):
                length = ordered[ordered.shape[0] - longer + min(longer - 1, int(quantile * longer))]
                out[i] = max(1, min(cap, length - produced[i]))
                break
    return out


@compiled
def lost_mask(now, step, first_token, tpot_s, produced, remaining):
    """SlackBatching.lost over arrays: who misses its TPOT SLO even at steps of `step` seconds."""
    budget = tpot_s * (produced - 1 + remaining)
    return (now - first_token) + remaining * step > budget


@compiled
def slack_order(now, step, aging, arrival, first_token, tpot_s, produced, remaining):
    """SlackBatching.split over arrays: (feasible indices, shortest aged remaining output first;
    lost indices, oldest first), both stable."""
    lost = lost_mask(now, step, first_token, tpot_s, produced, remaining)
    key = remaining - aging * (now - first_token)
    feasible = np.nonzero(~lost)[0]
    late = np.nonzero(lost)[0]
    feasible = feasible[np.argsort(key[feasible], kind="mergesort")]
    late = late[np.argsort(arrival[late], kind="mergesort")]
    return feasible, late


@compiled
def _heap_above(keys, ids, a, b):
    return keys[a] > keys[b] or (keys[a] == keys[b] and ids[a] < ids[b])


@compiled
def _sift_down(keys, ids, size, pos):
    while True:
        top, left, right = pos, 2 * pos + 1, 2 * pos + 2
        if left < size and _heap_above(keys, ids, left, top):
            top = left
        if right < size and _heap_above(keys, ids, right, top):
            top = right
        if top == pos:
            return
        keys[pos], keys[top] = keys[top], keys[pos]
        ids[pos], ids[top] = ids[top], ids[pos]
        pos = top


@compiled
def _sift_up(keys, ids, pos):
    while pos > 0:
        parent = (pos - 1) // 2
        if not _heap_above(keys, ids, pos, parent):
            return
        keys[pos], keys[parent] = keys[parent], keys[pos]
        ids[pos], ids[parent] = ids[parent], ids[pos]
        pos = parent


@compiled
def late_prompts(due, own, tokens, fixed, budget, now, drop_longest):
    """_Predicting.split_on_time over arrays in prefill order: which prompts finish late. Kept
    prompts sit in a max-heap by the time each added (ties: the earlier first), from which
    drop_longest (Moore-Hodgson) gives up the costliest when that saves more time."""
    n = due.shape[0]
    late = np.zeros(n, dtype=np.bool_)
    heap_keys = np.empty(n, dtype=np.float64)
    heap_ids = np.empty(n, dtype=np.int64)
    size = 0
    t, step_tokens = now, budget  # the first prompt opens a step
    for i in range(n):
        opens_step = step_tokens + tokens[i] > budget
        added = own[i] + (fixed * -(-tokens[i] // budget) if opens_step else 0.0)
        if t + added <= due[i]:
            heap_keys[size], heap_ids[size] = added, i
            _sift_up(heap_keys, heap_ids, size)
            size += 1
            t = t + added
            step_tokens = (tokens[i] - 1) % budget + 1 if opens_step else step_tokens + tokens[i]
        elif drop_longest and size > 0 and heap_keys[0] > added:
            late[heap_ids[0]] = True
            t += added - heap_keys[0]
            heap_keys[0], heap_ids[0] = added, i
            _sift_down(heap_keys, heap_ids, size, 0)
        else:
            late[i] = True
    return late


@compiled
def admission_prefix(batch, context, tightest, tokens, limits, max_batch, free_blocks, alpha, beta, gamma):
    """SlackBatching.admit's walk down its order: how many requests join before one would
    push the predicted step past the tightest step limit, or the batch or the blocks run out."""
    for i in range(tokens.shape[0]):
        if batch >= max_batch or (batch and free_blocks < batch + 1):
            return i
        limit = min(tightest, limits[i])
        if batch and alpha + beta * (batch + 1) + gamma * (context + tokens[i]) > limit:
            return i
        batch, context, tightest = batch + 1, context + tokens[i], limit
    return tokens.shape[0]


# ---- the policies' array paths: gather each request's numbers once, decide, map back ----------


def _estimator_arrays(estimator):
    """(class -> row, pools, every pool's sorted lengths end to end, where each pool starts and
    the last ends), cached on the estimator until it observes a new length (and each key's
    lengths until that key sees one: a finished request changes three). Pools: pools[row,
    bucket] is the pool of that class and prompt bucket, pools[row, NUM_BUCKETS] the class's,
    pools[row, NUM_BUCKETS + 1] every request's; a class never seen has row len(class -> row),
    and a key without lengths the empty pool after the last."""
    if estimator.arrays is None:
        by_key = estimator.lengths_by_key()
        cached = estimator.key_arrays
        for key, v in by_key.items():
            if key not in cached:
                cached[key] = np.array(v, dtype=np.int64)
        parts = [cached[key] for key in by_key]
        index = {key: i for i, key in enumerate(by_key)}
        empty = len(index)
        classes = {key[0]: None for key in by_key if key}
        rows = {c: i for i, c in enumerate(classes)}
        pools = np.full((len(rows) + 1, NUM_BUCKETS + 2), empty, dtype=np.int64)
        pools[:, NUM_BUCKETS + 1] = index.get((), empty)
        for key, i in index.items():
            if len(key) == 2:
                pools[rows[key[0]], key[1]] = i
            elif key:
                pools[rows[key[0]], NUM_BUCKETS] = i
        starts = np.cumsum([0] + [len(v) for v in parts] + [0]).astype(np.int64)
        lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        estimator.arrays = (rows, pools, lengths, starts)
    return estimator.arrays


def prompt_buckets(prompt):
    """output_length.prompt_bucket of each prompt length (int64 array), exactly."""
    n = np.maximum(prompt, 1)
    octave = np.frexp(n.astype(np.float64))[1].astype(np.int64) - 1  # exact below 2**53
    return 2 * octave + (n * n >= np.left_shift(1, 2 * octave + 1))


def remaining_of(columns, estimator):
    """OutputLengthEstimator.remaining of every request of these columns."""
    rows, pools, lengths, starts = _estimator_arrays(estimator)
    unseen = len(rows)
    row = np.array([rows.get(c, unseen) for c in columns.class_names], dtype=np.int64)[columns.class_code]
    chosen = np.stack([pools[row, prompt_buckets(columns.prompt)], pools[row, NUM_BUCKETS],
                       pools[row, NUM_BUCKETS + 1]], axis=1)
    return remaining_outputs(columns.produced, columns.max_tokens, columns.hint, chosen, lengths, starts,
                             estimator.min_samples, estimator.quantile)


def _items(requests) -> list:
    return requests if isinstance(requests, list) else list(requests)


def slack_order_of(requests, now: float, step: float, aging: float, estimator):
    """SlackBatching.split as indices into requests: (feasible, shortest aged remaining output
    first; lost, oldest first), the requests' columns and their predicted remaining outputs."""
    columns = columns_of(requests)
    remaining = remaining_of(columns, estimator)
    feasible, lost = slack_order(now, step, aging, columns.arrival, columns.first_token, columns.tpot_s,
                                 columns.produced, remaining)
    return feasible, lost, columns, remaining


def slack_split(waiting, now: float, step: float, aging: float, estimator) -> tuple[list, list]:
    """SlackBatching.split: (feasible requests, shortest aged remaining output first; lost ones,
    oldest first)."""
    feasible, lost, _, _ = slack_order_of(waiting, now, step, aging, estimator)
    items = _items(waiting)
    return [items[i] for i in feasible.tolist()], [items[i] for i in lost.tolist()]


def _step_limits(tpot, context, lost, cost, headroom: float, kept_throughput: float):
    """SlackBatching.step_limit of requests with these TPOT SLOs, contexts and lost flags (arrays)."""
    alpha, beta, gamma = cost.decode
    alone = np.maximum(0.0, alpha + beta * 1 + gamma * context)  # decode_time(1, context)
    kept = np.minimum(tpot, np.maximum(tpot * headroom, cost.decode_limit_keeping(tpot, kept_throughput)))
    return np.where(lost | (alone > tpot), math.inf, kept)


def tightest_step_limit(running, now: float, step: float, estimator, cost, headroom: float,
                        kept_throughput: float) -> float:
    """SlackBatching's smallest step_limit over the running batch, each request judged lost or
    not at steps of `step` seconds."""
    columns = columns_of(running)
    lost = lost_mask(now, step, columns.first_token, columns.tpot_s, columns.produced,
                     remaining_of(columns, estimator))
    return float(_step_limits(columns.tpot_s, columns.num_tokens, lost, cost, headroom, kept_throughput).min())


def slack_admission(ready, now: float, step: float, aging: float, estimator, batch: int, context: int,
                    tightest: float, max_batch: int, free_blocks: int, cost, headroom: float,
                    kept_throughput: float, rescue: bool) -> list:
    """SlackBatching.admit: the ready requests that join, in its order, by the walk of
    admission_prefix (which stops by the time the batch is full: only the order's head can
    join), then, with `rescue`, those of the feasible ones left out that SlackBatching.rescued
    takes."""
    feasible, lost, columns, remaining = slack_order_of(ready, now, step, aging, estimator)
    head = np.concatenate([feasible, lost])[: max_batch - batch + 1]
    tokens = columns.num_tokens[head]
    limits = _step_limits(columns.tpot_s[head], tokens, np.arange(head.shape[0]) >= feasible.shape[0], cost,
                          headroom, kept_throughput)
    alpha, beta, gamma = cost.decode
    count = admission_prefix(batch, context, tightest, tokens, limits, max_batch, free_blocks, alpha, beta, gamma)
    items = _items(ready)
    admitted = head[:count]
    room = min(max_batch, free_blocks) - batch - count
    if rescue and count < feasible.shape[0] and room > 0:
        refused = feasible[count:]
        next_step = cost.decode_time(batch + count, context + int(tokens[:count].sum()))
        numbers = (columns.first_token[refused], columns.tpot_s[refused], columns.produced[refused],
                   remaining[refused])
        about_lost = ~lost_mask(now, next_step, *numbers) & lost_mask(now + next_step, next_step, *numbers)
        admitted = np.concatenate([admitted, refused[about_lost][:room]])
    return [items[i] for i in admitted.tolist()]


def on_time_split(waiting, now: float, prefill_coefficients, token_budget: int, least_slack: bool):
    """_Predicting.split_by: ordered by least slack or else by deadline, then (on time, late
    ones oldest first), late by the walk of late_prompts."""
    fixed, b, c = prefill_coefficients
    columns = columns_of(waiting)
    arrival, new = columns.arrival, columns.uncomputed
    due = arrival + columns.ttft_s
    own = b * new + c * new * columns.num_tokens
    order = np.argsort(due - own if least_slack else due, kind="stable")
    late = late_prompts(due[order], own[order], new[order], fixed, token_budget, now, not least_slack)
    demoted = order[late]  # in prefill order, then by arrival, as split_on_time leaves them
    demoted = demoted[np.argsort(arrival[demoted], kind="stable")]
    items = _items(waiting)
    return [items[i] for i in order[~late].tolist()], [items[i] for i in demoted.tolist()]
