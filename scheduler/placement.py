"""Which workers serve a request: the router's choice, and the simulator's model of it.

A prefill worker here has `queued_prompt_tokens` (prompt tokens placed on it whose first token
has not come back) and `requests_in_hand` (placed on it and not yet handed off); a decode worker
has `requests_in_hand` (placed on it and not finished) and `free_blocks`."""

from __future__ import annotations

from typing import Iterable, TypeVar

W = TypeVar("W")

# A text prompt is tokenized by its prefill worker, after placement: until then about four
# characters make a token.
CHARS_PER_TOKEN = 4


def prompt_tokens(text: str | None, token_ids: list[int] | None) -> int:
    """A prompt's length in tokens, or the estimate of it for a text prompt."""
    return len(token_ids) if text is None else len(text) // CHARS_PER_TOKEN + 1


def pick_prefill_worker(workers: Iterable[W]) -> W | None:
    """The least prompt work queued: a request's wait for its first token grows with the tokens
    ahead of it, not with how many requests they are. Then the fewest requests in hand."""
    return min(workers, key=lambda w: (w.queued_prompt_tokens, w.requests_in_hand), default=None)


def pick_decode_worker(workers: Iterable[W]) -> W | None:
    """The fewest requests in hand; then the most free KV blocks."""
    return min(workers, key=lambda w: (w.requests_in_hand, -w.free_blocks), default=None)
