"""`kairos bench compare`: sweep request rates x policies, in the simulator or live against
local workers, against the fcfs+cb baseline, and report the paper-style table, goodput, JSON and
PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.metrics import latency_samples
from kairos.scheduler.simulator import SimConfig, Simulator, simulation_report
from kairos.scheduler.traces import TraceRequest, shape

BASELINE = "fcfs+cb"
GOODPUT_ATTAINMENT = 0.9


def simulated_point(config: SimConfig, cost: CostModel):
    """run_point for `compare`: one policy pair on one trace, in the simulator."""

    def run(trace: list[TraceRequest], policy: str) -> tuple[dict, dict]:
        prefill, decode = policy.split("+")
        sim = Simulator(replace(config, prefill_policy=prefill, decode_policy=decode), cost)
        requests = sim.run(trace)
        # As `simulate` reports: a refused request misses every SLO, and a stall is an error.
        return simulation_report(sim, requests), latency_samples([r for r in requests if not r.refused])

    return run


def goodput(points: list[tuple[float, float]]) -> float:
    """The highest rate with e2e attainment >= 90%, interpolated between swept rates (0 if
    even the lowest misses)."""
    best = 0.0
    for (r0, a0), (r1, a1) in zip(points, points[1:] + [(math.inf, -1.0)]):
        if a0 < GOODPUT_ATTAINMENT:
            break
        best = r0
        if a1 < GOODPUT_ATTAINMENT and math.isfinite(r1):
            best = r0 + (r1 - r0) * (a0 - GOODPUT_ATTAINMENT) / (a0 - a1)
            break
    return best


def mean_report(reports: list[dict]) -> dict:
    """The mean of several runs' SLO reports, key by key (latency percentiles too)."""
    first = reports[0]
    return {key: mean_report([r[key] for r in reports]) if isinstance(value, dict)
            else sum(r[key] for r in reports) / len(reports) if isinstance(value, (int, float))
            else value for key, value in first.items()}


def compare(trace: list[TraceRequest], rate_scales: list[float], policies: list[str], run_point,
            repeats: int = 1, progress=None) -> dict:
    """run_point(trace, policy) -> (SLO report, latency samples), for the trace at each rate,
    `repeats` times with the policies taking turns (so a slow spell of the machine falls on all
    of them); a row holds the mean report, and each run's E2E attainment."""
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    last_arrival = max((r.arrival for r in trace), default=0.0)
    if last_arrival <= 0:
        raise ValueError("the trace's requests all arrive at once (or there are none): it has no rate to scale")
    base_rate = len(trace) / last_arrival
    rows, cdfs = [], {}
    for scale in rate_scales:
        runs = {policy: [] for policy in policies}
        for _ in range(repeats):
            for policy in policies:
                runs[policy].append(run_point(shape(trace, scale), policy))
                if progress:
                    progress()
        for policy in policies:
            reports = [report for report, _ in runs[policy]]
            row = {"rate_scale": scale, "rate_req_s": base_rate * scale, "policy": policy, **mean_report(reports)}
            if repeats > 1:
                row["e2e_runs"] = [r["e2e_attainment"] for r in reports]
            rows.append(row)
            cdfs[(scale, policy)] = {key: sorted(v for _, samples in runs[policy] for v in samples[key])
                                     for key in runs[policy][0][1]}
    summary = {}
    for policy in policies:
        mine = [(r["rate_req_s"], r["e2e_attainment"]) for r in rows if r["policy"] == policy]
        # At 90% at every rate swept: the goodput is the highest rate or more. (A sweep that dips
        # under 90% and comes back, as live runs can, has its goodput at the first crossing.)
        summary[policy] = {"goodput_req_s": goodput(mine),
                           "goodput_above_sweep": all(a >= GOODPUT_ATTAINMENT for _, a in mine)}
    base_goodput = summary.get(BASELINE, {}).get("goodput_req_s", 0.0)
    for policy in policies:
        g = summary[policy]["goodput_req_s"]
        summary[policy]["goodput_vs_baseline"] = g / base_goodput if base_goodput else None
        gains = [gain(r, baseline_row(rows, r)) for r in rows if r["policy"] == policy]
        in_band = [g for g in gains if 0.4 <= g["baseline_e2e"] <= 0.8]
        summary[policy]["best_in_40_80_band"] = {
            key: max((g[key] for g in in_band), default=None)
            for key in ("ttft_points", "tpot_points", "e2e_points", "throughput_pct")}
        summary[policy]["never_worse_e2e"] = all(g["e2e_points"] >= -0.5 for g in gains)
    return {"rows": rows, "summary": summary, "cdfs": cdfs}


def baseline_row(rows: list[dict], row: dict) -> dict:
    return next(r for r in rows if r["rate_scale"] == row["rate_scale"] and r["policy"] == BASELINE)


def gain(row: dict, base: dict) -> dict:
    return {"baseline_e2e": base["e2e_attainment"],
            "ttft_points": 100 * (row["ttft_attainment"] - base["ttft_attainment"]),
            "tpot_points": 100 * (row["tpot_attainment"] - base["tpot_attainment"]),
            "e2e_points": 100 * (row["e2e_attainment"] - base["e2e_attainment"]),
            "throughput_pct": 100 * (row["decode_throughput_tok_s"] / base["decode_throughput_tok_s"] - 1)}


def table(result: dict) -> str:
    lines = [f"{'rate req/s':>10} {'policy':>15} {'TTFT':>7} {'TPOT':>7} {'E2E':>7} {'dec tok/s':>10}   "
             f"{'dTTFT':>7} {'dTPOT':>7} {'dE2E':>7} {'dThru':>7}"]
    for r in result["rows"]:
        g = gain(r, baseline_row(result["rows"], r))
        lines.append(f"{r['rate_req_s']:>10.1f} {r['policy']:>15} {r['ttft_attainment']:>7.1%} "
                     f"{r['tpot_attainment']:>7.1%} {r['e2e_attainment']:>7.1%} "
                     f"{r['decode_throughput_tok_s']:>10.0f}   "
                     f"{g['ttft_points']:>+6.1f}p {g['tpot_points']:>+6.1f}p {g['e2e_points']:>+6.1f}p "
                     f"{g['throughput_pct']:>+6.1f}%")
    lines.append("")
    lines.append(f"{'policy':>15} {'goodput req/s':>14} {'x baseline':>10}   best gain where the baseline attains "
                 "40-80% E2E: TTFT / TPOT / E2E points, decode throughput")
    below_sweep, above_sweep = [], []
    base_above = result["summary"].get(BASELINE, {}).get("goodput_above_sweep", False)
    for policy, s in result["summary"].items():
        best = s["best_in_40_80_band"]
        fmt = lambda v, unit: "n/a" if v is None else f"{v:+.1f}{unit}"  # noqa: E731
        ratio = "n/a" if s["goodput_vs_baseline"] is None else f"{s['goodput_vs_baseline']:.2f}"
        goodput = f"{s['goodput_req_s']:.2f}"
        if not s["goodput_req_s"]:  # even the lowest rate swept misses 90%: the goodput lies below it
            goodput = f"< {min(r['rate_req_s'] for r in result['rows'] if r['policy'] == policy):.1f}"
            ratio = "n/a"
            below_sweep.append(policy)
        elif s["goodput_above_sweep"]:  # a lower bound, and so is its ratio unless the baseline's is too
            goodput = f">= {s['goodput_req_s']:.2f}"
            ratio = "n/a" if base_above or s["goodput_vs_baseline"] is None else f">= {ratio}"
            above_sweep.append(policy)
        elif base_above and s["goodput_vs_baseline"] is not None:
            ratio = f"<= {ratio}"
        lines.append(f"{policy:>15} {goodput:>14} {ratio:>10}   {fmt(best['ttft_points'], 'p')} / "
                     f"{fmt(best['tpot_points'], 'p')} / {fmt(best['e2e_points'], 'p')}, "
                     f"{fmt(best['throughput_pct'], '%')}{'' if s['never_worse_e2e'] else '  (worse somewhere)'}")
    if below_sweep:
        lines.append(f"{', '.join(below_sweep)}: under 90% E2E attainment at every rate swept; sweep lower rates "
                     "for a goodput")
    if above_sweep:
        lines.append(f"{', '.join(above_sweep)}: at 90% E2E attainment or more at every rate swept; sweep higher "
                     "rates for a goodput")
    return "\n".join(lines)


def write(result: dict, out_dir: Path, name: str, meta: dict) -> list[Path]:
    """JSON of the sweep, and PNGs: attainment against rate per policy, and latency CDFs at the
    rate where the baseline's E2E attainment is nearest 60%."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json"]
    paths[0].write_text(json.dumps({**meta, "rows": result["rows"], "summary": result["summary"]}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')")
        return paths
    policies = list(result["summary"])
    paths.append(out_dir / f"{name}_attainment.png")
    plot_attainment(result["rows"], policies, meta.get("title", name), paths[-1])

    base_rows = [r for r in result["rows"] if r["policy"] == BASELINE] or result["rows"]
    scale = min(base_rows, key=lambda r: abs(r["e2e_attainment"] - 0.6))["rate_scale"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
        for policy in policies:
            values = result["cdfs"][(scale, policy)][key]
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=policy)
        ax.set_xscale("log")
        ax.set_xlabel(f"{key.replace('_ms', '').upper()} (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    rate = next(r["rate_req_s"] for r in result["rows"] if r["rate_scale"] == scale)
    fig.suptitle(f"{meta.get('title', name)}: latency CDFs at {rate:.1f} req/s")
    fig.tight_layout()
    paths.append(out_dir / f"{name}_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_attainment(rows: list[dict], policies: list[str], title: str, path: Path) -> None:
    """Attainment against rate, a line per policy; with repeated live runs, the E2E panel
    shades the range their runs spanned."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, key, name in zip(axes, ("ttft_attainment", "tpot_attainment", "e2e_attainment"), ("TTFT", "TPOT", "E2E")):
        for policy in policies:
            mine = [r for r in rows if r["policy"] == policy]
            rates = [r["rate_req_s"] for r in mine]
            line, = ax.plot(rates, [100 * r[key] for r in mine], marker="o", label=policy)
            if key == "e2e_attainment" and all("e2e_runs" in r for r in mine):
                ax.fill_between(rates, [100 * min(r["e2e_runs"]) for r in mine],
                                [100 * max(r["e2e_runs"]) for r in mine], color=line.get_color(), alpha=0.15)
        ax.set_title(f"{name} SLO attainment" + (" (shaded: range of runs)" if key == "e2e_attainment"
                                                 and all("e2e_runs" in r for r in rows) else ""))
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of requests")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
