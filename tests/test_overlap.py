"""Overlapped decode steps (--overlap on): each step is launched before the last one's tokens are
read. Whatever the mix of stops, limits, aborts and preemptions, outputs, blocks and the prefix
cache must end exactly as with steps run one at a time."""

import pytest
import torch

from kairos.engine import LLM, SamplingParams
from kairos.engine.sequence import PENDING

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def prompts(n, seed=0, low=5, high=60):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(2, 512, (k,), generator=g).tolist() for k in lengths]


def both(**engine_args):
    return LLM("tiny", overlap="off", **engine_args), LLM("tiny", overlap="on", **engine_args)


def outputs(llm, batch, params):
    return [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(batch, params)]


def test_the_overlapped_path_is_taken():
    """A decode step returns the last step's tokens: the first returns none, and its sequence
    holds a pending token whose value the next step reads on the device."""
    llm = LLM("tiny", overlap="on", num_kv_blocks=64, max_model_len=256)
    seq = llm.add_request(prompts(1)[0], GREEDY)
    assert llm.step() == [seq] and seq.num_output_tokens == 1  # the prefill is waited for
    assert llm.step() == [] and seq.num_pending == 1 and seq.token_ids[-1] == PENDING
    assert llm.step() == [seq] and seq.num_pending == 1 and PENDING not in seq.token_ids[:-1]
    while llm.has_unfinished():
        llm.step()
    assert PENDING not in seq.token_ids and seq.num_output_tokens == 40


@pytest.mark.parametrize("engine_args", [
    dict(num_kv_blocks=512, max_model_len=256),
    dict(num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=16),  # chunked prompts
    dict(num_kv_blocks=16, max_model_len=256),  # preemption under KV pressure
    dict(num_kv_blocks=16, max_model_len=256, enable_prefix_caching=False),
], ids=["plain", "chunked", "preempting", "preempting-no-cache"])
def test_greedy_outputs_and_blocks_match_steps_one_at_a_time(engine_args):
    serial, overlapped = both(**engine_args)
    batch = prompts(8)
    assert outputs(overlapped, batch, GREEDY) == outputs(serial, batch, GREEDY)
    if engine_args["num_kv_blocks"] == 16:
        # Not always as many: a step scheduled before a stop is known takes a slot in vain.
        assert overlapped.scheduler.num_preemptions > 0 and serial.scheduler.num_preemptions > 0
    for llm in (serial, overlapped):
        assert llm.num_free_blocks == llm.num_total_blocks


def test_prefix_cache_learns_output_blocks_as_it_does_step_by_step():
    """A block completed by a token that was pending when its step was scheduled is registered
    once the token is known: the same hashes as steps one at a time."""
    serial, overlapped = both(num_kv_blocks=128, max_model_len=256, block_size=8)
    batch = prompts(4)
    assert outputs(overlapped, batch, GREEDY) == outputs(serial, batch, GREEDY)
    assert set(overlapped.block_manager.cached) == set(serial.block_manager.cached)
    assert len(serial.block_manager.cached) > sum(len(p) // 8 for p in batch)  # outputs included


def test_limits_stops_and_seeded_sampling_match():
    serial, overlapped = both(num_kv_blocks=64, max_model_len=48)
    free_run = serial.generate("Hello there", GREEDY)[0]
    cases = [
        ("Hello there", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)),  # max_model_len
        ("Hello there", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        ("Hello there", SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[free_run.token_ids[6]])),
        ("Hello there", SamplingParams(max_tokens=40, temperature=0, stop=[free_run.text[5:8]])),
        ("Once upon", SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)),
        ("Once upon", SamplingParams(max_tokens=1, temperature=0)),
    ]
    batch, params = [c[0] for c in cases], [c[1] for c in cases]
    got = outputs(overlapped, batch, params)
    assert got == outputs(serial, batch, params)
    assert [r for _, _, r in got] == ["length", "length", "stop", "stop", "length", "length"]
    assert len(got[0][0]) == 48 - len(serial.tokenizer.encode("Hello there"))


def test_aborts_while_a_step_is_in_flight_leave_nothing_behind():
    llm = LLM("tiny", overlap="on", num_kv_blocks=64, max_model_len=256)
    reference = LLM("tiny", overlap="off", num_kv_blocks=64, max_model_len=256).generate(prompts(4), GREEDY)
    seqs = [llm.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(prompts(4))]
    for _ in range(4):
        llm.step()
    assert llm._in_flight is not None and seqs[0].num_pending == 1
    assert llm.abort("r0") and llm.abort("r2")
    assert PENDING not in seqs[0].token_ids and seqs[0].num_pending == 0
    stepped = []
    while llm.has_unfinished():
        stepped += llm.step() or []
    assert seqs[0] not in stepped and seqs[2] not in stepped  # the in-flight token is dropped
    assert [s.finish_reason.value for s in seqs] == ["abort", "length", "abort", "length"]
    assert seqs[1].output_token_ids == reference[1].token_ids and seqs[3].output_token_ids == reference[3].token_ids
    assert llm.num_free_blocks == llm.num_total_blocks


def test_a_step_failing_mid_flight_fails_only_its_requests():
    from kairos.engine.llm import StepFailed

    llm = LLM("tiny", overlap="on", num_kv_blocks=64, max_model_len=256)
    seqs = [llm.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(prompts(2))]
    llm.step()
    llm.step()  # a decode step in flight
    launch = llm.runner.launch
    llm.runner.launch = lambda batch: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(StepFailed) as failed:
        llm.step()
    assert sorted(failed.value.request_ids) == ["r0", "r1"]
    for request_id in failed.value.request_ids:
        llm.abort(request_id)
    llm.runner.launch = launch
    while llm.has_unfinished():
        assert not llm.step()  # the step in flight belongs to aborted requests: nothing to return
    assert all(s.finish_reason.value == "abort" and PENDING not in s.token_ids for s in seqs)
    assert llm.num_free_blocks == llm.num_total_blocks


def test_a_prefill_launched_behind_a_failing_step_fails_with_it_and_leaves_no_prefix():
    """A prefill is launched before the decode step in flight is read; when that read fails,
    the prefill is never read either: its request fails too (it must not decode on from a
    first token that never came back), and its blocks serve no later prompt as a prefix."""
    from kairos.engine.llm import StepFailed

    llm = LLM("tiny", overlap="on", num_kv_blocks=64, max_model_len=256, block_size=8)
    first, late = prompts(2, seed=1, low=20, high=40)
    llm.add_request(first, GREEDY, request_id="r0")
    llm.step()
    llm.step()  # r0's decode step in flight
    llm._in_flight.tokens.wait = lambda: (_ for _ in ()).throw(RuntimeError("device lost"))
    llm.add_request(late, GREEDY, request_id="r1")
    with pytest.raises(StepFailed) as failed:
        llm.step()  # launches r1's prefill, then reads r0's step
    assert sorted(failed.value.request_ids) == ["r0", "r1"] and llm._in_flight is None
    for request_id in failed.value.request_ids:
        llm.abort(request_id)
    assert not llm.has_unfinished() and llm.num_free_blocks == llm.num_total_blocks
    assert not llm.block_manager.cached
    fresh = LLM("tiny", overlap="off", num_kv_blocks=64, max_model_len=256, block_size=8)
    assert outputs(llm, [late], GREEDY) == outputs(fresh, [late], GREEDY)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_graph_replays_match_serial_steps_on_cuda():
    """On CUDA the overlapped step's pending inputs are read on the device, between graph
    replays, while the host builds the next step: the same tokens as serial steps (float32,
    where a different batch bucket does not flip a greedy token)."""
    batch = prompts(11)
    params = [SamplingParams(max_tokens=m, temperature=t, seed=3, ignore_eos=True)
              for m, t in zip([2, 30, 7, 19, 30, 1, 12, 25, 30, 4, 16], [0, 0, 0.8] * 4)]
    got = {}
    for overlap in ("off", "on"):
        llm = LLM("tiny", device="cuda", dtype="float32", num_kv_blocks=64, max_model_len=256, max_num_seqs=16,
                  overlap=overlap)
        assert llm.runner.graphs is not None
        got[overlap] = outputs(llm, batch, params)
        assert llm.num_free_blocks == llm.num_total_blocks
    assert got["on"] == got["off"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_decode_waits_for_the_device_only_through_events_on_cuda():
    """While decoding, the host waits for a step only on the event of its tokens' copy: nothing
    in scheduling, input building, the graph replay or sampling (greedy, top-p, seeded)
    synchronizes, or the host could not prepare a step while the last one runs. Torch's sync
    debug mode raises on any synchronizing call."""
    llm = LLM("tiny", device="cuda", overlap="on", num_kv_blocks=64, max_model_len=256, max_num_seqs=16)
    assert llm.runner.graphs is not None
    params = [SamplingParams(max_tokens=24, temperature=t, top_p=p, seed=s, ignore_eos=True)
              for t, p, s in [(0, 1.0, None), (0.8, 0.9, None), (1.0, 1.0, 3)] * 3]
    seqs = [llm.add_request(ids, p) for ids, p in zip(prompts(9), params)]
    while any(s.num_output_tokens == 0 for s in seqs):  # prefill steps, waited for by design
        llm.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        while llm.has_unfinished():
            llm.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(s.num_output_tokens == 24 for s in seqs)
    assert llm.num_free_blocks == llm.num_total_blocks
