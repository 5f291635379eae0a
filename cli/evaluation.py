"""Trace-driven evaluation: `kairos simulate` runs a trace through the simulator; `kairos bench
compare` sweeps rates x policy pairs, simulated or live; `kairos bench replay` sends a trace to
a running router."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from kairos.bench import DEFAULT_PROFILE, DEFAULT_TRACE, RESULTS
from kairos.cli.checks import model_folder, positive_float, positive_floats, positive_int, writable_folder
from kairos.cli.engine_flags import engine_argv
from kairos.cli.report import print_slo_report
from kairos.scheduler import DECODE_POLICIES, PREFILL_POLICIES
from kairos.scheduler.defaults import (
    BLOCK_SIZE,
    DEFAULT_TPOT_SLO_MS,
    DEFAULT_TTFT_SLO_MS,
    MAX_BATCH,
    MAX_INFLIGHT_TRANSFER_BYTES,
    TOKEN_BUDGET,
)
from kairos.scheduler.metrics import NothingServed
from kairos.transport.sockets import DEFAULT_ROUTER

MIB = 2**20
# Options of the simulated system alone, with their defaults: a live run has the real thing.
SIMULATED_ONLY = {"--profile": str(DEFAULT_PROFILE), "--kv-bandwidth-gb-s": 25.0, "--step-jitter": 0.0,
                  "--colocated-slowdown": "1,1"}
LIVE_ONLY = {"--model": "tiny", "--load-format": "auto", "--max-model-len": None, "--worker-profile": None,
             "--timeout": 300.0}


def add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=str(DEFAULT_TRACE),
                   help="a trace file (or, with --trace-format synthetic, ignored)")
    p.add_argument("--trace-format", default="azure", choices=["azure", "mooncake", "synthetic"])
    p.add_argument("--rate-scale", type=float, default=1.0, help="compress time by this factor")
    p.add_argument("--start-s", type=float, default=0.0)
    p.add_argument("--duration-s", type=float)
    p.add_argument("--limit", type=positive_int, help="at most this many requests")
    p.add_argument("--ttft-slo-ms", type=float, default=DEFAULT_TTFT_SLO_MS)
    p.add_argument("--tpot-slo-ms", type=float, default=DEFAULT_TPOT_SLO_MS)
    p.add_argument("--ttft-ms-per-1k-prompt", type=float, default=0.0,
                   help="grow the TTFT SLO by this much per 1000 prompt tokens")
    p.add_argument("--synthetic-requests", type=positive_int, default=1000)
    p.add_argument("--synthetic-rate", type=float, default=5.0, help="requests/s")
    p.add_argument("--synthetic-arrival", default="poisson", choices=["poisson", "gamma"])
    p.add_argument("--synthetic-lengths", default="lognormal", choices=["lognormal", "zipf"])
    p.add_argument("--synthetic-prompt-mean", type=int, default=1000, help="mean prompt length, tokens")
    p.add_argument("--synthetic-output-mean", type=int, default=150, help="mean output length, tokens")
    p.add_argument("--synthetic-max-len", type=int, default=8192, help="longest prompt and output together")
    p.add_argument("--synthetic-long-share", type=float, default=0.0,
                   help="share of long prompts (a bimodal mix), of mean --synthetic-long-mean")
    p.add_argument("--synthetic-long-mean", type=int, default=16000)
    p.add_argument("--synthetic-prefix-groups", type=int, default=0,
                   help="requests share their first --synthetic-prefix-len tokens within this many groups "
                        "(Mooncake-style hash_ids, for the prefix cache)")
    p.add_argument("--synthetic-prefix-len", type=int, default=2048)
    p.add_argument("--mixed-throughput-share", type=float, default=0.0,
                   help="make this share of requests throughput-intensive (a deadline for the whole response)")
    p.add_argument("--mixed-collective-share", type=float, default=0.0,
                   help="make this share of requests the first call of an agent's DAG of 3-8 calls")
    p.add_argument("--max-prompt-len", type=int, help="cap prompt lengths (to fit a small model)")
    p.add_argument("--max-output-len", type=int, help="cap output lengths")
    p.add_argument("--max-tokens", type=positive_int,
                   help="the max_tokens clients set on every request, outputs still ending at the trace's lengths "
                        "(live: as at an end token, which the policies are not told; over a router only). Default: "
                        "each request's own length, which the policies' output-length bound then knows exactly")


def read_trace(args: argparse.Namespace):
    from kairos.scheduler.traces import load_trace, mixed, shape, with_slos

    trace = load_trace(args.trace, args.trace_format, num_requests=args.synthetic_requests,
                       rate=args.synthetic_rate, arrival=args.synthetic_arrival, lengths=args.synthetic_lengths,
                       prompt_mean=args.synthetic_prompt_mean, output_mean=args.synthetic_output_mean,
                       max_len=args.synthetic_max_len, long_share=args.synthetic_long_share,
                       long_mean=args.synthetic_long_mean, prefix_groups=args.synthetic_prefix_groups,
                       prefix_len=args.synthetic_prefix_len)
    trace = shape(trace, args.rate_scale, args.start_s, args.duration_s, args.limit)
    max_prompt, max_output = args.max_prompt_len, args.max_output_len
    for flag, cap in (("--max-prompt-len", max_prompt), ("--max-output-len", max_output)):
        if cap is not None and cap < 1:
            raise ValueError(f"{flag} must be at least 1, got {cap}")
    if max_prompt or max_output:
        trace = [replace(r, prompt_len=min(r.prompt_len, max_prompt or r.prompt_len),
                         output_len=min(r.output_len, max_output or r.output_len)) for r in trace]
    trace = with_slos(trace, args.ttft_slo_ms, args.tpot_slo_ms, args.ttft_ms_per_1k_prompt)
    if args.mixed_throughput_share or args.mixed_collective_share:
        trace = mixed(trace, args.mixed_throughput_share, args.mixed_collective_share)
    return trace


def add_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=SIMULATED_ONLY["--profile"], help="step-time profile (kairos profile)")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--token-budget", type=int, default=TOKEN_BUDGET, help="prefill tokens per step")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="decode sequences per step")
    p.add_argument("--kv-capacity-tokens", type=int, help="per worker (default: from the profile)")
    p.add_argument("--kv-bandwidth-gb-s", type=float, default=SIMULATED_ONLY["--kv-bandwidth-gb-s"],
                   help="prefill -> decode KV bandwidth")
    p.add_argument("--max-inflight-transfer-mb", type=float, default=MAX_INFLIGHT_TRANSFER_BYTES / MIB,
                   help="KV under way into a decode worker, MiB (as kairos decode --max-inflight-transfer-mb)")
    p.add_argument("--max-prefill-wait-s", type=float,
                   help="a prompt the prefill policy demoted goes first once it has waited this long "
                        "(as the workers' flag; default: no limit)")
    p.add_argument("--step-jitter", type=float, default=SIMULATED_ONLY["--step-jitter"],
                   help="spread step times around the profile by this mean relative deviation "
                        "(kairos status reports it while serving); 0 runs every step as predicted")
    p.add_argument("--colocated-slowdown", default=SIMULATED_ONLY["--colocated-slowdown"], metavar="PREFILL,DECODE",
                   help="workers that share one device slow each other: a prefill step beside a busy decode "
                        "worker takes PREFILL times its length alone, a decode step beside prefill DECODE times "
                        "(python -m kairos.bench.sim_fidelity fits both from serving's step logs); 1,1: a device each")


def sim_setup(args: argparse.Namespace, prefill_policy: str = "fcfs", decode_policy: str = "cb"):
    from kairos.scheduler.cost_model import CostModel
    from kairos.scheduler.simulator import SimConfig, measured_on_gpu

    try:
        profile = json.loads(open(args.profile).read())
        cost = CostModel.from_profile(profile)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"cannot use the profile {args.profile}: {e}") from None
    config = SimConfig(args.prefill_workers, args.decode_workers, prefill_policy, decode_policy,
                       args.token_budget, args.max_batch,
                       profile.get("kv_capacity_tokens", SimConfig.kv_capacity_tokens)
                       if args.kv_capacity_tokens is None else args.kv_capacity_tokens,
                       profile.get("kv_bytes_per_token", SimConfig.kv_bytes_per_token), args.kv_bandwidth_gb_s,
                       max_inflight_transfer_bytes=int(args.max_inflight_transfer_mb * MIB),
                       prefill_jitter=args.step_jitter, decode_jitter=args.step_jitter,
                       **colocated_slowdown(args.colocated_slowdown), kv_sent_during_steps=measured_on_gpu(profile),
                       max_tokens=args.max_tokens, max_prefill_wait_s=args.max_prefill_wait_s)
    return config, cost


def colocated_slowdown(value: str) -> dict:
    """--colocated-slowdown PREFILL,DECODE as the simulator's settings."""
    try:
        prefill, decode = (float(x) for x in value.split(","))
    except ValueError:
        raise ValueError(f"--colocated-slowdown is PREFILL,DECODE (two numbers >= 1, such as 1.3,1.2), "
                         f"not {value!r}") from None
    return {"prefill_beside_decode": prefill, "decode_beside_prefill": decode}


def cmd_simulate(args: argparse.Namespace) -> int:
    from kairos.scheduler.simulator import simulate

    config, cost = sim_setup(args, args.prefill_policy, args.decode_policy)
    trace = read_trace(args)
    started = time.perf_counter()
    report = simulate(trace, config, cost)
    report["simulated_in_s"] = round(time.perf_counter() - started, 3)
    refused = f" ({report['refused']} refused: longer than the KV cache)" if report["refused"] else ""
    print_slo_report(report, args.json, f"{report['requests']} requests{refused}, "
                                        f"{args.prefill_policy}+{args.decode_policy}, "
                                        f"simulated in {report['simulated_in_s']:.1f} s")
    return 0


def check_compare_flags(args: argparse.Namespace) -> None:
    """Flags that set up only the simulator, or only the live workers, are refused in the other
    mode; a results name must be a file name."""
    if args.rate_scale != 1.0:
        raise ValueError("--rate-scale sets one rate; a comparison sweeps --rate-scales")
    if args.name is not None and (not args.name or Path(args.name).name != args.name or args.name in (".", "..")):
        raise ValueError(f"--name is the results' file name, without a folder (that is --out-dir): not {args.name!r}")
    if args.repeats != 1 and not args.live:
        raise ValueError("--repeats is for --live runs: the simulator gives the same result every time")
    for flag, default in LIVE_ONLY.items() if not args.live else ():
        if getattr(args, flag[2:].replace("-", "_")) != default:
            raise ValueError(f"{flag} sets up the live workers: it needs --live")
    for flag, default in SIMULATED_ONLY.items() if args.live else ():
        if getattr(args, flag[2:].replace("-", "_")) != default:
            hint = " (the workers' profile is --worker-profile)" if flag == "--profile" else ""
            raise ValueError(f"{flag} sets up the simulator; a --live run measures it instead{hint}")


def policy_pairs(spec: str, baseline: str) -> list[str]:
    """PREFILL+DECODE pairs, each once, the baseline first if it is not among them."""
    pairs = list(dict.fromkeys(spec.split(",")))
    if baseline not in pairs:
        pairs.insert(0, baseline)
    for pair in pairs:
        if pair.count("+") != 1:
            raise ValueError(f"a policy pair is PREFILL+DECODE (such as kairos+kairos), not {pair!r}")
        prefill, decode = pair.split("+")
        PREFILL_POLICIES.policy_class(prefill)  # a clear error for an unknown name
        DECODE_POLICIES.policy_class(decode)
    return pairs


def live_setup(args: argparse.Namespace):
    """run_point and its record for a --live sweep: local workers with the sweep's limits."""
    from kairos.scheduler.simulator import SimConfig, check_config
    from kairos.transport.replay import live_point

    model_folder(args.model)
    # The live cluster's settings, checked as the simulator checks its own.
    check_config(SimConfig(args.prefill_workers, args.decode_workers, token_budget=args.token_budget,
                           max_batch=args.max_batch,
                           max_inflight_transfer_bytes=int(args.max_inflight_transfer_mb * MIB),
                           kv_capacity_tokens=SimConfig.kv_capacity_tokens if args.kv_capacity_tokens is None
                           else args.kv_capacity_tokens, max_prefill_wait_s=args.max_prefill_wait_s))
    num_kv_blocks = None if args.kv_capacity_tokens is None else -(-args.kv_capacity_tokens // BLOCK_SIZE)
    worker = engine_argv(model=args.model, load_format=args.load_format, max_num_batched_tokens=args.token_budget,
                         max_num_seqs=args.max_batch, max_model_len=args.max_model_len, num_kv_blocks=num_kv_blocks,
                         profile=args.worker_profile, max_prefill_wait_s=args.max_prefill_wait_s)
    decode = ["--max-inflight-transfer-mb", str(args.max_inflight_transfer_mb)]
    run_point = live_point(worker, args.timeout, args.prefill_workers, args.decode_workers, decode, args.max_tokens)
    return run_point, {"workers": worker, "decode_worker_extra": decode, "prefill_workers": args.prefill_workers,
                       "decode_workers": args.decode_workers}


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kairos.scheduler import compare as cmp

    check_compare_flags(args)
    writable_folder(args.out_dir, "--out-dir")  # now, not after the sweep
    policies = policy_pairs(args.policies, cmp.BASELINE)
    trace = read_trace(args)
    scales = sorted(set(args.rate_scales))  # goodput reads the rates in order
    if args.live:
        run_point, setup = live_setup(args)
    else:
        config, cost = sim_setup(args)
        run_point, setup = cmp.simulated_point(config, cost), {"profile": args.profile, "config": vars(config)}
    mode = "live" if args.live else "simulated"
    try:
        with tqdm(total=len(scales) * len(policies) * args.repeats, desc=mode, disable=not sys.stderr.isatty()) as bar:
            result = cmp.compare(trace, scales, policies, run_point, args.repeats, progress=bar.update)
    except NothingServed as e:  # a live point whose requests all failed
        print(f"kairos: error: {e}", file=sys.stderr)
        return 1
    print(cmp.table(result))
    stem = Path(args.trace).stem if args.trace_format != "synthetic" else "synthetic"
    name = args.name or f"compare_{stem}{'_live' if args.live else ''}"
    meta = {"title": name, "trace": args.trace, "trace_format": args.trace_format, "ttft_slo_ms": args.ttft_slo_ms,
            "tpot_slo_ms": args.tpot_slo_ms, "ttft_ms_per_1k_prompt": args.ttft_ms_per_1k_prompt, "mode": mode,
            **setup, "command": " ".join(["kairos", *sys.argv[1:]])}
    for path in cmp.write(result, Path(args.out_dir), name, meta):
        print(f"wrote {path}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kairos.transport.replay import replay

    if args.http is None and (args.model or args.api_key):
        raise ValueError("--model and --api-key are for --http (the HTTP API); a router takes neither")
    if args.http is not None and args.addr is not None:
        raise ValueError("--addr (a router) and --http (the HTTP API) exclude each other: give one")
    if args.http is not None and not args.http.startswith(("http://", "https://")):
        raise ValueError(f"--http takes the API's URL, http://HOST:PORT or https://..., not {args.http!r}")
    trace = read_trace(args)
    target = args.http or args.addr or DEFAULT_ROUTER
    api_key = args.api_key or os.environ.get("KAIROS_API_KEY")
    try:
        with tqdm(total=len(trace), desc="replay", disable=args.json or not sys.stderr.isatty()) as bar:
            report = replay(target, trace, timeout_s=args.timeout, progress=bar.update, seed=args.prompt_seed,
                            http_model=args.model, api_key=api_key, max_tokens=args.max_tokens)
    except NothingServed as e:
        print(f"kairos: error: {e}", file=sys.stderr)
        return 1
    failed = f"{report['failed']} failed" + (f"; the first: {report['first_failure']}" if report["failed"] else "")
    print_slo_report(report, args.json, f"{report['requests']} requests ({failed}), live at {target}")
    return 0


def add_commands(sub) -> None:
    sim = sub.add_parser("simulate", help="replay a trace through the policies in a discrete-event model")
    add_trace_args(sim)
    add_sim_args(sim)
    sim.add_argument("--prefill-policy", default="fcfs", choices=list(PREFILL_POLICIES),
                     help=PREFILL_POLICIES.describe())
    sim.add_argument("--decode-policy", default="cb", choices=list(DECODE_POLICIES), help=DECODE_POLICIES.describe())
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=cmd_simulate)

    bench = sub.add_parser("bench", help="trace-driven comparisons").add_subparsers(dest="bench", required=True)
    cmp = bench.add_parser("compare", help="sweep rates x policies, simulated or live, against fcfs+cb")
    add_trace_args(cmp)
    add_sim_args(cmp)
    cmp.add_argument("--live", action="store_true",
                     help="replay against a local router with --prefill-workers and --decode-workers workers per "
                          "point, started with --token-budget, --max-batch, --kv-capacity-tokens and "
                          "--max-inflight-transfer-mb, instead of simulating")
    cmp.add_argument("--model", default=LIVE_ONLY["--model"], help="--live: the workers' model")
    cmp.add_argument("--load-format", default=LIVE_ONLY["--load-format"], choices=["auto", "dummy"],
                     help="--live: the workers' weights (dummy: random, for a model folder with no weights)")
    cmp.add_argument("--max-model-len", type=int, help="--live: the workers' longest sequence")
    cmp.add_argument("--worker-profile", help="--live: the workers' step-time profile (default: each measures "
                                               "a short one at start-up; --profile is the simulator's)")
    cmp.add_argument("--timeout", type=positive_float, default=LIVE_ONLY["--timeout"],
                     help="--live: seconds to wait for any reply")
    cmp.add_argument("--rate-scales", type=positive_floats, default=[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                     help="comma-separated: how many times faster than the trace requests arrive")
    cmp.add_argument("--repeats", type=int, default=1,
                     help="--live: runs per point, the policies taking turns; rows report their mean")
    cmp.add_argument("--policies", default="fcfs+cb,kairos+cb,kairos+kairos,mh+kairos",
                     help="PREFILL+DECODE pairs; fcfs+cb (the baseline) is always included")
    cmp.add_argument("--out-dir", default=str(RESULTS))
    cmp.add_argument("--name", help="file name stem (default: compare_<trace>)")
    cmp.set_defaults(func=cmd_compare)

    rep = bench.add_parser("replay", help="send a trace to a router, open loop, and report SLO attainment")
    add_trace_args(rep)
    rep.add_argument("--addr", help=f"the router (default: {DEFAULT_ROUTER})")
    rep.add_argument("--http", metavar="URL", help="send through the OpenAI-compatible HTTP API at URL (kairos api), "
                     "streamed /v1/completions, instead of to the router at --addr")
    rep.add_argument("--model", help="--http: the model name (default: the one /v1/models lists)")
    rep.add_argument("--api-key", help="--http: the API key (default: $KAIROS_API_KEY)")
    rep.add_argument("--timeout", type=positive_float, default=300.0, help="seconds to wait for any reply")
    rep.add_argument("--prompt-seed", type=int, help="draw the synthetic prompts from this seed (default: a fresh "
                     "one, so that no prompt of an earlier replay is still in the server's prefix cache)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_replay)
