"""The offline engine on the tiny model: batching, chunked prefill, preemption, aborts, stops."""


import pytest
import torch
from hf_models import VOCAB, make_checkpoint
from kernel_testing import kernel_variants

from kairos.engine import LLM, SamplingParams
from kairos.engine.config import ConfigError
from kairos.kernels import reference

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def prompts(n, seed=0, low=5, high=60):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(2, 512, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def reference_outputs():
    """Greedy outputs one prompt at a time, with room to spare: the ground truth."""
    llm = LLM("tiny", num_kv_blocks=512, max_model_len=256, enable_prefix_caching=False)
    return [llm.generate(p, GREEDY)[0].token_ids for p in prompts(8)]


def test_batching_does_not_change_greedy_output(reference_outputs):
    llm = LLM("tiny", num_kv_blocks=512, max_model_len=256)
    outs = llm.generate(prompts(8), GREEDY)
    assert [o.token_ids for o in outs] == reference_outputs


def test_chunked_prefill_matches_whole_prefill(reference_outputs):
    llm = LLM("tiny", num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=16)
    outs = llm.generate(prompts(8), GREEDY)
    assert [o.token_ids for o in outs] == reference_outputs
    assert llm.num_free_blocks == llm.num_total_blocks


def test_long_chunks_over_their_prefix_match_whole_prefill():
    # Chunks this long attend to the prompt's earlier chunks apart from themselves (on a CPU).
    chunk = reference.SPLIT_PREFIX_MIN_QUERIES
    (prompt,) = prompts(1, seed=5, low=3 * chunk - 20, high=3 * chunk - 19)
    outputs = [LLM("tiny", num_kv_blocks=128, max_model_len=2048, max_num_batched_tokens=budget)
               .generate(prompt, GREEDY)[0].token_ids for budget in (2048, chunk)]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_kv_pressure_keeps_outputs_exact(reference_outputs, caching):
    # 16 blocks is one max-length sequence: eight prompts cannot all fit at once.
    llm = LLM("tiny", num_kv_blocks=16, max_model_len=256, enable_prefix_caching=caching)
    outs = llm.generate(prompts(8), GREEDY)
    assert llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference_outputs
    assert llm.num_free_blocks == llm.num_total_blocks


def test_the_reference_ops_derive_their_metadata_once_per_forward_pass(reference_outputs, monkeypatch):
    """Each layer's attention finds the pass's metadata derived already (the same tensors at
    every layer), and each pass derives its own (new tensors, or the same buffers written).
    The torch backend on a CPU takes the reference ops where numba is off (or in half precision)."""
    from kairos.engine.model import CausalLM
    from kairos.kernels import cpu_ops, reference

    monkeypatch.setattr(cpu_ops, "ENABLED", False)

    derived, decode_passes = [], []
    for name in ("_decode_layout", "_stored_rows", "_rotation"):
        derive = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, derive=derive, name=name: derived.append(name) or derive(*a))
    forward = CausalLM.forward
    monkeypatch.setattr(CausalLM, "forward", lambda self, ids, positions, ctx: decode_passes.append(
        not ctx.is_prefill) or forward(self, ids, positions, ctx))
    llm = LLM("tiny", num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=64)
    outs = llm.generate(prompts(8), GREEDY)
    assert [o.token_ids for o in outs] == reference_outputs
    assert derived.count("_decode_layout") == sum(decode_passes) >= GREEDY.max_tokens - 1
    assert derived.count("_stored_rows") == derived.count("_rotation") == len(decode_passes)


def test_abort_frees_blocks_of_running_and_waiting_requests():
    llm = LLM("tiny", num_kv_blocks=64, max_model_len=256, max_num_seqs=2)
    seqs = [llm.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(prompts(4))]
    for _ in range(3):
        llm.step()
    assert seqs[0].block_table and not seqs[3].block_table
    assert llm.abort("r0") and llm.abort("r3") and not llm.abort("nope")
    while llm.has_unfinished():
        llm.step()
    assert [s.finish_reason.value for s in seqs] == ["abort", "length", "length", "abort"]
    assert llm.num_free_blocks == llm.num_total_blocks


def test_max_tokens_and_max_model_len_end_with_length():
    llm = LLM("tiny", num_kv_blocks=64, max_model_len=32)
    out = llm.generate(list(range(2, 12)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 22 and out.finish_reason == "length"
    out = llm.generate(list(range(2, 12)), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ends_generation_on_that_token(tiny_llm):
    free_run = tiny_llm.generate("Hello", GREEDY)[0].token_ids
    stop_at = free_run[10]
    first = free_run.index(stop_at)
    out = tiny_llm.generate("Hello", SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free_run[: first + 1] and out.finish_reason == "stop"


def test_eos_from_generation_config_stops_unless_ignored(tiny_llm):
    assert tiny_llm.eos_token_ids == (1,)
    seq = tiny_llm.make_sequence("Hi", SamplingParams(max_tokens=5))
    assert seq.append_token(1, 1024) == "stop"
    seq = tiny_llm.make_sequence("Hi", SamplingParams(max_tokens=5, ignore_eos=True))
    assert seq.append_token(1, 1024) is None


def test_the_tokenizers_own_end_token_stops_generation_beside_the_generation_configs(tiny_path, tmp_path):
    """A chat fine-tune ends its turns with the token its tokenizer names (<|im_end|>) while its
    generation config keeps the base model's: both end a request."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_path, folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    llm = LLM(str(folder), num_kv_blocks=32, max_model_len=128)
    assert llm.eos_token_ids == (2, 1)  # the generation config's, then tokenizer_config's <|end|>
    seq = llm.make_sequence("Hi", SamplingParams(max_tokens=5))
    assert seq.append_token(1, 128) == "stop"


def test_streamed_text_holds_back_every_stop_string_prefix_whatever_the_stops_order():
    """'xab' may become the stop 'xabc': none of it streams, however the stops are listed."""
    from types import SimpleNamespace

    from kairos.engine.sequence import Sequence

    for stops in (["bq", "xabc"], ["xabc", "bq"]):
        seq = Sequence([1], SamplingParams(stop=stops), detokenizer=SimpleNamespace(text="hello "))
        assert seq.take_text_delta() == "hello "
        seq.detokenizer.text += "xab"
        assert seq.take_text_delta() == ""
        seq.detokenizer.text += "d"
        assert seq.take_text_delta() == "xabd"


def test_a_prompt_logits_call_that_fails_leaves_no_prefix_behind():
    """The first prompt's blocks were registered for KV that no forward pass wrote."""
    llm = LLM("tiny", num_kv_blocks=8, max_model_len=128, block_size=16)
    with pytest.raises(RuntimeError, match="not enough free KV blocks"):
        llm.prompt_logits([[3] * 40, [4] * 100])  # 3 blocks, then 7 of the 5 left
    assert not llm.block_manager.cached and llm.num_free_blocks == llm.num_total_blocks


def test_a_decode_worker_matches_received_kv_as_a_prefix_only_once_it_is_in_place():
    """Blocks reserved for a prompt's KV hold nothing until the transfer lands: no prefix match
    may find them before. Once in place, they serve a later prefix (a preempted sequence's own
    recompute first of all)."""
    llm = LLM("tiny", role="decode", num_kv_blocks=64, max_model_len=256, block_size=16)
    seq = llm.make_sequence([7] * 40, SamplingParams(max_tokens=4))
    assert llm.reserve_prompt_kv(seq) and not llm.block_manager.cached
    seq.append_token(5, llm.max_model_len)  # the first token, sampled by the prefill worker
    llm.add_prefilled(seq)
    assert len(llm.block_manager.cached) == 2  # 40 tokens: two full blocks
    again = llm.make_sequence([7] * 40 + [5, 9], SamplingParams(max_tokens=4))
    assert llm.block_manager.match_prefix(again) == 32
    cancelled = llm.make_sequence([8] * 40, SamplingParams(max_tokens=4))
    assert llm.reserve_prompt_kv(cancelled)
    llm.free_reserved(cancelled)  # its transfer failed: nothing of it is findable
    assert llm.block_manager.match_prefix(llm.make_sequence([8] * 40, SamplingParams(max_tokens=4))) == 0


def test_a_decode_worker_waits_while_kv_on_its_way_holds_the_blocks_a_preempted_sequence_needs():
    """A preempted sequence computes its KV again on the decode worker once its blocks fit.
    While KV on its way in holds them, nothing can run, and the worker waits (step gives None)
    rather than failing every request; and new KV is not let in ahead of the preempted."""
    llm = LLM("tiny", role="decode", num_kv_blocks=16, max_model_len=256, block_size=16)
    incoming = llm.make_sequence([7] * 190, SamplingParams(max_tokens=4, ignore_eos=True))  # 12 blocks
    assert llm.reserve_prompt_kv(incoming)
    preempted = llm.make_sequence([8] * 80, SamplingParams(max_tokens=4, ignore_eos=True))  # 5 blocks, 4 free
    llm.scheduler.waiting.append(preempted)
    assert llm.step() is None and llm.step() is None
    incoming.append_token(5, llm.max_model_len)  # sampled by the prefill worker
    llm.add_prefilled(incoming)
    while incoming.finish_reason is None:
        assert llm.step()
    assert llm.num_free_blocks == 16  # the finished one gave its blocks back (and the preempted got none)
    # Now the preempted sequence's 5 blocks are kept for it: 12 more blocks of KV would not leave them.
    late = llm.make_sequence([9] * 190, SamplingParams(max_tokens=4))
    assert not llm.reserve_prompt_kv(late)
    assert llm.reserve_prompt_kv(llm.make_sequence([9] * 150, SamplingParams(max_tokens=4)))  # 10 blocks
    while preempted.finish_reason is None:
        assert llm.step()


def test_stop_string_truncates_text(tiny_llm):
    free_run = tiny_llm.generate("The quick brown fox", GREEDY)[0]
    text = free_run.text
    stop = text[12:15]
    assert stop.strip("\ufffd") == stop  # a whole-character stop string
    out = tiny_llm.generate("The quick brown fox", SamplingParams(max_tokens=40, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    assert out.token_ids == free_run.token_ids[: len(out.token_ids)]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llm):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=42, ignore_eos=True)
    alone = tiny_llm.generate("Once upon", params)[0].token_ids
    batched = tiny_llm.generate(["x y z", "Once upon", "abc"], [GREEDY, params, SamplingParams(temperature=0.7)])
    assert batched[1].token_ids == alone
    other_seed = tiny_llm.generate("Once upon", SamplingParams(max_tokens=20, seed=43, ignore_eos=True))[0]
    assert other_seed.token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_llm):
    greedy = tiny_llm.generate("Once upon", GREEDY)[0].token_ids
    for params in (SamplingParams(max_tokens=40, temperature=1.5, top_k=1, seed=1, ignore_eos=True),
                   SamplingParams(max_tokens=40, temperature=1.5, top_p=1e-6, seed=1, ignore_eos=True)):
        assert tiny_llm.generate("Once upon", params)[0].token_ids == greedy


def test_text_and_token_id_prompts_agree(tiny_llm):
    by_text = tiny_llm.generate("Hello world", GREEDY)[0]
    by_ids = tiny_llm.generate(by_text.prompt_token_ids, GREEDY)[0]
    assert by_ids.token_ids == by_text.token_ids and by_ids.text == by_text.text


def test_warm_up_runs_a_full_budget_prefill_and_a_decode_step_and_keeps_nothing(monkeypatch):
    """Workers warm up before serving (a shape's first step compiles GPU kernels): one prefill
    step of the whole token budget, then a decode step, with no trace left in the calibration,
    the prefill counter, the block pool or the prefix cache."""
    from pathlib import Path

    profile = Path(__file__).resolve().parent.parent / "bench" / "profiles" / "tiny_cpu_2core.json"
    llm = LLM("tiny", num_kv_blocks=64, max_model_len=200, max_num_batched_tokens=500, prefill_policy="kairos",
              decode_policy="kairos", profile=str(profile), max_prefill_wait_s=7.5)
    assert llm.scheduler.prefill_policy.max_wait_s == 7.5
    with pytest.raises(ConfigError, match="--max-prefill-wait-s must be positive"):
        LLM("tiny", prefill_policy="kairos", profile=str(profile), max_prefill_wait_s=-1.0)
    steps = []
    launch = llm.runner.launch
    monkeypatch.setattr(llm.runner, "launch", lambda batch: steps.append(batch) or launch(batch))
    totals = {phase: list(t) for phase, t in llm.cost_model.totals.items()}
    assert llm.warm_up() > 0
    assert steps[0].is_prefill and sum(steps[0].num_new_tokens) == 500  # prompts of 198, 198 and 104
    assert [len(b.seqs) for b in steps[1:] if not b.is_prefill] == [3]
    assert llm.cost_model.totals == totals and llm.num_prefill_tokens_computed == 0
    assert llm.num_free_blocks == llm.num_total_blocks and not llm.block_manager.cached
    assert not llm.scheduler.decode_policy.estimator.lengths_by_key()  # no 2-token outputs learned
    llm.generate([[5] * 20], SamplingParams(max_tokens=3, ignore_eos=True))
    assert llm.scheduler.decode_policy.estimator.lengths_by_key()[()] == [3]  # serving's are


def test_an_engine_that_prefills_and_decodes_teaches_both_of_its_policies_the_output_lengths():
    """Tempo's prefill policy ranks by predicted output lengths too: where one engine serves
    whole requests, it learns them as its decode policy does."""
    from pathlib import Path

    profile = Path(__file__).resolve().parent.parent / "bench" / "profiles" / "tiny_cpu_2core.json"
    llm = LLM("tiny", num_kv_blocks=64, max_model_len=200, prefill_policy="tempo", decode_policy="kairos",
              profile=str(profile))
    llm.generate([[5] * 20, [6] * 40], SamplingParams(max_tokens=3, ignore_eos=True))
    assert llm.scheduler.prefill_policy.service.predictor.lengths_by_key()[()] == [3, 3]
    assert llm.scheduler.decode_policy.estimator.lengths_by_key()[()] == [3, 3]


def test_a_model_length_under_two_blocks_warms_up_within_its_positions():
    """The warm-up's pass over a cached prefix stays within the positions RoPE has."""
    llm = LLM("tiny", block_size=16, max_model_len=20, num_kv_blocks=8)
    assert llm.warm_up() > 0 and llm.generate([[5] * 10], SamplingParams(max_tokens=4))[0].finish_reason


def test_after_the_warm_up_serving_compiles_no_kernel(monkeypatch, tmp_path):
    """Every Triton kernel variant that serving launches, the warm-up launched first: on a GPU
    each new one compiles mid-serving. The steps below vary what could make one: prompts of a
    token, across block boundaries and past the token budget (chunked), a cached prefix, decode
    batches of 1 to 3 whose widest block table is 1, 2, 16 or 18 blocks, and contexts the
    decode kernel splits in 1 to 3, and sampled batches of 1 to 4 rows through the top-k/top-p
    filter. Blocks of 4 tokens, and splits from 32 keys rather than 256, keep the interpreted
    prompts short. Steps of one token take the skinny matmul (whose variants do not depend on
    the token count), so that its variants are checked too. The model has the tiny one's heads (32
    wide, two queries a KV head) in fewer layers of narrower matmuls: the interpreter runs it in
    a third of the time."""
    from kairos.kernels import attention

    monkeypatch.setattr(attention, "MIN_TOKENS_PER_SPLIT", 32)
    make_checkpoint("llama", tmp_path, num_attention_heads=2, num_key_value_heads=1)
    llm = LLM(str(tmp_path), backend="triton", block_size=4, num_kv_blocks=96, max_model_len=160,
              max_num_batched_tokens=64, skinny_matmul_tokens=1)
    rng = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(3, VOCAB, (n,), generator=rng).tolist() for n in (1, 3, 5, 61, 70)}
    with kernel_variants() as seen:
        llm.warm_up()
        warmed = set(seen)
        assert {name for name, _ in warmed} >= {"_prefill_kernel", "_decode_kernel", "_merge_kernel",
                                               "_rms_norm_kernel", "_rope_store_kv_kernel", "_radix_pass_kernel",
                                               "_softmax_parts_kernel", "_finish_kernel", "_skinny_linear_kernel"}
        params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0)
        llm.generate([ids[1], ids[3], ids[5]], params)
        for rows, (top_k, top_p) in enumerate([(5, 1.0), (0, 0.9), (3, 0.8), (0, 0.5)], start=1):  # sampled
            llm.generate([ids[1], ids[3], ids[5], ids[1]][:rows],
                         SamplingParams(max_tokens=3, ignore_eos=True, top_k=top_k, top_p=top_p))
        for n in (61, 70):
            llm.generate([ids[n]], params)
        llm.generate([ids[70][:40] + [7]], params)  # its first ten blocks are cached
    assert llm.num_free_blocks == llm.num_total_blocks
    assert set(seen) - warmed == set()


def test_eos_after_ends_an_output_as_an_end_token_would_with_max_tokens_left_as_the_cap(tiny_llm):
    """A replay forces a trace's output length with eos_after: the output stops there (finish
    reason stop) while max_tokens, what the policies read, stays the client's cap."""
    prompts = [[3, 4, 5] * 7, [9] * 30]
    capped = tiny_llm.generate(prompts, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    ended = tiny_llm.generate(prompts, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True, eos_after=7))
    assert [o.token_ids for o in ended] == [o.token_ids for o in capped]
    assert {o.finish_reason for o in ended} == {"stop"} and {o.finish_reason for o in capped} == {"length"}
    with pytest.raises(ValueError, match="eos_after must be an integer"):
        SamplingParams(eos_after=0)
