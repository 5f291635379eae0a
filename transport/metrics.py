"""The router's Prometheus metrics. Every request passes the router, so it counts and times them
(on its own clock, from arrival to each token's relay) and re-exposes what its workers report
in their heartbeats: queues, KV blocks, transfers, step times, the cost model's calibration.

Names follow vLLM's where one exists, with `kairos:` for `vllm:`, so that a dashboard built for
vLLM needs only the prefix changed. Served by `kairos router --metrics-port` and by the HTTP
API's `/metrics` (which asks the router for this text)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS_S = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

# Heartbeat figures shown as gauges per worker: (figure, metric, help).
WORKER_GAUGES = (
    ("waiting", "kairos:num_requests_waiting", "Requests queued on the worker, not yet scheduled."),
    ("running", "kairos:num_requests_running", "Requests in the worker's running batch."),
    ("free_blocks", "kairos:kv_blocks_free", "Free KV cache blocks."),
    ("total_blocks", "kairos:kv_blocks_total", "KV cache blocks in all."),
    ("transfers", "kairos:kv_transfers_in_flight", "KV transfers under way (prefill: outgoing, decode: incoming)."),
)
# Heartbeat counters shown as counters per worker.
WORKER_COUNTERS = (
    ("preemptions", "kairos:num_preemptions", "Sequences preempted for lack of KV blocks."),
    ("kv_transfers", "kairos:kv_transfers", "KV transfers received complete (decode workers)."),
    ("kv_bytes", "kairos:kv_transfer_bytes", "KV bytes received (decode workers)."),
)


class RouterMetrics:
    """Counters and histograms the router updates as requests end, and a collector that reads
    its workers' latest heartbeats at each scrape. `workers` is a function returning the
    registered workers (objects with worker_id, role, total_blocks and stats), `queues` one
    returning the router's own queue lengths by name."""

    def __init__(self, workers, queues):
        self.registry = CollectorRegistry()
        self._workers, self._queues = workers, queues
        r = self.registry
        self.received = Counter("kairos:request_received", "Requests the router accepted.", registry=r)
        self.success = Counter("kairos:request_success", "Requests that ended with output, by finish reason.",
                               ["finished_reason"], registry=r)
        self.failure = Counter("kairos:request_failure", "Requests that failed, by error code.", ["code"],
                               registry=r)
        self.slo_met = Counter("kairos:request_slo_met", "Completed requests that met their TTFT, their TPOT, "
                               "both, or (throughput and collective requests) their deadline.", ["slo"], registry=r)
        self.ttft = Histogram("kairos:time_to_first_token_seconds", "From arrival at the router to the first "
                              "token's relay.", buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("kairos:time_per_output_token_seconds", "A completed request's mean time per "
                              "output token after the first.", buckets=TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("kairos:e2e_request_latency_seconds", "From arrival to the last token's relay.",
                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Histogram("kairos:request_prompt_tokens", "Prompt length of completed requests.",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("kairos:request_generation_tokens", "Output length of completed "
                                           "requests.", buckets=TOKEN_BUCKETS, registry=r)
        r.register(_WorkerCollector(self))

    def completed(self, finish_reason: str, ttft_s: float | None, tpot_s: float | None, e2e_s: float,
                  prompt_tokens: int | None, output_tokens: int, ttft_met: bool, tpot_met: bool,
                  deadline_met: bool | None = None) -> None:
        """deadline_met: None for a request without a deadline (a latency-sensitive one)."""
        self.success.labels(finish_reason).inc()
        for slo, met in (("ttft", ttft_met), ("tpot", tpot_met), ("both", ttft_met and tpot_met)):
            self.slo_met.labels(slo).inc(met)
        if deadline_met is not None:
            self.slo_met.labels("deadline").inc(deadline_met)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None and output_tokens > 1:
            self.tpot.observe(tpot_s)
        self.e2e.observe(e2e_s)
        if prompt_tokens is not None:
            self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(output_tokens)

    def failed(self, code: str | None) -> None:
        self.failure.labels(code or "error").inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int):
        """Serves /metrics over HTTP from a thread; returns the server (its shutdown() stops it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class _WorkerCollector:
    """Reads the workers' latest heartbeat figures at scrape time (from the scraping thread: the
    router replaces a worker's stats whole, never edits them in place)."""

    def __init__(self, metrics: RouterMetrics):
        self.metrics = metrics

    def collect(self):
        workers = list(self.metrics._workers())
        labels = ["worker", "role"]
        for figure, name, doc in WORKER_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for w in workers:
                value = w.total_blocks if figure == "total_blocks" else w.stats.get(figure)
                if _number(value):
                    family.add_metric([w.worker_id, w.role], value)
            yield family
        usage = GaugeMetricFamily("kairos:kv_cache_usage_perc", "Share of KV blocks in use (0 to 1).", labels=labels)
        for w in workers:
            free = w.stats.get("free_blocks")
            if _number(free) and w.total_blocks > 0:
                usage.add_metric([w.worker_id, w.role], 1.0 - free / w.total_blocks)
        yield usage
        for figure, name, doc in WORKER_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            for w in workers:
                if _number(w.stats.get(figure)):
                    family.add_metric([w.worker_id, w.role], w.stats[figure])
            yield family
        scale = GaugeMetricFamily("kairos:cost_model_scale", "Observed over predicted step time: the cost model's "
                                  "running calibration, per phase.", labels=["worker", "role", "phase"])
        steps = HistogramMetricFamily("kairos:step_duration_seconds", "Engine step time (for decode, the period "
                                      "between steps), per worker and phase.", labels=["worker", "role", "phase"])
        for w in workers:
            for phase, s in _maps(w.stats.get("cost_scale")):
                if _number(s.get("mean")):
                    scale.add_metric([w.worker_id, w.role, phase], s["mean"])
            for phase, hist in _maps(w.stats.get("step_seconds")):
                buckets = _buckets(hist)
                if buckets is not None and _number(hist.get("sum")):
                    steps.add_metric([w.worker_id, w.role, phase], buckets, hist["sum"])
        yield scale
        yield steps
        queues = GaugeMetricFamily("kairos:router_requests", "Requests at the router: waiting for a worker, "
                                   "or in flight.", labels=["state"])
        for state, count in self.metrics._queues().items():
            queues.add_metric([state], count)
        yield queues


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _maps(value) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in value.items() if isinstance(v, dict)] if isinstance(value, dict) else []


def _buckets(hist: dict) -> list[tuple[str, float]] | None:
    """A worker's cumulative step-time buckets in order, ending at +Inf; None if they are not a
    histogram (the figures come from a peer)."""
    bounds = []
    for key, count in hist.items():
        if key == "sum":
            continue
        try:
            bound = float(key)
        except ValueError:
            return None
        if math.isnan(bound) or not _number(count):
            return None
        bounds.append((bound, key, count))
    bounds.sort()
    counts = [c for _, _, c in bounds]
    if not bounds or bounds[-1][0] != math.inf or counts != sorted(counts):
        return None
    return [(key, count) for _, key, count in bounds]
