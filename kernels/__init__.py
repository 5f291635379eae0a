"""The kernel backend seam: every matmul, attention and small op the model runs goes through a
Backend.

A backend is a namespace of functions with the signatures of `kairos.kernels.reference`:
- `torch`: that reference; runs on any device. On a CPU, decode attention and RoPE with the KV
  store take the compiled loops of `cpu_ops` (float32, where numba is installed).
- `triton`: the Triton kernels (`small_ops`, `attention`, `sampling`), and torch's matmul
  (cuBLAS) or, for steps of at most `skinny_matmul_tokens` tokens, the skinny matmul of
  `linear`; on CPU only under TRITON_INTERPRET=1.
- `flashinfer`: FlashInfer's paged attention (`flashinfer_attention`) and the other Triton
  kernels; CUDA only, where FlashInfer is installed.
- `auto`: triton on CUDA when Triton is installed, torch otherwise.

`capturable` says whether a decode step through the backend may be captured in a CUDA graph:
not with the reference (it sizes tensors by their data) nor FlashInfer (it plans on the host).
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

OPS = (
    "linear",
    "silu_and_mul_linear",
    "rms_norm_linear",
    "rms_norm",
    "add_rms_norm",
    "silu_and_mul",
    "rope_and_store_kv",
    "prefill_attention",
    "decode_attention",
    "top_k_top_p_cutoff",
)

BACKENDS = ("auto", "torch", "triton", "flashinfer")


def resolve_backend_name(name: str, device_type: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; available: {', '.join(BACKENDS)}")
    if name == "auto":
        triton_ok = importlib.util.find_spec("triton") is not None
        return "triton" if device_type == "cuda" and triton_ok else "torch"
    return name


def get_backend(name: str = "torch", device_type: str = "cpu", skinny_matmul_tokens: int = 0) -> SimpleNamespace:
    name = resolve_backend_name(name, device_type)
    if skinny_matmul_tokens and name == "torch":
        raise ValueError("the skinny matmul is a Triton kernel: --skinny-matmul-tokens needs the triton or "
                         "flashinfer backend (auto is torch off CUDA)")
    if name == "torch":
        from kairos.kernels import cpu_ops, reference

        impls = [cpu_ops, reference] if device_type == "cpu" and cpu_ops.ENABLED else [reference]
    elif name == "flashinfer" and device_type != "cuda":
        raise ValueError("the flashinfer backend runs on CUDA")
    elif device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton backend runs on CUDA; on CPU only in Triton's interpreter, "
                         "with TRITON_INTERPRET=1 set (slow: for testing)")
    else:
        try:
            from kairos.kernels import attention, linear, sampling, small_ops
        except ImportError as e:
            raise ValueError(f"the {name} backend needs Triton installed: {e}") from e
        impls = [linear.skinny_or_torch(skinny_matmul_tokens), small_ops, attention, sampling]
        if name == "flashinfer":
            from kairos.kernels.flashinfer_attention import FlashInferAttention

            impls.insert(0, FlashInferAttention())
    ops = {op: getattr(next(m for m in impls if hasattr(m, op)), op) for op in OPS}
    return SimpleNamespace(name=name, capturable=name == "triton", **ops)
