"""Serving: `kairos router`, `prefill`, `decode`, `api` and `serve` start the processes; `client`
and `status` talk to a router."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kairos.cli.checks import fraction, model_folder, port_is_free, positive_float, positive_int, writable_file
from kairos.cli.engine_flags import add_engine_args, engine_argv, engine_kwargs
from kairos.cli.report import print_status
from kairos.scheduler.defaults import (
    DEFAULT_TPOT_SLO_MS,
    DEFAULT_TTFT_SLO_MS,
    MAX_INFLIGHT_TRANSFER_BYTES,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
)
from kairos.transport.protocol import HEARTBEAT_INTERVAL_S
from kairos.transport.sockets import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_ROUTER

MIB = 2**20


def add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)


def add_curve_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-keys", metavar="DIR",
                   help="the cluster's CURVE keys (kairos keys DIR): encrypted links, listed workers only")


def add_default_slo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ttft-slo-ms", type=float, default=DEFAULT_TTFT_SLO_MS,
                   help="time-to-first-token SLO of requests that set none")
    p.add_argument("--tpot-slo-ms", type=float, default=DEFAULT_TPOT_SLO_MS,
                   help="time-per-output-token SLO of requests that set none")


def add_prompt_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS,
                   help="longest text prompt the router takes, in characters")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help="longest token-id prompt the router takes")


def add_metrics_port_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int,
                   help="serve the router's Prometheus metrics over HTTP on this port (at --host)")


def add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--served-model-name", help="the model name requests give (default: --model)")
    p.add_argument("--api-key", help="what HTTP requests must present as 'Authorization: Bearer KEY' "
                                     "(default: $KAIROS_API_KEY; none: no check)")
    p.add_argument("--max-body-mb", type=positive_float, default=32.0, help="largest HTTP request body, MiB")


def router_limit_argv(args: argparse.Namespace) -> list[str]:
    return ["--ttft-slo-ms", str(args.ttft_slo_ms), "--tpot-slo-ms", str(args.tpot_slo_ms),
            "--max-prompt-chars", str(args.max_prompt_chars), "--max-prompt-tokens", str(args.max_prompt_tokens)]


def add_worker_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--transfer-timeout", type=positive_float, default=10.0,
                   help="seconds a KV transfer may take once the decode side is ready for it, beyond the "
                        "longest step of the worker at the other end (on a CPU a worker answers between "
                        "steps; each side tells the other how long they take)")
    p.add_argument("--offer-timeout", type=positive_float, default=60.0,
                   help="seconds a prefilled request may wait for room on its decode worker before it fails")
    p.add_argument("--kv-frame-mb", type=positive_float, default=8.0, help="largest KV frame on the wire, MiB")
    add_curve_arg(p)
    p.add_argument("--step-log", metavar="FILE",
                   help="append one JSON line per engine step: loop time split, batch, queue and free KV blocks")


def worker_kwargs(args: argparse.Namespace) -> dict:
    """A worker's own settings, checked (keys read, the step log writable) before its model
    loads: a mistake there should not cost the load."""
    from kairos.transport.security import CurveKeys

    keys = CurveKeys.load(args.curve_keys, "worker") if args.curve_keys else None
    if args.step_log:
        writable_file(args.step_log, "--step-log")
    return {"transfer_timeout_s": args.transfer_timeout, "offer_timeout_s": args.offer_timeout,
            "max_frame_bytes": int(args.kv_frame_mb * MIB), "step_log": args.step_log, "keys": keys}


def worker_argv(args: argparse.Namespace) -> list[str]:
    """A worker's own flags (besides the engine's), for a child process."""
    argv = ["--transfer-timeout", str(args.transfer_timeout), "--offer-timeout", str(args.offer_timeout),
            "--kv-frame-mb", str(args.kv_frame_mb)]
    argv += ["--curve-keys", args.curve_keys] if args.curve_keys else []
    return argv + (["--step-log", args.step_log] if args.step_log else [])


def cmd_router(args: argparse.Namespace) -> int:
    from kairos.scheduler.request import RequestSLO
    from kairos.transport.router import Router
    from kairos.transport.security import CurveKeys

    if min(args.max_prompt_chars, args.max_prompt_tokens) < 1:
        raise ValueError("--max-prompt-chars and --max-prompt-tokens must be at least 1")
    if args.worker_timeout < 2 * HEARTBEAT_INTERVAL_S:
        raise ValueError(f"--worker-timeout must be at least {2 * HEARTBEAT_INTERVAL_S:g} s: workers beat every "
                         f"{HEARTBEAT_INTERVAL_S:g} s, and a shorter timeout gives up live ones")
    if args.metrics_port:  # 0: any free port, the one printed
        port_is_free(args.host, args.metrics_port, "--metrics-port")
    router = Router(args.host, args.port, args.worker_timeout, args.queue_timeout,
                    default_slo=RequestSLO(args.ttft_slo_ms, args.tpot_slo_ms),
                    max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens,
                    keys=CurveKeys.load(args.curve_keys, "router") if args.curve_keys else None,
                    metrics_port=args.metrics_port)
    served = router.metrics_server
    metrics = f", metrics at http://{args.host}:{served.server_port}/metrics" if served is not None else ""
    print(f"kairos router: listening at {router.addr}{metrics}", flush=True)
    router.run()
    return 0


def cmd_prefill(args: argparse.Namespace) -> int:
    from kairos.engine import LLM
    from kairos.transport.prefill import PrefillWorker

    settings = worker_kwargs(args)
    PrefillWorker(LLM(role="prefill", **engine_kwargs(args)), args.router, **settings).run()
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from kairos.engine import LLM
    from kairos.transport.decode import DecodeWorker

    settings = worker_kwargs(args)
    DecodeWorker(LLM(role="decode", **engine_kwargs(args)), args.router, kv_host=args.kv_host,
                 kv_port=args.kv_port, max_inflight_bytes=int(args.max_inflight_transfer_mb * MIB), **settings).run()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from kairos.transport.http_api import run_api
    from kairos.transport.serve import free_port

    if args.model != "tiny" and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model}: no such model folder (its chat template serves chat requests)")
    if args.port == 0:  # any free port, the one printed
        args.port = free_port(args.host)
    port_is_free(args.host, args.port, "--port")
    run_api(args.router, args.host, args.port, args.model, args.served_model_name, args.timeout, args.curve_keys,
            int(args.max_body_mb * MIB), args.api_key or os.environ.get("KAIROS_API_KEY"), args.verbose)
    return 0


def api_argv(args: argparse.Namespace, router: str) -> list[str]:
    """`kairos api` as `kairos serve --http-port` starts it."""
    # The chat template is the tokenizer's, where one is given apart from the model.
    argv = ["api", "--router", router, "--host", args.host, "--port", str(args.http_port),
            "--model", args.tokenizer or args.model, "--served-model-name", args.served_model_name or args.model,
            "--timeout", str(args.api_timeout), "--max-body-mb", str(args.max_body_mb)]
    # The key goes by environment, not argv: a command line is visible to every local user.
    return argv + (["--curve-keys", args.curve_keys] if args.curve_keys else [])


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from kairos.transport.serve import cpu_share, free_port, serve

    n_prefill, n_decode = args.prefill_workers, args.decode_workers
    model_folder(args.model)
    if args.port == 0:  # any free port: the workers and clients are told which
        args.port = free_port(args.host)
    if args.http_port == 0:  # likewise, printed by the API as it starts
        args.http_port = free_port(args.host)
    for flag, port in (("--port", args.port), ("--http-port", args.http_port), ("--metrics-port", args.metrics_port)):
        if port is not None:
            port_is_free(args.host, port, flag)
    if args.http_port is None:
        given = [flag for flag, value in (("--api-key", args.api_key), ("--served-model-name", args.served_model_name))
                 if value]
        if given:
            raise ValueError(f"{' and '.join(given)} configure the HTTP API: give --http-port too")
    settings = engine_kwargs(args)
    util = settings.pop("gpu_memory_utilization")
    threads = args.cpu_threads or cpu_share(n_prefill + n_decode)
    workers = [*engine_argv(**settings), *worker_argv(args), "--cpu-threads", str(threads)]
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    # One GPU, workers started one at a time, each sizing its memory against a running total:
    # the prefill workers share --prefill-memory-share of it, the decode workers the rest.
    share = args.prefill_memory_share
    prefill = [["--gpu-memory-utilization", f"{util * share * (i + 1) / n_prefill:.3f}"] for i in range(n_prefill)]
    decode = [["--gpu-memory-utilization", f"{util * (share + (1 - share) * (i + 1) / n_decode):.3f}"]
              for i in range(n_decode)]
    router = [*router_limit_argv(args), *(["--curve-keys", args.curve_keys] if args.curve_keys else [])]
    router += ["--metrics-port", str(args.metrics_port)] if args.metrics_port is not None else []
    api = api_argv(args, f"tcp://{args.host}:{args.port}") if args.http_port is not None else None
    if api is not None and args.api_key:
        os.environ["KAIROS_API_KEY"] = args.api_key
    return serve(args.host, args.port, router, workers, prefill, decode, args.startup_timeout, on_gpu,
                 args.verbose, args.curve_keys, api)


def cmd_client(args: argparse.Namespace) -> int:
    from kairos.transport.client import Client, RequestFailed

    slo = {"ttft_ms": args.ttft_slo_ms, "tpot_ms": args.tpot_slo_ms, "request_class": args.request_class,
           "output_len_hint": args.output_len_hint, "kind": args.kind, "deadline_ms": args.deadline_ms,
           "dag_id": args.dag_id, "dag_stage": args.dag_stage}
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "seed": args.seed, "stop": args.stop, "ignore_eos": args.ignore_eos,
               "slo": {k: v for k, v in slo.items() if v is not None}}
    failed = False
    with Client(args.addr, timeout_s=args.timeout, curve_keys=args.curve_keys) as client:
        if args.json or len(args.prompt) > 1:
            for completion in client.generate(args.prompt, **options):
                failed |= completion.error is not None
                if args.json:
                    out = completion.to_dict()
                    if out["error"] is None:
                        del out["error"], out["error_code"]
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
    from kairos.transport.client import Client

    if args.wait is not None:
        from kairos.transport.serve import wait_for_workers

        wait_for_workers(args.addr, {"prefill": 1, "decode": 1}, None, args.wait, curve_keys=args.curve_keys)
    with Client(args.addr, timeout_s=args.timeout, curve_keys=args.curve_keys) as client:
        report = client.status()
    if args.json:
        print(json.dumps(report))
    else:
        print_status(report)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from kairos.transport.security import generate_keys

    folder = generate_keys(args.folder)
    print(f"wrote CURVE keys to {folder}: give every router, worker and client --curve-keys {folder}; "
          f"clients need only server.key. Keep the *.key_secret files private.")
    return 0


def add_commands(sub) -> None:
    router = sub.add_parser("router", help="the front door that clients and workers connect to")
    add_network_args(router)
    add_default_slo_args(router)
    add_prompt_limit_args(router)
    add_curve_arg(router)
    router.add_argument("--worker-timeout", type=positive_float, default=2.0,
                        help="seconds without a heartbeat before a worker is given up for dead "
                             f"(workers beat every {HEARTBEAT_INTERVAL_S:g} s)")
    router.add_argument("--queue-timeout", type=positive_float, default=30.0,
                        help="seconds a request may wait for a worker to register")
    add_metrics_port_arg(router)
    router.set_defaults(func=cmd_router)

    api = sub.add_parser("api", help="the OpenAI-compatible HTTP server, in front of a router")
    api.add_argument("--router", default=DEFAULT_ROUTER, help="the router's address")
    api.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--model", default="tiny", help="the workers' --model: its chat template serves chat requests")
    api.add_argument("--timeout", type=positive_float, default=300.0,
                     help="seconds a request may wait for its next token before it fails (504)")
    add_http_args(api)
    add_curve_arg(api)
    api.set_defaults(func=cmd_api)

    for role, func in (("prefill", cmd_prefill), ("decode", cmd_decode)):
        worker = sub.add_parser(role, help=f"a {role} worker")
        add_worker_args(worker)
        worker.add_argument("--router", default=DEFAULT_ROUTER, help="the router's address")
        worker.set_defaults(func=func)
    decode = sub.choices["decode"]
    decode.add_argument("--kv-host", default=DEFAULT_HOST,
                        help="address prefill workers send KV to (default: loopback only)")
    decode.add_argument("--kv-port", type=int, default=0, help="default: any free port")
    decode.add_argument("--max-inflight-transfer-mb", type=float, default=MAX_INFLIGHT_TRANSFER_BYTES / MIB,
                        help="KV under way into this worker, MiB (one transfer can always go)")

    srv = sub.add_parser("serve", help="router + prefill + decode workers on this machine, restarted if they die")
    add_worker_args(srv)
    add_network_args(srv)
    add_default_slo_args(srv)
    add_prompt_limit_args(srv)
    srv.add_argument("--prefill-workers", type=positive_int, default=1, help="prefill worker processes")
    srv.add_argument("--decode-workers", type=positive_int, default=1, help="decode worker processes")
    srv.add_argument("--prefill-memory-share", type=fraction, default=0.4,
                     help="on one GPU: the prefill workers' share of --gpu-memory-utilization")
    srv.add_argument("--startup-timeout", type=positive_float, default=600.0)
    add_metrics_port_arg(srv)
    srv.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API (kairos api) here")
    srv.add_argument("--api-timeout", type=positive_float, default=300.0,
                     help="with --http-port: seconds a request may wait for its next token (504)")
    add_http_args(srv)
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
    cli.add_argument("--ttft-slo-ms", type=float, help="time-to-first-token SLO (default: the router's)")
    cli.add_argument("--tpot-slo-ms", type=float, help="time-per-output-token SLO (default: the router's)")
    cli.add_argument("--request-class", help="a class of requests whose output lengths are alike, for the scheduler")
    cli.add_argument("--output-len-hint", type=int, help="expected output length, for the scheduler")
    cli.add_argument("--kind", choices=["latency", "throughput", "collective"],
                     help="latency-sensitive (TTFT and TPOT, the default), throughput-intensive (a deadline for "
                          "the whole response) or collective (a call of an agent's DAG, one deadline for the DAG)")
    cli.add_argument("--deadline-ms", type=float, help="throughput and collective requests: when the response is due")
    cli.add_argument("--dag-id", help="collective requests: the DAG the call belongs to")
    cli.add_argument("--dag-stage", type=int, help="collective requests: which call of its DAG this is, from 0")
    cli.add_argument("--timeout", type=positive_float, default=60.0, help="seconds to wait for any reply")
    cli.add_argument("--json", action="store_true", help="one JSON object per request")
    add_curve_arg(cli)
    cli.set_defaults(func=cmd_client)

    status = sub.add_parser("status", help="workers, queues, KV blocks and request counts of a router")
    status.add_argument("--addr", default=DEFAULT_ROUTER)
    status.add_argument("--timeout", type=positive_float, default=5.0)
    status.add_argument("--wait", type=positive_float, metavar="S",
                        help="first wait up to S seconds for a prefill and a decode worker to register "
                             "(exit status 1 if they do not): for scripts that start a cluster")
    status.add_argument("--json", action="store_true")
    add_curve_arg(status)
    status.set_defaults(func=cmd_status)

    keys = sub.add_parser("keys", help="write a cluster's CURVE keys into a new folder (for --curve-keys)")
    keys.add_argument("folder")
    keys.set_defaults(func=cmd_keys)
