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
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
        """logits: [B, V] float32; steps: per row, how many tokens the request has output so far.
        Returns one token id per row, on the logits' device (int64, [B]): nothing here waits
        for the device."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
        logits = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = self._filter_top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and lets each seeded
        # request use its own generator regardless of the rest of the batch.
        noise = torch.empty_like(probs)
        for row, (p, step) in enumerate(zip(params, steps)):
            noise[row].exponential_(generator=self._generator_for(p, step))
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled)

    def _generator_for(self, params: SamplingParams, step: int) -> torch.Generator:
        if params.seed is None:
            return self.generator
        # A 64-bit mix of (seed, step): neighbouring seeds and steps give unrelated streams.
        return self._seeded.manual_seed((params.seed * 0x9E3779B97F4A7C15 + step) % 2**63)

    @staticmethod
    def _filter_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        vocab = logits.shape[-1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest head whose mass reaches top_p: drop a token when the mass before it
        # already does. The first token always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
