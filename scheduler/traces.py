"""Request traces: Azure LLM inference CSVs, Mooncake-style JSONL and synthetic workloads, with
time compression, windowing and SLO assignment. Pure Python.

A trace is a list of `TraceRequest`, arrivals in seconds from the trace's start, sorted.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from kairos.scheduler.request import RequestSLO

MOONCAKE_BLOCK_TOKENS = 512
FORMATS = ("azure", "mooncake", "synthetic")


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds since the start of the trace
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # Mooncake: one id per 512-token prompt block; equal ids, shared prefix
    slo: RequestSLO = RequestSLO()
    # A DAG's later call, or a closed-loop client's next request: the index in the trace of the
    # request it waits for. Its `arrival` is then the seconds after that one ends (an agent's
    # tool time, a user's think time); a DAG's call's SLO deadline_ms is the DAG's, from the
    # DAG's first call.
    after: int | None = None


def load_azure(path: str | Path) -> list[TraceRequest]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not an Azure LLM trace: no {', '.join(sorted(missing))} column")
        for line, row in enumerate(reader, start=2):
            try:
                stamp = datetime.datetime.fromisoformat(row["TIMESTAMP"][:26])
                rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
    if not rows:
        raise ValueError(f"{path} has no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return [TraceRequest((t - start).total_seconds(), max(1, p), max(1, o)) for t, p, o in rows]


def load_mooncake(path: str | Path) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                stamp, hash_ids = float(row["timestamp"]), row.get("hash_ids", [])
                if not math.isfinite(stamp):
                    raise ValueError(f"timestamp {stamp}")
                if not isinstance(hash_ids, list) or not all(type(h) is int for h in hash_ids):
                    raise ValueError("hash_ids must be a list of integers")
                out.append(TraceRequest(stamp / 1e3, max(1, int(row["input_length"])),
                                        max(1, int(row["output_length"])), tuple(hash_ids)))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{line_no}: not a Mooncake trace record ({e!r})") from None
    if not out:
        raise ValueError(f"{path} has no requests")
    out.sort(key=lambda r: r.arrival)
    start = out[0].arrival
    return [replace(r, arrival=r.arrival - start) for r in out]


def synthetic(num_requests: int = 1000, rate: float = 5.0, arrival: str = "poisson", burstiness: float = 1.0,
              lengths: str = "lognormal", prompt_mean: int = 1000, output_mean: int = 150, max_len: int = 8192,
              long_share: float = 0.0, long_mean: int = 16000, prefix_groups: int = 0, prefix_len: int = 2048,
              seed: int = 0) -> list[TraceRequest]:
    """Poisson or Gamma arrivals (Gamma with `burstiness` = squared coefficient of variation of
    the gaps; 1 is Poisson), lognormal or Zipf lengths with the given means, each at most
    max_len tokens (prompt and output together).

    Long-context mixes: a `long_share` of the prompts have mean `long_mean` (bimodal). Shared
    prefixes: with `prefix_groups` > 0, each request belongs to one of that many groups (a
    system prompt, a document), whose first `prefix_len` tokens its prompt shares; the trace
    then carries Mooncake-style `hash_ids`, one per 512-token block, equal across a group's
    shared blocks and unique elsewhere."""
    rng = random.Random(seed)
    if arrival not in ("poisson", "gamma") or lengths not in ("lognormal", "zipf"):
        raise ValueError("arrival is poisson or gamma; lengths lognormal or zipf")
    if not (rate > 0 and burstiness > 0):
        raise ValueError(f"a synthetic trace needs a positive rate and burstiness, got {rate} and {burstiness}")
    if not 0 <= long_share <= 1 or min(prompt_mean, output_mean, long_mean, prefix_len) < 1 or prefix_groups < 0:
        raise ValueError("synthetic lengths: means and the prefix length at least 1, the long share in [0, 1], "
                         "prefix groups at least 0")
    if max_len < 2:
        raise ValueError(f"the synthetic maximum length must be at least 2 tokens, got {max_len}")

    def gap() -> float:
        if arrival == "poisson":
            return rng.expovariate(rate)
        shape = 1.0 / burstiness
        return rng.gammavariate(shape, 1.0 / (rate * shape))

    def length(mean: int) -> int:
        if lengths == "lognormal":
            sigma = 1.0
            value = rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)
        else:  # Zipf-like: a Pareto tail with exponent 1.5, scaled to the mean
            value = mean / 3 * rng.paretovariate(1.5)
        return max(1, min(max_len, int(value)))

    unique_ids = itertools.count(prefix_groups * (prefix_len // MOONCAKE_BLOCK_TOKENS + 1))
    t, out = 0.0, []
    for _ in range(num_requests):
        prompt = min(max_len - 1, length(long_mean if long_share and rng.random() < long_share else prompt_mean))
        output = min(max_len - prompt, length(output_mean))
        hash_ids: tuple[int, ...] = ()
        if prefix_groups:
            group = rng.randrange(prefix_groups)
            blocks = -(-prompt // MOONCAKE_BLOCK_TOKENS)
            shared = min(blocks, prefix_len // MOONCAKE_BLOCK_TOKENS)
            first = group * (prefix_len // MOONCAKE_BLOCK_TOKENS + 1)
            hash_ids = tuple(range(first, first + shared)) + tuple(next(unique_ids) for _ in range(blocks - shared))
        out.append(TraceRequest(t, prompt, output, hash_ids))
        t += gap()
    return out


def mixed(trace: list[TraceRequest], throughput_share: float = 0.2, collective_share: float = 0.1,
          dag_calls: tuple[int, int] = (3, 8), deadline_ms_per_token: float = 40.0,
          tool_s: tuple[float, float] = (0.1, 0.5), seed: int = 0) -> list[TraceRequest]:
    """A mixed workload from a trace (with SLOs): its arrivals and lengths, a `throughput_share`
    of the requests turned throughput-intensive and a `collective_share` into the first call of
    an agent's DAG; the rest stay latency-sensitive.

    A throughput request's whole response is due `ttft_ms + deadline_ms_per_token` x its output
    length after it arrives: sooner than its TPOT SLO would pace it, as a tool waiting for a
    whole answer needs. A DAG has dag_calls (inclusive range) calls, one after another, the later
    ones with lengths drawn from the trace and sent a tool's time (`tool_s`) after the call before
    ends; its deadline is the sum of its calls' throughput deadlines plus the tool times. The DAG's
    later calls come at the end of the list, each naming the call it follows (`after`)."""
    if not (0 <= throughput_share and 0 <= collective_share and throughput_share + collective_share <= 1):
        raise ValueError("the throughput and collective shares must be >= 0 and sum to at most 1")
    rng = random.Random(seed)
    out, later, roots = [], [], {}

    def due_ms(r: TraceRequest) -> float:
        return r.slo.ttft_ms + deadline_ms_per_token * r.output_len

    for i, r in enumerate(trace):
        u = rng.random()
        if u < throughput_share:
            out.append(replace(r, slo=replace(r.slo, kind="throughput", deadline_ms=due_ms(r))))
        elif u < throughput_share + collective_share:
            calls = [r] + [trace[rng.randrange(len(trace))] for _ in range(rng.randint(*dag_calls) - 1)]
            gaps = [rng.uniform(*tool_s) for _ in calls[1:]]
            deadline = sum(map(due_ms, calls)) + 1e3 * sum(gaps)
            dag = f"dag-{i}"
            roots[dag] = len(out)
            out.append(replace(r, slo=replace(r.slo, kind="collective", deadline_ms=deadline, dag_id=dag)))
            for stage, (call, gap) in enumerate(zip(calls[1:], gaps), start=1):
                later.append((stage, call, gap, dag, deadline))
        else:
            out.append(r)
    # A later call follows the call before it in its DAG, which is the root or the previous entry.
    for stage, call, gap, dag, deadline in later:
        before = roots[dag] if stage == 1 else len(out) - 1
        out.append(replace(call, arrival=gap, hash_ids=(), after=before,
                           slo=replace(call.slo, kind="collective", deadline_ms=deadline, dag_id=dag, dag_stage=stage)))
    return out


def load_trace(path_or_name: str, trace_format: str, **synthetic_args) -> list[TraceRequest]:
    if trace_format == "synthetic":
        return synthetic(**synthetic_args)
    if trace_format == "azure":
        return load_azure(path_or_name)
    if trace_format == "mooncake":
        return load_mooncake(path_or_name)
    raise ValueError(f"unknown trace format {trace_format!r}; available: {', '.join(FORMATS)}")


def shape(trace: list[TraceRequest], rate_scale: float = 1.0, start_s: float = 0.0,
          duration_s: float | None = None, limit: int | None = None) -> list[TraceRequest]:
    """The window [start_s, start_s + duration_s) of the original timeline, then time compressed
    by rate_scale (2 = twice the rate), rebased to start at 0."""
    if not 0 < rate_scale < math.inf:
        raise ValueError(f"--rate-scale must be positive, got {rate_scale}")
    end = math.inf if duration_s is None else start_s + duration_s
    window = [r for r in trace if start_s <= r.arrival < end][:limit]
    if not window:
        raise ValueError("the trace window holds no requests")
    return [replace(r, arrival=(r.arrival - start_s) / rate_scale) for r in window]


def with_slos(trace: list[TraceRequest], ttft_slo_ms: float, tpot_slo_ms: float,
              ttft_ms_per_1k_prompt: float = 0.0) -> list[TraceRequest]:
    """Fixed SLOs; with ttft_ms_per_1k_prompt > 0, the TTFT SLO grows with the prompt: a long
    prompt's prefill cannot be as fast as a short one's, so its target is
    ttft_slo_ms + ttft_ms_per_1k_prompt * prompt_len / 1000."""
    base = RequestSLO(ttft_slo_ms, tpot_slo_ms)
    if not ttft_ms_per_1k_prompt >= 0:
        raise ValueError(f"--ttft-ms-per-1k-prompt must be >= 0, got {ttft_ms_per_1k_prompt}")
    if not ttft_ms_per_1k_prompt:
        return [replace(r, slo=base) for r in trace]
    return [replace(r, slo=replace(base, ttft_ms=ttft_slo_ms + ttft_ms_per_1k_prompt * r.prompt_len / 1000))
            for r in trace]
