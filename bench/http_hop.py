"""The HTTP hop: what the OpenAI-compatible API (`kairos api`) adds to TTFT and TPOT over the
native ZeroMQ client, at the same load, against one `kairos serve --http-port`.

  python -P -m kairos.bench.http_hop                    # tiny model on this machine
  python -P -m kairos.bench.http_hop --limit 400 --rate-scale 3

The same trace (the Azure conversation trace by default, lengths capped to fit the tiny model)
is replayed through each path in turn, rounds interleaved and the first path alternating, so
that drift in the machine hits both alike. Every run draws fresh prompts, so none finds another's
prefixes cached. Reports TTFT and TPOT percentiles per path and their p50 and p99 differences
(HTTP minus native); JSON under bench/results/.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from tqdm import tqdm

from kairos.bench import DEFAULT_TRACE
from kairos.bench.common import write_result
from kairos.scheduler.metrics import latency_samples, percentiles
from kairos.scheduler.traces import load_trace, shape, with_slos
from kairos.transport.replay import replay_requests, report, warm_up
from kairos.transport.serve import ProcessGroup, free_port, wait_until_healthy


def summary(requests: list) -> dict:
    samples = latency_samples(requests)
    return {"ttft_ms": percentiles(samples["ttft_ms"]), "tpot_ms": percentiles(samples["tpot_ms"]),
            **{k: v for k, v in report(requests).items() if k.endswith("attainment") or k in ("requests", "failed")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--rate-scale", type=float, default=2.0)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--max-output-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="runs through each path")
    ap.add_argument("--name", default="http_hop_tiny_cpu")
    args = ap.parse_args()

    trace = shape(load_trace(args.trace, "azure"), args.rate_scale, limit=args.limit)
    trace = [replace(r, prompt_len=min(r.prompt_len, args.max_prompt_len),
                     output_len=min(r.output_len, args.max_output_len)) for r in trace]
    trace = with_slos(trace, 1000.0, 100.0)
    port, http_port = free_port(), free_port()
    addr, url = f"tcp://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
    group = ProcessGroup()
    group.start("serve", ["serve", "--port", str(port), "--http-port", str(http_port), "--model", args.model])
    runs = {"native": [], "http": []}
    try:
        wait_until_healthy(url, 600, lambda: group.dead() and f"kairos serve exited: {group.dead()}")
        warm_up(addr, trace)
        warm_up(url, trace, requests=4)  # the API process's first requests, too
        order = ["native", "http"]
        with tqdm(total=2 * args.rounds * len(trace), desc="replay") as bar:
            for i in range(args.rounds):
                for path in order if i % 2 == 0 else order[::-1]:
                    runs[path] += replay_requests(addr if path == "native" else url, trace, progress=bar.update)
    finally:
        group.stop()
    result = {path: summary(requests) for path, requests in runs.items()}
    result["http_minus_native_ms"] = {
        metric: {q: result["http"][metric][q] - result["native"][metric][q] for q in ("p50", "p99")}
        for metric in ("ttft_ms", "tpot_ms")}
    for path in ("native", "http"):
        r = result[path]
        print(f"{path:>6}: TTFT p50 {r['ttft_ms']['p50']:.1f} p99 {r['ttft_ms']['p99']:.1f} ms   "
              f"TPOT p50 {r['tpot_ms']['p50']:.2f} p99 {r['tpot_ms']['p99']:.2f} ms   "
              f"attainment {r['e2e_attainment']:.1%} ({r['failed']} failed)")
    d = result["http_minus_native_ms"]
    print(f"the HTTP hop adds: TTFT p50 {d['ttft_ms']['p50']:+.2f} ms, p99 {d['ttft_ms']['p99']:+.2f} ms; "
          f"TPOT p50 {d['tpot_ms']['p50']:+.3f} ms, p99 {d['tpot_ms']['p99']:+.3f} ms")
    setup = {"model": args.model, "trace": args.trace, "limit": args.limit, "rate_scale": args.rate_scale,
             "max_prompt_len": args.max_prompt_len, "max_output_len": args.max_output_len, "rounds": args.rounds}
    print(f"wrote {write_result(args.name, {'setup': setup, **result})}")


if __name__ == "__main__":
    main()
