"""Step inputs built with array operations, padded batches for CUDA graphs, and decode replayed
from graphs against the eager path (on CUDA)."""

import random

import numpy as np
import pytest
import torch

from kairos.engine import LLM, SamplingParams
from kairos.engine.cuda_graphs import decode_buckets
from kairos.engine.sequence import Sequence
from kairos.engine.step_inputs import DecodeInputs, PrefillInputs

BLOCK = 4


def sequences(rng, count, num_blocks=1000):
    """Sequences of random lengths holding scattered blocks, some part-way through a prompt."""
    free = rng.sample(range(num_blocks), num_blocks)
    seqs = []
    for _ in range(count):
        length = rng.randint(1, 37)
        seq = Sequence([rng.randrange(100) for _ in range(length)], SamplingParams())
        seq.block_table = [free.pop() for _ in range(-(-length // BLOCK))]
        seq.num_computed_tokens = rng.randint(0, length - 1)
        seqs.append(seq)
    return seqs


def slot(seq, pos):
    return seq.block_table[pos // BLOCK] * BLOCK + pos % BLOCK


@pytest.mark.parametrize("count, rows", [(1, 1), (3, 8), (7, 7), (5, 16)])
def test_decode_inputs_hold_each_sequence_and_pad_to_the_bucket(count, rows):
    seqs = sequences(random.Random(count), count)
    inputs = DecodeInputs(max_batch=16, max_blocks=10, block_size=BLOCK, device=torch.device("cpu"))
    inputs.fill(sequences(random.Random(99), 16), 16)  # stale rows from a larger step before
    inputs.fill(seqs, rows)
    ids, positions, ctx = inputs.forward_args(rows)
    assert ids.shape == positions.shape == ctx.slot_mapping.shape == ctx.context_lens.shape == (rows,)
    for i, seq in enumerate(seqs):
        assert ids[i] == seq.token_ids[-1] and positions[i] == len(seq) - 1 and ctx.context_lens[i] == len(seq)
        assert ctx.slot_mapping[i] == slot(seq, len(seq) - 1)
        assert ctx.block_tables[i, : len(seq.block_table)].tolist() == seq.block_table
    # Padding stores nowhere and attends to one token of a real block.
    assert (ctx.slot_mapping[count:] == -1).all() and (ctx.context_lens[count:] == 1).all()
    assert (ctx.block_tables[count:, 0] == 0).all() and (positions[count:] == 0).all()


def test_every_part_of_the_packed_buffers_is_aligned():
    inputs = DecodeInputs(max_batch=5, max_blocks=3, block_size=BLOCK, device=torch.device("cpu"))
    ids, positions, ctx = inputs.forward_args(5)
    prefill = PrefillInputs(torch.device("cpu"))
    seqs = sequences(random.Random(1), 3)
    counts = [len(s) - s.num_computed_tokens for s in seqs]
    _, p_pos, p_ctx, rows = prefill.build(seqs, counts, BLOCK, [0])
    for t in (ids, positions, ctx.slot_mapping, ctx.context_lens, ctx.block_tables, p_pos, p_ctx.slot_mapping,
              p_ctx.cu_seqlens_q, p_ctx.cu_seqlens_k, p_ctx.block_tables, rows):
        assert t.data_ptr() % 64 == 0


@pytest.mark.parametrize("seed", range(4))
def test_prefill_inputs_match_a_token_by_token_build(seed):
    rng = random.Random(seed)
    seqs = sequences(rng, rng.randint(1, 6))
    counts = [rng.randint(1, len(s) - s.num_computed_tokens) for s in seqs]
    ids, positions, ctx, rows = PrefillInputs(torch.device("cpu")).build(seqs, counts, BLOCK, [2, 0])
    want_ids, want_pos, want_slots = [], [], []
    for seq, n in zip(seqs, counts):
        span = range(seq.num_computed_tokens, seq.num_computed_tokens + n)
        want_ids += [seq.token_ids[p] for p in span]
        want_pos += span
        want_slots += [slot(seq, p) for p in span]
    assert ids.tolist() == want_ids and positions.tolist() == want_pos and ctx.slot_mapping.tolist() == want_slots
    assert ctx.cu_seqlens_q.tolist() == np.cumsum([0] + counts).tolist()
    assert ctx.cu_seqlens_k.tolist() == np.cumsum([0] + [s.num_computed_tokens + n for s, n in
                                                         zip(seqs, counts)]).tolist()
    assert rows.tolist() == [2, 0] and ctx.max_seqlen_q == max(counts)
    assert (ctx.block_tables is None) == all(s.num_computed_tokens == 0 for s in seqs)


@pytest.mark.parametrize("max_batch", [1, 3, 8, 17, 64, 100, 256])
def test_buckets_cover_every_batch_size(max_batch):
    buckets = decode_buckets(max_batch)
    assert buckets[0] == 1 and buckets[-1] == max_batch and buckets == sorted(set(buckets))
    # No batch pads by more than 16 rows, nor by more than half of itself.
    for batch in range(1, max_batch + 1):
        bucket = next(b for b in buckets if b >= batch)
        assert bucket - batch <= max(16, batch // 2)


def test_padding_rows_do_not_change_the_real_rows_logits():
    """A bucket's padding is computed with the batch: the real rows' logits must be what they
    are without it (the eager path, on CPU)."""
    llm = LLM("tiny", num_kv_blocks=256, max_model_len=128, max_num_seqs=8)
    for p in ([5, 6, 7], [9] * 20, list(range(3, 40))):
        llm.add_request(p, SamplingParams(max_tokens=3, ignore_eos=True))
    llm.step()  # the prefill
    seqs = list(llm.scheduler.running)
    runner = llm.runner
    runner.decode_inputs.fill(seqs, len(seqs))
    unpadded = runner.model.compute_logits(runner.model(*runner.decode_inputs.forward_args(len(seqs))))
    runner.decode_inputs.fill(seqs, 8)
    padded = runner.model.compute_logits(runner.model(*runner.decode_inputs.forward_args(8)))
    torch.testing.assert_close(padded[: len(seqs)], unpadded, rtol=1e-5, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_matches_eager(dtype):
    """Same prompts through graphs and eager decode: in float32 the same logits at every step
    to rounding (the decode kernel's split count follows the bucket, not the batch) and the
    same greedy tokens, as batches cross bucket sizes while sequences finish; in bfloat16,
    where a rounding apart can flip a token and part the two runs, the first step's logits."""
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 500) for _ in range(rng.randint(3, 90))] for _ in range(11)]
    params = [SamplingParams(max_tokens=rng.randint(2, 30), temperature=0, ignore_eos=True) for _ in prompts]
    outputs, logits = {}, {}
    for eager in (False, True):
        llm = LLM("tiny", device="cuda", dtype=dtype, num_kv_blocks=512, max_model_len=256, max_num_seqs=16,
                  enforce_eager=eager)
        assert (llm.runner.graphs is None) == eager
        seen = []
        forward = llm.runner.forward_logits

        def recording(batch, all_logits=False):
            out = forward(batch, all_logits)
            if not batch.is_prefill:
                seen.append(out.clone())
            return out

        llm.runner.forward_logits = recording
        outputs[eager] = [o.token_ids for o in llm.generate(prompts, params)]
        logits[eager] = seen
        assert llm.num_free_blocks == llm.num_total_blocks
    if dtype == "float32":
        assert outputs[False] == outputs[True]
        assert len(logits[True]) == len(logits[False])
        for graph_step, eager_step in zip(logits[False], logits[True]):
            torch.testing.assert_close(graph_step, eager_step, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(logits[False][0], logits[True][0], rtol=5e-2, atol=5e-2)


@cuda
def test_a_batch_larger_than_the_largest_graph_runs_eagerly():
    llm = LLM("tiny", device="cuda", num_kv_blocks=512, max_model_len=128, max_num_seqs=4)
    llm.runner.graphs.buckets = [1, 2]  # as if only up to 2 were captured
    outs = llm.generate([[3, 4, 5]] * 4, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 4 for o in outs)
