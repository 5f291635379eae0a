"""What each Triton kernel asks of an SM, without a GPU.

Every kernel is compiled as the engine launches it in a Llama-3.1-8B step (bf16, pages of 16
tokens) on an H100/H200 (sm_90, 132 SMs): the launch wrappers run on CPU tensors of the step's
shapes, Triton specializes their real arguments as the GPU's JIT would, and compiles them with
the ptxas it ships. Registers, spills (stack) and shared memory are read from the cubin, and
give how many programs fit on one SM and how many waves the grid takes; the compiled TTGIR
gives how many asynchronous copies a program keeps loading while it computes. A kernel that spills,
or whose grid leaves SMs idle, shows here before it is timed on a GPU (bench/kernels.py).

  python -P -m kairos.bench.kernel_resources            # writes bench/results/kernel_resources_sm90_triton<v>.json
  python -P -m kairos.bench.kernel_resources --check    # and exits 1 if any launch spills

The numbers are this Triton's (the file names its version): the GPU machine's may compile
differently, and bench/gpu_all.sh runs this there too.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

HQ, HKV, D, PAGE, HIDDEN, INTERMEDIATE = 32, 8, 128, 16, 4096, 14336
SM90 = {"sms": 132, "registers": 65536, "max_warps": 64, "max_programs": 32, "shared_bytes": 233472,
        "shared_per_program_reserved": 1024}


def programs_per_sm(registers: int, num_warps: int, shared: int, sm: dict = SM90) -> int:
    """Resident programs of a kernel on one SM: registers are allocated 256 to a warp, and each
    program also holds the SM's 1 KiB of reserved shared memory."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = sm["registers"] // per_warp // num_warps
    by_warps = sm["max_warps"] // num_warps
    by_shared = sm["shared_bytes"] // (shared + sm["shared_per_program_reserved"])
    return min(by_registers, by_warps, by_shared, sm["max_programs"])


def cubin_resources(cubin: bytes, tools: Path) -> dict:
    """REG, STACK and SHARED of the one function in a cubin, from cuobjdump."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kairos_kernel_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        out = subprocess.run([tools / "cuobjdump", "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    finally:
        path.unlink()
    usage = out[out.index("Function "):]
    return {key.lower(): int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "SHARED")}


def async_groups_in_flight(ttgir: str) -> int:
    """The most asynchronous copy groups a program leaves loading while it computes: the largest
    count any wait of the compiled kernel lets stay outstanding (0 where nothing is pipelined).
    Decode attention issues one group for a K tile and one for its V tile."""
    return max((int(n) for n in re.findall(r"ttg\.async_wait .*\{num = (\d+) : i32\}", ttgir)), default=0)


@contextmanager
def compiling_launches(rows: list[dict]):
    """Within it, a Triton launch compiles for sm_90 and appends its resources to rows instead
    of running; the attention wrappers choose their GPU tiles and SM count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from kairos.kernels import attention

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    compiled: dict = {}
    case = {"label": ""}

    def compile_launch(fn, *args, grid, warmup, **kwargs):
        bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
            *args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        key = (fn.__name__, repr(signature), repr(constexprs), repr(attrs), repr(sorted(options.__dict__.items())))
        if key not in compiled:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            compiled[key] = {**cubin_resources(kernel.asm["cubin"], tools), "dynamic_shared": kernel.metadata.shared,
                             "num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages,
                             "async_groups_in_flight": async_groups_in_flight(kernel.asm["ttgir"])}
        res = compiled[key]
        shared = res["shared"] + res["dynamic_shared"]
        per_sm = programs_per_sm(res["reg"], res["num_warps"], shared)
        programs = grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1)
        rows.append({"case": case["label"], "kernel": fn.__name__, "grid": list(grid), "programs": programs,
                     "num_warps": res["num_warps"], "num_stages": res["num_stages"], "registers": res["reg"],
                     "stack_bytes": res["stack"], "shared_bytes": shared,
                     "async_groups_in_flight": res["async_groups_in_flight"], "programs_per_sm": per_sm,
                     "waves": programs / (per_sm * SM90["sms"]) if per_sm else float("inf")})

    saved = JITFunction.run, attention._gpu_launch, attention._num_sms
    JITFunction.run = compile_launch
    attention._gpu_launch = lambda t: True
    attention._num_sms = lambda device_index: SM90["sms"]
    try:
        yield case
    finally:
        JITFunction.run, attention._gpu_launch, attention._num_sms = saved


def launch_llama_step_kernels(case: dict) -> None:
    """Calls every kernel wrapper on the shapes of Llama-3.1-8B steps (the contents are never read)."""
    import torch

    from kairos.bench import matmul
    from kairos.bench.kernels import DECODE_TILES, PREFILL_TILES
    from kairos.kernels import attention, linear, sampling, small_ops

    bf16 = torch.bfloat16

    def qkv_views(tokens: int):
        qkv = torch.empty(tokens, (HQ + 2 * HKV) * D, dtype=bf16)
        return (qkv[:, : HQ * D].view(tokens, HQ, D), qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D),
                qkv[:, (HQ + HKV) * D :].view(tokens, HKV, D))

    k_cache = torch.empty(4, PAGE, HKV, D, dtype=bf16)  # the launch depends on the pool's strides, not its size
    v_cache = torch.empty_like(k_cache)
    for batch, context in [(32, 1024), (128, 1024), (1, 32768), (2, 32768)]:
        case["label"] = f"decode B={batch} L={context}"
        q, _, _ = qkv_views(batch)
        tables = torch.zeros(batch, context // PAGE, dtype=torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32)
        attention.decode_attention(q, k_cache, v_cache, tables, lens, D**-0.5)
    for block_n, num_warps, num_stages in DECODE_TILES:  # the tiles bench/kernels.py times beside the default
        case["label"] = f"decode B=2 L=32768 tile {block_n}/{num_warps}/{num_stages}"
        attention.decode_attention(q, k_cache, v_cache, tables, lens, D**-0.5, block_n=block_n, num_warps=num_warps,
                                   num_stages=num_stages)
    for tokens, prefix in [(8192, 0), (512, 4096)]:
        label = case["label"] = f"prefill {tokens} tokens" + (f" after {prefix} cached" if prefix else "")
        q, k, v = qkv_views(tokens)
        cu_q = torch.tensor([0, tokens], dtype=torch.int32)
        cu_k = torch.tensor([0, prefix + tokens], dtype=torch.int32)
        tables = torch.zeros(1, (prefix + tokens) // PAGE, dtype=torch.int32) if prefix else None
        attention.prefill_attention(q, k, v, k_cache, v_cache, cu_q, cu_k, tables, D**-0.5, tokens)
        for block_m, block_n, num_warps, num_stages in PREFILL_TILES:  # bench/kernels.py times them unpaged
            case["label"] = f"{label} tile {block_m}/{block_n}/{num_warps}/{num_stages}"
            attention.prefill_attention(q, k, v, k_cache, v_cache, cu_q, cu_k, tables, D**-0.5, tokens,
                                        block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    tokens = 8192
    x = torch.empty(tokens, HIDDEN, dtype=bf16)
    weight = torch.empty(HIDDEN, dtype=bf16)
    q, k, v = qkv_views(tokens)
    small = {
        "rms_norm": lambda: small_ops.rms_norm(x, weight, 1e-5),
        "add_rms_norm": lambda: small_ops.add_rms_norm(x, torch.empty_like(x), weight, 1e-5),
        "silu_and_mul": lambda: small_ops.silu_and_mul(torch.empty(tokens, 2 * INTERMEDIATE, dtype=bf16)),
        "rope_and_store_kv": lambda: small_ops.rope_and_store_kv(
            torch.zeros(tokens, dtype=torch.int64), q, k, v, torch.empty(tokens, D), k_cache, v_cache,
            torch.zeros(tokens, dtype=torch.int64)),
    }
    for name, launch in small.items():
        case["label"] = f"{name}, {tokens} tokens"
        launch()
    for proj, (n, k) in matmul.SHAPES.items():  # the skinny matmul candidates, as bench/matmul.py times them
        weight = torch.empty(n, k, dtype=bf16)
        for batch in (1, 128):
            for tile in [linear.DEFAULT_TILE, *matmul.TILES]:
                label = f"{proj} B={batch} tile {'/'.join(map(str, tile))}"
                case["label"] = "linear " + label
                linear.linear(torch.empty(batch, k, dtype=bf16), weight, tile=tile)
                if proj == "down":
                    case["label"] = "silu_and_mul_linear " + label
                    linear.silu_and_mul_linear(torch.empty(batch, 2 * k, dtype=bf16), weight, tile=tile)
                if proj in matmul.NORMED:
                    case["label"] = "rms_norm_linear " + label
                    hidden = torch.empty(batch, k, dtype=bf16)
                    linear.rms_norm_linear(hidden, torch.empty_like(hidden), torch.empty(k, dtype=bf16), 1e-5,
                                           weight, tile=tile)
    batch, vocab = 128, 128256
    case["label"] = f"top_k_top_p_cutoff, {batch} rows of {vocab}"
    sampling.top_k_top_p_cutoff(torch.empty(batch, vocab), torch.empty(batch, dtype=torch.int64),
                                torch.empty(batch))


def measure() -> list[dict]:
    rows: list[dict] = []
    with compiling_launches(rows) as case:
        launch_llama_step_kernels(case)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if any launch spills registers")
    args = ap.parse_args()
    # Compiling needs Triton's real JIT, not the interpreter the CPU tests run kernels in.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from kairos.bench.common import write_result

    rows = measure()
    print(f"{'case':52s} {'kernel':22s} {'programs':>8s} {'warps':>5s} {'regs':>4s} {'stack':>5s} {'smem':>7s} "
          f"{'async':>5s} {'per SM':>6s} {'waves':>6s}")
    for r in rows:
        print(f"{r['case']:52s} {r['kernel']:22s} {r['programs']:8d} {r['num_warps']:5d} {r['registers']:4d} "
              f"{r['stack_bytes']:5d} {r['shared_bytes']:7d} {r['async_groups_in_flight']:5d} "
              f"{r['programs_per_sm']:6d} {r['waves']:6.2f}")
    path = write_result(f"kernel_resources_sm90_triton{triton.__version__}",
                        {"triton": triton.__version__, "target": "cuda sm_90", "sm": SM90, "launches": rows})
    print(f"wrote {path}")
    spilling = sorted({f"{r['kernel']} ({r['case']})" for r in rows if r["stack_bytes"]})
    if spilling:
        print("spills registers: " + ", ".join(spilling))
        if args.check:
            sys.exit(1)


if __name__ == "__main__":
    main()
