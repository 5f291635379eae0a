"""The prefill worker's side of a handoff, driven turn by turn: a prompt's KV is offered as the
step that completes it starts (so the decode side makes room while it runs), its data carries
the first token, and every way the prompt can end before its KV leaves cancels the offer and
returns its blocks."""

import time

import pytest
import zmq

from kairos.transport import protocol as p
from kairos.transport.sockets import make_socket, recv, send


class FakeDecode:
    """A decode worker's KV socket: greets, records what arrives, makes room when told to."""

    def __init__(self, ctx: zmq.Context):
        self.socket = make_socket(ctx, zmq.ROUTER, max_bytes=64 * 2**20)
        self.addr = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.received: list[p.Message] = []
        self.peer: bytes | None = None

    def drain(self, wait_ms: int = 0) -> list[p.Message]:
        got = []
        while self.socket.poll(wait_ms) and (msg := recv(self.socket, routed=True, max_frames=1 << 16,
                                                          max_total_bytes=1 << 30)) is not None:
            self.peer = msg.identity
            got.append(msg.msg)
            if isinstance(msg.msg, p.KVHello):
                send(self.socket, p.KVHelloOk("decode-fake"), msg.identity)
            wait_ms = 0
        self.received += got
        return got

    def make_room(self, transfer_id: str, step_s: float = 0.0) -> None:
        send(self.socket, p.KVReady(transfer_id, step_s=step_s), self.peer)


@pytest.fixture
def prefill():
    from kairos.engine import LLM
    from kairos.transport.prefill import PrefillWorker

    worker = PrefillWorker(LLM("tiny", role="prefill", num_kv_blocks=64, max_model_len=256), "tcp://127.0.0.1:9")
    worker.to_router = []
    worker.router.send_multipart = lambda frames, *a, **k: worker.to_router.append(p.decode(frames[-1]))
    decode = FakeDecode(worker.ctx)
    yield worker, decode
    worker.close()


def submit(worker, decode: FakeDecode, request_id: str, prompt_len: int, max_tokens: int) -> None:
    worker.handle_router(p.PrefillRequest(request_id, None, [5 + i % 50 for i in range(prompt_len)],
                                          {"max_tokens": max_tokens, "temperature": 0}, {}, "decode-fake",
                                          decode.addr, time.time()))


def turn_until(worker, decode: FakeDecode, done, turns: int = 50) -> None:
    for _ in range(turns):
        worker.run_once()
        decode.drain(wait_ms=20)
        if done():
            return
    raise AssertionError("not reached")


def greet(worker, decode: FakeDecode) -> None:
    """One handoff end to end: the handshake (once per pair) is done after it."""
    submit(worker, decode, "warm", 16, 4)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVOffer) for m in decode.received))
    transfer_id = next(m for m in decode.received if isinstance(m, p.KVOffer)).transfer_id
    decode.make_room(transfer_id)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVData) for m in decode.received))
    send(decode.socket, p.KVAck(transfer_id), decode.peer)
    turn_until(worker, decode, lambda: not worker.transfers)
    decode.received.clear()


def first_tokens(worker) -> dict[str, int]:
    return {t.request_id: t.token_ids[0] for m in worker.to_router if isinstance(m, p.StepTokens)
            for t in m.chunks() if t.index == 0}


def test_the_offer_goes_out_before_the_first_token_and_the_data_carries_it(prefill):
    worker, decode = prefill
    greet(worker, decode)
    offered_at, longest_step_before = {}, {}
    completing = worker.llm.on_prompts_completing

    def record(seqs):
        # The step is launched, its token not yet known: the offer goes out now.
        offered_at.update({s.request_id: s.num_pending for s in seqs})
        longest_step_before["s"] = worker.longest_step_s
        completing(seqs)
    worker.llm.on_prompts_completing = record

    submit(worker, decode, "a", 40, 8)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVOffer) for m in decode.received))
    offer = next(m for m in decode.received if isinstance(m, p.KVOffer))
    assert offered_at == {"a": 1}  # one token pending: the offer preceded it
    assert offer.num_blocks == -(-40 // worker.geometry.block_size)
    # The longest step before it (the greeting's), which the decode side waits beyond its timeout.
    assert offer.step_s > 0 and offer.step_s == round(longest_step_before["s"], 3)
    decode.make_room(offer.transfer_id)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVData) for m in decode.received))
    data = next(m for m in decode.received if isinstance(m, p.KVData))
    assert data.transfer_id == offer.transfer_id and data.first_token == first_tokens(worker)["a"]
    send(decode.socket, p.KVAck(offer.transfer_id), decode.peer)
    turn_until(worker, decode, lambda: worker.llm.num_free_blocks == worker.llm.num_total_blocks)


def test_the_ack_may_take_the_decode_workers_longest_step_beyond_the_timeout(prefill):
    """A decode worker takes KV in and acknowledges it between its steps, and its answer to an
    offer says how long they take (3 s): the ack is awaited that long beyond the transfer
    timeout, then the transfer is cancelled. One claiming steps of over an hour is refused."""
    worker, decode = prefill
    greet(worker, decode)
    submit(worker, decode, "a", 40, 8)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVOffer) for m in decode.received))
    offer = next(m for m in decode.received if isinstance(m, p.KVOffer))
    decode.make_room(offer.transfer_id, step_s=3.0)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVData) for m in decode.received))
    sent = time.monotonic()
    worker.tick(sent + worker.transfer_timeout_s + 2)
    assert offer.transfer_id in worker.transfers  # the timeout alone has passed
    worker.tick(sent + worker.transfer_timeout_s + 3.5)
    assert offer.transfer_id not in worker.transfers
    assert p.KVCancel(offer.transfer_id, "timed out") in decode.drain(wait_ms=1000)
    assert any(isinstance(m, p.Error) and m.request_id == "a" and
               f"timed out after {worker.transfer_timeout_s + 3:g} s" in m.message for m in worker.to_router)
    assert worker.llm.num_free_blocks == worker.llm.num_total_blocks

    decode.received.clear()
    submit(worker, decode, "b", 40, 8)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVOffer) for m in decode.received))
    offer = next(m for m in decode.received if isinstance(m, p.KVOffer))
    decode.make_room(offer.transfer_id, step_s=3601.0)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVCancel) for m in decode.received))
    assert not any(isinstance(m, p.KVData) for m in decode.received)
    assert any(isinstance(m, p.Error) and m.request_id == "b" and "steps take 3601.0 s" in m.message
               for m in worker.to_router)
    assert worker.llm.num_free_blocks == worker.llm.num_total_blocks and not worker.transfers


def test_room_made_during_the_step_sends_the_kv_in_the_next_turn(prefill):
    """The decode side answers while the completing step runs: the KV goes out in the next
    turn, before any further step (not a step later, as it would if offered after the step)."""
    worker, decode = prefill
    greet(worker, decode)

    completing = worker.llm.on_prompts_completing

    def answer_during_the_step(seqs):
        completing(seqs)
        for msg in decode.drain(wait_ms=1000):
            if isinstance(msg, p.KVOffer):
                decode.make_room(msg.transfer_id)
    worker.llm.on_prompts_completing = answer_during_the_step
    submit(worker, decode, "b", 40, 8)
    worker.run_once()
    assert "b" in first_tokens(worker)
    worker.run_once()
    decode.drain(wait_ms=1000)
    offer = next(m for m in decode.received if isinstance(m, p.KVOffer) and m.request_id == "b")
    assert any(isinstance(m, p.KVData) and m.transfer_id == offer.transfer_id for m in decode.received)


@pytest.mark.parametrize("how", ["ends at its first token", "the step fails", "aborted"])
def test_an_offer_whose_prompt_ends_early_is_cancelled_and_blocks_return(prefill, how):
    worker, decode = prefill
    greet(worker, decode)
    submit(worker, decode, "d", 40, 1 if how == "ends at its first token" else 8)
    if how == "the step fails":
        launch = worker.llm.runner.launch

        def failing(batch):
            tokens = launch(batch)
            tokens.wait = lambda: (_ for _ in ()).throw(RuntimeError("device lost"))
            return tokens
        worker.llm.runner.launch = failing
    if how == "aborted":  # offered, the decode side has not made room yet
        turn_until(worker, decode, lambda: any(isinstance(m, p.KVOffer) for m in decode.received))
        worker.abort("d")
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVCancel) for m in decode.received))
    offer = next(m for m in decode.received if isinstance(m, p.KVOffer))
    cancel = next(m for m in decode.received if isinstance(m, p.KVCancel))
    assert cancel.transfer_id == offer.transfer_id
    assert not any(isinstance(m, p.KVData) for m in decode.received)
    assert worker.llm.num_free_blocks == worker.llm.num_total_blocks and not worker.transfers
    if how == "the step fails":
        assert any(isinstance(m, p.Error) and m.request_id == "d" and "device lost" in m.message
                   for m in worker.to_router)


def test_kv_made_ready_while_a_step_runs_leaves_during_it(prefill):
    """On a GPU the host is free while a step runs: the worker takes the decode side's answers
    then, and KV made ready leaves at once, but never before the step computing it has ended."""
    worker, decode = prefill
    greet(worker, decode)
    submit(worker, decode, "a", 40, 8)
    turn_until(worker, decode, lambda: any(isinstance(m, p.KVOffer) for m in decode.received))
    a_offer = next(m for m in decode.received if isinstance(m, p.KVOffer))

    launch = worker.llm.runner.launch
    seen_running: list[p.Message] = []  # what the decode side had got before the step's tokens were read

    def running_step(batch):
        tokens = launch(batch)
        polls = 0

        def ready():  # the step runs until a's KV has left (or for 200 polls)
            nonlocal polls
            polls += 1
            for msg in decode.drain(wait_ms=5):
                seen_running.append(msg)
                if isinstance(msg, p.KVOffer):  # b's, made as its step started
                    decode.make_room(msg.transfer_id)
            if polls == 1:
                decode.make_room(a_offer.transfer_id)
            return polls > 200 or any(isinstance(m, p.KVData) for m in seen_running)
        tokens.ready = ready
        return tokens
    worker.llm.runner.launch = running_step
    submit(worker, decode, "b", 60, 8)
    worker.run_once()
    worker.llm.runner.launch = launch
    sent = [m for m in seen_running if isinstance(m, p.KVData)]
    assert [m.transfer_id for m in sent] == [a_offer.transfer_id]
    assert sent[0].first_token == first_tokens(worker)["a"]
    b_offer = next(m for m in seen_running if isinstance(m, p.KVOffer))
    worker.run_once()  # b's step is over: its KV goes, with its first token
    decode.drain(wait_ms=1000)
    b_data = next(m for m in decode.received if isinstance(m, p.KVData) and m.transfer_id == b_offer.transfer_id)
    assert b_data.first_token == first_tokens(worker)["b"]


def test_an_offer_rejected_while_its_step_runs_fails_the_request_and_frees_its_blocks(prefill):
    worker, decode = prefill
    greet(worker, decode)
    launch = worker.llm.runner.launch

    def running_step(batch):
        tokens = launch(batch)
        answered = []

        def ready():
            for msg in decode.drain(wait_ms=5):
                if isinstance(msg, p.KVOffer):
                    send(decode.socket, p.KVReject(msg.transfer_id, "no room, ever"), decode.peer)
                    answered.append(msg)
            return len(answered) > 0 and not worker.transfers
        tokens.ready = ready
        return tokens
    worker.llm.runner.launch = running_step
    submit(worker, decode, "r", 40, 8)
    worker.run_once()
    assert any(isinstance(m, p.Error) and m.request_id == "r" and "no room, ever" in m.message
               for m in worker.to_router)
    assert worker.llm.num_free_blocks == worker.llm.num_total_blocks and not worker.llm.has_unfinished()


def test_a_prefill_worker_learns_the_output_lengths_the_router_reports(prefill, caplog):
    worker, _ = prefill
    learned = []
    worker.llm.scheduler.prefill_policy.finished = learned.append
    worker.handle_router(p.Completed({"request_class": "chat", "tpot_ms": 40}, 300, 42))
    [done] = learned
    assert (done.slo.request_class, done.slo.tpot_ms, done.num_prompt_tokens, done.num_output_tokens) == (
        "chat", 40, 300, 42)
    for bad in (p.Completed({"tpot_ms": -1}, 300, 42), p.Completed({}, 0, 42), p.Completed({}, 3, 2.5),
                p.Completed([], 3, 4)):
        worker.handle_router(bad)
    assert len(learned) == 1 and caplog.text.count("a bad completion report") == 4
