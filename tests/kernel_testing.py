"""Shared pieces of the kernel tests: device, dtypes, paged inputs, NaN-poisoned outputs, comparison,
and the kernel variants launches compile."""

import contextlib

import torch

from kairos.kernels import reference as ref

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


def paged_pool(lengths, kv_heads, head_dim, page, dtype):
    """A KV pool with random contents and each sequence in randomly scattered blocks."""
    blocks = [-(-n // page) for n in lengths]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, page, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks).tolist()
    width = max(blocks)
    tables = [[order.pop() for _ in range(n)] + [-1] * (width - n) for n in blocks]
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device=DEVICE)


def pack_prefill(q_lens, prefixes, kv_heads, group, head_dim, page, dtype):
    """Random q/k/v for the new tokens, stored into a paged pool that already holds prefixes."""
    k_lens = [a + b for a, b in zip(q_lens, prefixes)]
    k_cache, v_cache, tables = paged_pool(k_lens, kv_heads, head_dim, page, dtype)
    total = sum(q_lens)
    q = torch.randn(total, kv_heads * group, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(total, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    slots = [tables[s, pos // page].item() * page + pos % page
             for s, (ql, p) in enumerate(zip(q_lens, prefixes)) for pos in range(p, p + ql)]
    ref.store_kv(k, v, k_cache, v_cache, torch.tensor(slots, device=DEVICE))
    cu_q = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens, device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, k_cache, v_cache, cu_q, cu_k, tables


@contextlib.contextmanager
def kernel_variants():
    """Records each Triton kernel launch's specialization as Triton keys its compiled kernels:
    the constexpr values, and for every other argument its type with Triton's specialization of
    it (an integer equal to 1 or divisible by 16, a pointer's 16-byte alignment), unless the
    kernel leaves that argument unspecialized."""
    import inspect

    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    from kairos.kernels import attention, linear, sampling, small_ops

    seen: set = set()
    hooked = []
    for module in (attention, small_ops, sampling, linear):
        for name, kernel in vars(module).items():
            if not (name.endswith("_kernel") and hasattr(kernel, "add_pre_run_hook")):
                continue
            params = inspect.signature(kernel.fn).parameters
            options = getattr(kernel, "kwargs", None) or {}  # the interpreter keeps jit's options here
            unspecialized = options.get("do_not_specialize") or getattr(kernel, "do_not_specialize", None) or ()
            unspecialized = {kernel.arg_names[a] if isinstance(a, int) else a for a in unspecialized}

            def hook(*args, _name=name, _kernel=kernel, _params=params, _unspecialized=unspecialized, **kwargs):
                bound = {**dict(zip(_kernel.arg_names, args)), **kwargs}
                key = []
                for arg in _kernel.arg_names:
                    value = bound[arg]
                    if "constexpr" in str(_params[arg].annotation):  # a string under postponed annotations
                        key.append((arg, value))
                    elif arg in _unspecialized:  # a pointer's element type still makes a variant
                        key.append((arg, str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__))
                    else:
                        key.append((arg, native_specialize_impl(BaseBackend, value, False, True, True)))
                seen.add((_name, tuple(key)))

            kernel.add_pre_run_hook(hook)
            hooked.append((kernel, hook))
    try:
        yield seen
    finally:
        for kernel, hook in hooked:
            kernel.pre_run_hooks.remove(hook)
