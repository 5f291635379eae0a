"""How a served request is judged, simulated or live: its time per output token, whether it met
its SLO, and the SLO report of a run. The router, the decode workers, the simulator and the
benchmarks all count by these.

A request here has `arrival_time`, `first_token_time`, `finish_time` (seconds, one clock),
`output_len` and `slo` (a RequestSLO)."""

from __future__ import annotations

import math


def time_per_output_token(first_token_time: float, last_token_time: float, output_tokens: int) -> float:
    """Seconds per token after the first (0 for a single token): the first token's time is the
    TTFT's, and each later one's the TPOT's."""
    return (last_token_time - first_token_time) / (output_tokens - 1) if output_tokens > 1 else 0.0


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(values)
    return {f"p{q}": s[min(len(s) - 1, int(q / 100 * len(s)))] for q in (50, 90, 99)}


class NothingServed(RuntimeError):
    """Every request of a live run failed: there is nothing to report on."""


def metrics(requests: list, decode_tokens: int | None = None) -> dict:
    """The SLO report of finished requests: attainment, latency percentiles and decode
    throughput (by default, every token after each request's first)."""
    ttft_ms, tpot_ms, ttft_ok, tpot_ok, both = [], [], 0, 0, 0
    for r in requests:
        ttft = r.first_token_time - r.arrival_time
        tpot = time_per_output_token(r.first_token_time, r.finish_time, r.output_len)
        ttft_ms.append(ttft * 1e3)
        tpot_ms.append(tpot * 1e3)
        a, b = ttft <= r.slo.ttft_s, tpot <= r.slo.tpot_s
        ttft_ok += a
        tpot_ok += b
        both += a and b
    n = len(requests)
    span = max(r.finish_time for r in requests) - min(r.arrival_time for r in requests)
    tokens = decode_tokens if decode_tokens is not None else sum(r.output_len - 1 for r in requests)
    return {"requests": n, "ttft_attainment": ttft_ok / n, "tpot_attainment": tpot_ok / n, "e2e_attainment": both / n,
            "decode_throughput_tok_s": tokens / span if span > 0 else 0.0,
            "ttft_ms": percentiles(ttft_ms), "tpot_ms": percentiles(tpot_ms)}


def met_slo(r) -> bool:
    """Whether a finished request met its own SLO: TTFT and TPOT for a latency-sensitive one, its
    deadline for a throughput-intensive one. (A collective call is judged with its DAG.)"""
    if r.slo.kind == "latency":
        return (r.first_token_time - r.arrival_time <= r.slo.ttft_s and
                time_per_output_token(r.first_token_time, r.finish_time, r.output_len) <= r.slo.tpot_s)
    return r.finish_time - r.arrival_time <= r.slo.deadline_ms / 1e3


def service_metrics(requests: list) -> dict:
    """Service gain, as Tempo counts it: a request's output tokens if it meets its SLO, none if
    not (no extra for finishing early); a DAG's calls' tokens if its last call finishes by the
    DAG's deadline (from its first call's arrival). Service goodput is that gain per second of
    the run, SLO goodput the requests (a DAG's calls each) that met their SLO per second, and
    attainment is per kind. Requests refused (`refused` true) or unfinished count as misses.
    A collective request carries `dag_start`, when its DAG's first call arrived."""
    kinds: dict[str, list[int]] = {}  # kind -> [met, all]
    gain, met_requests, dags = 0, 0, {}
    for r in requests:
        served = not getattr(r, "refused", False) and not math.isnan(r.finish_time)
        if r.slo.kind == "collective":
            dag = dags.setdefault(r.slo.dag_id, {"start": r.dag_start, "due_ms": None, "end": 0.0, "tokens": 0,
                                                  "calls": 0, "served": True})
            if r.slo.dag_stage == 0:
                dag["due_ms"] = r.slo.deadline_ms
            dag["end"] = max(dag["end"], r.finish_time if served else math.inf)
            dag["tokens"] += r.output_len
            dag["calls"] += 1
            dag["served"] &= served
            continue
        ok = served and met_slo(r)
        counts = kinds.setdefault(r.slo.kind, [0, 0])
        counts[0] += ok
        counts[1] += 1
        gain += r.output_len if ok else 0
        met_requests += ok
    for dag in dags.values():
        ok = dag["served"] and dag["due_ms"] is not None and dag["end"] - dag["start"] <= dag["due_ms"] / 1e3
        counts = kinds.setdefault("collective", [0, 0])
        counts[0] += ok
        counts[1] += 1
        gain += dag["tokens"] if ok else 0
        met_requests += dag["calls"] if ok else 0
    finished = [r.finish_time for r in requests if not math.isnan(r.finish_time)]
    span = max(finished, default=0.0) - min(r.arrival_time for r in requests)
    per_s = 1 / span if span > 0 else 0.0
    return {"requests": len(requests), "service_gain_tokens": gain, "service_goodput_tok_s": gain * per_s,
            "slo_goodput_req_s": met_requests * per_s,
            "attainment_by_kind": {kind: met / n for kind, (met, n) in sorted(kinds.items())},
            "requests_by_kind": {kind: n for kind, (_, n) in sorted(kinds.items())}}


def latency_samples(requests: list) -> dict:
    """Sorted TTFT and TPOT (ms) of the served requests, for CDF plots."""
    served = [r for r in requests if not math.isnan(r.finish_time)]
    return {"ttft_ms": sorted((r.first_token_time - r.arrival_time) * 1e3 for r in served),
            "tpot_ms": sorted(time_per_output_token(r.first_token_time, r.finish_time, r.output_len) * 1e3
                              for r in served if r.output_len > 1)}
