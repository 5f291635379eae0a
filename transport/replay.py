"""`kairos bench replay`: a trace sent live to a router, open loop (each request leaves at its
arrival time whatever happened to the others), with synthetic prompts of the trace's lengths.
TTFT, TPOT and end-to-end SLO attainment come from the client's clock, in the simulator's
report format."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, replace

from scheduler.simulator import metrics
from scheduler.traces import TraceRequest
from transport.client import AsyncClient


@dataclass
class ReplayedRequest:
    """One replayed request, with what `scheduler.simulator.metrics` reads."""

    arrival_time: float
    ttft_slo: float
    tpot_slo: float
    output_len: int
    first_token_time: float = float("nan")
    finish_time: float = float("nan")
    error: str | None = None


async def _replay(addr: str, trace: list[TraceRequest], vocab_ids: int, timeout_s: float, progress) -> list:
    rng = random.Random(0)
    done: list[ReplayedRequest] = []
    async with AsyncClient(addr, timeout_s=timeout_s) as client:
        start = time.perf_counter()

        async def one(r: TraceRequest) -> None:
            prompt = [rng.randrange(1, vocab_ids) for _ in range(r.prompt_len)]
            await asyncio.sleep(max(0.0, start + r.arrival - time.perf_counter()))
            sent = time.perf_counter() - start
            out = await client.generate(prompt, max_tokens=r.output_len, ignore_eos=True, temperature=0,
                                        ttft_ms=r.ttft_slo * 1e3, tpot_ms=r.tpot_slo * 1e3)
            item = ReplayedRequest(sent, r.ttft_slo, r.tpot_slo, len(out.token_ids), error=out.error)
            if out.error is None and out.token_times_ms:
                item.first_token_time = sent + out.token_times_ms[0] / 1e3
                item.finish_time = sent + out.token_times_ms[-1] / 1e3
            done.append(item)
            if progress:
                progress()

        await asyncio.gather(*(one(r) for r in trace))
    return done


def replay_requests(addr: str, trace: list[TraceRequest], vocab_ids: int = 256, timeout_s: float = 300.0,
                    progress=None) -> list[ReplayedRequest]:
    """Every request of the trace, sent open loop; each with its client-side timings or error."""
    return asyncio.run(_replay(addr, trace, vocab_ids, timeout_s, progress))


def warm_up(addr: str, trace: list[TraceRequest], requests: int = 16, timeout_s: float = 300.0) -> None:
    """Sends the trace's first requests, one after another, unmeasured: a fresh worker's first
    steps pay one-off costs (allocations, lazy initialisation) that would otherwise land on
    the first measured requests, and its cost-model calibration starts from real steps."""
    for r in trace[:requests]:
        replay_requests(addr, [replace(r, arrival=0.0)], timeout_s=timeout_s)


def report(requests: list[ReplayedRequest]) -> dict:
    served = [r for r in requests if r.error is None]
    if not served:
        raise RuntimeError(f"every replayed request failed; first error: {requests[0].error}")
    result = metrics(served)
    failed = len(requests) - len(served)
    # A failed request met no SLO.
    for key in ("ttft_attainment", "tpot_attainment", "e2e_attainment"):
        result[key] = result[key] * len(served) / len(requests)
    result.update(requests=len(requests), failed=failed)
    return result


def live_point(worker_argv: list[str], timeout_s: float = 300.0):
    """run_point for `scheduler.compare`: each policy pair on a fresh local router with one
    prefill and one decode worker (started with these arguments), warmed up, then the trace
    replayed live."""
    from scheduler.compare import latency_samples
    from transport.serve import local_cluster

    def run(trace: list[TraceRequest], policy: str) -> tuple[dict, dict]:
        prefill, decode = policy.split("+")
        with local_cluster(["--prefill-policy", prefill, *worker_argv], ["--decode-policy", decode, *worker_argv]) as addr:
            warm_up(addr, trace, timeout_s=timeout_s)
            requests = replay_requests(addr, trace, timeout_s=timeout_s)
        return report(requests), latency_samples(requests)

    return run


def replay(addr: str, trace: list[TraceRequest], vocab_ids: int = 256, timeout_s: float = 300.0,
           progress=None) -> dict:
    return report(replay_requests(addr, trace, vocab_ids, timeout_s, progress))
