"""How long the scheduling policies take to decide, per step, with many requests queued or
running (pure Python, this CPU). Target: <= 1 ms at 512 requests.

    python -m kairos.bench.decision_time [--requests 64,256,512,2048]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from kairos.bench.common import write_result
from kairos.scheduler import (
    DECODE_POLICIES,
    PREFILL_POLICIES,
    CostModel,
    OutputLengthEstimator,
    PolicySettings,
    RequestSLO,
    SlackBatching,
)

# An H100-like Llama-3.1-8B step model, for realistic proportions only.
COST = CostModel(prefill=(0.004, 6e-5, 2e-10), decode=(0.008, 3e-5, 1.5e-8))


@dataclass(eq=False)
class Req:
    arrival_time: float
    slo: RequestSLO
    num_uncomputed_tokens: int
    num_tokens: int
    num_output_tokens: int
    max_tokens: int


def requests(n: int, rng: random.Random) -> list[Req]:
    out = []
    for _ in range(n):
        prompt = int(rng.lognormvariate(6.5, 1.0)) + 1
        produced = rng.randrange(1, 200)
        slo = RequestSLO(rng.choice([500, 1000, 3000]), rng.choice([30, 50, 100]), rng.choice(["chat", "code", None]))
        out.append(Req(rng.uniform(0, 10), slo, prompt, prompt + produced, produced, 1024))
    return out


def time_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", default="64,256,512,2048")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(0)
    estimator = OutputLengthEstimator()
    for _ in range(2048):
        estimator.observe(rng.choice(["chat", "code", None]), int(rng.lognormvariate(5, 1)) + 1)
    rows = []
    for n in (int(x) for x in args.requests.split(",")):
        waiting = requests(n, rng)
        row = {"requests": n}
        for name in ("fcfs", "edf", "kairos", "mh"):
            policy = PREFILL_POLICIES.build(name, PolicySettings(COST, 8192))
            row[f"prefill_{name}_ms"] = time_ms(lambda: policy.order(waiting, 10.0), args.repeats)
        # Decode: half running, half ready to join.
        running, ready = waiting[: n // 2], waiting[n // 2 :]
        for name, policy in (("cb", DECODE_POLICIES.build("cb", PolicySettings(max_batch=256))),
                             ("kairos", SlackBatching(COST, 256, estimator))):
            row[f"decode_{name}_ms"] = time_ms(lambda: policy.admit(running, ready, 10.0, 100_000), args.repeats)
        rows.append(row)
    names = [k for k in rows[0] if k != "requests"]
    print(f"median decision time per step, ms ({args.repeats} runs); target <= 1 ms at 512")
    print(f"{'requests':>8} " + " ".join(f"{k.removesuffix('_ms'):>15}" for k in names))
    for row in rows:
        print(f"{row['requests']:>8} " + " ".join(f"{row[k]:>15.3f}" for k in names))
    print(f"wrote {write_result('decision_time_cpu', {'rows': rows})}")


if __name__ == "__main__":
    main()
