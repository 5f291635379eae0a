"""Kairos engine: Llama-family models on a paged KV cache.

`from kairos.engine import LLM` loads torch and the model code; the request types it also
offers (SamplingParams, RequestSLO, from kairos.scheduler.request) load neither."""

from kairos.scheduler.request import RequestSLO, SamplingParams

__all__ = ["LLM", "RequestOutput", "RequestSLO", "SamplingParams"]


def __getattr__(name: str):
    if name in ("LLM", "RequestOutput"):
        from kairos.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
