"""Decode throughput of slack-guided batching against continuous batching, at vLLM's default cap
of 256 sequences and at an equal cap, in the simulator on the Azure conversation trace.

  python -P -m kairos.bench.decode_batching

Two setups: one prefill and one decode worker, where prefill binds (decode throughput is then
the rate at which outputs arrive, whatever the decode policy), and four prefill workers to one
decode worker, where decode binds. Prints decode tokens/s and E2E and TPOT attainment per load;
JSON under bench/results/.
"""

from __future__ import annotations

import argparse

from kairos.bench import DEFAULT_PROFILE, DEFAULT_TRACE
from kairos.bench.common import profile_cost_model, write_result
from kairos.scheduler.simulator import SimConfig, simulate
from kairos.scheduler.traces import load_azure, shape, with_slos

RUNS = (("fcfs+cb", 256), ("fcfs+cb", 1024), ("kairos+kairos", 1024))
SETUPS = {"1P1D": (1, "4.5,5.5,6.5,7.5"), "4P1D": (4, "12,16,20,24")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE))
    ap.add_argument("--name", default="decode_batching")
    args = ap.parse_args()
    profile, cost = profile_cost_model(args.profile)
    base = load_azure(DEFAULT_TRACE)
    rows = []
    for setup, (prefill_workers, scales) in SETUPS.items():
        for scale in map(float, scales.split(",")):
            trace = with_slos(shape(base, scale), 1000.0, 100.0)
            at = {}
            for pair, cap in RUNS:
                prefill, decode = pair.split("+")
                config = SimConfig(prefill_workers=prefill_workers, prefill_policy=prefill, decode_policy=decode,
                                   max_batch=cap, kv_capacity_tokens=profile["kv_capacity_tokens"])
                report = simulate(trace, config, cost)
                row = {"setup": setup, "rate_scale": scale, "policy": pair, "max_batch": cap,
                       **{k: report[k] for k in ("decode_throughput_tok_s", "e2e_attainment", "tpot_attainment")}}
                rows.append(row)
                at[(pair, cap)] = row["decode_throughput_tok_s"]
                print(f"{setup} {scale:5.1f} {pair:>14} cap {cap:5d}  decode {row['decode_throughput_tok_s']:7.0f} "
                      f"tok/s  E2E {row['e2e_attainment']:.1%}  TPOT {row['tpot_attainment']:.1%}", flush=True)
            kairos = at[("kairos+kairos", 1024)]
            print(f"{setup} {scale:5.1f}  kairos against cb at 256: {kairos / at[('fcfs+cb', 256)] - 1:+.1%}, "
                  f"at an equal cap: {kairos / at[('fcfs+cb', 1024)] - 1:+.1%}")
    print(f"wrote {write_result(args.name, {'profile': args.profile, 'rows': rows})}")


if __name__ == "__main__":
    main()
