"""How long the scheduling policies take to decide, per step, with many requests queued or
running, on this CPU: with the compiled loops of `kairos.scheduler.native` (numba) and, in the
same run, with the plain-Python paths. Targets: <= 0.2 ms at 512 requests, <= 1 ms at 4096.

    python -m kairos.bench.decision_time [--requests 64,512,2048,4096]
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
    native,
)

# An H100-like Llama-3.1-8B step model, for realistic proportions only.
COST = CostModel(prefill=(0.004, 6e-5, 2e-10), decode=(0.008, 3e-5, 1.5e-8))


@dataclass(eq=False)
class Req:
    arrival_time: float
    first_token_time: float
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
        arrival = rng.uniform(0, 10)
        out.append(Req(arrival, arrival + rng.uniform(0, 1), slo, prompt, prompt + produced, produced, 1024))
    return out


def time_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def decisions(n: int, rng: random.Random, estimator: OutputLengthEstimator, repeats: int) -> dict:
    waiting = requests(n, rng)
    row = {"requests": n}
    for name in ("fcfs", "edf", "kairos", "mh"):
        policy = PREFILL_POLICIES.build(name, PolicySettings(COST, 8192))
        row[f"prefill_{name}_ms"] = time_ms(lambda: policy.order(waiting, 10.0), repeats)
    # Decode: up to 128 running (half the batch cap), the rest ready to join (admit), and all
    # of them ranked (the order in which a decode worker takes KV in).
    running, ready = waiting[: min(n // 2, 128)], waiting[min(n // 2, 128) :]
    cb = DECODE_POLICIES.build("cb", PolicySettings(max_batch=256))
    kairos = SlackBatching(COST, 256, estimator)
    row["decode_cb_ms"] = time_ms(lambda: cb.admit(running, ready, 10.0, 100_000), repeats)
    row["decode_kairos_ms"] = time_ms(lambda: kairos.admit(running, ready, 10.0, 100_000), repeats)
    row["decode_kairos_rank_ms"] = time_ms(lambda: kairos.order(waiting, running, 10.0), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", default="64,512,2048,4096")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(0)
    estimator = OutputLengthEstimator()
    for _ in range(2048):
        estimator.observe(rng.choice(["chat", "code", None]), int(rng.lognormvariate(5, 1)) + 1)
    counts = [int(x) for x in args.requests.split(",")]
    compiled = native.ENABLED
    native.ENABLED = False
    plain = [decisions(n, random.Random(n), estimator, args.repeats) for n in counts]
    native.ENABLED = compiled
    rows = [decisions(n, random.Random(n), estimator, args.repeats) for n in counts]
    names = [k for k in rows[0] if k != "requests"]
    print(f"median decision time per step, ms ({args.repeats} runs); targets <= 0.2 ms at 512, <= 1 ms at 4096; "
          f"compiled loops {'on' if compiled else 'off (numba missing or KAIROS_NUMBA=0)'}, plain Python in ()")
    print(f"{'requests':>8} " + " ".join(f"{k.removesuffix('_ms'):>21}" for k in names))
    for row, base in zip(rows, plain):
        print(f"{row['requests']:>8} " + " ".join(f"{row[k]:>9.3f} ({base[k]:>9.3f})" for k in names))
    print(f"wrote {write_result('decision_time_cpu', {'compiled': compiled, 'rows': rows, 'plain_python': plain})}")


if __name__ == "__main__":
    main()
