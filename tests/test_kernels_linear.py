"""Triton skinny matmuls against their PyTorch references, on fresh random inputs: token counts
either side of the 16-token dot width and of a program's token block, output rows either side of
a weight tile, input widths that do and do not fill the last k tile. Output buffers are poisoned
with NaN so every element is proven written."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_testing import DEVICE, DTYPES, close, poison_outputs  # noqa: E402

from kairos.kernels import linear as linear_kernels  # noqa: E402
from kairos.kernels import reference as ref  # noqa: E402


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    poison_outputs(monkeypatch, linear_kernels)


def _weight(n, k, dtype):
    # Scaled so that sums over k stay near 1 and the dtype's relative rounding is what is compared.
    return torch.randn(n, k, device=DEVICE, dtype=dtype) / k ** 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, n, k", [(1, 16, 256), (3, 17, 100), (16, 7, 520), (17, 100, 256),
                                          (65, 33, 272)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(dtype, tokens, n, k, with_bias):
    x = torch.randn(tokens, k, device=DEVICE, dtype=dtype)
    w = _weight(n, k, dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if with_bias else None
    close(linear_kernels.linear(x, w, bias), ref.linear(x, w, bias), dtype, fp32_tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, n, k", [(1, 16, 256), (5, 23, 136), (33, 64, 512)])
def test_silu_and_mul_linear(dtype, tokens, n, k):
    """The activation computed while the down projection reads its input matches the two ops
    one after the other."""
    x = torch.randn(tokens, 2 * k, device=DEVICE, dtype=dtype)
    w = _weight(n, k, dtype)
    close(linear_kernels.silu_and_mul_linear(x, w), ref.silu_and_mul_linear(x, w), dtype, fp32_tol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
# (5, 16, 600): one weight tile hands on all three k slices of the residual.
@pytest.mark.parametrize("tokens, n, k", [(1, 16, 256), (3, 40, 136), (17, 33, 520), (5, 16, 600)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_linear(dtype, tokens, n, k, with_residual):
    """The residual add and RMS norm computed while the projection reads its input match the
    ops one after the other, and so does the residual it hands on (in float16 the norm runs
    first, in its own kernel)."""
    x = torch.randn(tokens, k, device=DEVICE, dtype=dtype) * 3
    residual = torch.randn(tokens, k, device=DEVICE, dtype=dtype) if with_residual else None
    before = None if residual is None else residual.clone()
    gamma = torch.rand(k, device=DEVICE, dtype=dtype) + 0.5
    w, bias = _weight(n, k, dtype), torch.randn(n, device=DEVICE, dtype=dtype)
    out, res_out = linear_kernels.rms_norm_linear(x, residual, gamma, 1e-6, w, bias)
    ref_out, ref_res = ref.rms_norm_linear(x, residual, gamma, 1e-6, w, bias)
    close(out, ref_out, dtype, fp32_tol=1e-4)
    close(res_out, ref_res, dtype)
    if residual is None:
        assert res_out is x  # the first layer's residual is its input
    else:
        assert torch.equal(residual, before)  # a new tensor: other programs still read the old one


def test_rms_norm_linear_checks_its_shapes():
    w, x = _weight(8, 64, torch.float32), torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="norm weight of shape \\(63,\\)"):
        linear_kernels.rms_norm_linear(x, None, torch.ones(63, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="residual of shape \\(3, 64\\)"):
        linear_kernels.rms_norm_linear(x, torch.randn(3, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6, w)


@pytest.mark.parametrize("tile", [(16, 64, 4, 2), (32, 128, 4, 3), (64, 32, 8, 1)])
def test_every_tile_shape_computes_the_same(tile):
    """The bench sweeps tiles: each must be correct, not only the default."""
    x = torch.randn(2, 3, 200, device=DEVICE)  # leading dims kept, k not a multiple of any block
    w = _weight(45, 200, torch.float32)
    out = linear_kernels.linear(x, w, tile=tile)
    assert out.shape == (2, 3, 45)
    close(out, ref.linear(x, w), torch.float32, fp32_tol=1e-4)


def test_strided_input_rows():
    """A row view of a wider buffer (as a projection of a packed tensor) is read by its stride."""
    wide = torch.randn(9, 300, device=DEVICE)
    x = wide[:, :128]
    w = _weight(40, 128, torch.float32)
    close(linear_kernels.linear(x, w), ref.linear(x, w), torch.float32, fp32_tol=1e-4)


def test_width_mismatch_is_a_clear_error():
    w = _weight(8, 64, torch.float32)
    with pytest.raises(ValueError, match="64 inputs"):
        linear_kernels.linear(torch.randn(2, 63, device=DEVICE), w)
    with pytest.raises(ValueError, match="gate and up"):
        linear_kernels.silu_and_mul_linear(torch.randn(2, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        linear_kernels.linear(torch.randn(2, 8, device=DEVICE), w.t())


def test_backend_takes_the_skinny_kernel_up_to_its_token_limit(monkeypatch):
    """With skinny_matmul_tokens=4 a step of 4 tokens runs the Triton kernels and one of 5
    torch's matmul (after the Triton activation or norm); both compute the reference's result."""
    from kairos.kernels import get_backend

    names = ("linear", "silu_and_mul_linear", "rms_norm_linear")
    calls = []
    for name in names:
        real = getattr(linear_kernels, name)
        monkeypatch.setattr(linear_kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    backend = get_backend("triton", DEVICE, skinny_matmul_tokens=4)
    w = _weight(24, 40, torch.float32)
    gamma = torch.rand(40, device=DEVICE) + 0.5
    for tokens in (4, 5):
        x = torch.randn(tokens, 40, device=DEVICE)
        gated = torch.randn(tokens, 80, device=DEVICE)
        close(backend.linear(x, w), ref.linear(x, w), torch.float32, fp32_tol=1e-4)
        close(backend.silu_and_mul_linear(gated, w), ref.silu_and_mul_linear(gated, w), torch.float32, fp32_tol=1e-4)
        for residual in (None, torch.randn(tokens, 40, device=DEVICE)):
            got = backend.rms_norm_linear(x, residual, gamma, 1e-6, w)
            for actual, expected in zip(got, ref.rms_norm_linear(x, residual, gamma, 1e-6, w)):
                close(actual, expected, torch.float32, fp32_tol=1e-4)
        assert calls == ([*names, "rms_norm_linear"] if tokens == 4 else [])
        calls.clear()


def test_the_skinny_matmul_needs_a_triton_backend():
    from kairos.engine import LLM
    from kairos.engine.config import ConfigError, EngineConfig
    from kairos.kernels import get_backend

    with pytest.raises(ValueError, match="needs the triton or flashinfer backend"):
        get_backend("torch", "cpu", skinny_matmul_tokens=8)
    with pytest.raises(ValueError, match="needs the triton or flashinfer backend"):
        LLM("tiny", backend="torch", skinny_matmul_tokens=8)
    with pytest.raises(ConfigError, match="skinny-matmul-tokens"):
        EngineConfig(skinny_matmul_tokens=-1)


def test_engine_generates_the_same_tokens_with_the_skinny_matmul(tmp_path):
    """Greedy decoding with every decode step's projections on the skinny kernels gives the
    tokens torch's matmuls give, and a prompt of a few tokens the same logits at every position.
    A qwen2-shaped model: its q/k/v projections have biases."""
    from hf_models import make_checkpoint

    from kairos.engine import LLM, SamplingParams

    make_checkpoint("qwen2", tmp_path)
    prompts = [[5, 9, 200, 31], [7] * 11, [300, 2, 2, 8, 41, 17]]
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0)
    tokens, logits = {}, {}
    for skinny in (0, 8):
        llm = LLM(str(tmp_path), backend="triton", device=DEVICE, dtype="float32", skinny_matmul_tokens=skinny,
                  num_kv_blocks=32, max_model_len=64)
        tokens[skinny] = [out.token_ids for out in llm.generate(prompts, params)]
        (logits[skinny],) = llm.prompt_logits([prompts[2]])  # 6 tokens: a prefill step the skinny kernels take
    assert tokens[8] == tokens[0]
    assert (logits[8] - logits[0]).abs().max() <= 1e-4 * logits[0].abs().max()
    assert all(len(t) == 6 for t in tokens[0])
