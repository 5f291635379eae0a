"""The sampler's distributions on logits whose probabilities are known."""

import pytest
import torch

from kairos.engine.sampler import Sampler
from kairos.kernels import get_backend
from kairos.scheduler.request import SamplingParams

N = 6000
LOGITS = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))


def draw(params: SamplingParams, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(torch.device("cpu"), seed)
    tokens = sampler(LOGITS.repeat(N, 1), [params] * N, list(range(N)))
    return torch.bincount(tokens, minlength=4).float() / N


def close(freq, expected, tol=0.025):
    return torch.allclose(freq, torch.tensor(expected), atol=tol)


def test_temperature_one_follows_softmax():
    assert close(draw(SamplingParams(temperature=1.0)), [0.4, 0.3, 0.2, 0.1])


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        p = torch.softmax(LOGITS / t, dim=0).tolist()
        assert close(draw(SamplingParams(temperature=t)), p)


def test_top_k_keeps_only_the_k_most_likely():
    assert close(draw(SamplingParams(top_k=2)), [0.4 / 0.7, 0.3 / 0.7, 0, 0])


def test_top_p_keeps_the_smallest_head_reaching_p():
    # 0.4 < 0.5, so the second token is needed to reach the mass; the third is not.
    assert close(draw(SamplingParams(top_p=0.5)), [0.4 / 0.7, 0.3 / 0.7, 0, 0])
    assert close(draw(SamplingParams(top_p=0.75)), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0])


def test_greedy_rows_and_sampled_rows_in_one_batch():
    logits = torch.tensor([[0.0, 5.0, 1.0]] + [[0.0, 0.0, 0.0]] * 64)
    params = [SamplingParams(temperature=0)] + [SamplingParams(temperature=1.0, seed=3)] * 64
    first = Sampler(torch.device("cpu"), 0)(logits, params, list(range(65))).tolist()
    assert first[0] == 1
    # Seeded requests draw from their own streams: another engine seed changes nothing.
    assert Sampler(torch.device("cpu"), 99)(logits, params, list(range(65))).tolist() == first


def test_a_temperature_too_small_to_divide_by_is_greedy_not_token_zero():
    """Logits over 1e-37 overflow float32: a row of NaN, whose argmax is token 0."""
    logits = torch.tensor([[0.0, 5.0, 1.0]] * 3)
    params = [SamplingParams(temperature=t) for t in (1e-38, 1e-6)] + [SamplingParams(temperature=0.7, seed=1)]
    assert all(p.greedy for p in params[:2]) and not params[2].greedy
    tokens = Sampler(torch.device("cpu"), 0)(logits, params, [0, 0, 0]).tolist()
    assert tokens[:2] == [1, 1]


def test_engine_seed_drives_unseeded_draws():
    logits = torch.zeros(64, 8)
    params = [SamplingParams()] * 64

    def sample(seed):
        return Sampler(torch.device("cpu"), seed)(logits, params, list(range(64))).tolist()

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    logits = torch.randn(1, 50)
    seeded = SamplingParams(temperature=1.0, seed=11)

    def tokens_of_seeded(batch_size: int, engine_seed: int) -> list[int]:
        rows = logits.repeat(batch_size, 1)
        params = [seeded] + [SamplingParams(temperature=1.0)] * (batch_size - 1)
        sampler = Sampler(torch.device("cpu"), engine_seed)
        return [sampler(rows, params, [step] * batch_size)[0].item() for step in range(40)]

    alone = tokens_of_seeded(1, 0)
    assert tokens_of_seeded(7, 0) == alone
    assert tokens_of_seeded(7, 5) == alone
    assert len(set(alone)) > 1  # the steps draw different tokens


def test_seeds_2_to_the_63_apart_draw_differently():
    """The CPU generator keeps 32 bits of its seed: -1 and 2**63 - 1 once drew alike."""
    logits = torch.randn(1, 500)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(torch.device("cpu"), 0)
        return [sampler(logits, [SamplingParams(seed=seed)], [step])[0].item() for step in range(8)]

    assert draws(-1) != draws(2**63 - 1) and draws(0) != draws(-(2**63))
    assert draws(-1) == draws(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_never_waits_for_the_device_on_cuda():
    """Sampling is queued behind the step's forward pass; a synchronizing call in it (such as
    a blocking copy of the rows' settings) would hold the host until that pass ends. The
    top-k/top-p filter is the Triton backend's, as the engine runs it on a GPU."""
    logits = torch.randn(6, 1000, device="cuda")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(top_k=5),
              SamplingParams(top_p=0.9), SamplingParams(temperature=1.2, top_k=50, top_p=0.8, seed=4),
              SamplingParams(seed=9)]
    sampler = Sampler(torch.device("cuda"), 0, get_backend("triton", "cuda").top_k_top_p_cutoff)
    sampler(logits, params, list(range(6)))  # allocations and kernels of the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler(logits, params, list(range(6)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens[0].item() == logits[0].argmax().item()
