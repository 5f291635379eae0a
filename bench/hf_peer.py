"""transformers as the peer measured in the same run: the same model shape, its own kernels.

A model folder with weights loads them; a folder with config.json alone (the shipped shapes)
gets random weights, which time the same as real ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kairos.engine.llm import resolve_model_path


def load_hf_model(model: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model)
    if any(Path(path).glob("*.safetensors")):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    return hf.eval().requires_grad_(False)


class TokenClock:
    """A generate() streamer that notes when each step's tokens reach the host: the prompt
    first, then one call per generated token (generate copies them to the host, a sync)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_kwargs(new_tokens: int, cache_implementation: str | None) -> dict:
    """Exactly new_tokens greedy tokens (no stop at EOS) with the given cache."""
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": 0}
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    return kwargs


@torch.inference_mode()
def decode_step_seconds(hf, batch: int, context: int, new_tokens: int, cache_implementation: str | None,
                        repeats: int = 2) -> float:
    """Seconds per decode step of generate() at this batch and context, from the time between
    its first and last generated tokens; the best of `repeats` runs after one that warms up
    (and, with a static cache, compiles)."""
    device = hf.device
    ids = torch.randint(0, hf.config.vocab_size, (batch, context), device=device)
    kwargs = generate_kwargs(new_tokens, cache_implementation)
    best = float("inf")
    for _ in range(repeats + 1):
        clock = TokenClock()
        hf.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **kwargs)
        generated = clock.times[1:]
        best = min(best, (generated[-1] - generated[0]) / (len(generated) - 1))
    return best
