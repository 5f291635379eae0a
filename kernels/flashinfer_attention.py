"""FlashInfer's paged attention behind the signatures of `kairos.kernels.reference`.

FlashInfer splits attention into a plan (host-side work over the batch's page layout, written
into a workspace) and runs that reuse it: a plan is made at a forward pass's first layer and
reused by its others (`kairos.kernels.per_pass`). Planning reads the layout on the host: one
device sync per forward pass, and no CUDA graphs (`capturable` is False for this backend).

The layout conversion is plain PyTorch and runs anywhere; the wrappers need FlashInfer on CUDA.
"""

from __future__ import annotations

import torch

from kairos.kernels.per_pass import PassMemo

WORKSPACE_BYTES = 256 << 20


def paged_kv_layout(block_tables: torch.Tensor, context_lens: torch.Tensor,
                    page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables ([num_seqs, width], -1 padded) as FlashInfer's compressed page layout:
    indptr [num_seqs + 1] (where each sequence's pages start in indices), indices (every used
    page, sequence by sequence) and last_page_len [num_seqs] (tokens in each last page), int32."""
    lens = context_lens.long()
    pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=lens.device)
    indptr[1:] = pages.cumsum(0)
    used = torch.arange(block_tables.shape[1], device=block_tables.device) < pages.unsqueeze(1)
    indices = block_tables[used].to(torch.int32)  # row-major: each sequence's pages in order
    last_page_len = (lens - (pages - 1) * page_size).to(torch.int32)
    return indptr, indices, last_page_len


class FlashInferAttention:
    """One engine's FlashInfer wrappers (decode, paged prefill, ragged prefill) and their
    shared workspace, made on first use on the device of the first query."""

    def __init__(self):
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError(f"the flashinfer backend needs FlashInfer installed (pip install flashinfer-python): "
                             f"{e}") from e
        self.flashinfer = flashinfer
        self.workspace: torch.Tensor | None = None
        self.wrappers: dict[tuple, object] = {}
        self.plans = PassMemo()

    def _wrapper(self, key: tuple, device: torch.device):
        if key not in self.wrappers:
            if self.workspace is None:
                self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            fi = self.flashinfer
            if key[0] == "decode":
                # FlashInfer's tensor-core decode is its faster path once 4 or more query heads
                # share a KV head (Llama 3 8B has 4).
                self.wrappers[key] = fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                           use_tensor_cores=key[1])
            elif key[0] == "paged":
                self.wrappers[key] = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            else:
                self.wrappers[key] = fi.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        return self.wrappers[key]

    def _planned(self, key: tuple, q: torch.Tensor, tensors: tuple, params: tuple, plan) -> object:
        """The wrapper for key, planned for these metadata (by calling plan(wrapper) unless it
        already is). The checks run only when planning, not at every layer."""
        wrapper = self._wrapper(key, q.device)

        def checked_plan():
            if q.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"FlashInfer attention runs in float16 or bfloat16, not {q.dtype}: "
                                 "pass --dtype bfloat16 (or float16), or another --backend")
            plan(wrapper)

        self.plans.get(key, tensors, params, checked_plan)
        return wrapper

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        num_heads, head_dim = q.shape[1], q.shape[2]
        page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        params = (num_heads, num_kv_heads, head_dim, page_size, q.dtype, k_cache.dtype, scale)

        def plan(wrapper):
            indptr, indices, last = paged_kv_layout(block_tables, context_lens, page_size)
            wrapper.plan(indptr, indices, last, num_heads, num_kv_heads, head_dim, page_size,
                         q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=scale)

        key = ("decode", num_heads // num_kv_heads >= 4)
        wrapper = self._planned(key, q, (block_tables, context_lens), params, plan)
        return wrapper.run(q.contiguous(), (k_cache, v_cache))

    def prefill_attention(self, q, k, v, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables, scale,
                          max_seqlen_q):
        num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        page_size = k_cache.shape[1]
        params = (num_heads, num_kv_heads, head_dim, page_size, q.dtype, k.dtype, scale)
        if block_tables is None:
            # No cached prefix: every context is its own new tokens, read where they are.
            def plan(wrapper):
                wrapper.plan(cu_seqlens_q, cu_seqlens_k, num_heads, num_kv_heads, head_dim, causal=True,
                             sm_scale=scale, q_data_type=q.dtype, kv_data_type=k.dtype)

            wrapper = self._planned(("ragged",), q, (cu_seqlens_q, cu_seqlens_k), params, plan)
            return wrapper.run(q.contiguous(), k.contiguous(), v.contiguous())

        # A cached prefix: the whole context, new tokens included (stored already), from the pages.
        def plan(wrapper):
            context_lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
            indptr, indices, last = paged_kv_layout(block_tables, context_lens, page_size)
            wrapper.plan(cu_seqlens_q, indptr, indices, last, num_heads, num_kv_heads, head_dim, page_size,
                         causal=True, sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype)

        wrapper = self._planned(("paged",), q, (cu_seqlens_q, cu_seqlens_k, block_tables), params, plan)
        return wrapper.run(q.contiguous(), (k_cache, v_cache))
