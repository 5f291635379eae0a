"""TTFT attainment of the prefill policies, live: a router, a prefill and a decode worker (tiny
model on CPU by default), and a burst of three kinds of prompt sent back to back:
  - long prompts with loose TTFT SLOs (FCFS makes everything behind them wait);
  - long prompts with SLOs too tight for any order (EDF serves them first, in vain);
  - short prompts with SLOs that ordering alone decides.

    python -m kairos.bench.slo_live                           # fcfs, edf, kairos, mh
    python -m kairos.bench.slo_live --policies fcfs,kairos --rounds 3

TTFT is taken on the client's clock. Each policy runs on fresh processes with the same
step-time profile (measured first, or --profile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from kairos.bench.common import write_result
from kairos.cli.engine_flags import engine_argv
from kairos.transport.client import Client
from kairos.transport.serve import local_cluster


def run_burst(args, policy: str, profile: str) -> dict:
    worker = engine_argv(model=args.model, profile=profile, max_num_batched_tokens=args.token_budget,
                         num_kv_blocks=2048, max_model_len=2048)
    with local_cluster(["--prefill-policy", policy, *worker], worker) as addr:
        with Client(addr, timeout_s=120) as client:
            client.generate("warm up", max_tokens=2)
            rounds = []
            for r in range(args.rounds):
                groups = {}
                for kind, count, length, slo in (("long", args.longs, args.long_len, args.long_slo_ms),
                                                 ("hopeless", args.hopeless, args.long_len, args.hopeless_slo_ms),
                                                 ("short", args.shorts, args.short_len, args.short_slo_ms)):
                    groups[kind] = (slo, [client.submit([(7 * i + r + len(kind)) % 500 + 1] * length, max_tokens=2,
                                                        slo={"ttft_ms": slo}) for i in range(count)])
                row, met_all, total = {}, 0, 0
                for kind, (slo, ids) in groups.items():
                    ttfts = [client.result(rid).ttft_ms for rid in ids]
                    met = sum(t <= slo for t in ttfts)
                    met_all, total = met_all + met, total + len(ids)
                    row[f"{kind}_attainment"] = met / len(ids) if ids else None
                    row[f"{kind}_ttft_ms_p50"] = statistics.median(ttfts) if ids else None
                rounds.append({"ttft_attainment": met_all / total, **row})
                time.sleep(0.5)
    return {"policy": policy, "rounds": rounds,
            "ttft_attainment": statistics.mean(r["ttft_attainment"] for r in rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--policies", default="fcfs,edf,kairos,mh")
    parser.add_argument("--profile", help="step-time profile; default: measured now (kairos profile --quick)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--longs", type=int, default=24)
    parser.add_argument("--long-len", type=int, default=1000)
    parser.add_argument("--long-slo-ms", type=float, default=30000)
    parser.add_argument("--hopeless", type=int, default=8)
    parser.add_argument("--hopeless-slo-ms", type=float, default=50)
    parser.add_argument("--shorts", type=int, default=24)
    parser.add_argument("--short-len", type=int, default=24)
    parser.add_argument("--short-slo-ms", type=float, default=1500)
    parser.add_argument("--token-budget", type=int, default=1024)
    args = parser.parse_args()
    profile = args.profile
    if profile is None:
        from kairos.engine import LLM
        from kairos.engine.profiler import measure_profile

        llm = LLM(args.model, max_num_batched_tokens=args.token_budget, num_kv_blocks=2048, max_model_len=2048)
        profile = str(Path(tempfile.mkdtemp()) / "profile.json")
        Path(profile).write_text(json.dumps(measure_profile(llm, quick=True)))
        del llm
    results = [run_burst(args, policy, profile) for policy in args.policies.split(",")]
    base = next((r for r in results if r["policy"] == "fcfs"), results[0])
    print(f"per round, back to back: {args.longs} prompts of {args.long_len} tokens "
          f"(TTFT SLO {args.long_slo_ms:g} ms), "
          f"{args.hopeless} of {args.long_len} (SLO {args.hopeless_slo_ms:g} ms), {args.shorts} of {args.short_len} "
          f"(SLO {args.short_slo_ms:g} ms); {args.rounds} rounds")
    print(f"{'policy':>8} {'TTFT attained':>14} {'vs fcfs':>8} {'short met':>10} "
          f"{'short p50 ms':>13} {'long p50 ms':>12}")
    for r in results:
        rounds = r["rounds"]
        print(f"{r['policy']:>8} {r['ttft_attainment']:>14.1%} {r['ttft_attainment'] - base['ttft_attainment']:>+8.1%} "
              f"{statistics.mean(x['short_attainment'] for x in rounds):>10.1%} "
              f"{statistics.mean(x['short_ttft_ms_p50'] for x in rounds):>13.0f} "
              f"{statistics.mean(x['long_ttft_ms_p50'] for x in rounds):>12.0f}")
    path = write_result(f"slo_live_{args.model}_cpu", {"setup": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
