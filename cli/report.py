"""What the commands print: SLO reports of simulated and replayed runs, and a router's status."""

from __future__ import annotations

import json

STATUS_COLUMNS = ("role", "worker_id", "requests", "queued_prompt_tokens", "cached_prompt_tokens", "waiting",
                  "running", "ready", "transfers", "kv_cuda_ipc", "free_blocks", "total_blocks", "preemptions",
                  "completed", "aborted", "failed", "ttft_met", "tpot_met", "cost_scale", "last_seen_ms")


def print_slo_report(report: dict, as_json: bool, headline: str) -> None:
    """A simulated or replayed run's SLO report: one JSON object, or a few lines."""
    if as_json:
        print(json.dumps(report))
        return
    print(headline)
    print(f"attainment: TTFT {report['ttft_attainment']:.1%}  TPOT {report['tpot_attainment']:.1%}  "
          f"both {report['e2e_attainment']:.1%}   decode {report['decode_throughput_tok_s']:.0f} tok/s")
    for name in ("ttft_ms", "tpot_ms"):
        q = report[name]
        print(f"{name}: p50 {q['p50']:.1f}  p90 {q['p90']:.1f}  p99 {q['p99']:.1f}")
    service = report.get("service")
    if service:  # a mixed workload: what each kind attained and the service it got in time
        kinds = "  ".join(f"{kind} {v:.1%}" for kind, v in service["attainment_by_kind"].items())
        print(f"service goodput {service['service_goodput_tok_s']:.0f} tok/s  SLO goodput "
              f"{service['slo_goodput_req_s']:.2f} req/s  attainment by kind: {kinds}")


def print_status(report: dict) -> None:
    """The router's totals, then a table of its workers."""
    counters = report["counters"]
    print("requests: " + ", ".join(f"{k} {v}" for k, v in counters.items())
          + f", waiting for workers {report['pending']}")

    def cell(worker: dict, column: str) -> str:
        if column == "cost_scale":  # measured over predicted step time, per phase
            scale = worker.get("cost_scale") or {}
            return " ".join(f"{phase}x{s['mean']:.2f}" for phase, s in scale.items())
        return str(worker.get(column, ""))

    rows = [[cell(w, c) for c in STATUS_COLUMNS] for w in sorted(report["workers"], key=lambda w: w["role"])]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(STATUS_COLUMNS)]
    for row in [list(STATUS_COLUMNS), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if not rows:
        print("(no workers registered)")
