"""The `kairos` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import zmq

from engine.config import DTYPES
from transport.serve import StartupError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="Hugging Face model folder, or 'tiny' (built in)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json, if not the model's own")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone, for benchmarking shapes")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: auto is triton on CUDA, torch (the PyTorch reference) elsewhere")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache size in blocks (default: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--prefill-policy", default="fcfs", choices=["fcfs", "edf", "kairos", "mh"],
                   help="order of waiting prompts: kairos ranks by TTFT slack; mh maximises deadlines met")
    p.add_argument("--decode-policy", default="cb", choices=["cb", "kairos"],
                   help="cb: FCFS up to --max-num-seqs; kairos: admit while the step fits the tightest TPOT")
    p.add_argument("--profile", help="step-time profile (kairos profile) for the cost model; "
                                     "without one, predicting policies measure a short one at start-up")
    p.add_argument("--cpu-threads", type=int, help="torch threads for CPU work (default: one per core); "
                                                   "processes sharing a machine should split its cores")


def engine_kwargs(args: argparse.Namespace) -> dict:
    names = ("tokenizer", "dtype", "device", "load_format", "backend", "block_size", "num_kv_blocks",
             "gpu_memory_utilization", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
             "enable_prefix_caching", "prefill_policy", "decode_policy", "profile")
    return {n: getattr(args, n) for n in names}


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    # With --seed S, prompt i gets seed S + i: the run is reproducible and the prompts do not
    # all share one random stream.
    params = [SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=None if args.seed is None else args.seed + i, stop=args.stop or [], ignore_eos=args.ignore_eos,
    ) for i in range(len(args.prompt))]
    llm = LLM(args.model, **engine_kwargs(args))
    outputs = llm.generate(args.prompt, params, use_tqdm=not args.json and sys.stderr.isatty())
    for out in outputs:
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                              "prompt_token_ids": out.prompt_token_ids,
                              "finish_reason": out.finish_reason,
                              "num_cached_tokens": out.num_cached_tokens}, ensure_ascii=False))
        else:
            print(f"--- prompt: {out.prompt!r}\n{out.prompt}{out.text}\n[{len(out.token_ids)} tokens, "
                  f"finish: {out.finish_reason}]")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from engine import LLM
    from engine.profiler import measure_profile

    llm = LLM(args.model, **engine_kwargs(args))
    profile = measure_profile(llm, quick=args.quick, progress=sys.stderr.isatty())
    out = args.out or f"profile_{profile['model']}_{llm.runner.device.type}.json"
    with open(out, "w") as f:
        json.dump(profile, f, indent=1)
    a, b, c = profile["fit"]["prefill"]
    alpha, beta, gamma = profile["fit"]["decode"]
    print(f"{len(profile['prefill'])} prefill and {len(profile['decode'])} decode steps timed in "
          f"{profile['seconds_to_measure']:.0f} s on {profile['device']} ({profile['dtype']})")
    print(f"prefill = {a * 1e3:.3f} ms + {b * 1e6:.3f} us/token + {c * 1e9:.4f} ns/(token x context)   "
          f"held-out MAPE {100 * profile['prefill_mape']:.1f}%")
    print(f"decode  = {alpha * 1e3:.3f} ms + {beta * 1e6:.3f} us/seq + {gamma * 1e9:.4f} ns/context token   "
          f"held-out MAPE {100 * profile['decode_mape']:.1f}%")
    print(f"wrote {out}")
    return 0


# ---- trace-driven evaluation ----------------------------------------------------------------------

DEFAULT_PROFILE = "bench/profiles/Llama-3.1-8B_H100.json"


def add_trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="bench/traces/AzureLLMInferenceTrace_conv.csv",
                   help="a trace file (or, with --trace-format synthetic, ignored)")
    p.add_argument("--trace-format", default="azure", choices=["azure", "mooncake", "synthetic"])
    p.add_argument("--rate-scale", type=float, default=1.0, help="compress time by this factor")
    p.add_argument("--start-s", type=float, default=0.0)
    p.add_argument("--duration-s", type=float)
    p.add_argument("--limit", type=int, help="at most this many requests")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=100.0)
    p.add_argument("--ttft-ms-per-1k-prompt", type=float, default=0.0,
                   help="grow the TTFT SLO by this much per 1000 prompt tokens")
    p.add_argument("--synthetic-requests", type=int, default=1000)
    p.add_argument("--synthetic-rate", type=float, default=5.0, help="requests/s")
    p.add_argument("--synthetic-arrival", default="poisson", choices=["poisson", "gamma"])
    p.add_argument("--synthetic-lengths", default="lognormal", choices=["lognormal", "zipf"])


def add_length_caps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-prompt-len", type=int, help="cap prompt lengths (to fit a small model)")
    p.add_argument("--max-output-len", type=int, help="cap output lengths")


def read_trace(args: argparse.Namespace):
    from dataclasses import replace

    from scheduler.traces import load_trace, shape, with_slos

    trace = load_trace(args.trace, args.trace_format, num_requests=args.synthetic_requests,
                       rate=args.synthetic_rate, arrival=args.synthetic_arrival, lengths=args.synthetic_lengths)
    trace = shape(trace, args.rate_scale, args.start_s, args.duration_s, args.limit)
    max_prompt, max_output = getattr(args, "max_prompt_len", None), getattr(args, "max_output_len", None)
    for flag, cap in (("--max-prompt-len", max_prompt), ("--max-output-len", max_output)):
        if cap is not None and cap < 1:
            raise ValueError(f"{flag} must be at least 1, got {cap}")
    if max_prompt or max_output:
        trace = [replace(r, prompt_len=min(r.prompt_len, max_prompt or r.prompt_len),
                         output_len=min(r.output_len, max_output or r.output_len)) for r in trace]
    return with_slos(trace, args.ttft_slo_ms, args.tpot_slo_ms, args.ttft_ms_per_1k_prompt)


def sim_setup(args: argparse.Namespace):
    from scheduler.cost_model import CostModel
    from scheduler.simulator import SimConfig

    try:
        profile = json.loads(open(args.profile).read())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the profile {args.profile}: {e}") from None
    config = SimConfig(args.prefill_workers, args.decode_workers, getattr(args, "prefill_policy", "fcfs"),
                       getattr(args, "decode_policy", "cb"),
                       args.token_budget, args.max_batch,
                       profile.get("kv_capacity_tokens", SimConfig.kv_capacity_tokens)
                       if args.kv_capacity_tokens is None else args.kv_capacity_tokens,
                       profile.get("kv_bytes_per_token", SimConfig.kv_bytes_per_token), args.kv_bandwidth_gb_s,
                       max_inflight_transfer_bytes=int(args.max_inflight_transfer_mb * 2**20),
                       prefill_jitter=args.step_jitter, decode_jitter=args.step_jitter)
    return config, CostModel.from_profile(profile)


# Options of the simulated system alone, with their defaults: a live run has the real thing.
SIMULATED_ONLY = {"--profile": DEFAULT_PROFILE, "--kv-bandwidth-gb-s": 25.0, "--step-jitter": 0.0}
LIVE_ONLY = {"--model": "tiny", "--load-format": "auto", "--max-model-len": None, "--worker-profile": None,
             "--timeout": 300.0}


def add_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=SIMULATED_ONLY["--profile"], help="step-time profile (kairos profile)")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--token-budget", type=int, default=8192, help="prefill tokens per step")
    p.add_argument("--max-batch", type=int, default=256, help="decode sequences per step")
    p.add_argument("--kv-capacity-tokens", type=int, help="per worker (default: from the profile)")
    p.add_argument("--kv-bandwidth-gb-s", type=float, default=SIMULATED_ONLY["--kv-bandwidth-gb-s"],
                   help="prefill -> decode KV bandwidth")
    p.add_argument("--max-inflight-transfer-mb", type=float, default=4096.0,
                   help="KV under way into a decode worker, MiB (as kairos decode --max-inflight-transfer-mb)")
    p.add_argument("--step-jitter", type=float, default=SIMULATED_ONLY["--step-jitter"],
                   help="spread step times around the profile by this mean relative deviation "
                        "(kairos status reports it while serving); 0 runs every step as predicted")


def cmd_simulate(args: argparse.Namespace) -> int:
    from scheduler.simulator import simulate

    config, cost = sim_setup(args)
    trace = read_trace(args)
    started = time.perf_counter()
    report = simulate(trace, config, cost)
    report["simulated_in_s"] = round(time.perf_counter() - started, 3)
    print_slo_report(report, args.json, f"{report['requests']} requests, {args.prefill_policy}+{args.decode_policy}, "
                                        f"simulated in {report['simulated_in_s']:.1f} s")
    return 0


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


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scheduler import compare as cmp

    trace = read_trace(args)
    scales = [float(x) for x in args.rate_scales.split(",")]
    policies = args.policies.split(",")
    if cmp.BASELINE not in policies:
        policies.insert(0, cmp.BASELINE)
    for policy in policies:
        if policy.count("+") != 1:
            raise ValueError(f"a policy pair is PREFILL+DECODE (such as kairos+kairos), not {policy!r}")
    from tqdm import tqdm

    if args.repeats != 1 and not args.live:
        raise ValueError("--repeats is for --live runs: the simulator gives the same result every time")
    for flag, default in LIVE_ONLY.items() if not args.live else ():
        if getattr(args, flag[2:].replace("-", "_")) != default:
            raise ValueError(f"{flag} sets up the live workers: it needs --live")
    if args.live:
        from scheduler.simulator import SimConfig, check_config
        from transport.replay import live_point

        for flag, default in SIMULATED_ONLY.items():
            if getattr(args, flag[2:].replace("-", "_")) != default:
                hint = " (the workers' profile is --worker-profile)" if flag == "--profile" else ""
                raise ValueError(f"{flag} sets up the simulator; a --live run measures it instead{hint}")
        # The live cluster's settings, checked as the simulator checks its own.
        check_config(SimConfig(args.prefill_workers, args.decode_workers, token_budget=args.token_budget,
                               max_batch=args.max_batch,
                               max_inflight_transfer_bytes=int(args.max_inflight_transfer_mb * 2**20),
                               kv_capacity_tokens=SimConfig.kv_capacity_tokens if args.kv_capacity_tokens is None
                               else args.kv_capacity_tokens))
        worker = ["--model", args.model, "--load-format", args.load_format,
                  "--max-num-batched-tokens", str(args.token_budget), "--max-num-seqs", str(args.max_batch)]
        if args.max_model_len is not None:
            worker += ["--max-model-len", str(args.max_model_len)]
        if args.kv_capacity_tokens is not None:
            worker += ["--num-kv-blocks", str(-(-args.kv_capacity_tokens // 16))]
        if args.worker_profile:
            worker += ["--profile", args.worker_profile]
        decode = ["--max-inflight-transfer-mb", str(args.max_inflight_transfer_mb)]
        run_point = live_point(worker, args.timeout, args.prefill_workers, args.decode_workers, decode)
        setup = {"workers": worker, "decode_worker_extra": decode, "prefill_workers": args.prefill_workers,
                 "decode_workers": args.decode_workers}
    else:
        config, cost = sim_setup(args)
        run_point, setup = cmp.simulated_point(config, cost), {"profile": args.profile, "config": vars(config)}
    mode = "live" if args.live else "simulated"
    with tqdm(total=len(scales) * len(policies) * args.repeats, desc=mode, disable=not sys.stderr.isatty()) as bar:
        result = cmp.compare(trace, scales, policies, run_point, args.repeats, progress=bar.update)
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

    from transport.replay import replay

    trace = read_trace(args)
    with tqdm(total=len(trace), desc="replay", disable=args.json or not sys.stderr.isatty()) as bar:
        report = replay(args.addr, trace, timeout_s=args.timeout, progress=bar.update, seed=args.prompt_seed)
    print_slo_report(report, args.json, f"{report['requests']} requests ({report['failed']} failed), live at {args.addr}")
    return 0


# ---- serving ------------------------------------------------------------------------------------

DEFAULT_ROUTER = "tcp://127.0.0.1:7100"


def add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7100)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transfer-timeout", type=float, default=10.0,
                   help="seconds a KV transfer may take once the decode side is ready for it")
    p.add_argument("--kv-frame-mb", type=float, default=8.0, help="largest KV frame on the wire, MiB")
    p.add_argument("--step-log", metavar="FILE",
                   help="append one JSON line per engine step: loop time split, batch, queue and free KV blocks")


def worker_kwargs(args: argparse.Namespace) -> dict:
    return {"transfer_timeout_s": args.transfer_timeout, "max_frame_bytes": int(args.kv_frame_mb * 2**20),
            "step_log": args.step_log}


def cmd_router(args: argparse.Namespace) -> int:
    from transport.router import Router

    router = Router(args.host, args.port, args.worker_timeout, args.queue_timeout,
                    default_slo=(args.ttft_slo_ms, args.tpot_slo_ms))
    print(f"kairos router: listening at {router.addr}", flush=True)
    router.run()
    return 0


def cmd_prefill(args: argparse.Namespace) -> int:
    from transport.prefill import PrefillWorker
    from transport.worker import build_llm

    PrefillWorker(build_llm(args.model, "prefill", engine_kwargs(args)), args.router, **worker_kwargs(args)).run()
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from transport.decode import DecodeWorker
    from transport.worker import build_llm

    DecodeWorker(build_llm(args.model, "decode", engine_kwargs(args)), args.router, kv_host=args.kv_host,
                 kv_port=args.kv_port, max_inflight_bytes=int(args.max_inflight_transfer_mb * 2**20),
                 **worker_kwargs(args)).run()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from transport.serve import cpu_share, serve

    worker_argv = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--load-format",
                   args.load_format, "--backend", args.backend, "--block-size", str(args.block_size),
                   "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                   "--transfer-timeout", str(args.transfer_timeout), "--kv-frame-mb", str(args.kv_frame_mb),
                   "--prefill-policy", args.prefill_policy, "--decode-policy", args.decode_policy]
    for flag, value in (("--tokenizer", args.tokenizer), ("--max-model-len", args.max_model_len),
                        ("--num-kv-blocks", args.num_kv_blocks), ("--profile", args.profile),
                        ("--step-log", args.step_log)):
        if value is not None:
            worker_argv += [flag, str(value)]
    if not args.enable_prefix_caching:
        worker_argv.append("--no-prefix-caching")
    worker_argv += ["--cpu-threads", str(args.cpu_threads or cpu_share(2))]
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    # One GPU, two workers: prefill takes a share, then decode fills up to the total.
    util = args.gpu_memory_utilization
    prefill_argv = ["--gpu-memory-utilization", f"{util * args.prefill_memory_share:.3f}"]
    decode_argv = ["--gpu-memory-utilization", f"{util:.3f}"]
    if args.verbose:
        worker_argv.insert(0, "-v")
    router_argv = ["--ttft-slo-ms", str(args.ttft_slo_ms), "--tpot-slo-ms", str(args.tpot_slo_ms)]
    return serve(args.host, args.port, router_argv, worker_argv, prefill_argv, decode_argv, args.startup_timeout,
                 on_gpu)


def cmd_client(args: argparse.Namespace) -> int:
    from transport.client import Client, RequestFailed

    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "ignore_eos": args.ignore_eos,
               "ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms, "output_len_hint": args.output_len_hint}
    failed = False
    with Client(args.addr, timeout_s=args.timeout) as client:
        if args.json or len(args.prompt) > 1:
            for completion in client.generate(args.prompt, **options):
                failed |= completion.error is not None
                if args.json:
                    out = completion.to_dict()
                    if out["error"] is None:
                        del out["error"]
                    print(json.dumps(out, ensure_ascii=False), flush=True)
                else:
                    print(f"--- {completion.request_id}\n{completion.text}\n"
                          f"[{completion.error or completion.finish_reason}]", flush=True)
            return 1 if failed else 0
        request_id = client.submit(args.prompt[0], **options)
        try:
            for chunk in client.stream(request_id):
                print(chunk.text, end="", flush=True)
            print()
        except KeyboardInterrupt:
            client.abort(request_id)
            raise
        except RequestFailed as e:
            print(f"\nkairos: error: {e.message}", file=sys.stderr)
            return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from transport.client import Client

    if args.wait is not None:
        from transport.serve import wait_for_workers

        if not args.wait > 0:
            raise ValueError(f"--wait must be a positive number of seconds, got {args.wait}")
        wait_for_workers(args.addr, {"prefill": 1, "decode": 1}, None, args.wait)
    with Client(args.addr, timeout_s=args.timeout) as client:
        report = client.status()
    if args.json:
        print(json.dumps(report))
        return 0
    counters = report["counters"]
    print("requests: " + ", ".join(f"{k} {v}" for k, v in counters.items()) + f", waiting for workers {report['pending']}")
    columns = ("role", "worker_id", "requests", "queued_prompt_tokens", "cached_prompt_tokens", "waiting", "running",
               "ready", "transfers", "kv_cuda_ipc", "free_blocks", "total_blocks", "preemptions", "completed", "aborted",
               "failed", "ttft_met", "tpot_met", "cost_scale", "last_seen_ms")

    def cell(worker: dict, column: str) -> str:
        if column == "cost_scale":  # measured over predicted step time, per phase
            scale = worker.get("cost_scale") or {}
            return " ".join(f"{phase}x{s['mean']:.2f}" for phase, s in scale.items())
        return str(worker.get(column, ""))

    rows = [[cell(w, c) for c in columns] for w in sorted(report["workers"], key=lambda w: w["role"])]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    for row in [list(columns), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if not rows:
        print("(no workers registered)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kairos", description="Kairos LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine set-up details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="offline generation for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, help="sampling seed: prompt i uses S + i (reproducible output)")
    gen.add_argument("--stop", action="append", help="stop string; repeatable")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, per line")
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser("profile", help="time real prefill and decode steps; fit the cost model")
    add_engine_args(prof)
    prof.add_argument("--out", help="JSON file (default: profile_<model>_<device>.json)")
    prof.add_argument("--quick", action="store_true", help="a coarse grid (what workers do at start-up)")
    prof.set_defaults(func=cmd_profile)

    sim = sub.add_parser("simulate", help="replay a trace through the policies in a discrete-event model")
    add_trace_args(sim)
    add_sim_args(sim)
    add_length_caps(sim)
    sim.add_argument("--prefill-policy", default="fcfs", choices=["fcfs", "edf", "kairos", "mh"])
    sim.add_argument("--decode-policy", default="cb", choices=["cb", "kairos"])
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=cmd_simulate)

    bench = sub.add_parser("bench", help="trace-driven comparisons").add_subparsers(dest="bench", required=True)
    cmp = bench.add_parser("compare", help="sweep rates x policies, simulated or live, against fcfs+cb")
    add_trace_args(cmp)
    add_sim_args(cmp)
    add_length_caps(cmp)
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
    cmp.add_argument("--timeout", type=float, default=LIVE_ONLY["--timeout"],
                     help="--live: seconds to wait for any reply")
    cmp.add_argument("--rate-scales", default="2,3,4,5,6,7,8")
    cmp.add_argument("--repeats", type=int, default=1,
                     help="--live: runs per point, the policies taking turns; rows report their mean")
    cmp.add_argument("--policies", default="fcfs+cb,kairos+cb,kairos+kairos,mh+kairos",
                     help="PREFILL+DECODE pairs; fcfs+cb (the baseline) is always included")
    cmp.add_argument("--out-dir", default="bench/results")
    cmp.add_argument("--name", help="file name stem (default: compare_<trace>)")
    cmp.set_defaults(func=cmd_compare)

    rep = bench.add_parser("replay", help="send a trace to a router, open loop, and report SLO attainment")
    add_trace_args(rep)
    rep.add_argument("--addr", default=DEFAULT_ROUTER)
    add_length_caps(rep)
    rep.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for any reply")
    rep.add_argument("--prompt-seed", type=int, help="draw the synthetic prompts from this seed (default: a fresh "
                     "one, so that no prompt of an earlier replay is still in the server's prefix cache)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_replay)

    router = sub.add_parser("router", help="the front door that clients and workers connect to")
    add_network_args(router)
    router.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="default time-to-first-token SLO")
    router.add_argument("--tpot-slo-ms", type=float, default=100.0, help="default time-per-output-token SLO")
    router.add_argument("--worker-timeout", type=float, default=2.0,
                        help="seconds without a heartbeat before a worker is given up for dead")
    router.add_argument("--queue-timeout", type=float, default=30.0,
                        help="seconds a request may wait for a worker to register")
    router.set_defaults(func=cmd_router)

    for role, func in (("prefill", cmd_prefill), ("decode", cmd_decode)):
        worker = sub.add_parser(role, help=f"a {role} worker")
        add_engine_args(worker)
        add_worker_args(worker)
        worker.add_argument("--router", default=DEFAULT_ROUTER, help="the router's address")
        worker.set_defaults(func=func)
        if role == "decode":
            worker.add_argument("--kv-host", default="127.0.0.1",
                                help="address prefill workers send KV to (default: loopback only)")
            worker.add_argument("--kv-port", type=int, default=0, help="default: any free port")
            worker.add_argument("--max-inflight-transfer-mb", type=float, default=4096.0,
                                help="KV under way into this worker, MiB (one transfer can always go)")

    srv = sub.add_parser("serve", help="router + prefill + decode workers on this machine")
    add_engine_args(srv)
    add_worker_args(srv)
    add_network_args(srv)
    srv.add_argument("--prefill-memory-share", type=float, default=0.4,
                     help="on one GPU: the prefill worker's share of --gpu-memory-utilization")
    srv.add_argument("--startup-timeout", type=float, default=600.0)
    srv.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="default time-to-first-token SLO")
    srv.add_argument("--tpot-slo-ms", type=float, default=100.0, help="default time-per-output-token SLO")
    srv.set_defaults(func=cmd_serve)

    cli = sub.add_parser("client", help="send prompts to a router and stream the replies")
    cli.add_argument("prompt", nargs="+")
    cli.add_argument("--addr", default=DEFAULT_ROUTER)
    cli.add_argument("--max-tokens", type=int, default=64)
    cli.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    cli.add_argument("--top-p", type=float, default=1.0)
    cli.add_argument("--top-k", type=int, default=-1)
    cli.add_argument("--seed", type=int)
    cli.add_argument("--stop", action="append", help="stop string; repeatable")
    cli.add_argument("--ignore-eos", action="store_true")
    cli.add_argument("--ttft-ms", type=float, help="time-to-first-token SLO")
    cli.add_argument("--tpot-ms", type=float, help="time-per-output-token SLO")
    cli.add_argument("--output-len-hint", type=int, help="expected output length, for the scheduler")
    cli.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any reply")
    cli.add_argument("--json", action="store_true", help="one JSON object per request")
    cli.set_defaults(func=cmd_client)

    status = sub.add_parser("status", help="workers, queues, KV blocks and request counts of a router")
    status.add_argument("--addr", default=DEFAULT_ROUTER)
    status.add_argument("--timeout", type=float, default=5.0)
    status.add_argument("--wait", type=float, metavar="S",
                        help="first wait up to S seconds for a prefill and a decode worker to register "
                             "(exit status 1 if they do not): for scripts that start a cluster")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if getattr(args, "cpu_threads", None) is not None:
        if args.cpu_threads < 1:
            print("kairos: error: --cpu-threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.cpu_threads)
    try:
        return args.func(args)
    except (TimeoutError, StartupError) as e:  # no answer from a server; a local worker would not start
        print(f"kairos: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, zmq.ZMQError) as e:
        print(f"kairos: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
