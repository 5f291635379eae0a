"""Attention metadata for one forward pass, carried in one object from the runner to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is stored
    # Prefill: tokens of sequence s are cu_seqlens_q[s]:cu_seqlens_q[s+1]; its whole context
    # (cached prefix + new tokens) has cu_seqlens_k[s+1] - cu_seqlens_k[s] tokens.
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0  # host-side, for kernel launch grids
    # Paged reads: a prefill with a cached prefix, or every decode step.
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32, -1 padded
    context_lens: torch.Tensor | None = None  # [num_seqs] int32, decode only
