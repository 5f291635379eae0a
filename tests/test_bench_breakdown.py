"""The decode benchmark's floor and its breakdown of a step's GPU time."""

import pytest
import torch

from kairos.bench import shipped
from kairos.bench.decode_throughput import weight_bytes_per_step
from kairos.bench.step_breakdown import breakdown, device_events, kind_of, profile_steps
from kairos.engine.config import ModelConfig
from kairos.engine.model import CausalLM
from kairos.kernels import get_backend


@pytest.mark.parametrize("name, params, vocab, hidden, tied", [
    ("Llama-3.1-8B", 8_030_261_248, 128256, 4096, False),
    ("Qwen3-0.6B", 596_049_920, 151936, 1024, True),
])
def test_the_floor_reads_every_weight_but_an_untied_embedding_table(name, params, vocab, hidden, tied):
    cfg = ModelConfig.from_pretrained(shipped("models") / name)
    with torch.device("meta"):
        model = CausalLM(cfg, get_backend()).to(torch.bfloat16)
    model.tie_weights()
    total, read, matmul = weight_bytes_per_step(model)
    assert total == 2 * params
    assert read == total if tied else read == 2 * (params - vocab * hidden)
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert matmul == read - 2 * norms


def trace_event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_breakdown_sums_each_kind_and_the_gpu_idle_between_kernels():
    trace = {"traceEvents": [
        trace_event("cpu_op", "aten::mm", 0, 50),  # host side: not GPU time
        trace_event("gpu_user_annotation", "step", 0, 30),  # spans kernels: counted by them alone
        trace_event("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 0, 10),
        trace_event("kernel", "_decode_kernel", 12, 3),
        trace_event("kernel", "_merge_kernel", 13, 4),  # overlaps the one before
        trace_event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 20, 1),
        trace_event("kernel", "void at::native::vectorized_elementwise_kernel<4>", 25, 5),
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 26},
    ]}
    result = breakdown(device_events(trace), steps=2)
    # One GPU span of 30 us (0 to 30) over two steps; kernels cover 10 + 5 + 1 + 5 of it.
    assert result["span_ms"] == pytest.approx(0.015)
    assert result["busy_ms"] == pytest.approx(0.0105)
    assert result["idle_ms"] == pytest.approx(0.0045)
    assert result["events_per_step"] == 2.5
    assert result["ms_by_kind"] == pytest.approx({"matmul": 0.005, "attention": 0.0035, "other": 0.0025,
                                                  "copies": 0.0005})
    assert list(result["ms_by_kind"]) == ["matmul", "attention", "other", "copies"]  # costliest first
    assert result["top_kernels"][0] == {"name": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "kind": "matmul",
                                        "ms": pytest.approx(0.005), "calls": 0.5}
    assert breakdown([], steps=2) is None


@pytest.mark.parametrize("name, kind", [
    ("nvjet_tst_128x8_64x8_2x1_v_bz_TNT", "matmul"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "matmul"),
    ("_rope_store_kv_kernel", "norm, RoPE, SiLU"),
    ("_rms_norm_kernel", "norm, RoPE, SiLU"),
    ("_radix_pass_kernel", "sampling"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>",
     "sampling"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "sampling"),
    ("void at::native::indexSelectLargeIndex<c10::BFloat16>", "other"),
])
def test_kernels_are_told_apart_by_name(name, kind):
    assert kind_of(name) == kind


def test_profiling_a_cpu_step_finds_no_gpu_time():
    # The profiler's real trace parses; a CPU run has host ops in it but nothing on a GPU.
    x = torch.randn(64, 64)
    assert profile_steps(lambda: x @ x, steps=3, device=torch.device("cpu")) is None
