"""The kernel backend seam: every attention and small op the model runs goes through a Backend.

A backend is a namespace of functions with the signatures of `kernels.reference`. The `torch`
backend is that reference and runs on any device; faster backends plug in here by name.
"""

from __future__ import annotations

from types import SimpleNamespace

from kernels import reference

OPS = (
    "rms_norm",
    "add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "store_kv",
    "prefill_attention",
    "decode_attention",
)

BACKENDS = ("torch",)


def get_backend(name: str = "torch") -> SimpleNamespace:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; available: {', '.join(BACKENDS)}")
    return SimpleNamespace(name=name, **{op: getattr(reference, op) for op in OPS})
