"""The prefill worker: batched prefill, the first token to the router, then the request's KV
blocks to its decode worker.

A transfer goes: handshake with the decode worker (once per pair) -> offer, as the step that
completes the prompt starts -> the decode side answers ready when it has reserved room (until
then the blocks stay here: backpressure) -> once the step is over, the KV frames (or, to a
decode worker on this GPU, only the block ids: it copies them from our cache) with the first
token -> ack, and only then are the blocks freed. Offering as the step starts lets the decode
side make room while it runs: offered after it, the answer would come during the next step,
and the KV would wait for that step to end too. On a GPU the decode side's answers are also
taken while a step runs (the host is free until its tokens land), so KV made ready then leaves
at once. A prompt that ends at its first token, or whose step fails, cancels its offer. No ack
within the transfer timeout fails the request and frees the blocks; so does an abort or the
decode worker's death.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch
import zmq

from kairos.engine.sequence import Sequence, Status
from kairos.scheduler.request import FinishedRequest, PromptTooLong
from kairos.transport import protocol as p
from kairos.transport.kv import OutgoingKV, PinnedPool, blocks_per_frame, export_cache
from kairos.transport.sockets import recv, send, send_tracked
from kairos.transport.worker import Worker

log = logging.getLogger("kairos.prefill")
MAX_DISPATCH_AGE_S = 60.0
# Host memory pinned at start for outgoing KV, at most: the KV of every prompt whose transfer
# overlaps another's must fit, and pinning more costs startup time (about 0.5 s per GiB).
MAX_STAGING_BYTES = 4 * 2**30


def dispatch_age(arrival_unix: float, now_unix: float) -> float:
    """How long ago the router received a request: its SLO clock has been running since. Clock
    skew between hosts must not make a request look ancient, or from the future."""
    return min(MAX_DISPATCH_AGE_S, max(0.0, now_unix - arrival_unix))


def first_token_age(t) -> float:
    """Seconds since the transfer's first token was sampled (TPOT's clock starts there)."""
    return time.monotonic() - t.seq.token_times[0] if t.seq.token_times else 0.0


@dataclass
class Transfer:
    transfer_id: str
    seq: Sequence
    peer: DecodePeer
    deadline: float = 0.0  # for the handshake, for room on the decode side, then for the ack
    wait_s: float = 0.0  # the wait that ends at the deadline, for the message if it passes
    peer_step_s: float = 0.0  # the decode worker's longest step, which the ack may take beyond the timeout
    awaiting_room: bool = False  # offered; the decode side has not reserved its blocks yet
    first_token: int | None = None  # sampled by the step that completes the prompt
    written: torch.cuda.Event | None = None  # on a GPU: recorded after that step, its KV written then
    kv: OutgoingKV | None = None  # sent once the decode side is ready; kept until the ack
    sent: zmq.MessageTracker | None = None  # whether ZeroMQ still holds the frames' memory

    def wait(self, seconds: float) -> None:
        self.wait_s = seconds
        self.deadline = time.monotonic() + seconds


@dataclass
class DecodePeer:
    worker_id: str
    socket: zmq.Socket
    greeted: bool = False
    cuda_ipc: bool = False  # it maps our KV cache: transfers name blocks instead of sending bytes
    per_frame: int = 1  # blocks per KV frame: what both ends' --kv-frame-mb allow, once greeted
    unsent_offers: list = field(default_factory=list)  # transfers waiting for the handshake


class PrefillWorker(Worker):
    role = "prefill"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TTFT from arrival here; prompt tokens served from the prefix cache rather than computed.
        self.counters.update(first_tokens=0, ttft_met=0, cached_prompt_tokens=0)
        self.targets: dict[str, tuple[str, str]] = {}  # request id -> decode worker id, KV address
        self.peers: dict[str, DecodePeer] = {}
        self.transfers: dict[str, Transfer] = {}
        self.by_request: dict[str, Transfer] = {}
        on_gpu = self.llm.runner.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream() if on_gpu else None
        cache = self.llm.runner.kv_cache
        self.staging = PinnedPool(min(MAX_STAGING_BYTES, cache.numel() * cache.element_size())) if on_gpu else None
        self.ready: list[Transfer] = []  # the decode side has room; the data goes out this turn
        self.per_frame = blocks_per_frame(self.geometry, self.max_frame_bytes)
        self.cache_export = export_cache(self.llm.runner)
        self.llm.on_prompts_completing = self.start_transfers
        self.llm.while_step_runs = self.serve_kv_during_step
        self.kv_poller = zmq.Poller()  # the decode workers' KV sockets alone

    def stats(self) -> dict:
        return {**super().stats(), "transfers": len(self.transfers)}

    # ---- from the router ----------------------------------------------------------------------

    def handle_router(self, msg: p.Message) -> None:
        if isinstance(msg, p.PrefillRequest):
            try:
                seq = self.make_sequence(msg.prompt, msg.prompt_token_ids, msg.params, msg.slo, msg.request_id,
                                         msg.add_special_tokens, msg.max_tokens_must_fit)
            except ValueError as e:
                code = p.PROMPT_TOO_LONG if isinstance(e, PromptTooLong) else p.INVALID_REQUEST
                self.fail(msg.request_id, str(e), code)
                return
            seq.arrival_time -= dispatch_age(msg.arrival_unix, time.time())
            self.targets[msg.request_id] = (msg.decode_worker_id, msg.decode_kv_addr)
            self.llm.add_sequence(seq)
        elif isinstance(msg, p.Abort):
            self.abort(msg.request_id)
        elif isinstance(msg, p.WorkerGone):
            self.drop_peer(msg.worker_id)
        elif isinstance(msg, p.Completed):
            self.learn(msg)
        else:
            log.warning("unexpected %s message from the router", msg.TYPE)

    def learn(self, msg: p.Completed) -> None:
        try:
            done = FinishedRequest.from_report(msg.slo, msg.prompt_tokens, msg.output_tokens)
        except ValueError as e:
            log.warning("a bad completion report from the router: %s", e)
            return
        self.llm.scheduler.prefill_policy.finished(done)

    def abort(self, request_id: str) -> None:
        if self.llm.abort(request_id):
            self.counters["aborted"] += 1
        transfer = self.by_request.get(request_id)
        if transfer is not None:
            self.counters["aborted"] += 1
            self.cancel_transfer(transfer, "aborted")
        self.targets.pop(request_id, None)

    def reset(self) -> None:
        for t in list(self.transfers.values()):
            self.cancel_transfer(t, "the prefill worker was reset")
        for worker_id in list(self.peers):
            self.drop_peer(worker_id)
        self.targets.clear()
        super().reset()

    def drop_peer(self, worker_id: str) -> None:
        """The decode worker died: the router has failed its requests; free their blocks."""
        peer = self.peers.pop(worker_id, None)
        if peer is None:
            return
        for transfer in [t for t in self.transfers.values() if t.peer is peer]:
            self.finish_transfer(transfer)
        self.poller.unregister(peer.socket)
        self.kv_poller.unregister(peer.socket)
        peer.socket.close(linger=0)

    # ---- engine -------------------------------------------------------------------------------

    def on_step(self, stepped: list[Sequence]) -> None:
        self.send_tokens(stepped)
        for seq in stepped:
            self.counters["first_tokens"] += 1
            self.counters["ttft_met"] += seq.token_times[0] - seq.arrival_time <= seq.slo.ttft_s
            self.counters["cached_prompt_tokens"] += seq.num_cached_tokens
            transfer = self.by_request.get(seq.request_id)
            if transfer is None:
                if seq.status is Status.HANDED_OFF:  # its offer ended while the step ran (rejected, cancelled)
                    self.llm.release_handed_off(seq)
                continue
            if seq.status is Status.HANDED_OFF:
                transfer.first_token = seq.output_token_ids[0]
            else:  # it ended at its first token: nothing to decode
                self.cancel_transfer(transfer, "finished at prefill")

    def on_step_failed(self, request_ids: list[str], message: str) -> None:
        for request_id in request_ids:
            self.targets.pop(request_id, None)
            transfer = self.by_request.get(request_id)
            if transfer is not None:
                self.cancel_transfer(transfer, "the prefill step failed")
        super().on_step_failed(request_ids, message)

    def start_transfers(self, seqs: list[Sequence]) -> None:
        """Offers the KV of prompts a step just launched will complete."""
        written = None
        if self.copy_stream is not None:
            written = torch.cuda.Event()
            written.record()
        for seq in seqs:
            if seq.request_id in self.targets:  # not a warm-up prompt
                self.start_transfer(seq, written)

    def serve_kv_during_step(self) -> bool:
        """While a step runs on the GPU: the decode workers' answers are taken (room made, KV
        acknowledged), and KV they have made room for leaves now, not when the step ends. The
        router's messages wait for the turn: nothing here touches the running batch. False when
        no transfer awaits an answer."""
        if not self.transfers:
            return False
        for sock, _ in self.kv_poller.poll(1):
            for _ in range(256):
                if sock.closed or not self.handle_socket(sock):
                    break
        self.send_ready()
        return True

    def start_transfer(self, seq: Sequence, written: torch.cuda.Event | None = None) -> None:
        worker_id, kv_addr = self.targets.pop(seq.request_id)
        peer = self.peers.get(worker_id)
        if peer is None:
            sock = self.dealer(self.worker_id, kv_addr)
            self.poller.register(sock, zmq.POLLIN)
            self.kv_poller.register(sock, zmq.POLLIN)
            peer = self.peers[worker_id] = DecodePeer(worker_id, sock)
            send(sock, p.KVHello(self.worker_id, self.geometry.to_dict(), self.cache_export))
        transfer = Transfer(uuid.uuid4().hex, seq, peer, written=written)
        transfer.wait(self.transfer_timeout_s)
        self.transfers[transfer.transfer_id] = transfer
        self.by_request[seq.request_id] = transfer
        if peer.greeted:
            self.offer(transfer)
        else:
            peer.unsent_offers.append(transfer)

    def offer(self, t: Transfer) -> None:
        seq = t.seq
        send(t.peer.socket, p.KVOffer(t.transfer_id, seq.request_id, seq.prompt_token_ids,
                                      dataclasses.asdict(seq.params), seq.slo.to_dict(), len(seq.block_table),
                                      step_s=round(self.longest_step_s, 3), age_s=time.monotonic() - seq.arrival_time))
        # Waiting for room on the decode side is backpressure, not a fault, but it is bounded:
        # a decode worker that never makes room must not hold this worker's blocks forever.
        t.wait(self.offer_timeout_s)
        t.awaiting_room = True

    def finish_transfer(self, t: Transfer) -> None:
        if t.kv is not None:
            t.kv.release(t.sent)
        self.transfers.pop(t.transfer_id, None)
        self.by_request.pop(t.seq.request_id, None)
        if t in t.peer.unsent_offers:
            t.peer.unsent_offers.remove(t)
        if t.seq.status is Status.HANDED_OFF:  # else it never got there (failed, or ended at prefill)
            self.llm.release_handed_off(t.seq)

    def cancel_transfer(self, t: Transfer, reason: str) -> None:
        """Tells the decode worker the transfer is off (it frees what it reserved), then ends it here."""
        send(t.peer.socket, p.KVCancel(t.transfer_id, reason))
        self.finish_transfer(t)

    def fail_transfer(self, t: Transfer, message: str) -> None:
        self.fail(t.seq.request_id, message)
        self.finish_transfer(t)

    # ---- the KV channel -----------------------------------------------------------------------

    def send_ready(self) -> None:
        """Copies the KV of every transfer made ready to host memory, then sends it, at once (in
        the loop's turn, or while a step runs): waiting for the next turn would put a whole
        prefill step (100 ms and more for long prompts on a GPU) into every handoff, and so into
        the request's TPOT. All the copies are queued before the first is waited for, so a
        burst of ready transfers costs one wait, not one each. A transfer whose step is still
        running (the decode side answered its offer during it) waits for its first token."""
        if not self.ready:
            return
        started = time.perf_counter()
        ready = [t for t in self.ready if t.transfer_id in self.transfers and t.first_token is not None]
        self.ready = [t for t in self.ready if t.transfer_id in self.transfers and t.first_token is None]
        by_name = [t for t in ready if t.peer.cuda_ipc]
        for t in by_name:
            t.written.synchronize()  # done already: its step's tokens have been read
            send(t.peer.socket, p.KVData(t.transfer_id, t.peer.per_frame, t.first_token,
                                         block_ids=list(t.seq.block_table), first_token_age_s=first_token_age(t)))
            t.wait(self.transfer_timeout_s + t.peer_step_s)
        staged = [t for t in ready if not t.peer.cuda_ipc]
        for t in staged:
            t.kv = OutgoingKV(self.llm.runner, t.seq.block_table, self.copy_stream, self.staging, t.written)
        for t in staged:
            t.kv.wait()
            t.sent = send_tracked(t.peer.socket, p.KVData(t.transfer_id, t.peer.per_frame, t.first_token,
                                                          first_token_age_s=first_token_age(t)),
                                  t.kv.frames(t.peer.per_frame))
            t.wait(self.transfer_timeout_s + t.peer_step_s)
        self.turn_notes["kv_staging_s"] = self.turn_notes.get("kv_staging_s", 0.0) + time.perf_counter() - started

    def handle_socket(self, sock: zmq.Socket) -> bool:
        received = recv(sock, routed=False)
        if received is None:
            return False
        peer = next((q for q in self.peers.values() if q.socket is sock), None)
        if peer is None:
            return True
        msg = received.msg
        if isinstance(msg, p.KVHelloOk):
            peer.greeted = True
            peer.cuda_ipc = msg.cuda_ipc and self.cache_export is not None
            # Frames no larger than the decode worker takes, whatever each side was told.
            theirs = blocks_per_frame(self.geometry, msg.max_frame_bytes) if msg.max_frame_bytes else self.per_frame
            peer.per_frame = min(self.per_frame, theirs)
            for t in peer.unsent_offers:
                self.offer(t)
            peer.unsent_offers.clear()
            return True
        if isinstance(msg, p.Error) and msg.request_id is None and not peer.greeted:
            # The handshake failed (geometry mismatch): nothing can go to this worker.
            for t in list(peer.unsent_offers):
                self.fail_transfer(t, f"decode worker {peer.worker_id} refused the KV handshake: {msg.message}")
            self.drop_peer(peer.worker_id)
            return True
        t = self.transfers.get(getattr(msg, "transfer_id", None))
        if t is None:
            if not isinstance(msg, p.Error):
                log.info("%s for a transfer that is over; ignored", msg.TYPE)
            return True
        if isinstance(msg, p.KVReady):
            try:
                p.check_peer_step(msg.step_s)
            except ValueError as e:
                send(t.peer.socket, p.KVCancel(t.transfer_id, "a step length out of range"))
                self.fail_transfer(t, f"decode worker {t.peer.worker_id} refused: {e}")
                return True
            t.awaiting_room = False
            t.peer_step_s = msg.step_s
            t.wait(self.transfer_timeout_s)
            self.ready.append(t)  # staged with the others made ready this turn, before the next step
        elif isinstance(msg, p.KVAck):
            self.finish_transfer(t)
        elif isinstance(msg, p.KVReject):
            self.fail_transfer(t, msg.message)
        elif isinstance(msg, p.KVCancel):
            self.finish_transfer(t)  # the decode side has reported the request's fate
        return True

    def tick(self, now: float) -> None:
        self.send_ready()
        for t in list(self.transfers.values()):
            if now > t.deadline:
                send(t.peer.socket, p.KVCancel(t.transfer_id, "timed out"))
                self.fail_transfer(t, f"decode worker {t.peer.worker_id} had no room for the request within "
                                      f"{t.wait_s:g} s" if t.awaiting_room else
                                      f"KV transfer to decode worker {t.peer.worker_id} timed out "
                                      f"after {t.wait_s:g} s")
