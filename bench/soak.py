"""Soak: many requests through a live cluster, a share of them aborted mid-stream, with every
process's memory read after each round. A process that keeps anything per request (records,
logs, statistics) without a bound grows round after round; one that does not stays flat once
its caches have warmed up.

  python -m kairos.bench.soak                          # 20,000 requests, tiny model, this CPU
  python -m kairos.bench.soak --requests 4000 --round 1000

After each round it waits until every worker reports all its KV blocks free and nothing in
flight (a request lost or a block leaked shows up as a round that never settles), then reads
each process's resident set (VmRSS). The result: RSS per process per round, its growth after
the first round (target: at most 5%), JSON under bench/results/ and a PNG of RSS against
requests served.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path

from tqdm import tqdm

from kairos.bench.common import RESULTS, save_figure, write_result
from kairos.cli.engine_flags import engine_argv
from kairos.transport.client import AsyncClient, Client, RequestFailed
from kairos.transport.serve import ProcessGroup, local_cluster

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bankers".split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def one_request(client: AsyncClient, rng: random.Random, abort: bool, max_tokens: int) -> str:
    """Sends one request; an aborted one is cut after its second token. Returns its outcome."""
    # Half text (tokenized on the prefill worker, detokenized as it streams), half token ids.
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 120))]
    prompt = " ".join(words) if rng.random() < 0.5 else [rng.randrange(1, 500) for _ in range(len(words))]
    tokens = 0
    try:
        async for chunk in client.stream(prompt, max_tokens=max_tokens, temperature=0.8, ignore_eos=True,
                                         stop=["zz"], slo={"request_class": rng.choice(["chat", "code", "agent"])}):
            tokens += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                return chunk.finish_reason
            if abort and tokens >= 2:
                await client.abort(chunk.request_id)
    except RequestFailed:
        return "failed"
    return "ended"


async def run_round(addr: str, count: int, seed: int, abort_share: float, concurrency: int,
                    max_tokens: int, bar: tqdm) -> dict[str, int]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    outcomes: dict[str, int] = {}

    async def limited(abort: bool) -> None:
        async with gate:
            outcome = await one_request(client, rng, abort, max_tokens)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        bar.update()

    async with AsyncClient(addr, timeout_s=120) as client:
        await asyncio.gather(*(limited(rng.random() < abort_share) for _ in range(count)))
    return outcomes


def settled(status: dict) -> bool:
    return status["counters"]["in_flight"] == 0 and all(
        w.get("free_blocks") == w["total_blocks"] and not w.get("running") and not w.get("waiting")
        and not w.get("ready") and not w.get("transfers") for w in status["workers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--round", type=int, default=2_000, help="requests between memory readings")
    ap.add_argument("--abort-share", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()

    worker = engine_argv(model=args.model)
    group = ProcessGroup()
    rounds = []
    with local_cluster(worker, worker, group=group) as addr:
        names = [c.name for c in group.children]
        pids = [c.proc.pid for c in group.children]
        with tqdm(total=args.requests, desc="soak", unit="req") as bar:
            for index, start in enumerate(range(0, args.requests, args.round)):
                count = min(args.round, args.requests - start)
                outcomes = asyncio.run(run_round(addr, count, index, args.abort_share, args.concurrency,
                                                 args.max_tokens, bar))
                with Client(addr, timeout_s=10) as client:
                    status = client.fresh_status(settled, timeout_s=60)
                rounds.append({"served": start + count, "outcomes": outcomes,
                               "rss_mb": {name: rss_mb(pid) for name, pid in zip(names, pids)},
                               "counters": status["counters"]})
                bar.write(f"{start + count:6d} requests  " + "  ".join(
                    f"{name} {mb:6.1f} MB" for name, mb in rounds[-1]["rss_mb"].items()) + f"  {outcomes}")
    growth = {name: rounds[-1]["rss_mb"][name] / rounds[0]["rss_mb"][name] - 1 for name in names}
    print("growth after the first round: " + ", ".join(f"{name} {g:+.1%}" for name, g in growth.items()))
    result = {"model": args.model, "requests": args.requests, "round": args.round, "abort_share": args.abort_share,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": rounds,
              "growth_after_first_round": growth, "flat": all(g <= 0.05 for g in growth.values())}
    print(f"wrote {write_result(f'soak_{args.model}_cpu', result)}")
    plot(rounds, names, RESULTS / f"soak_{args.model}_cpu.png")


def plot(rounds: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    served = [r["served"] for r in rounds]
    for name in names:
        ax.plot(served, [r["rss_mb"][name] for r in rounds], marker="o", label=name)
    ax.set_xlabel("requests served")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title("Memory per process over a soak (20% aborted mid-stream)")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
