"""Token sampling: greedy, temperature, top-k, top-p, with reproducible draws for seeded
requests.

A seeded request's k-th output token is drawn from a generator seeded by (seed, k) alone, so
any process can continue a request where another left off (prefill samples the first token,
decode the rest) and still produce the offline engine's tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kairos.kernels import reference
from kairos.scheduler.request import SamplingParams

CutoffFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
MIN_TOP_P = 1e-30  # a top_p that float32 would round to 0 stands for this: the top token alone


class Sampler:
    def __init__(self, device: torch.device, seed: int, top_k_top_p_cutoff: CutoffFn = reference.top_k_top_p_cutoff):
        """top_k_top_p_cutoff: the kernel backend's (`kairos.kernels`), which on the GPU selects
        each row's cutoff without sorting the vocabulary."""
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seeded = torch.Generator(device=device)
        self.top_k_top_p_cutoff = top_k_top_p_cutoff

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
        """logits: [B, V] float32; steps: per row, how many tokens the request has output so far.
        Returns one token id per row, on the logits' device (int64, [B]): nothing here waits
        for the device."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        temps, top_k, top_p, is_greedy = self._row_values(params, logits)
        logits = logits / temps.unsqueeze(1)
        uses_top_k, uses_top_p = any(p.top_k > 0 for p in params), any(p.top_p < 1 for p in params)
        if uses_top_k or uses_top_p:
            cutoff = self.top_k_top_p_cutoff(logits, top_k if uses_top_k else None, top_p if uses_top_p else None)
            logits = logits.masked_fill(logits < cutoff.unsqueeze(1), float("-inf"))
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Unseeded rows share one
        # draw from the engine's generator; a seeded row draws again from its own.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, (p, step) in enumerate(zip(params, steps)):
            if p.seed is not None:
                noise[row].exponential_(generator=self._seeded_generator(p.seed, step))
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy, sampled)

    @staticmethod
    def _row_values(params: list[SamplingParams], logits: torch.Tensor):
        """Each row's temperature, top-k, top-p and greedy flag on the logits' device, from one
        pinned host tensor copied without waiting: a blocking copy would wait for the forward
        pass queued before it, and the host could no longer prepare the next step meanwhile."""
        vocab = logits.shape[-1]
        host = torch.tensor([[1.0 if p.greedy else p.temperature for p in params],
                             [p.top_k if p.top_k > 0 else vocab for p in params],  # exact in float32
                             [max(p.top_p, MIN_TOP_P) for p in params],
                             [float(p.greedy) for p in params]], dtype=torch.float32, pin_memory=logits.is_cuda)
        temps, top_k, top_p, is_greedy = host.to(logits.device, non_blocking=True)
        return temps, top_k.long(), top_p, is_greedy.bool()

    def _seeded_generator(self, seed: int, step: int) -> torch.Generator:
        # A 64-bit mix of (seed, step): neighbouring seeds and steps give unrelated streams. The
        # high half is folded into the low one, which is all the CPU generator (mt19937) keeps:
        # seeds 2**63 apart, such as -1 and 2**63 - 1, would otherwise draw alike.
        mixed = (seed * 0x9E3779B97F4A7C15 + step) % 2**64
        return self._seeded.manual_seed(mixed ^ (mixed >> 32))
