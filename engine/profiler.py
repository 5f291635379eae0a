"""Step-time profiles: real forward passes (with sampling) timed on this machine, over a grid of
prefill batches (token counts, prompt mixes, cached prefixes) and decode batches (batch size x
context length). `scheduler.CostModel` is fitted to the result."""

from __future__ import annotations

import datetime
import json
import logging
import platform
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kairos.engine.block_manager import BlockManager
from kairos.engine.sequence import Sequence
from kairos.engine.step_scheduler import Batch
from kairos.kernels import resolve_backend_name
from kairos.scheduler.cost_model import CostModel
from kairos.scheduler.request import SamplingParams

log = logging.getLogger("kairos")


def _powers(lo: int, hi: int, factor: int = 2) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= factor
    return out


class Profiler:
    def __init__(self, llm, quick: bool, repeats: int = 3):
        self.llm = llm
        self.runner = llm.runner
        # A throwaway block manager: profiling must not disturb the engine's own bookkeeping.
        self.blocks = BlockManager(self.runner.num_blocks, llm.config.block_size, enable_prefix_caching=False)
        self.quick = quick
        self.repeats = repeats
        self.rng = random.Random(0)
        self.vocab = llm.model_config.vocab_size
        self.max_len = llm.max_model_len - 1

    def _seq(self, length: int) -> Sequence:
        return Sequence([self.rng.randrange(self.vocab) for _ in range(length)], SamplingParams(max_tokens=1))

    def _time(self, batch: Batch) -> float:
        best = float("inf")
        for _ in range(self.repeats + 1):  # the first run warms up
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.runner.run(batch)
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    def _fits(self, seqs_tokens: list[int]) -> bool:
        bs = self.blocks.block_size
        return sum(-(-t // bs) for t in seqs_tokens) <= self.blocks.num_free_blocks

    def prefill_point(self, num_prompts: int, new: int, cached: int) -> dict | None:
        if cached + new > self.max_len or not self._fits([cached + new] * num_prompts):
            return None
        seqs = [self._seq(cached + new) for _ in range(num_prompts)]
        for seq in seqs:
            self.blocks.allocate(seq, cached + new)
            seq.num_computed_tokens = cached  # as if a prefix-cache hit covered it
        try:
            seconds = self._time(Batch(True, seqs, [new] * num_prompts))
        finally:
            for seq in seqs:
                self.blocks.free_sequence(seq)
        return {"prompts": [[new, cached + new]] * num_prompts, "seconds": seconds}

    def decode_point(self, batch_size: int, context: int) -> dict | None:
        if context > self.max_len or not self._fits([context] * batch_size):
            return None
        seqs = [self._seq(context) for _ in range(batch_size)]
        for seq in seqs:
            self.blocks.allocate(seq, context)
            seq.num_computed_tokens = context - 1
        try:
            seconds = self._time(Batch(False, seqs, [1] * batch_size))
        finally:
            for seq in seqs:
                self.blocks.free_sequence(seq)
        return {"context_lens": [context] * batch_size, "seconds": seconds}

    def grid(self):
        budget = self.llm.config.max_num_batched_tokens
        # The quick grid (a worker's start-up) stays small enough to take seconds, not minutes.
        totals = _powers(16, min(budget, 1024), 4) if self.quick else _powers(16, budget, 2)
        mixes = (1, 4) if self.quick else (1, 4, 16)
        for total in totals:
            for n in mixes:
                if total // n >= 8:
                    for cached in (0, total // n):
                        yield "prefill", (n, total // n, cached)
        batches = _powers(1, min(self.llm.config.max_num_seqs, 64), 4) if self.quick else \
            _powers(1, self.llm.config.max_num_seqs, 2)
        contexts = _powers(16, min(self.max_len, 1024), 8) if self.quick else _powers(16, self.max_len, 4)
        for b in batches:
            for ctx in contexts:
                yield "decode", (b, ctx)

    @torch.inference_mode()
    def run(self, progress: bool) -> dict:
        points = list(self.grid())
        profile = {"prefill": [], "decode": []}
        for kind, args in tqdm(points, desc="profile", unit="step", disable=not progress):
            point = self.prefill_point(*args) if kind == "prefill" else self.decode_point(*args)
            if point is not None:
                profile[kind].append(point)
        return profile


def measure_profile(llm, quick: bool = False, progress: bool = False) -> dict:
    """A profile as JSON-ready data, with what it was measured on and its fit."""
    started = time.perf_counter()
    profile = Profiler(llm, quick).run(progress)
    cost, report = CostModel.fit_with_holdout(profile)
    device = llm.runner.device
    return {
        "model": str(llm.model_config.path.name),
        "architecture": llm.model_config.architecture,
        "load_format": llm.config.load_format,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU",
        # CPU step times depend on the threads the steps ran with (--cpu-threads).
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": str(llm.runner.dtype).removeprefix("torch."),
        "backend": resolve_backend_name(llm.config.backend, device.type),
        "block_size": llm.config.block_size,
        # The simulator's KV transfer sizes and per-worker capacity, from this engine's cache.
        "kv_bytes_per_token": llm.runner.kv_bytes_per_block() // llm.config.block_size,
        "kv_capacity_tokens": llm.runner.num_blocks * llm.config.block_size,
        "quick": quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds_to_measure": round(time.perf_counter() - started, 2),
        "fit": cost.to_dict(),
        **report,
        **profile,
    }


def load_cost_model(llm, profile_path: str | None) -> CostModel:
    if profile_path:
        try:
            return CostModel.from_profile(json.loads(Path(profile_path).read_text()))
        except (OSError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"cannot use the profile {profile_path}: {e}") from None
    log.warning("no --profile given: measuring a short step-time profile for the cost model")
    profile = measure_profile(llm, quick=True)
    log.warning("short profile took %.1f s (held-out error: prefill %.0f%%, decode %.0f%%)",
                profile["seconds_to_measure"], 100 * profile["prefill_mape"], 100 * profile["decode_mape"])
    return CostModel.fit(profile)
