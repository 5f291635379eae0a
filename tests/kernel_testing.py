"""Shared pieces of the kernel tests: device, dtypes, NaN-poisoned outputs and comparison."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 only on the GPU: Triton's interpreter computes bf16 dots wrongly.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def poison_outputs(monkeypatch, module) -> None:
    """Makes every output buffer of a kernel module start as NaN, so that an element the
    kernel forgets to write fails the comparison."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "alloc", poisoned)


def close(actual, expected, dtype, fp32_tol: float = 1e-5) -> None:
    """Every element written, and within the dtype's rounding of the reference."""
    tol = {torch.float32: fp32_tol, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert not actual.isnan().any()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)
