"""The top-k/top-p cutoff kernel against its sorting reference, and against the definition
itself in float64, on fresh random logits: odd vocabularies, rows split unevenly among
programs, ties, masked (-inf) logits and extreme magnitudes."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_testing import DEVICE, kernel_variants, poison_outputs  # noqa: E402

from kairos.engine.sampler import Sampler  # noqa: E402
from kairos.kernels import reference as ref  # noqa: E402
from kairos.kernels import sampling  # noqa: E402
from kairos.scheduler.request import SamplingParams  # noqa: E402

AMBIGUOUS = 1e-4  # a mass this close to top_p may round either way in float32


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    poison_outputs(monkeypatch, sampling)


def row_settings(rows: int, vocab: int, gen: torch.Generator):
    """Random top-k and top-p per row. The first rows turn off top-k, top-p, both, keep one
    token, and take a top-p of most of a small top-k (whose mass is then found within it)."""
    top_k = torch.randint(1, vocab + 1, (rows,), generator=gen)
    top_p = torch.rand(rows, generator=gen) * 0.98 + 0.01
    fixed = [(vocab, None), (None, 1.0), (vocab, 1.0), (1, None), (max(1, vocab // 10), 0.97), (2, 0.9)]
    for row, (k, p) in enumerate(fixed[:rows]):
        top_k[row] = k if k is not None else top_k[row]
        top_p[row] = p if p is not None else top_p[row]
    return top_k.to(DEVICE), top_p.to(DEVICE)


def masses(row: torch.Tensor, k: int, cutoff: float) -> tuple[float, float]:
    """Probability (float64, over the k largest and ties) of the logits above the cutoff, and at or above it."""
    row = row.double()
    kth = row.sort(descending=True).values[min(k, len(row)) - 1]
    probs = row.masked_fill(row < kth, float("-inf")).softmax(0)
    return probs[row > cutoff].sum().item(), probs[row >= cutoff].sum().item()


def check_cutoffs(logits, top_k, top_p, **launch):
    got = sampling.top_k_top_p_cutoff(logits, top_k, top_p, **launch).cpu()
    want = ref.top_k_top_p_cutoff(logits, top_k, top_p).cpu()
    assert not got.isnan().any()
    vocab = logits.shape[1]
    for row, (k, p) in enumerate(zip(top_k.tolist(), top_p.tolist())):
        x = logits[row].cpu()
        if k >= vocab and p >= 1:
            assert got[row] == float("-inf")
            continue
        assert got[row] in x, "the cutoff is one of the row's logits"
        above, at_or_above = masses(x, k, got[row].item())
        if p < 1:  # the smallest head (of the top k) whose mass reaches p
            assert above < p + AMBIGUOUS and at_or_above >= p - AMBIGUOUS
        else:
            assert (x >= got[row]).sum() >= k > (x > got[row]).sum()  # the k-th largest, ties in
        ref_above, ref_at_or_above = masses(x, k, want[row].item())
        if p >= 1 or min(abs(ref_above - p), abs(ref_at_or_above - p)) > AMBIGUOUS:
            assert got[row] == want[row], f"row {row}: {got[row]} against the reference's {want[row]}"


@pytest.mark.parametrize("rows, vocab", [(1, 1), (4, 7), (7, 1000), (6, 1025), (7, 4099)])
def test_cutoff_matches_the_sorting_reference(rows, vocab):
    gen = torch.Generator().manual_seed(vocab)
    flatness = torch.rand(rows, 1, generator=gen) * 4  # peaked and flat rows
    logits = (torch.randn(rows, vocab, generator=gen) * flatness).to(DEVICE)
    check_cutoffs(logits, *row_settings(rows, vocab, gen))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_rows_split_unevenly_among_programs(num_splits):
    """Each program reads a chunk of whole tiles; the last chunk is short, and every pass
    combines the chunks' partial histograms."""
    gen = torch.Generator().manual_seed(num_splits)
    rows, vocab = 6, 3000
    logits = torch.randn(rows, vocab, generator=gen).to(DEVICE)
    check_cutoffs(logits, *row_settings(rows, vocab, gen), num_splits=num_splits)


@pytest.mark.parametrize("digit_bits", [1, 2, 8])
def test_other_digit_widths_select_the_same_cutoffs(digit_bits):
    """The bench times 2-bit digits beside the default 4 (more passes, each cheaper); every
    width that divides 32 selects the same keys."""
    gen = torch.Generator().manual_seed(digit_bits)
    rows, vocab = 6, 700
    logits = (torch.randn(rows, vocab, generator=gen) * 2).to(DEVICE)
    check_cutoffs(logits, *row_settings(rows, vocab, gen), digit_bits=digit_bits)


def test_ties_masked_logits_and_extreme_magnitudes():
    gen = torch.Generator().manual_seed(7)
    rows, vocab = 6, 600
    tied = torch.randint(-4, 5, (rows, vocab), generator=gen).float()  # every value repeated many times
    tied[0, :300] = float("-inf")  # masked, as a vocabulary's padding is
    tied[1] = -tied[1].abs() - 1e4  # all negative and far from zero
    tied[2] = torch.randn(vocab, generator=gen) * 1e3  # most probabilities underflow to zero
    tied[3, 5] = 3e38
    check_cutoffs(tied.to(DEVICE), *row_settings(rows, vocab, gen))


def test_a_stage_no_row_asks_for_costs_no_pass(monkeypatch):
    """None for top-k or top-p means every row leaves it off: the cutoff is as with the setting
    off in every row, and that stage's passes are not launched."""
    gen = torch.Generator().manual_seed(5)
    rows, vocab = 3, 1500
    logits = (torch.randn(rows, vocab, generator=gen) * 2).to(DEVICE)
    top_k, top_p = row_settings(rows, vocab, gen)
    all_k, all_p = torch.full_like(top_k, vocab), torch.ones_like(top_p)
    passes = []

    def hook(*args, **kwargs):
        passes.append(1)

    sampling._radix_pass_kernel.add_pre_run_hook(hook)
    try:
        for k, p, digit_passes in [(None, top_p, 8), (top_k, None, 8), (None, None, 0)]:
            passes.clear()
            got = sampling.top_k_top_p_cutoff(logits, k, p)
            assert len(passes) == digit_passes
            assert torch.equal(got, sampling.top_k_top_p_cutoff(logits, all_k if k is None else k,
                                                                all_p if p is None else p))
            assert torch.equal(ref.top_k_top_p_cutoff(logits, k, p), ref.top_k_top_p_cutoff(
                logits, all_k if k is None else k, all_p if p is None else p))
    finally:
        sampling._radix_pass_kernel.pre_run_hooks.remove(hook)


def test_sampler_draws_the_same_tokens_through_the_kernel():
    """Filtering through the kernel leaves the sampler's draws exactly as the reference's."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(8, 500, generator=gen) * 3).to(DEVICE)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s) for t, k, p, s in [
        (0.8, 0, 0.95, None), (1.0, 40, 1.0, 1), (0.7, 20, 0.5, None), (1.3, 0, 0.3, 2), (0, 0, 1.0, None),
        (1.0, 0, 1.0, None), (0.5, 100, 0.9, 3), (1.0, 1, 0.9, None)]]
    steps = list(range(8))
    device = torch.device(DEVICE)
    for seed in range(3):
        expected = Sampler(device, seed)(logits, params, steps)
        assert torch.equal(Sampler(device, seed, sampling.top_k_top_p_cutoff)(logits, params, steps), expected)


def test_a_top_p_too_small_for_float32_keeps_the_top_token_through_the_kernel():
    """1e-50 rounds to 0 in float32, and a mass of 0 to reach took no digit the kernel could
    stop at: it masked every token, and the row drew token 0."""
    logits = (torch.randn(3, 300, generator=torch.Generator().manual_seed(4)) * 3).to(DEVICE)
    params = [SamplingParams(temperature=1.0, top_p=1e-50, seed=i) for i in range(3)]
    for cutoff in (ref.top_k_top_p_cutoff, sampling.top_k_top_p_cutoff):
        tokens = Sampler(torch.device(DEVICE), 0, cutoff)(logits, params, [0, 0, 0])
        assert torch.equal(tokens, logits.argmax(dim=-1))


def test_one_compiled_variant_serves_every_batch():
    """The split count follows the batch size; nothing Triton specializes a kernel on may (each
    new variant compiles mid-serving on a GPU), the alignment of the rows' settings included:
    the sampler passes them as views into one tensor. Drawn through the sampler, as serving
    does: in the interpreter (32 programs) a vocabulary of 1100 is split in 2 for 1 and 2 rows
    and not at all for 17, where Triton would specialize a count of 1; the top-p view is 16-byte
    aligned at 2 rows only."""
    vocab = 1100
    sampler = Sampler(torch.device(DEVICE), 0, sampling.top_k_top_p_cutoff)
    with kernel_variants() as seen:
        for rows in (1, 2, 17):
            sampler(torch.randn(rows, vocab, device=DEVICE), [SamplingParams(top_k=50, top_p=0.9)] * rows, [0] * rows)
            if rows == 1:
                first = set(seen)
    assert {name for name, _ in first} == {"_radix_pass_kernel", "_softmax_parts_kernel", "_finish_kernel"}
    assert set(seen) == first
