"""Simulator fidelity: the same trace slice, live against real workers and in the simulator,
for the same policies at several loads; the gap in SLO attainment.

    python -m kairos.bench.sim_fidelity                       # tiny model on CPU, conv trace slice
    python -m kairos.bench.sim_fidelity --model bench/models/Llama-3.1-8B --load-format dummy \
        --profile bench/profiles/Llama-3.1-8B_H100.json --rate-scales 6,8,12 ...   # one GPU

The simulator is given what the workers were given: their profile (measured with the thread
count each worker runs with), the token budget, the batch limit and the KV capacity. Serving
runs steps slower than the quiet profile (the workers share the machine), so the first live
point is also a calibration, from the workers' step logs of its measured runs. Its prefill
steps scale the profile's prefill by least squares (a queue waits on its long steps, and
serving slowed long steps more than short ones: up to 1.6x against 1.0x on one GPU shared
with the decode worker). Its decode steps are fitted afresh: serving slows large batches more
than small ones, which no single scale carries. Workers that share a device slow each other,
the more so as the load keeps the other one busy: from both workers' logs, each role's steps
are fitted alone and with their slowdown beside the other's, which the simulator applies
while the other role is busy, and the prefill loop's time between steps is added to each
step. The steps' spread becomes the simulator's step-time jitter.
Each live run starts on fresh, warmed-up workers, and each point runs `--repeats` times (the
policies taking turns): the spread between repeats is the noise any simulator is judged
against. Target: within 5 percentage points.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from kairos.bench import DEFAULT_TRACE
from kairos.bench.common import write_result
from kairos.cli.engine_flags import engine_argv
from kairos.scheduler.cost_model import CostModel, nonnegative_least_squares
from kairos.scheduler.simulator import SimConfig, measured_on_gpu, simulate
from kairos.scheduler.traces import load_azure, shape, with_slos
from kairos.transport.client import Client
from kairos.transport.replay import replay, warm_up
from kairos.transport.serve import cpu_share, local_cluster

KEYS = ("ttft_attainment", "tpot_attainment", "e2e_attainment")
# A jittered simulation is one draw of the steps' times, as a live run is; on a short trace one
# draw moves a point by several requests, so a jittered prediction is the mean of this many.
JITTER_DRAWS = 8
# What a point's step logs give over all its runs together, not as a mean of its runs'.
FITTED = ("decode_fit", "decode_fit_jitter", "decode_online_error", "prefill_fit", "prefill_fit_jitter",
          "prefill_loop_s", "prefill_stalls", "prefill_beside_decode", "decode_beside_prefill")
# A prefill step whose ratio to the profile is this many times the median step's is a stall (on
# a fresh GPU machine, one step of a session's first run took 4.4 and 5.7 times: the first use
# of a kernel's shape), which a queue meets once, not at its rate; least squares would weigh it
# by its length, so the fit leaves it out and counts it.
STALL_FACTOR = 3.0
# A contention fit needs this many steps mostly alone and this many mostly beside the other worker.
MIN_SIDE_STEPS = 20
# Rounds of fitting decode steps alone and their slowdown beside prefill, each given the other.
CONTENTION_ROUNDS = 8


def cost_scales(addr: str) -> dict:
    """Each role's cost_scale from `kairos status` (one prefill and one decode worker)."""
    with Client(addr) as client:
        workers = client.fresh_status()["workers"]
    return {role: next(w["cost_scale"][role] for w in workers if w["role"] == role) for role in ("prefill", "decode")}


def serving_drift(before: dict, after: dict, seconds: float) -> dict:
    """How much slower the steps of one measured run (`seconds` long) went than the profile
    predicts, per phase: observed over predicted seconds over just that run's steps
    (time-weighted, so the loaded middle of the run counts as much as it lasted, not only the
    quiet end a running mean would show); the steps' spread around the running mean, relative
    to it (their jitter); and the share of the run the worker spent in steps (its busy share)."""
    drift = {}
    for role in ("prefill", "decode"):
        observed = after[role]["observed_s"] - before[role]["observed_s"]
        predicted = after[role]["predicted_s"] - before[role]["predicted_s"]
        drift[role] = observed / predicted if predicted > 0 else after[role]["mean"]
        drift[f"{role}_jitter"] = after[role]["spread"] / after[role]["mean"]
        drift[f"{role}_busy"] = observed / seconds
    return drift


def busy_spans(log: Path) -> tuple[list[float], list[float]]:
    """When a worker had work in hand (wall clock), from its step log, as the simulator's workers
    are busy: from a step's start to the next one's while the step left requests waiting or
    running, else to its end. The spans' starts and ends, in order."""
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("stepped") and not r["blocked"]]
    starts: list[float] = []
    ends: list[float] = []
    for step, following in zip(steps, [*steps[1:], None]):
        start = end = step["t"] - step["after_s"]
        start -= step["step_s"]
        if following is not None and step["waiting"] + step["running"] > 0:
            end = max(end, following["t"] - following["after_s"] - following["step_s"])
        if ends and start <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


def beside(record: dict, other: tuple[list[float], list[float]]) -> float:
    """The share of a logged step during which the other worker was busy."""
    end = record["t"] - record["after_s"]
    start = end - record["step_s"]
    if end <= start:
        return 0.0
    starts, ends = other
    i, covered = max(0, bisect.bisect_right(starts, start) - 1), 0.0
    while i < len(starts) and starts[i] < end:
        covered += max(0.0, min(end, ends[i]) - max(start, starts[i]))
        i += 1
    return covered / (end - start)


def contention_fit(steps: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """(scale, slowdown) such that a step predicted to take p, the other worker busy for a share
    b of it, takes scale * p * (1 + (slowdown - 1) * b), by least squares over (p, observed, b);
    as the simulator runs a step at the slower pace while the other role is busy. None where
    fewer than MIN_SIDE_STEPS steps ran mostly alone or mostly beside (the two cannot be told
    apart: a prefill worker on one GPU almost never steps alone, its decode worker busy), or
    where steps ran no slower beside."""
    alone = sum(b < 0.5 for _, _, b in steps)
    if min(alone, len(steps) - alone) < MIN_SIDE_STEPS:
        return None
    scale, extra = nonnegative_least_squares([[p, p * b] for p, _, b in steps], [o for _, o, _ in steps])
    if scale <= 0.0 or extra <= 0.0:
        return None
    return scale, 1.0 + extra / scale


def without_stalls(steps: list[tuple[float, float, float]]) -> int:
    """Takes the stalls out of `steps` ((predicted, observed, share beside) each) in place:
    those over STALL_FACTOR times the median step's ratio of observed to predicted. Returns how
    many there were. Decode steps keep theirs: a decode step's time includes the loop's since
    the previous one, and leaving the long ones out widened the gaps of every recorded run
    judged again."""
    ratios = sorted(o / p for p, o, _ in steps)
    limit = STALL_FACTOR * ratios[len(ratios) // 2]
    kept = [step for step in steps if step[1] <= limit * step[0]]
    stalls = len(steps) - len(kept)
    steps[:] = kept
    return stalls


def logged(logs: list[Path], spans: list[tuple[float, float]], others: list[Path] | None, keep) -> list:
    """(record, share of it beside the other worker, the loop's time after it) of each step that
    `keep` takes within the measured spans. The share is 0 without the other workers' logs. The
    loop's time is what the worker spent between the step and the next one (sending, taking
    messages in) where the step left it work; None where it went idle (its wait for work is no
    cost) or the log does not say."""
    steps = []
    for i, (log, (start, end)) in enumerate(zip(logs, spans)):
        other = busy_spans(others[i]) if others else None
        records = [json.loads(line) for line in log.read_text().splitlines()]
        for record, following in zip(records, [*records[1:], None]):
            if start <= record["t"] <= end and keep(record):
                busy = following is not None and record.get("waiting", 0) + record.get("running", 0) > 0
                loop = record.get("after_s", 0.0) + following.get("messages_s", 0.0) if busy else None
                steps.append((record, beside(record, other) if other else 0.0, loop))
    return steps


def served_decode_fit(logs: list[Path], spans: list[tuple[float, float]],
                      prefill_logs: list[Path] | None = None) -> dict:
    """Serving's own decode step times, fitted as the profile is (fixed, per sequence, per
    context token) to the decode steps the workers logged within the measured runs (wall-clock
    spans): what each step cost the running sequences, the serving loop's time since the
    previous step included. A scale on the quiet profile cannot carry how serving slows a step:
    large batches slowed most (the other worker's steps contend with them for the cores and
    memory), and the tail of TPOT lives in them. Plain least squares weighs a step by its
    length, as TPOT does. With the prefill workers' logs, the fit is of steps alone, and
    `decode_beside_prefill` how much longer they ran while the prefill worker was busy (on a
    shared device: 1.2-1.4x on one H100, 1.2-1.3x on two CPU cores), fitted in turn with the
    steps until both settle. The jitter is the steps' mean relative deviation from the fit. The
    workers' own calibration is judged too: its prediction before each step against the step."""
    records = logged(logs, spans, prefill_logs, lambda r: "context_tokens" in r)
    if len(records) < 3:
        return {}
    steps = [([1.0, float(r["batch"]), float(r["context_tokens"])], r["observed_s"], b) for r, b, _ in records]
    slowdown, fit, told_apart = 1.0, None, False
    for _ in range(CONTENTION_ROUNDS if prefill_logs else 1):
        fit = nonnegative_least_squares([f for f, _, _ in steps], [o / (1 + (slowdown - 1) * b) for _, o, b in steps])
        contended = contention_fit([(sum(c * x for c, x in zip(fit, f)), o, b) for f, o, b in steps])
        if contended is None:
            break
        (scale, slowdown), told_apart = contended, True
        fit = [c * scale for c in fit]
    model = CostModel((0.0, 0.0, 0.0), tuple(fit))
    jitter = sum(abs(o / (model.decode_time(int(f[1]), int(f[2])) * (1 + (slowdown - 1) * b)) - 1)
                 for f, o, b in steps) / len(steps)
    online = [abs(r["calibrated_s"] / r["observed_s"] - 1) for r, _, _ in records if r.get("calibrated_s", 0.0) > 0.0]
    return {"decode_fit": fit, "decode_fit_jitter": jitter,
            **({"decode_beside_prefill": slowdown} if told_apart else {}),
            **({"decode_online_error": sum(online) / len(online)} if online else {})}


def step_log(folder: Path, policy: str, rate: float, repeat: int, role: str) -> Path:
    """Where a live run keeps a worker's step log (and where `--resimulate` finds it)."""
    prefill, decode = policy.split("+")
    return folder / f"{prefill}_{decode}_x{rate:g}_{repeat}_{role}.jsonl"


def served_prefill_fit(logs: list[Path], spans: list[tuple[float, float]],
                       decode_logs: list[Path] | None = None) -> dict:
    """Serving's prefill steps (from the prefill workers' step logs, within the measured runs'
    spans) as a least-squares scale on the profile's prediction. Least squares weighs a step by
    its length once more than the time-weighted ratio does, as queueing does: a prompt that
    arrives while a step runs waits, on average, half the length-weighted mean step. With the
    decode workers' logs, the scale is of steps alone, and `prefill_beside_decode` how much
    longer they ran while the decode worker was busy (on two CPU cores 1.2-1.4x: at a heavier
    load the decode worker is busy more of the time, so prefill steps slow with the load), where
    enough steps ran each way to tell. `prefill_loop_s` is the loop's mean time between a step
    and the next while prompts wait, which a quiet profile never sees (on two CPU cores 3-4 ms,
    a tenth of a step). The jitter is the steps' mean relative deviation from the fit."""
    records = logged(logs, spans, decode_logs,
                     lambda r: r.get("prefill_tokens", 0) > 0 and r.get("predicted_s", 0.0) > 0.0)
    steps = [(r["predicted_s"], r["observed_s"], b) for r, b, _ in records]
    if len(steps) < 3:
        return {}
    stalls = without_stalls(steps)
    loops = [loop for _, _, loop in records if loop is not None]
    contended = contention_fit(steps)
    scale, slowdown = contended or (sum(p * o for p, o, _ in steps) / sum(p * p for p, _, _ in steps), 1.0)
    jitter = sum(abs(o / (scale * p * (1 + (slowdown - 1) * b)) - 1) for p, o, b in steps) / len(steps)
    loop_s = sum(loops) / len(loops) if loops else 0.0
    return {"prefill_fit": scale, "prefill_fit_jitter": jitter, "prefill_loop_s": loop_s, "prefill_stalls": stalls,
            **({"prefill_beside_decode": slowdown} if contended else {})}


def replay_span(prefill_log: Path, warm_up: int) -> tuple[float, float]:
    """A recorded run's measured span, for runs recorded before spans were: warm-up requests
    go one at a time, each prefilled in a step of its own, so the run begins with the prefill
    step after them."""
    steps = [json.loads(line) for line in prefill_log.read_text().splitlines()]
    steps = [r for r in steps if r.get("prefill_tokens", 0) > 0]
    first = steps[warm_up]
    return first["t"] - first["step_s"], float("inf")


def measure_here(model: str, engine_args: dict) -> dict:
    """The workers' profile, measured in this process with the threads each worker gets."""
    import torch

    from kairos.engine import LLM
    from kairos.engine.profiler import measure_profile

    torch.set_num_threads(cpu_share(2))
    llm = LLM(model, **engine_args)
    profile = measure_profile(llm, quick=False)
    del llm
    return profile


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rate-scales", default="8,10,12",
                        help="loads to compare at (time compression); the default spans the tiny model's prefill "
                             "worker on a 2-core CPU, from well below its capacity to near it")
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
    parser.add_argument("--model", default="tiny", help="the workers' model: 'tiny' or a model folder")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--profile", help="the workers' step-time profile (default: measured here first, "
                                          "with the threads each worker gets)")
    parser.add_argument("--kv-bandwidth-gb-s", type=float, default=0.5,
                        help="prefill -> decode KV bandwidth for the simulator (python -m kairos.bench.transfer)")
    parser.add_argument("--warm-up", type=int, default=16, help="requests sent one at a time before each live run")
    parser.add_argument("--step-logs", metavar="DIR",
                        help="keep each live run's worker step logs here (kairos prefill/decode --step-log); "
                             "with --resimulate, fit the recorded runs' prefill steps afresh from the logs here")
    parser.add_argument("--name", default="sim_fidelity_tiny_cpu", help="result file stem under bench/results/")
    parser.add_argument("--resimulate", metavar="RESULT",
                        help="no live runs: judge the live runs recorded in this result file (with its "
                             "settings and calibration) against the current simulator, and rewrite it")
    return parser.parse_args(argv)


def point_trace(args: argparse.Namespace, rate: float) -> list:
    trace = shape(load_azure(args.trace), rate, limit=args.requests)
    return with_slos([replace(r, prompt_len=min(r.prompt_len, args.max_prompt_len),
                              output_len=min(r.output_len, args.max_output_len)) for r in trace],
                     args.ttft_slo_ms, args.tpot_slo_ms)


def judge(args: argparse.Namespace, profile: dict, calibration: dict, row: dict) -> dict:
    """Simulates the row's point calibrated and jittered as the first point's workers were (the
    prediction, a mean over JITTER_DRAWS draws of the jitter), then without the jitter, then
    straight from the profile, then at each live run's own measured step speed (the event model
    and policies alone, given the speed the machine ran at); and the gaps of each to the live
    runs."""
    prefill, decode = row["policy"].split("+")
    trace = point_trace(args, row["rate_scale"])
    cost = CostModel.from_profile(profile)
    config = SimConfig(prefill_policy=prefill, decode_policy=decode, token_budget=args.token_budget,
                       max_batch=args.max_batch, kv_capacity_tokens=args.kv_blocks * 16,
                       kv_bytes_per_token=profile.get("kv_bytes_per_token", SimConfig.kv_bytes_per_token),
                       kv_bandwidth_gb_s=args.kv_bandwidth_gb_s, kv_sent_during_steps=measured_on_gpu(profile))

    def contended(drift: dict) -> SimConfig:
        """The workers share one device: each role's steps slow as much beside the other's as
        they did in the runs fitted (not at all in results recorded before that was fitted)."""
        return replace(config, prefill_beside_decode=drift.get("prefill_beside_decode", 1.0),
                       decode_beside_prefill=drift.get("decode_beside_prefill", 1.0))

    def served(drift: dict) -> CostModel:
        """The profile's prefill scaled to serving's; decode as serving's own steps were fitted
        (results recorded before those fits scale by the time-weighted ratios)."""
        scaled = cost.scaled(drift.get("prefill_fit", drift["prefill"]), drift["decode"])
        fixed, per_token, per_context = scaled.prefill
        prefill = (fixed + drift.get("prefill_loop_s", 0.0), per_token, per_context)
        return CostModel(prefill, tuple(drift["decode_fit"]) if "decode_fit" in drift else scaled.decode)

    def at_speed(drift: dict) -> dict:
        jittered = replace(contended(drift), prefill_jitter=drift.get("prefill_fit_jitter", drift["prefill_jitter"]),
                           decode_jitter=drift.get("decode_fit_jitter", drift["decode_jitter"]))
        draws = [simulate(trace, replace(jittered, seed=seed), served(drift)) for seed in range(JITTER_DRAWS)]
        return {k: sum(d[k] for d in draws) / len(draws) for k in KEYS}

    row["simulated"] = at_speed(calibration)
    row["without_jitter"] = simulate(trace, contended(calibration), served(calibration))
    row["uncalibrated"] = simulate(trace, config, cost)
    own = [at_speed(drift) for drift in row.get("run_drifts", [])]
    if own:
        row["own_speed"] = {k: sum(o[k] for o in own) / len(own) for k in KEYS}
    live = row["live"]
    for key, sim in (("gap_points", "simulated"), ("without_jitter_gap_points", "without_jitter"),
                     ("uncalibrated_gap_points", "uncalibrated"), ("own_speed_gap_points", "own_speed")):
        if sim in row:
            row[key] = {k: 100 * (row[sim][k] - live[k]) for k in KEYS}
    return row


def fitted(drift: dict, profile: dict) -> str:
    prefill = (f"; least squares scales prefill {drift['prefill_fit']:.2f}x, "
               f"give or take {drift['prefill_fit_jitter']:.0%}" if "prefill_fit" in drift else "")
    beside = [f"{role} steps {drift[key]:.2f}x" for role, key in
              (("prefill", "prefill_beside_decode"), ("decode", "decode_beside_prefill")) if key in drift]
    if beside:
        prefill += "; beside the other worker's steps, " + " and ".join(beside) + " as long as alone"
    if "prefill_loop_s" in drift:
        prefill += f"; {drift['prefill_loop_s'] * 1e3:.1f} ms between prefill steps"
    if "decode_fit" not in drift:
        return prefill
    ours, theirs = drift["decode_fit"], CostModel.from_profile(profile).decode
    online = (f"; the workers' calibration predicted them within {drift['decode_online_error']:.0%}"
              if "decode_online_error" in drift else "")
    return prefill + (
        "; serving's decode steps fitted: {:.2f} ms + {:.3f} ms per sequence + {:.2f} us per context token "
        "(profile {:.2f} + {:.3f} + {:.2f}), give or take {:.0%}{}").format(
        ours[0] * 1e3, ours[1] * 1e3, ours[2] * 1e6, theirs[0] * 1e3, theirs[1] * 1e3, theirs[2] * 1e6,
        drift["decode_fit_jitter"], online)


def print_row(row: dict) -> None:
    live, simulated, gap = row["live"], row["simulated"], row["gap_points"]
    print(f"x{row['rate_scale']:<4g} {row['policy']:>15}: live TTFT {live['ttft_attainment']:.1%} "
          f"TPOT {live['tpot_attainment']:.1%} E2E {live['e2e_attainment']:.1%} | simulated "
          f"{simulated['ttft_attainment']:.1%} {simulated['tpot_attainment']:.1%} {simulated['e2e_attainment']:.1%} | "
          f"gap {gap['ttft_attainment']:+.1f} / {gap['tpot_attainment']:+.1f} / {gap['e2e_attainment']:+.1f} points "
          f"(without jitter E2E {row['without_jitter_gap_points']['e2e_attainment']:+.1f}, uncalibrated "
          f"{row['uncalibrated_gap_points']['e2e_attainment']:+.1f}{own_speed_gap(row)}; live runs spread "
          f"{row['live_spread_points']['e2e_attainment']:.1f})")


def own_speed_gap(row: dict) -> str:
    gap = row.get("own_speed_gap_points")
    return f", at the runs' own step speed {gap['e2e_attainment']:+.1f}" if gap else ""


def resimulate(path: Path, step_logs: Path | None = None) -> None:
    recorded = json.loads(path.read_text())
    args = argparse.Namespace(**recorded["setup"])
    args.resimulate = str(path)
    profile = recorded.get("profile") or json.loads(Path(args.profile).read_text())
    if step_logs:
        refit(recorded, args, step_logs)
    rows = [judge(args, profile, recorded["calibration"], row) for row in recorded["rows"]]
    for row in rows:
        print_row(row)
    summarize(args, profile, recorded["calibration"], rows, final=True,
              live_date=recorded.get("live_date", recorded["date"]), live_device=recorded.get("live_device"),
              live_command=recorded.get("live_command", recorded.get("command")))


def served_fits(prefill_logs: list[Path], spans: list[tuple[float, float]], decode_logs: list[Path] | None) -> dict:
    """Serving's prefill and decode steps, fitted from both workers' logs of the same runs;
    without the decode logs, the prefill steps alone (as one scale)."""
    if decode_logs is None:
        return served_prefill_fit(prefill_logs, spans)
    return {**served_prefill_fit(prefill_logs, spans, decode_logs),
            **served_decode_fit(decode_logs, spans, prefill_logs)}


def refit(recorded: dict, args: argparse.Namespace, step_logs: Path) -> None:
    """Fits serving's prefill and decode steps afresh from the recorded runs' step logs (named
    as a live run names them), for each run and for each point; the first point's is the
    calibration. A run recorded without its decode logs keeps its decode fit."""
    for row in recorded["rows"]:
        logs = {role: [step_log(step_logs, row["policy"], row["rate_scale"], repeat, role)
                       for repeat in range(len(row["live_runs"]))] for role in ("prefill", "decode")}
        spans = row.get("spans") or [replay_span(log, args.warm_up) for log in logs["prefill"]]
        decode = logs["decode"] if all(log.exists() for log in logs["decode"]) else None
        for i, (span, drift) in enumerate(zip(spans, row["run_drifts"])):
            drift.update(served_fits([logs["prefill"][i]], [span], decode and [decode[i]]))
        row["drift"].update(served_fits(logs["prefill"], spans, decode))
    recorded["calibration"] = recorded["rows"][0]["drift"]


def main() -> None:
    args = parse_args()
    if args.resimulate:
        resimulate(Path(args.resimulate), Path(args.step_logs) if args.step_logs else None)
        return
    engine_args = {"max_num_batched_tokens": args.token_budget, "max_num_seqs": args.max_batch,
                   "num_kv_blocks": args.kv_blocks, "max_model_len": args.max_model_len,
                   "load_format": args.load_format}
    if args.profile:
        profile_path = Path(args.profile)
        profile = json.loads(profile_path.read_text())
    else:
        profile_path = Path(tempfile.mkdtemp()) / "profile.json"
        profile = measure_here(args.model, engine_args)
        profile_path.write_text(json.dumps(profile))
    print(f"profile: {len(profile['prefill'])} prefill and {len(profile['decode'])} decode points on "
          f"{profile['device']}, held-out MAPE prefill {profile['prefill_mape']:.0%} "
          f"decode {profile['decode_mape']:.0%}")

    worker = engine_argv(model=args.model, profile=str(profile_path), **engine_args)
    rows, calibration = [], None
    policies = args.policies.split(",")
    # Step logs are always kept (in a temporary folder unless asked for): serving's own decode
    # step times are fitted from them.
    log_dir = Path(args.step_logs) if args.step_logs else Path(tempfile.mkdtemp(prefix="kairos-step-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    for rate in (float(x) for x in args.rate_scales.split(",")):
        trace = point_trace(args, rate)
        runs, drifts = {p: [] for p in policies}, {p: [] for p in policies}
        step_logs = {p: {"prefill": [], "decode": []} for p in policies}  # (log, measured span) of each run
        # Repeats take the policies in turn, so that a machine whose speed drifts during a
        # session (a GPU's clocks, its neighbours' load) slows every policy alike.
        for repeat in range(args.repeats):
            for policy in policies:
                prefill, decode = policy.split("+")
                logs = {role: step_log(log_dir, policy, rate, repeat, role) for role in ("prefill", "decode")}
                with local_cluster(["--prefill-policy", prefill, *worker, "--step-log", str(logs["prefill"])],
                                   ["--decode-policy", decode, *worker, "--step-log", str(logs["decode"])]) as addr:
                    warm_up(addr, trace, args.warm_up)
                    before, started, wall = cost_scales(addr), time.perf_counter(), time.time()
                    runs[policy].append(replay(addr, trace))
                    drift = serving_drift(before, cost_scales(addr), time.perf_counter() - started)
                span = (wall, time.time())
                for role in ("prefill", "decode"):
                    step_logs[policy][role].append((logs[role], span))
                drifts[policy].append({**drift, **served_fits([logs["prefill"]], [span], [logs["decode"]])})
        for policy in policies:
            drift = {k: sum(d[k] for d in drifts[policy]) / args.repeats for k in drifts[policy][0]
                     if k not in FITTED}
            # over all the point's runs
            drift.update(served_fits(*(list(x) for x in zip(*step_logs[policy]["prefill"])),
                                     [log for log, _ in step_logs[policy]["decode"]]))
            if calibration is None:
                # The first point calibrates every simulation: how much slower steps ran while
                # serving than in the quiet profile (co-located workers share the cores).
                calibration = drift
                print(f"calibration ({policy} at rate x{rate:g}): steps ran {drift['prefill']:.2f}x (prefill) and "
                      f"{drift['decode']:.2f}x (decode) the profile's prediction, give or take "
                      f"{drift['prefill_jitter']:.0%} and {drift['decode_jitter']:.0%}{fitted(drift, profile)}")
            done = runs[policy]
            row = {"policy": policy, "rate_scale": rate, "live_runs": done, "run_drifts": drifts[policy],
                   "spans": [span for _, span in step_logs[policy]["prefill"]],
                   "drift": drift, "live": {k: sum(run[k] for run in done) / len(done) for k in KEYS},
                   "live_spread_points": {k: 100 * (max(run[k] for run in done) - min(run[k] for run in done))
                                          for k in KEYS}}
            rows.append(judge(args, profile, calibration, row))
            print_row(row)
        summarize(args, profile, calibration, rows, final=False)
    summarize(args, profile, calibration, rows, final=True)


def summarize(args, profile: dict, calibration: dict, rows: list[dict], final: bool, live_date: str | None = None,
              live_device: str | None = None, live_command: str | None = None) -> None:
    """Writes the result file (after every point, so a run cut short keeps what it measured).
    `live_device` is where the workers ran (the profile's device may be another); a result
    judged again keeps the date, device and command of its live runs."""
    if live_device is None and not args.resimulate:
        import torch

        live_device = (torch.cuda.get_device_name() if torch.cuda.is_available()
                       else f"{platform.machine()} CPU, {os.cpu_count()} cores")
    def gaps(key: str) -> tuple[dict, dict] | None:
        judged = [r[key] for r in rows if key in r]
        if not judged:
            return None
        return ({k: max(abs(g[k]) for g in judged) for k in KEYS},
                {k: sum(abs(g[k]) for g in judged) / len(judged) for k in KEYS})

    worst, mean = gaps("gap_points")
    own_speed = gaps("own_speed_gap_points")
    noise = {k: sum(r["live_spread_points"][k] for r in rows) / len(rows) for k in KEYS}
    dated = {"live_date": live_date} if live_date else {}
    dated |= {"live_device": live_device} if live_device else {}
    dated |= {"live_command": live_command} if live_command else {}
    own = {"own_speed_largest_gap_points": own_speed[0], "own_speed_mean_gap_points": own_speed[1]} if own_speed else {}
    path = write_result(args.name, {"setup": vars(args), **dated, "device": profile["device"], "profile_mape": {
        "prefill": profile["prefill_mape"], "decode": profile["decode_mape"]}, "calibration": calibration,
        "largest_gap_points": worst, "mean_gap_points": mean, **own, "mean_live_spread_points": noise,
        "rows": rows, "profile": profile})
    if final:
        def line(worst: dict, mean: dict) -> str:
            return ("largest gap: " + ", ".join(f"{k.split('_')[0].upper()} {v:.1f}" for k, v in worst.items())
                    + " points; mean: " + ", ".join(f"{k.split('_')[0].upper()} {v:.1f}" for k, v in mean.items()))
        print(f"predicted (first point's calibration): {line(worst, mean)}")
        if own_speed:
            print(f"at each run's own step speed: {line(*own_speed)}")
        print(f"mean spread between live repeats: E2E {noise['e2e_attainment']:.1f}")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
