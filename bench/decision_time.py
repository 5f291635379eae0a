"""How long the scheduling policies take to decide, per step, with many requests queued or
running, on this CPU: as the workers decide, with the compiled loops of
`kairos.scheduler.native` (numba) over queues that keep their requests' numbers as arrays
(RequestQueue); and, in the same run, with the compiled loops over plain lists (the numbers
gathered every decision) and with the plain-Python paths. Also what keeping a queue's arrays
costs: per request that joins, and per step that takes 8 requests out of it. Targets: <= 0.2 ms
at 512 requests, <= 1 ms at 4096.

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
from kairos.scheduler.request_queue import RequestQueue

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

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens - self.num_output_tokens


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


def decisions(n: int, rng: random.Random, estimator: OutputLengthEstimator, repeats: int, queued: bool) -> dict:
    """Median decision times at n requests; over RequestQueues if `queued`, else plain lists."""
    waiting = requests(n, rng)
    queue = RequestQueue if queued else list
    prompts = queue(waiting)
    candidates = prompts.snapshot if queued else lambda: prompts  # what the engine's prefill step ranks
    row = {"requests": n}
    for name in ("fcfs", "edf", "kairos", "mh"):
        policy = PREFILL_POLICIES.build(name, PolicySettings(COST, 8192))
        row[f"prefill_{name}_ms"] = time_ms(lambda: policy.order(candidates(), 10.0), repeats)
    # Decode: up to 128 running (half the batch cap), the rest ready to join (admit), and all
    # of them ranked (the order in which a decode worker takes KV in).
    running, ready = waiting[: min(n // 2, 128)], queue(waiting[min(n // 2, 128) :])
    offers = queue(waiting)
    cb = DECODE_POLICIES.build("cb", PolicySettings(max_batch=256))
    kairos = SlackBatching(COST, 256, estimator)
    row["decode_cb_ms"] = time_ms(lambda: cb.admit(running, ready, 10.0, 100_000), repeats)
    row["decode_kairos_ms"] = time_ms(lambda: kairos.admit(running, ready, 10.0, 100_000), repeats)
    row["decode_kairos_rank_ms"] = time_ms(lambda: kairos.order(offers, running, 10.0), repeats)
    return row


def upkeep(n: int, repeats: int) -> dict:
    """What a RequestQueue of n requests costs to keep: microseconds per request appended, and
    per step that removes 8 of them (as a prefill step admits prompts)."""
    waiting = requests(n, random.Random(n))
    build = time_ms(lambda: RequestQueue(waiting), max(3, repeats // 10))
    queue = RequestQueue(waiting)
    removals = []
    for _ in range(repeats):
        taken = random.Random(len(removals)).sample(waiting, 8)
        start = time.perf_counter()
        queue.remove_all(taken)
        removals.append((time.perf_counter() - start) * 1e3)
        for r in taken:
            queue.append(r)
    return {"requests": n, "append_us_per_request": build / n * 1e3, "remove_8_ms": statistics.median(removals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", default="64,512,2048,4096")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(0)
    estimator = OutputLengthEstimator()
    for _ in range(8192):
        estimator.observe(rng.choice(["chat", "code", None]), int(rng.lognormvariate(6.5, 1.0)) + 1,
                          int(rng.lognormvariate(5, 1)) + 1)
    counts = [int(x) for x in args.requests.split(",")]
    compiled = native.ENABLED
    native.ENABLED = False
    plain = [decisions(n, random.Random(n), estimator, args.repeats, queued=False) for n in counts]
    native.ENABLED = compiled
    gathered = [decisions(n, random.Random(n), estimator, args.repeats, queued=False) for n in counts]
    rows = [decisions(n, random.Random(n), estimator, args.repeats, queued=True) for n in counts]
    kept = [upkeep(n, args.repeats) for n in counts]
    names = [k for k in rows[0] if k != "requests"]
    print(f"median decision time per step, ms ({args.repeats} runs); targets <= 0.2 ms at 512, <= 1 ms at 4096; "
          f"compiled loops {'on' if compiled else 'off (numba missing or KAIROS_NUMBA=0)'}: over RequestQueues "
          "(over lists) [plain Python]")
    print(f"{'requests':>8} " + " ".join(f"{k.removesuffix('_ms'):>29}" for k in names))
    for row, lists, base in zip(rows, gathered, plain):
        print(f"{row['requests']:>8} "
              + " ".join(f"{row[k]:>7.3f} ({lists[k]:>7.3f}) [{base[k]:>7.3f}]" for k in names))
    print("RequestQueue upkeep: " + ", ".join(f"{u['requests']} queued: {u['append_us_per_request']:.2f} us per "
                                               f"request joining, {u['remove_8_ms']:.3f} ms to remove 8" for u in kept))
    result = {"compiled": compiled, "rows": rows, "lists": gathered, "plain_python": plain, "queue_upkeep": kept}
    print(f"wrote {write_result('decision_time_cpu', result)}")


if __name__ == "__main__":
    main()
