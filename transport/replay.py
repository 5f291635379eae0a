"""`kairos bench replay`: a trace sent live to a router, open loop (each request leaves at its
arrival time whatever happened to the others), with synthetic prompts of the trace's lengths.
TTFT, TPOT and end-to-end SLO attainment come from the client's clock, in the simulator's
report format. With an HTTP URL instead of a router's address, the requests go through the
OpenAI-compatible API (`kairos api`): streamed /v1/completions, the SLOs in the body."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, replace

import torch

from kairos.scheduler.metrics import NothingServed, latency_samples, metrics, service_metrics
from kairos.scheduler.request import MIN_SLO_MS, RequestSLO
from kairos.scheduler.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest
from kairos.transport.client import AsyncClient, Client


@dataclass
class ReplayedRequest:
    """One replayed request, with what `kairos.scheduler.metrics` reads."""

    arrival_time: float
    slo: RequestSLO
    output_len: int
    first_token_time: float = float("nan")
    finish_time: float = float("nan")
    error: str | None = None
    dag_start: float = float("nan")  # a DAG's call: when its DAG's first call was sent


def _seeded(seed: int, *key) -> torch.Generator:
    digest = hashlib.blake2b(":".join(map(str, (seed, *key))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest))


def synthetic_prompt(r: TraceRequest, index: int, vocab_ids: int, seed: int) -> list[int]:
    """Token ids in [1, vocab_ids) of the index-th request's prompt length, drawn from `seed`.
    Prompt blocks that a Mooncake trace marks with the same hash id get the same tokens, so
    they share prefixes in the workers' caches as they did where the trace was recorded (and as
    the simulator models); nothing else is shared but by chance. Each prompt is drawn on its
    own, when it is due (in microseconds), so that a long trace's prompts never all sit in
    memory."""
    prompt: list[int] = []
    for h in r.hash_ids:
        if len(prompt) >= r.prompt_len:
            break
        prompt += torch.randint(1, vocab_ids, (MOONCAKE_BLOCK_TOKENS,), generator=_seeded(seed, "block", h)).tolist()
    del prompt[r.prompt_len:]
    own = r.prompt_len - len(prompt)
    return prompt + torch.randint(1, vocab_ids, (own,), generator=_seeded(seed, "request", index)).tolist()


def fresh_seed() -> int:
    """A prompt seed no earlier replay used (but by chance): a server keeps the prompts it has
    seen in its prefix cache, and a replay that repeated them would be served from it."""
    return secrets.randbits(63)


class _Native:
    """Requests to a router, on one AsyncClient connection. Each output runs to its trace length:
    max_tokens is that length, or with `max_tokens` given, that is the cap every request sets and
    the output ends at its length as at an end token (eos_after), which the policies are not
    told."""

    def __init__(self, addr: str, timeout_s: float, max_tokens: int | None = None):
        self.client = AsyncClient(addr, timeout_s=timeout_s)
        self.max_tokens = max_tokens

    async def send(self, prompt: list[int], r: TraceRequest) -> tuple[int, list[float], str | None]:
        """(output tokens, each token's arrival in seconds since sent, error)."""
        lengths = {"max_tokens": r.output_len} if self.max_tokens is None else {
            "max_tokens": self.max_tokens, "eos_after": r.output_len}
        try:
            out = await self.client.generate(prompt, **lengths, ignore_eos=True, temperature=0, slo=r.slo)
        except TimeoutError as e:  # one request's failure, not the replay's
            return 0, [], str(e)
        return len(out.token_ids), [ms / 1e3 for ms in out.token_times_ms], out.error

    async def close(self) -> None:
        self.client.close()


class _HTTP:
    """Streamed /v1/completions requests to the HTTP API at `url` (its base, with or without
    /v1); each SSE chunk is one token, as the workers stream them."""

    def __init__(self, url: str, timeout_s: float, model: str | None, api_key: str | None):
        import httpx

        base = url.rstrip("/")
        self.url = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # As many connections as requests in flight: the replay is open loop.
        self.http = httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=httpx.Limits(max_connections=None))
        self.model = model

    async def send(self, prompt: list[int], r: TraceRequest) -> tuple[int, list[float], str | None]:
        import httpx

        slo = r.slo
        body = {"model": self.model, "prompt": prompt, "max_tokens": r.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "ttft_slo_ms": slo.ttft_ms, "tpot_slo_ms": slo.tpot_ms,
                "kind": slo.kind, "deadline_ms": slo.deadline_ms, "dag_id": slo.dag_id, "dag_stage": slo.dag_stage,
                **({"request_class": r.slo.request_class} if r.slo.request_class else {}),
                **({"output_len_hint": r.slo.output_len_hint} if r.slo.output_len_hint else {})}
        sent, times = time.perf_counter(), []
        try:
            if self.model is None:
                models = await self.http.get(f"{self.url}/models")
                if models.status_code != 200:
                    return 0, [], f"HTTP {models.status_code} from {self.url}/models: {models.text[:200]}"
                self.model = models.json()["data"][0]["id"]
            body["model"] = self.model
            async with self.http.stream("POST", f"{self.url}/completions", json=body) as response:
                if response.status_code != 200:
                    return 0, [], f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return len(times), times, event["error"]["message"]
                    times.append(time.perf_counter() - sent)
        except httpx.TransportError as e:  # one request's failure (a timeout, a reset), not the replay's
            if isinstance(e, httpx.TimeoutException):
                waited = self.http.timeout.read
                return len(times), times, f"no reply from {self.url} within {waited:g} s ({type(e).__name__})"
            return len(times), times, f"{type(e).__name__}: {e or 'no detail'}"
        return len(times), times, None

    async def close(self) -> None:
        await self.http.aclose()


async def _replay(target, trace: list[TraceRequest], vocab_ids: int, progress, seed: int) -> list:
    """A DAG's later call (`after` set) is sent its tool time after the call before it ends,
    with the time its DAG has left as its deadline; if that call failed, it fails unsent."""
    done: list[ReplayedRequest | None] = [None] * len(trace)
    ended = [asyncio.Event() for _ in trace]
    try:
        start = time.perf_counter()

        async def one(index: int, r: TraceRequest) -> None:
            before = None
            if r.after is None:
                await asyncio.sleep(max(0.0, start + r.arrival - time.perf_counter()))
            else:
                await ended[r.after].wait()
                before = done[r.after]
                await asyncio.sleep(r.arrival)
            sent = time.perf_counter() - start
            slo, dag_start = r.slo, float("nan")
            if slo.kind == "collective":
                dag_start = sent if before is None else before.dag_start
                slo = replace(slo, deadline_ms=max(MIN_SLO_MS, slo.deadline_ms - (sent - dag_start) * 1e3))
            if before is not None and before.error is not None:
                item = ReplayedRequest(sent, slo, 0, error="an earlier call of its DAG failed")
            else:
                prompt = synthetic_prompt(r, index, vocab_ids, seed)
                tokens, times, error = await target.send(prompt, replace(r, slo=slo))
                item = ReplayedRequest(sent, slo, tokens, error=error)
                if error is None and times:
                    item.first_token_time = sent + times[0]
                    item.finish_time = sent + times[-1]
            item.dag_start = dag_start
            done[index] = item
            ended[index].set()
            if progress:
                progress()

        await asyncio.gather(*(one(i, r) for i, r in enumerate(trace)))
    finally:
        await target.close()
    return done


def replay_requests(addr: str, trace: list[TraceRequest], vocab_ids: int = 256, timeout_s: float = 300.0,
                    progress=None, seed: int | None = None, http_model: str | None = None,
                    api_key: str | None = None, max_tokens: int | None = None) -> list[ReplayedRequest]:
    """Every request of the trace, sent open loop; each with its client-side timings or error.
    The prompts come from `seed`, by default a fresh one. `addr` is a router's (tcp://...), or
    the HTTP API's URL (http://...), whose model is `http_model` (default: the one it lists).
    `max_tokens`: the cap every request sets, its output still ending at its trace length (over
    a router only: the HTTP API has no way to end an output where a trace did)."""
    seed = fresh_seed() if seed is None else seed
    http = addr.startswith(("http://", "https://"))
    if http and max_tokens is not None:
        raise ValueError("--max-tokens replays over a router only: through the HTTP API, max_tokens is each "
                         "request's trace length")

    async def run():
        target = _HTTP(addr, timeout_s, http_model, api_key) if http else _Native(addr, timeout_s, max_tokens)
        return await _replay(target, trace, vocab_ids, progress, seed)

    return asyncio.run(run())


def warm_up(addr: str, trace: list[TraceRequest], requests: int = 16, timeout_s: float = 300.0,
            max_tokens: int | None = None) -> list[ReplayedRequest]:
    """Sends the trace's first requests, one after another, unmeasured: a fresh worker's first
    steps pay one-off costs (allocations, lazy initialisation) that would otherwise land on
    the first measured requests, and its cost-model calibration starts from real steps. Their
    prompts share no prefix with each other or with the replay's (each has a fresh seed, and
    none of the trace's shared blocks), so the measured run finds no prefix cached."""
    return [done for r in trace[:requests]
            for done in replay_requests(addr, [replace(r, arrival=0.0, hash_ids=(), after=None)], timeout_s=timeout_s,
                                        max_tokens=max_tokens)]


def report(requests: list[ReplayedRequest]) -> dict:
    served = [r for r in requests if r.error is None]
    if not served:
        raise NothingServed(f"every replayed request failed; the first: {requests[0].error}")
    result = metrics(served)
    failed = len(requests) - len(served)
    # A failed request met no SLO.
    for key in ("ttft_attainment", "tpot_attainment", "e2e_attainment"):
        result[key] = result[key] * len(served) / len(requests)
    result.update(requests=len(requests), failed=failed)
    if failed:
        result["first_failure"] = next(r.error for r in requests if r.error is not None)
    if any(r.slo.kind != "latency" for r in requests):
        result["service"] = service_metrics(requests)
    return result


def served_by_worker(addr: str) -> dict[str, int]:
    """Requests each worker has served so far, by the router's status: first tokens for a
    prefill worker, finished requests for a decode worker (a one-token request ends on its
    prefill worker). Keyed "prefill 1", "decode 1", ... in worker id order."""
    with Client(addr) as client:
        workers = sorted(client.fresh_status()["workers"], key=lambda w: (w["role"], w["worker_id"]))
    served, seen = {}, {}
    for w in workers:
        seen[w["role"]] = seen.get(w["role"], 0) + 1
        served[f"{w['role']} {seen[w['role']]}"] = w.get("first_tokens" if w["role"] == "prefill" else "completed", 0)
    return served


def live_point(worker_argv: list[str], timeout_s: float = 300.0, prefill_workers: int = 1, decode_workers: int = 1,
               decode_argv: list[str] | None = None, max_tokens: int | None = None):
    """run_point for `scheduler.compare`: each policy pair on a fresh local router with this many
    prefill and decode workers (started with these arguments; decode ones with decode_argv
    too), warmed up, then the trace replayed live. The report adds what each worker served."""
    from kairos.transport.serve import local_cluster

    def run(trace: list[TraceRequest], policy: str) -> tuple[dict, dict]:
        prefill, decode = policy.split("+")
        with local_cluster(["--prefill-policy", prefill, *worker_argv],
                           ["--decode-policy", decode, *worker_argv, *(decode_argv or [])],
                           prefill_workers, decode_workers) as addr:
            warm_up(addr, trace, timeout_s=timeout_s, max_tokens=max_tokens)
            before = served_by_worker(addr)
            requests = replay_requests(addr, trace, timeout_s=timeout_s, max_tokens=max_tokens)
            after = served_by_worker(addr)
        result = report(requests)
        result["served_by_worker"] = {worker: n - before.get(worker, 0) for worker, n in after.items()}
        return result, latency_samples(requests)

    return run


def replay(addr: str, trace: list[TraceRequest], vocab_ids: int = 256, timeout_s: float = 300.0,
           progress=None, seed: int | None = None, http_model: str | None = None, api_key: str | None = None,
           max_tokens: int | None = None) -> dict:
    return report(replay_requests(addr, trace, vocab_ids, timeout_s, progress, seed, http_model, api_key, max_tokens))
