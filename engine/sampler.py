"""Token sampling: greedy, temperature, top-k, top-p, with reproducible draws for seeded
requests.

A seeded request's k-th output token is drawn from a generator seeded by (seed, k) alone, so
any process can continue a request where another left off (prefill samples the first token,
decode the rest) and still produce the offline engine's tokens."""

from __future__ import annotations

import torch

from kairos.scheduler.request import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
        """logits: [B, V] float32; steps: per row, how many tokens the request has output so far.
        Returns one token id per row, on the logits' device (int64, [B]): nothing here waits
        for the device."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        temps, top_k, top_p, is_greedy = self._row_values(params, logits)
        logits = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = self._filter_top_k_top_p(logits, top_k, top_p)
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
        host = torch.tensor([[p.temperature or 1.0 for p in params],
                             [p.top_k if p.top_k > 0 else vocab for p in params],  # exact in float32
                             [p.top_p for p in params],
                             [float(p.greedy) for p in params]], dtype=torch.float32, pin_memory=logits.is_cuda)
        temps, top_k, top_p, is_greedy = host.to(logits.device, non_blocking=True)
        return temps, top_k.long(), top_p, is_greedy.bool()

    def _seeded_generator(self, seed: int, step: int) -> torch.Generator:
        # A 64-bit mix of (seed, step): neighbouring seeds and steps give unrelated streams.
        return self._seeded.manual_seed((seed * 0x9E3779B97F4A7C15 + step) % 2**63)

    @staticmethod
    def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest head whose mass reaches top_p: drop a token when the mass before it
        # already does. The first token always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
