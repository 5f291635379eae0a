"""Mixed workloads (latency-sensitive, throughput-intensive and collective requests) in the
simulator: service goodput, SLO goodput and per-type attainment of fcfs+cb, kairos+kairos and
tempo+tempo, and the output-length upper bounds Tempo schedules by against the per-class p90
and, where scikit-learn is installed, a learned peer (gradient boosting with the quantile loss).

  python -P -m kairos.bench.tempo_mixed                  # Azure conversation trace, H200 profile
  python -P -m kairos.bench.tempo_mixed --rate-scales 2,4,6,8 --throughput-share 0.3

The mixed trace keeps the Azure trace's arrivals and lengths: a share of its requests become
throughput-intensive (a deadline for the whole response), and a share become the first call of
an agent's DAG of 3 to 8 calls, each sent when the one before has finished (plus a tool's
time), with one deadline for the DAG. JSON and a PNG of service goodput against load under
bench/results/.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from kairos.bench import DEFAULT_PROFILE, DEFAULT_TRACE
from kairos.bench.common import profile_cost_model, pyplot, save_figure, write_result
from kairos.scheduler.metrics import service_metrics
from kairos.scheduler.output_length import OutputLengthEstimator
from kairos.scheduler.simulator import SimConfig, Simulator
from kairos.scheduler.traces import load_azure, mixed, shape, with_slos

POLICIES = ("fcfs+cb", "kairos+kairos", "tempo+tempo")
CODE_TRACE = DEFAULT_TRACE.parent / "AzureLLMInferenceTrace_code.csv"


class BoostedQuantile:
    """The learned peer: scikit-learn's gradient boosting with the quantile loss on (class,
    log2 prompt length), refitted every `refit` requests on the latest `window` of them."""

    def __init__(self, quantile: float, window: int = 4096, refit: int = 2000):
        from sklearn.ensemble import GradientBoostingRegressor

        self.make = lambda: GradientBoostingRegressor(loss="quantile", alpha=quantile, n_estimators=100, max_depth=3)
        self.window, self.refit = window, refit
        self.seen: list[tuple[list[float], int]] = []
        self.model = None
        self.fit_s = 0.0

    @staticmethod
    def features(cls: str, prompt_len: int) -> list[float]:
        return [float(cls == "code"), math.log2(max(1, prompt_len))]

    def upper_bound(self, cls: str, prompt_len: int, max_tokens: int) -> int:
        if self.model is None:
            return max_tokens
        return max(1, min(max_tokens, math.ceil(self.model.predict([self.features(cls, prompt_len)])[0])))

    def observe(self, cls: str, prompt_len: int, length: int) -> None:
        self.seen.append((self.features(cls, prompt_len), length))
        if len(self.seen) % self.refit == 0:
            started = time.perf_counter()
            recent = self.seen[-self.window:]
            self.model = self.make().fit([x for x, _ in recent], [y for _, y in recent])
            self.fit_s += time.perf_counter() - started


def length_bounds() -> dict:
    """The predictors learn online over the two Azure traces (conversation and code, the
    classes), each request predicted before it is observed: how often the bound covers the
    length, how far above it lies, and how long a prediction takes. The learned peer runs where
    scikit-learn is installed (it is not a dependency)."""
    requests = [("conv", r) for r in load_azure(DEFAULT_TRACE)] + [("code", r) for r in load_azure(CODE_TRACE)]
    random.Random(0).shuffle(requests)
    per_class, grid = OutputLengthEstimator(0.9), OutputLengthEstimator(0.95, window=4096)
    predictors = {  # one prompt length for all: the class alone
        "per-class p90": (lambda c, r: per_class.remaining(c, 1, 0, 1 << 20),
                          lambda c, r: per_class.observe(c, 1, r.output_len), None),
        "quantile p95 (class x prompt length)": (lambda c, r: grid.remaining(c, r.prompt_len, 0, 1 << 20),
                                                 lambda c, r: grid.observe(c, r.prompt_len, r.output_len), None)}
    try:
        boosted = BoostedQuantile(0.95)
        predictors["gradient boosting p95 (scikit-learn)"] = (
            lambda c, r: boosted.upper_bound(c, r.prompt_len, 1 << 20),
            lambda c, r: boosted.observe(c, r.prompt_len, r.output_len), boosted)
    except ImportError:
        print("scikit-learn is not installed: the gradient-boosting peer is skipped")
    result = {}
    for name, (predict, observe, learned) in predictors.items():
        covered, over, seconds = 0, [], 0.0
        for i, (cls, r) in enumerate(requests):
            started = time.perf_counter()
            bound = predict(cls, r)
            seconds += time.perf_counter() - started
            if i >= 2000:  # scored once each has seen two thousand requests (the peer's first fit)
                covered += bound >= r.output_len
                over.append(bound / r.output_len)
            observe(cls, r)
        over.sort()
        result[name] = {"coverage": covered / len(over), "median_bound_over_length": over[len(over) // 2],
                        "predict_us": seconds / len(requests) * 1e6}
        if learned is not None:
            result[name]["fit_s"] = learned.fit_s
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE))
    ap.add_argument("--rate-scales", default="2,3,4,5,6,7,8")
    ap.add_argument("--duration-s", type=float, default=1200.0, help="of the trace, before rate scaling")
    ap.add_argument("--throughput-share", type=float, default=0.2)
    ap.add_argument("--collective-share", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, help="the max_tokens clients set on every request, outputs still "
                    "ending at the trace's lengths (default: each request's own length, which the policies' "
                    "output-length bound then knows)")
    ap.add_argument("--name", default="tempo_mixed")
    args = ap.parse_args()

    profile, cost = profile_cost_model(args.profile)
    base = load_azure(args.trace)
    rows = []
    for scale in map(float, args.rate_scales.split(",")):
        trace = mixed(with_slos(shape(base, scale, duration_s=args.duration_s), 1000.0, 100.0),
                      args.throughput_share, args.collective_share)
        for pair in POLICIES:
            prefill, decode = pair.split("+")
            config = SimConfig(prefill_policy=prefill, decode_policy=decode,
                               kv_capacity_tokens=profile.get("kv_capacity_tokens", SimConfig.kv_capacity_tokens),
                               max_tokens=args.max_tokens)
            requests = Simulator(config, cost).run(trace)
            row = {"rate_scale": scale, "policy": pair, **service_metrics(requests)}
            rows.append(row)
            kinds = "  ".join(f"{k} {v:.1%}" for k, v in row["attainment_by_kind"].items())
            print(f"{scale:5.1f} {pair:>14}  service goodput {row['service_goodput_tok_s']:8.0f} tok/s  "
                  f"SLO goodput {row['slo_goodput_req_s']:6.2f} req/s  {kinds}", flush=True)
    for scale in sorted({r["rate_scale"] for r in rows}):
        at = {r["policy"]: r for r in rows if r["rate_scale"] == scale}
        fcfs, kairos, tempo = (at[p]["service_goodput_tok_s"] or math.nan for p in POLICIES)
        print(f"{scale:5.1f}  tempo / fcfs+cb {tempo / fcfs:5.2f}x  tempo / kairos+kairos {tempo / kairos:5.2f}x")
    bounds = length_bounds()
    for name, b in bounds.items():
        fitting = f", {b['fit_s']:.1f} s fitting" if "fit_s" in b else ""
        print(f"{name}: covers {b['coverage']:.1%} of lengths, median bound {b['median_bound_over_length']:.2f}x "
              f"the length, {b['predict_us']:.1f} us a prediction{fitting}")
    setup = {"trace": args.trace, "profile": args.profile, "duration_s": args.duration_s,
             "throughput_share": args.throughput_share, "collective_share": args.collective_share,
             "max_tokens": args.max_tokens}
    print(f"wrote {write_result(args.name, {'setup': setup, 'rows': rows, 'length_bounds': bounds})}")
    plot(rows, args.name)


def plot(rows: list[dict], name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    from kairos.bench import RESULTS

    fig, ax = plt.subplots(figsize=(6, 4))
    for pair in POLICIES:
        points = [(r["rate_scale"], r["service_goodput_tok_s"]) for r in rows if r["policy"] == pair]
        ax.plot(*zip(*points), marker="o", label=pair)
    ax.set_xlabel("rate scale (x the trace's arrival rate)")
    ax.set_ylabel("service goodput (tokens/s in time)")
    ax.set_title("Mixed workload, simulated")
    ax.legend()
    save_figure(fig, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
