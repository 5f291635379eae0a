"""Kairos engine: Llama-family models on a paged KV cache."""

from engine.llm import LLM, RequestOutput
from engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
