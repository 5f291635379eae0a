"""The kernels as an H100/H200 would compile them, checked here without a GPU: Triton compiles
each launch of a Llama-3.1-8B step for sm_90 (bench/kernel_resources.py), and no launch may
spill registers to local memory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from kairos.bench.kernel_resources import SM90, programs_per_sm  # noqa: E402

ENGINE_KERNELS = {"_decode_kernel", "_merge_kernel", "_prefill_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel",
                  "_rope_store_kv_kernel", "_radix_pass_kernel", "_softmax_parts_kernel", "_finish_kernel"}
CANDIDATE_KERNELS = {"_skinny_linear_kernel"}  # timed against what the engine runs, not yet in it


def compiled_launches(script: str) -> list[dict]:
    """Runs script (which prints JSON) in a process with Triton's real JIT: the tests' own
    process runs kernels in the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(script)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def llama_launches():
    return compiled_launches("""
        import json
        from kairos.bench.kernel_resources import measure
        print(json.dumps(measure()))
    """)


def test_residency_follows_registers_warps_and_shared_memory():
    # Registers bind: 80 a thread is 2560 a warp, 25 warps, 6 programs of 4 warps.
    assert programs_per_sm(80, 4, 0) == 6
    # Shared memory binds: 39 KiB plus the reserved 1 KiB fits 5 times in 228 KiB.
    assert programs_per_sm(80, 4, 39936) == 5
    # Registers round up to 256 a warp: 130 a thread take 4352, so 15 warps, 3 programs.
    assert programs_per_sm(130, 4, 0) == 3
    # Warps bind: 64 a SM.
    assert programs_per_sm(16, 8, 0) == 8
    # And no more than 32 programs whatever they need.
    assert programs_per_sm(16, 1, 0) == SM90["max_programs"]


def test_every_engine_kernel_compiles_for_sm90_without_spilling(llama_launches):
    assert {r["kernel"] for r in llama_launches} == ENGINE_KERNELS | CANDIDATE_KERNELS
    spilling = [(r["case"], r["kernel"], r["stack_bytes"]) for r in llama_launches if r["stack_bytes"]]
    assert spilling == []
    assert all(r["programs_per_sm"] >= 1 for r in llama_launches)


def test_long_context_decode_fills_every_sm(llama_launches):
    """At batch 1 and 2 a program per (sequence, KV head) would use 8 or 16 of 132 SMs: the
    split must give every SM work, and not more programs than fit at once."""
    for batch in (1, 2):
        (decode,) = [r for r in llama_launches if r["case"] == f"decode B={batch} L=32768"
                     and r["kernel"] == "_decode_kernel"]
        assert SM90["sms"] <= decode["programs"] <= decode["programs_per_sm"] * SM90["sms"]


def test_deeper_pipelines_keep_kv_tiles_loading_while_one_is_computed(llama_launches):
    """Attention reads each key tile's pages a tile ahead, so with 3 and 4 stages the pipeliner
    keeps one and two K/V tiles loading (a K copy and a V copy each) while a program computes
    one, over a paged cache as well as over the prompt's own keys."""
    in_flight = {r["case"]: r["async_groups_in_flight"] for r in llama_launches
                 if " tile " in r["case"] and r["kernel"] in ("_decode_kernel", "_prefill_kernel")}
    decode = "decode B=2 L=32768 tile "
    assert in_flight[decode + "32/4/3"] == in_flight[decode + "64/4/3"] == 2 and in_flight[decode + "32/4/4"] == 4
    for prefill in ("prefill 8192 tokens tile ", "prefill 512 tokens after 4096 cached tile "):
        assert in_flight[prefill + "64/64/4/3"] == in_flight[prefill + "128/64/8/3"] == 2


def test_the_sampling_cutoff_passes_read_the_logits_in_one_full_wave(llama_launches):
    """Each pass over the logits keeps several tiles loading (a program alone would wait on
    every load), and the digit passes' grid for a batch of 128 rows nearly fills the SMs at
    once, with no second wave."""
    passes = [r for r in llama_launches if r["kernel"] in ("_radix_pass_kernel", "_softmax_parts_kernel")]
    assert len(passes) == 17  # eight digits for top-k, the top-k's softmax, eight digits for top-p
    for r in passes:
        assert r["async_groups_in_flight"] >= 4
        assert r["waves"] <= 1
        assert r["kernel"] == "_softmax_parts_kernel" or r["waves"] >= 0.75


def test_a_kernel_that_spills_is_seen(tmp_path):
    """The check can fail: a reduction over a 1024 x 128 float32 tile in registers spills."""
    (tmp_path / "spilling.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def _wide_sum(x_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
            rows = tl.arange(0, ROWS)[:, None]
            cols = tl.arange(0, COLS)[None, :]
            tile = tl.load(x_ptr + rows * COLS + cols)
            weights = tl.exp(tl.load(x_ptr + tl.arange(0, ROWS)))
            tl.store(out_ptr + tl.arange(0, COLS), tl.sum(tile * weights[:, None], axis=0) / tl.sum(weights))
    """))
    rows = compiled_launches(f"""
        import json, sys
        import torch
        sys.path.insert(0, {str(tmp_path)!r})
        from spilling import _wide_sum
        from kairos.bench.kernel_resources import compiling_launches
        rows = []
        with compiling_launches(rows) as case:
            case["label"] = "wide"
            _wide_sum[(1,)](torch.empty(1024 * 128), torch.empty(128), ROWS=1024, COLS=128)
        print(json.dumps(rows))
    """)
    assert rows[0]["kernel"] == "_wide_sum" and rows[0]["stack_bytes"] > 0


def test_skinny_matmul_streams_the_weight_on_every_sm_at_batch_1(llama_launches):
    """A batch-1 matmul is a read of its weight: the default tile must keep weight tiles loading
    while it multiplies one (two a program, a weight and a token copy each; three copies with
    the gate and up halves), and its grid must reach every SM in one wave for each of the
    layer's projections."""
    from kairos.kernels.linear import DEFAULT_TILE

    default = "B=1 tile " + "/".join(map(str, DEFAULT_TILE))
    rows = {r["case"]: r for r in llama_launches if r["kernel"] == "_skinny_linear_kernel"}
    for proj in ("qkv", "o", "down"):
        r = rows[f"linear {proj} {default}"]
        assert r["async_groups_in_flight"] == 2 * (DEFAULT_TILE[3] - 2)
        assert SM90["sms"] <= r["programs"] <= r["programs_per_sm"] * SM90["sms"]
    assert rows[f"silu_and_mul_linear down {default}"]["async_groups_in_flight"] == 3 * (DEFAULT_TILE[3] - 2)
    # The norm fused before q/k/v and gate/up also streams its residual and gain, and still fits
    # the batch-1 q/k/v projection in one wave.
    for proj in ("qkv", "gate_up"):
        r = rows[f"rms_norm_linear {proj} {default}"]
        assert r["async_groups_in_flight"] == 4 * (DEFAULT_TILE[3] - 2)
    r = rows[f"rms_norm_linear qkv {default}"]
    assert r["programs"] <= r["programs_per_sm"] * SM90["sms"]
