"""Token sampling: greedy, temperature, top-k, top-p, with a reproducible stream per seeded
request."""

from __future__ import annotations

import torch

from engine.sampling import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self._request_generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seq_ids: list[int]) -> list[int]:
        """logits: [B, V] float32. Returns one token id per row."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy.tolist()
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
        logits = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = self._filter_top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and lets each seeded
        # request use its own generator regardless of the rest of the batch.
        noise = torch.empty_like(probs)
        for row, (p, seq_id) in enumerate(zip(params, seq_ids)):
            noise[row].exponential_(generator=self._generator_for(p, seq_id))
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled).tolist()

    def _generator_for(self, params: SamplingParams, seq_id: int) -> torch.Generator:
        if params.seed is None:
            return self.generator
        gen = self._request_generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
            self._request_generators[seq_id] = gen
        return gen

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
