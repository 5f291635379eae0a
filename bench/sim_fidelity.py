"""Simulator fidelity: the same trace slice, live against real workers and in the simulator,
for the same policies at several loads; the gap in SLO attainment.

    python bench/sim_fidelity.py                       # tiny model on CPU, conv trace slice

The simulator is given what the workers were given: their profile (measured with the thread
count each worker runs with), the token budget, the batch limit and the KV capacity. Serving
runs steps slower than the quiet profile (the workers share the machine), so the first live
point is also a calibration: the workers' running ratio of observed to predicted step time
(`kairos status`) scales the profile for every simulation, and the steps' spread around it
becomes the simulator's step-time jitter. Each live run starts on fresh, warmed-up workers, and
each point runs `--repeats` times: the spread between repeats is the noise any simulator is
judged against. Target: within 5 percentage points.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from scheduler.cost_model import CostModel  # noqa: E402
from scheduler.simulator import SimConfig, simulate  # noqa: E402
from scheduler.traces import load_azure, shape, with_slos  # noqa: E402
from transport.client import Client  # noqa: E402
from transport.replay import replay, warm_up  # noqa: E402
from transport.serve import cpu_share, local_cluster  # noqa: E402

TRACES = Path(__file__).resolve().parent / "traces"
KEYS = ("ttft_attainment", "tpot_attainment", "e2e_attainment")


def serving_drift(addr: str) -> dict:
    """Observed over predicted step time from the prefill and the decode worker: the running
    mean, and the steps' mean deviation from it relative to the mean (their jitter)."""
    with Client(addr) as client:
        workers = client.status()["workers"]
    drift = {}
    for role in ("prefill", "decode"):
        scale = next(w["cost_scale"][role] for w in workers if w["role"] == role)
        drift[role], drift[f"{role}_jitter"] = scale["mean"], scale["spread"] / scale["mean"]
    return drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(TRACES / "AzureLLMInferenceTrace_conv.csv"))
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rate-scales", default="3,4,6", help="loads to compare at (time compression)")
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--max-output-len", type=int, default=32)
    parser.add_argument("--ttft-slo-ms", type=float, default=500)
    parser.add_argument("--tpot-slo-ms", type=float, default=60)
    parser.add_argument("--policies", default="fcfs+cb,kairos+kairos")
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--kv-blocks", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2,
                        help="live runs per point (fresh workers each); their spread is the live noise")
    args = parser.parse_args()

    import torch

    from engine import LLM
    from engine.profiler import measure_profile

    # Measured with the thread count each worker of the local cluster gets.
    torch.set_num_threads(cpu_share(2))
    engine_args = {"max_num_batched_tokens": args.token_budget, "max_num_seqs": args.max_batch,
                   "num_kv_blocks": args.kv_blocks, "max_model_len": 1024}
    llm = LLM("tiny", **engine_args)
    profile = measure_profile(llm, quick=False)
    kv_bytes_per_token = llm.runner.kv_bytes_per_block() // llm.config.block_size
    del llm
    profile_path = Path(tempfile.mkdtemp()) / "tiny_profile.json"
    profile_path.write_text(json.dumps(profile))
    print(f"profile: {len(profile['prefill'])} prefill and {len(profile['decode'])} decode points, held-out MAPE "
          f"prefill {profile['prefill_mape']:.0%} decode {profile['decode_mape']:.0%}")

    cost = CostModel.from_profile(profile)
    worker = ["--model", "tiny", "--profile", str(profile_path), "--max-num-batched-tokens", str(args.token_budget),
              "--max-num-seqs", str(args.max_batch), "--num-kv-blocks", str(args.kv_blocks), "--max-model-len", "1024"]
    rows, calibration = [], None
    for rate in (float(x) for x in args.rate_scales.split(",")):
        trace = shape(load_azure(args.trace), rate, limit=args.requests)
        trace = with_slos([replace(r, prompt_len=min(r.prompt_len, args.max_prompt_len),
                                   output_len=min(r.output_len, args.max_output_len)) for r in trace],
                          args.ttft_slo_ms, args.tpot_slo_ms)
        for policy in args.policies.split(","):
            prefill, decode = policy.split("+")
            runs, drifts = [], []
            for _ in range(args.repeats):
                with local_cluster(["--prefill-policy", prefill, *worker], ["--decode-policy", decode, *worker]) as addr:
                    warm_up(addr, trace)
                    runs.append(replay(addr, trace))
                    drifts.append(serving_drift(addr))
            live = {k: sum(run[k] for run in runs) / len(runs) for k in KEYS}
            live_spread = {k: 100 * (max(run[k] for run in runs) - min(run[k] for run in runs)) for k in KEYS}
            drift = {k: sum(d[k] for d in drifts) / len(drifts) for k in drifts[0]}
            if calibration is None:
                # The first point calibrates every simulation: how much slower steps ran while
                # serving than in the quiet profile (co-located workers share the cores).
                calibration = drift
                print(f"calibration ({policy} at rate x{rate:g}): steps ran {drift['prefill']:.2f}x (prefill) and "
                      f"{drift['decode']:.2f}x (decode) the profile's prediction, give or take "
                      f"{drift['prefill_jitter']:.0%} and {drift['decode_jitter']:.0%}")
            config = SimConfig(prefill_policy=prefill, decode_policy=decode, token_budget=args.token_budget,
                               max_batch=args.max_batch, kv_capacity_tokens=args.kv_blocks * 16,
                               kv_bytes_per_token=kv_bytes_per_token, kv_bandwidth_gb_s=0.5)
            jittered = replace(config, prefill_jitter=calibration["prefill_jitter"],
                               decode_jitter=calibration["decode_jitter"])
            simulated = simulate(trace, jittered, cost.scaled(calibration["prefill"], calibration["decode"]))
            steady = simulate(trace, config, cost.scaled(calibration["prefill"], calibration["decode"]))
            uncalibrated = simulate(trace, config, cost)
            row = {"policy": policy, "rate_scale": rate, "simulated": simulated, "live": live, "live_runs": runs,
                   "live_spread_points": live_spread, "without_jitter": steady, "uncalibrated": uncalibrated,
                   "drift": drift}
            row["gap_points"] = {k: 100 * (simulated[k] - live[k]) for k in KEYS}
            row["without_jitter_gap_points"] = {k: 100 * (steady[k] - live[k]) for k in KEYS}
            row["uncalibrated_gap_points"] = {k: 100 * (uncalibrated[k] - live[k]) for k in KEYS}
            rows.append(row)
            gap = row["gap_points"]
            print(f"x{rate:<4g} {policy:>15}: live TTFT {live['ttft_attainment']:.1%} TPOT {live['tpot_attainment']:.1%} "
                  f"E2E {live['e2e_attainment']:.1%} | simulated {simulated['ttft_attainment']:.1%} "
                  f"{simulated['tpot_attainment']:.1%} {simulated['e2e_attainment']:.1%} | gap "
                  f"{gap['ttft_attainment']:+.1f} / {gap['tpot_attainment']:+.1f} / {gap['e2e_attainment']:+.1f} points "
                  f"(without jitter E2E {row['without_jitter_gap_points']['e2e_attainment']:+.1f}, uncalibrated "
                  f"{row['uncalibrated_gap_points']['e2e_attainment']:+.1f}; live runs spread "
                  f"{live_spread['e2e_attainment']:.1f})")
    worst = {k: max(abs(r["gap_points"][k]) for r in rows) for k in KEYS}
    mean = {k: sum(abs(r["gap_points"][k]) for r in rows) / len(rows) for k in KEYS}
    noise = {k: sum(r["live_spread_points"][k] for r in rows) / len(rows) for k in KEYS}
    print("largest gap: " + ", ".join(f"{k.split('_')[0].upper()} {v:.1f}" for k, v in worst.items()) + " points; mean: "
          + ", ".join(f"{k.split('_')[0].upper()} {v:.1f}" for k, v in mean.items())
          + f"; mean spread between live repeats: E2E {noise['e2e_attainment']:.1f}")
    path = write_result("sim_fidelity_tiny_cpu", {"setup": vars(args), "profile_mape": {
        "prefill": profile["prefill_mape"], "decode": profile["decode_mape"]}, "calibration": calibration, "largest_gap_points": worst,
        "mean_gap_points": mean, "mean_live_spread_points": noise, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
