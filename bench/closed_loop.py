"""Closed-loop clients in the simulator: what a wait limit on demoted prompts buys and costs.

  python -P -m kairos.bench.closed_loop

Each client sends its next request the moment its last one ends (lengths from the Azure
conversation trace, TTFT SLO 1 s, TPOT 100 ms), so the prefill queue never runs dry. A policy
that demotes prompts predicted late (kairos, mh) then keeps a demoted prompt waiting as long as
prompts still in time keep coming; `--max-prefill-wait-s` bounds that wait, at a cost in SLOs
met. Prints and writes (JSON and PNG under bench/results/) attainment, TTFT percentiles, the
longest TTFT and requests/s per number of clients and policy.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from kairos.bench import DEFAULT_PROFILE, DEFAULT_TRACE, RESULTS
from kairos.bench.common import profile_cost_model, pyplot, save_figure, write_result
from kairos.scheduler.simulator import SimConfig, Simulator, simulation_report
from kairos.scheduler.traces import TraceRequest, load_azure, with_slos

CLIENTS = (100, 150, 200, 300, 400)
REQUESTS_PER_CLIENT = 20
RUNS = (("fcfs+cb", None), ("kairos+kairos", None), ("kairos+kairos", 30.0), ("kairos+kairos", 10.0),
        ("mh+kairos", None), ("mh+kairos", 30.0))


def closed_loop(base: list[TraceRequest], clients: int, per_client: int) -> list[TraceRequest]:
    """Each client's requests in a chain (its first ones starting over a second), the trace's
    lengths taken in order."""
    trace = []
    for c in range(clients):
        for k in range(per_client):
            r = base[(c * per_client + k) % len(base)]
            trace.append(replace(r, arrival=c / clients, after=None) if k == 0 else
                         replace(r, arrival=0.0, after=len(trace) - 1))
    return trace


def label(pair: str, max_wait_s: float | None) -> str:
    return pair if max_wait_s is None else f"{pair}, wait <= {max_wait_s:g} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE))
    ap.add_argument("--name", default="closed_loop")
    args = ap.parse_args()
    profile, cost = profile_cost_model(args.profile)
    base = with_slos(load_azure(DEFAULT_TRACE), 1000.0, 100.0)
    rows = []
    for clients in CLIENTS:
        trace = closed_loop(base, clients, REQUESTS_PER_CLIENT)
        for pair, max_wait_s in RUNS:
            prefill, decode = pair.split("+")
            config = SimConfig(prefill_policy=prefill, decode_policy=decode, max_prefill_wait_s=max_wait_s,
                               kv_capacity_tokens=profile["kv_capacity_tokens"],
                               kv_bytes_per_token=profile["kv_bytes_per_token"])
            sim = Simulator(config, cost)
            requests = sim.run(trace)
            report = simulation_report(sim, requests)
            longest = max(r.first_token_time - r.arrival_time for r in requests)
            row = {"clients": clients, "policy": pair, "max_prefill_wait_s": max_wait_s,
                   **{k: report[k] for k in ("ttft_attainment", "e2e_attainment", "ttft_ms")},
                   "max_ttft_ms": longest * 1e3, "requests_per_s": len(requests) / max(r.finish_time for r in requests)}
            rows.append(row)
            print(f"{clients:4d} clients  {label(pair, max_wait_s):30s} TTFT {row['ttft_attainment']:6.1%}  "
                  f"E2E {row['e2e_attainment']:6.1%}  TTFT p50 {row['ttft_ms']['p50'] / 1e3:6.2f} "
                  f"p99 {row['ttft_ms']['p99'] / 1e3:6.1f} max {longest:6.1f} s  {row['requests_per_s']:5.1f} req/s",
                  flush=True)
    setup = {"requests_per_client": REQUESTS_PER_CLIENT, "ttft_slo_ms": 1000.0, "tpot_slo_ms": 100.0,
             "prefill_workers": 1, "decode_workers": 1}
    print(f"wrote {write_result(args.name, {'profile': args.profile, 'setup': setup, 'rows': rows})}")
    plot(rows, args.name)


def plot(rows: list[dict], name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (met, wait) = plt.subplots(1, 2, figsize=(11, 4))
    for pair, max_wait_s in RUNS:
        mine = [r for r in rows if r["policy"] == pair and r["max_prefill_wait_s"] == max_wait_s]
        clients = [r["clients"] for r in mine]
        met.plot(clients, [100 * r["e2e_attainment"] for r in mine], marker="o", label=label(pair, max_wait_s))
        wait.plot(clients, [r["max_ttft_ms"] / 1e3 for r in mine], marker="o", label=label(pair, max_wait_s))
    met.set_xlabel("closed-loop clients")
    met.set_ylabel("E2E SLO attainment (%)")
    wait.set_xlabel("closed-loop clients")
    wait.set_ylabel("longest TTFT (s)")
    wait.set_yscale("log")
    met.legend(fontsize=8)
    fig.suptitle("Closed-loop clients, simulated: a wait limit on demoted prompts")
    save_figure(fig, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
