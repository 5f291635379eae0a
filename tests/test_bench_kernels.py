"""The kernel benchmark's sweep, driven here without a GPU: the kernels and the timer are
stand-ins, so what is checked is the bench itself (its minutes on a lent GPU are few). Each
launch it reports must be the launch it timed, and the split counts must cover the range
they claim."""

import types

import pytest
import torch

pytest.importorskip("triton")

from kairos.bench import kernels as kernel_bench  # noqa: E402
from kairos.kernels import attention  # noqa: E402


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """Launches are recorded, not run; each one 'takes' a time of its own, so that the fastest
    is known; the KV pools are empty tables of the right width."""
    launches = []
    clock = {"ms": 0.0}

    def decode(q, k_cache, v_cache, tables, lens, scale, num_splits=None, block_n=None, num_warps=4, num_stages=2):
        launches.append(("decode", q.shape[0], tables.shape[1] * kernel_bench.PAGE, num_splits, block_n, num_warps,
                         num_stages))
        clock["ms"] = 1.0 + 0.01 * len(launches)

    def prefill(*args, block_m=None, block_n=None, num_warps=4, num_stages=2):
        launches.append(("prefill", args[0].shape[0], block_m, block_n, num_warps, num_stages))
        clock["ms"] = 1.0 + 0.01 * len(launches)

    def timed(fn, **_):
        fn()
        return clock["ms"]

    monkeypatch.setattr(kernel_bench, "DEV", "cpu")
    monkeypatch.setattr(kernel_bench, "do_bench", timed)
    monkeypatch.setattr(kernel_bench, "paged_kv", lambda batch, length: (
        torch.empty(0), torch.empty(0), torch.zeros(batch, length // kernel_bench.PAGE, dtype=torch.int32)))
    monkeypatch.setattr(attention, "decode_attention", decode)
    monkeypatch.setattr(attention, "prefill_attention", prefill)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(
        multi_processor_count=132))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *args, **kwargs: None)
    return launches


def test_decode_sweep_reports_the_launches_it_timed(stand_in_gpu):
    rows = kernel_bench.bench_decode({"copy_GBps": 4000.0}, None)
    launched = {launch[1:] for launch in stand_in_gpu}
    tiles = {kernel_bench.DECODE_DEFAULT, *kernel_bench.DECODE_TILES}
    for row in rows:
        for entry in row["sweep"]:
            tile = (entry["block_n"], entry["num_warps"], entry["num_stages"])
            assert tile in tiles
            assert (row["batch"], row["context"], entry["splits"], *tile) in launched
        assert row["best"] == min(row["sweep"], key=lambda entry: entry["ms"])
        for tile in tiles:
            splits = [e["splits"] for e in row["sweep"] if (e["block_n"], e["num_warps"], e["num_stages"]) == tile]
            assert len(splits) == len(set(splits)) >= 1
            if row["context"] >= 32768:  # long contexts: every aimed-at residency is a split count of its own
                assert len(splits) == len(kernel_bench.SPLIT_TARGETS)
    # The engine's own launch (split count derived, default tile) is timed for every shape.
    assert {(r["batch"], r["context"], None, None, 4, 2) for r in rows} <= launched


def test_prefill_sweep_reports_the_launches_it_timed(stand_in_gpu, monkeypatch):
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: torch.empty(*shape, dtype=torch.bfloat16))
    rows = kernel_bench.bench_prefill({"matmul_bf16_TFLOPs": 700.0}, None)
    launched = {launch[1:] for launch in stand_in_gpu}
    for row in rows:
        tiles = [(e["block_m"], e["block_n"], e["num_warps"], e["num_stages"]) for e in row["sweep"]]
        assert tiles == [kernel_bench.PREFILL_DEFAULT, *kernel_bench.PREFILL_TILES]
        assert all((row["seq"], *tile) in launched for tile in tiles)
        assert row["best"] == min(row["sweep"], key=lambda entry: entry["ms"])


def test_decode_sweep_plot(stand_in_gpu, tmp_path):
    pytest.importorskip("matplotlib")
    rows = kernel_bench.bench_decode({"copy_GBps": 4000.0}, None)
    path = tmp_path / "sweep.png"
    kernel_bench.plot_decode_sweep(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampling_bench_times_the_kernel_and_the_sort_it_replaces(monkeypatch):
    """Each filter 'costs' a time of its own (the kernel 1, the sort 4), whether called alone
    or inside the sampler's draw: the rows must report each against the right one."""
    from kairos.kernels import reference, sampling

    clock = {"ms": 0.0}
    exact = reference.top_k_top_p_cutoff

    def costing(cost):
        def cutoff(logits, top_k, top_p, digit_bits=None):
            clock["ms"] += cost if digit_bits is None else 10 + digit_bits
            return exact(logits, top_k, top_p)
        return cutoff

    for module, cost in ((reference, 4.0), (sampling, 1.0)):
        monkeypatch.setattr(module, "top_k_top_p_cutoff", costing(cost))

    def timed(fn, **_):
        clock["ms"] = 0.0
        fn()
        return clock["ms"]

    monkeypatch.setattr(kernel_bench, "DEV", "cpu")
    monkeypatch.setattr(kernel_bench, "do_bench", timed)
    monkeypatch.setattr(kernel_bench, "VOCAB", 300)
    rows = kernel_bench.bench_sampling({"copy_GBps": 1.0}, None)
    assert [(r["batch"], r["top_k"], r["top_p"]) for r in rows] == [
        (b, k, p) for b in kernel_bench.SAMPLING_BATCHES for k, p in kernel_bench.SAMPLING_SETTINGS]
    for r in rows:
        assert (r["ms"], r["sort_ms"], r["sampler_ms"], r["sort_sampler_ms"]) == (1.0, 4.0, 1.0, 4.0)
        assert r["ms_by_digit_bits"] == {bits: 10.0 + bits for bits in kernel_bench.SAMPLING_DIGIT_BITS}
        assert r["speedup_vs_sort"] == r["sampler_speedup_vs_sort"] == 4.0
        assert r["floor_ms"] == pytest.approx(r["batch"] * 300 * 4 / 1e9 * 1e3)
