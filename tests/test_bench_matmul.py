"""The matmul benchmark driven without a GPU: the timer is a stand-in and each matmul 'costs' a
time of its own, so what is checked is the bench itself: each time reported against the launch
it timed, the floors, and a wrong tile reported as wrong rather than timed."""

import pytest
import torch

pytest.importorskip("triton")

from kairos.bench import kernels as kernel_bench  # noqa: E402
from kairos.bench import matmul as matmul_bench  # noqa: E402
from kairos.kernels import linear, small_ops  # noqa: E402


def test_each_tile_is_timed_against_cublas_and_a_wrong_one_is_not(monkeypatch, capsys):
    """Each matmul 'costs' a time of its own (cuBLAS 2, the activation 0.5, the norm 0.25, a
    Triton tile its block_k / 100); one tile returns a wrong result, and must be reported as
    wrong, not timed."""
    clock = {"ms": 0.0}
    wrong_tile = (32, 32, 4, 2)

    def costing(fn, cost):
        def timed_call(*args, **kwargs):
            clock["ms"] += cost(kwargs)
            return fn(*args, **kwargs)
        return timed_call

    def triton_cost(kwargs):
        return kwargs["tile"][1] / 100

    def with_wrong_tile(fn):
        def call(*args, tile):
            return fn(*args, tile=tile) + (1.0 if tile == wrong_tile else 0.0)
        return call

    def norm_with_wrong_tile(*args, tile, _real=linear.rms_norm_linear):
        out, residual = _real(*args, tile=tile)
        return out + (1.0 if tile == wrong_tile else 0.0), residual

    monkeypatch.setattr(torch.nn.functional, "linear", costing(torch.nn.functional.linear, lambda kw: 2.0))
    monkeypatch.setattr(small_ops, "silu_and_mul", costing(small_ops.silu_and_mul, lambda kw: 0.5))
    monkeypatch.setattr(small_ops, "add_rms_norm", costing(small_ops.add_rms_norm, lambda kw: 0.25))
    for name in ("linear", "silu_and_mul_linear"):
        monkeypatch.setattr(linear, name, costing(with_wrong_tile(getattr(linear, name)), triton_cost))
    monkeypatch.setattr(linear, "rms_norm_linear", costing(norm_with_wrong_tile, triton_cost))

    def timed(fn, **_):
        clock["ms"] = 0.0
        fn()
        return clock["ms"]

    monkeypatch.setattr(matmul_bench, "DEV", "cpu")
    monkeypatch.setattr(matmul_bench, "DTYPE", torch.float32)  # the interpreter's bf16 dot is wrong
    monkeypatch.setattr(kernel_bench, "do_bench", timed)
    monkeypatch.setattr(matmul_bench, "SHAPES", {"qkv": (40, 64), "down": (24, 48)})
    monkeypatch.setattr(matmul_bench, "BATCHES", (1, 3))
    monkeypatch.setattr(matmul_bench, "TILES", [(16, 32, 4, 2), wrong_tile])
    rows = matmul_bench.bench_matmuls({"copy_GBps": 1.0})
    assert [(r["proj"], r["batch"]) for r in rows] == [("qkv", 1), ("qkv", 3), ("down", 1), ("down", 3)]
    for r in rows:
        n, k, b = r["out_features"], r["in_features"], r["batch"]
        assert r["floor_ms"] == pytest.approx((n * k + b * k + b * n) * 4 / 1e6)
        assert r["cublas_ms"] == 2.0
        sweeps = [r["sweep"], r["gated_sweep" if r["proj"] == "down" else "normed_sweep"]]
        for sweep in sweeps:
            assert [tuple(e["tile"]) for e in sweep] == [linear.DEFAULT_TILE, (16, 32, 4, 2), wrong_tile]
            assert [e.get("ms") for e in sweep] == [linear.DEFAULT_TILE[1] / 100, 0.32, None]
            assert "differs from cuBLAS" in sweep[2]["error"]
        assert r["sweep"][1]["fraction_of_floor"] == pytest.approx(r["floor_ms"] / 0.32)
        assert ("gated_sweep" in r) == (r["proj"] == "down") != ("normed_sweep" in r)
        if r["proj"] == "down":
            assert r["gated_unfused_ms"] == 2.5
            assert r["gated_floor_ms"] == pytest.approx(r["floor_ms"] + b * k * 4 / 1e6)
        else:
            assert r["normed_unfused_ms"] == 2.25
            assert r["normed_floor_ms"] == pytest.approx(r["floor_ms"] + 2 * b * k * 4 / 1e6)
    out = capsys.readouterr().out
    assert "6.25x cuBLAS" in out and "7.03x cuBLAS" in out and "1 tiles failed" in out
