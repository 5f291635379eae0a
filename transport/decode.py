"""The decode worker: takes prefilled requests' KV from prefill workers, decodes them in one
continuous batch, and streams tokens to the router.

Incoming KV lands straight in blocks reserved for it. Offers are answered in the decode
policy's order (arrival order under continuous batching), and only while there are blocks to
reserve and the KV under way stays within `max_inflight_bytes` (one transfer can always go);
the rest wait (and their prefill workers keep holding the blocks). A request joins the running
batch only once all of its KV is written: the writes run on a thread of their own, and the
loop picks finished ones up between steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import zmq

from kairos.engine.sequence import Sequence
from kairos.scheduler.defaults import MAX_INFLIGHT_TRANSFER_BYTES
from kairos.scheduler.metrics import time_per_output_token
from kairos.scheduler.request_queue import RequestQueue
from kairos.transport import protocol as p
from kairos.transport.kv import KVWriter, open_peer_cache
from kairos.transport.security import WORKER_KEYS, warn_if_exposed
from kairos.transport.sockets import make_socket, recv, send
from kairos.transport.worker import Worker

log = logging.getLogger("kairos.decode")
# An offer for a request the router has not yet assigned here waits this long for its word,
# and at most this many such offers wait at once.
UNASSIGNED_WAIT_S = 2.0
MAX_UNASSIGNED = 256


@dataclass
class Incoming:
    transfer_id: str
    peer: bytes  # the prefill worker's identity on the KV socket
    seq: Sequence
    num_blocks: int
    wait_s: float  # for the KV once ready: the transfer timeout and the prefill worker's longest step
    deadline: float = float("inf")  # set once the offer is accepted
    cancelled: bool = False  # dropped while its write was under way: free the blocks after it


@dataclass
class Unassigned:
    peer: bytes
    offer: p.KVOffer
    deadline: float


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, *args, kv_host: str = "127.0.0.1", kv_port: int = 0,
                 max_inflight_bytes: int = MAX_INFLIGHT_TRANSFER_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        self.counters["tpot_met"] = 0
        self.max_inflight_bytes = max_inflight_bytes
        self.writer = KVWriter(self.llm.runner, self.max_frame_bytes)
        # A message is a header and at most the KV of one longest sequence, in frames of at
        # least one block each; ZeroMQ's size limit applies to each frame.
        geometry, max_blocks = self.writer.geometry, -(-self.llm.max_model_len // self.writer.geometry.block_size)
        self.max_kv_frames = 1 + 2 * geometry.num_layers * max_blocks
        self.max_kv_bytes = p.MAX_CONTROL_MESSAGE_BYTES + max_blocks * geometry.bytes_per_block
        self.kv_socket = make_socket(self.ctx, zmq.ROUTER,
                                     max_bytes=max(self.max_frame_bytes, p.MAX_CONTROL_MESSAGE_BYTES))
        if self.keys is not None:
            self.keys.listen(self.kv_socket, WORKER_KEYS)  # only workers' keys get through
        warn_if_exposed(kv_host, self.keys, "the decode worker's KV socket")
        if kv_port:
            self.kv_socket.bind(f"tcp://{kv_host}:{kv_port}")
        else:
            kv_port = self.kv_socket.bind_to_random_port(f"tcp://{kv_host}")
        self.kv_addr = f"tcp://{kv_host}:{kv_port}"
        self.poller.register(self.kv_socket, zmq.POLLIN)
        # Offers waiting for room: their sequences, which the decode policy ranks by the numbers
        # a RequestQueue keeps, and the offer of each.
        self.offers = RequestQueue()
        self.offer_of: dict[Sequence, Incoming] = {}
        self.incoming: dict[str, Incoming] = {}  # accepted, data not yet complete
        self.writing: dict[str, Incoming] = {}  # data received, being written into the blocks
        self.greeted: set[bytes] = set()
        self.peer_caches: dict[bytes, torch.Tensor] = {}  # prefill workers on this GPU, their caches mapped
        self.expected: dict[str, bytes] = {}  # request id -> the prefill worker the router assigned it
        self.unassigned: dict[str, Unassigned] = {}  # offers that came before the router's word
        self.counters["kv_cuda_ipc"] = 0  # transfers copied GPU to GPU
        self.counters["kv_transfers"] = 0  # transfers complete, and their bytes
        self.counters["kv_bytes"] = 0
        log.info("decode worker %s receives KV at %s", self.worker_id, self.kv_addr)

    def registration(self) -> p.Register:
        reg = super().registration()
        reg.kv_addr = self.kv_addr
        return reg

    def stats(self) -> dict:
        return {**super().stats(), "transfers": self.transfers_in_flight, "offers_waiting": len(self.offers)}

    @property
    def transfers_in_flight(self) -> int:
        return len(self.incoming) + len(self.writing)

    @property
    def inflight_bytes(self) -> int:
        blocks = sum(i.num_blocks for i in self.incoming.values()) + sum(i.num_blocks for i in self.writing.values())
        return blocks * self.geometry.bytes_per_block

    def has_room_in_flight(self, item: Incoming) -> bool:
        """Whether the offer's KV may go under way now: the bytes in flight (host memory while
        they arrive and are written) stay bounded, but one transfer can always go."""
        return not self.transfers_in_flight or (
            self.inflight_bytes + item.num_blocks * self.geometry.bytes_per_block <= self.max_inflight_bytes)

    def pending(self) -> list[Incoming]:
        """Every request this worker holds outside the engine, not yet dropped."""
        writing = (i for i in self.writing.values() if not i.cancelled)
        return [*self.offer_of.values(), *self.incoming.values(), *writing]

    # ---- from the router ----------------------------------------------------------------------

    def handle_router(self, msg: p.Message) -> None:
        if isinstance(msg, p.Abort):
            self.abort(msg.request_id)
        elif isinstance(msg, p.KVExpect):
            self.expected[msg.request_id] = msg.prefill_worker_id.encode()
            early = self.unassigned.pop(msg.request_id, None)
            if early is not None:
                self.on_offer(early.peer, early.offer)
        elif isinstance(msg, p.WorkerGone):
            gone = msg.worker_id.encode()
            for item in [i for i in self.pending() if i.peer == gone]:
                self.drop(item)
            self.expected = {rid: peer for rid, peer in self.expected.items() if peer != gone}
            self.greeted.discard(gone)
            self.peer_caches.pop(gone, None)
        else:
            log.warning("unexpected %s message from the router", msg.TYPE)

    def reset(self) -> None:
        for item in self.pending():
            send(self.kv_socket, p.KVCancel(item.transfer_id, "the decode worker was reset"), item.peer)
            self.drop(item)
        self.greeted.clear()
        self.peer_caches.clear()
        self.expected.clear()
        for early in self.unassigned.values():
            send(self.kv_socket, p.KVCancel(early.offer.transfer_id, "the decode worker was reset"), early.peer)
        self.unassigned.clear()
        super().reset()

    def abort(self, request_id: str) -> None:
        self.expected.pop(request_id, None)
        early = self.unassigned.pop(request_id, None)
        if early is not None:
            send(self.kv_socket, p.KVCancel(early.offer.transfer_id, "aborted"), early.peer)
        if self.llm.abort(request_id):
            self.counters["aborted"] += 1
        for item in [i for i in self.pending() if i.seq.request_id == request_id]:
            self.counters["aborted"] += 1
            send(self.kv_socket, p.KVCancel(item.transfer_id, "aborted"), item.peer)
            self.drop(item)

    def drop(self, item: Incoming) -> None:
        if self.offer_of.get(item.seq) is item:
            del self.offer_of[item.seq]
            self.offers.remove(item.seq)
        if self.incoming.pop(item.transfer_id, None) is not None:
            self.llm.free_reserved(item.seq)
        if item.transfer_id in self.writing:
            item.cancelled = True  # the writer thread may still be filling its blocks

    # ---- engine -------------------------------------------------------------------------------

    def on_step(self, stepped: list[Sequence]) -> None:
        for seq in stepped:
            if seq.is_finished:
                # TPOT from the first token's arrival here (with its KV) to the last.
                times = seq.token_times
                tpot = time_per_output_token(times[0], times[-1], len(times)) if times else 0.0
                self.counters["tpot_met"] += tpot <= seq.slo.tpot_s
        self.send_tokens(stepped)

    # ---- the KV channel -----------------------------------------------------------------------

    def handle_socket(self, sock: zmq.Socket) -> bool:
        received = recv(sock, routed=True, max_header_bytes=p.MAX_CONTROL_MESSAGE_BYTES,
                        max_frames=self.max_kv_frames, max_total_bytes=self.max_kv_bytes)
        if received is None:
            return False
        peer, msg = received.identity, received.msg
        if isinstance(msg, p.KVHello):
            self.on_hello(peer, msg)
        elif peer not in self.greeted:
            send(sock, p.Error(None, "no KV handshake yet: send kv_hello first"), peer)
        elif isinstance(msg, p.KVOffer):
            self.on_offer(peer, msg)
        elif isinstance(msg, p.KVData):
            self.on_data(peer, msg, received.frames)
        elif isinstance(msg, p.KVCancel):
            item = next((i for i in self.pending() if i.transfer_id == msg.transfer_id), None)
            if item is not None and item.peer == peer:
                self.drop(item)  # the prefill side has told the router
        else:
            send(sock, p.Error(None, f"unexpected {msg.TYPE} on the KV channel"), peer)
        return True

    def on_hello(self, peer: bytes, msg: p.KVHello) -> None:
        try:
            problem = p.KVGeometry.from_dict(msg.geometry).mismatch(self.geometry)
            # Which values this worker has stays in its log, not in the reply to an unknown peer.
            reply = problem and "KV geometry differs from this decode worker's (its log says how)"
        except ValueError as e:  # malformed: the reply names only what the peer sent
            problem = reply = str(e)
        if problem:
            log.warning("refused KV handshake from %s: %s", msg.worker_id, problem)
            send(self.kv_socket, p.Error(None, reply), peer)
            return
        self.greeted.add(peer)
        if msg.cuda_ipc is not None and peer not in self.peer_caches:
            try:
                self.peer_caches[peer] = open_peer_cache(msg.cuda_ipc, self.llm.runner, self.geometry)
                log.info("KV from %s is copied from its cache on this GPU (CUDA IPC)", msg.worker_id)
            except ValueError as e:
                log.info("KV from %s comes over the socket: %s", msg.worker_id, e)
        send(self.kv_socket, p.KVHelloOk(self.worker_id, cuda_ipc=peer in self.peer_caches,
                                         max_frame_bytes=self.max_frame_bytes), peer)

    def on_offer(self, peer: bytes, msg: p.KVOffer) -> None:
        assigned = self.expected.get(msg.request_id)
        if assigned is None and msg.request_id not in self.unassigned and len(self.unassigned) < MAX_UNASSIGNED:
            # The router's word may still be on its way: the offer waits for it, briefly.
            self.unassigned[msg.request_id] = Unassigned(peer, msg, time.monotonic() + UNASSIGNED_WAIT_S)
            return
        if assigned != peer:
            # Only the prefill worker the router assigned may fill a request's blocks: anyone
            # else, knowing or guessing its id, could otherwise fail it or feed it KV.
            send(self.kv_socket, p.KVReject(msg.transfer_id, f"decode worker {self.worker_id}: request "
                                                             f"{msg.request_id} is not assigned to this peer"), peer)
            return
        del self.expected[msg.request_id]
        try:
            seq = self.make_sequence(None, msg.prompt_token_ids, msg.params, msg.slo, msg.request_id)
            needed = -(-len(msg.prompt_token_ids) // self.geometry.block_size)
            if msg.num_blocks != needed:
                raise ValueError(f"an offer of {msg.num_blocks} blocks for a {len(msg.prompt_token_ids)}-token prompt")
            if needed > self.llm.num_total_blocks:
                raise ValueError(f"the prompt needs {needed} KV blocks; this decode worker has "
                                 f"{self.llm.num_total_blocks} in all")
            p.check_peer_step(msg.step_s)
        except ValueError as e:
            send(self.kv_socket, p.KVReject(msg.transfer_id, f"decode worker {self.worker_id}: {e}"), peer)
            return
        seq.arrival_time = time.monotonic() - p.peer_age(msg.age_s)  # the request's arrival, not the offer's
        self.offers.append(seq)
        self.offer_of[seq] = Incoming(msg.transfer_id, peer, seq, msg.num_blocks, self.transfer_timeout_s + msg.step_s)

    def on_data(self, peer: bytes, msg: p.KVData, frames: list) -> None:
        item = self.incoming.get(msg.transfer_id)
        if item is None or item.peer != peer:
            return  # cancelled or timed out here already; the sender has been told
        source = self.peer_caches.get(peer)
        if source is not None:
            problem = self.writer.check_copy(source, msg.block_ids, frames, item.num_blocks)
        elif msg.block_ids is not None:
            problem = "KV block ids from a prefill worker whose cache is not mapped here"
        else:
            problem = self.writer.check(frames, item.num_blocks, msg.blocks_per_frame)
        vocab_size = self.llm.model_config.vocab_size
        if not problem and not 0 <= msg.first_token < vocab_size:
            problem = f"first token {msg.first_token} is outside the vocabulary of {vocab_size}"
        if problem:
            send(self.kv_socket, p.KVCancel(item.transfer_id, problem), peer)
            self.fail(item.seq.request_id, f"bad KV transfer from {peer.decode(errors='replace')}: {problem}")
            self.drop(item)
            return
        # The first token was sampled on the prefill side; replay it so the detokenizer and
        # the stop-string state continue where the prefill worker's left off.
        item.seq.append_token(msg.first_token, self.llm.max_model_len)
        item.seq.token_times[-1] = time.monotonic() - p.peer_age(msg.first_token_age_s)  # sampled then, not now
        item.seq.take_text_delta()
        del self.incoming[item.transfer_id]
        self.writing[item.transfer_id] = item
        if source is not None:
            self.counters["kv_cuda_ipc"] += 1
            self.writer.submit_copy(item.transfer_id, source, msg.block_ids, item.seq.block_table)
        else:
            self.writer.submit(item.transfer_id, frames, item.seq.block_table, msg.blocks_per_frame)

    def finish_writes(self) -> None:
        for transfer_id, error in self.writer.finished():
            item = self.writing.pop(transfer_id)
            if item.cancelled:
                self.llm.free_reserved(item.seq)
            elif error:
                send(self.kv_socket, p.KVCancel(transfer_id, error), item.peer)
                self.fail(item.seq.request_id, error)
                self.llm.free_reserved(item.seq)
            else:
                send(self.kv_socket, p.KVAck(transfer_id), item.peer)
                send(self.router, p.HandedOff(item.seq.request_id))
                self.counters["kv_transfers"] += 1
                self.counters["kv_bytes"] += item.num_blocks * self.geometry.bytes_per_block
                self.llm.add_prefilled(item.seq)

    def idle_poll_ms(self) -> int:
        # A finished write is picked up (and its request starts decoding) within a millisecond.
        return 1 if self.writing else super().idle_poll_ms()

    def close(self) -> None:
        self.writer.close()
        super().close()

    def tick(self, now: float) -> None:
        self.finish_writes()
        for request_id, early in [(r, e) for r, e in self.unassigned.items() if now > e.deadline]:
            del self.unassigned[request_id]
            send(self.kv_socket, p.KVReject(early.offer.transfer_id, f"decode worker {self.worker_id}: request "
                                                                     f"{request_id} is not assigned here"), early.peer)
        for item in [i for i in self.incoming.values() if now > i.deadline]:
            send(self.kv_socket, p.KVCancel(item.transfer_id, "timed out"), item.peer)
            self.fail(item.seq.request_id, f"KV transfer from {item.peer.decode(errors='replace')} timed out "
                                           f"after {item.wait_s:g} s")
            self.drop(item)
        self.accept_offers(now)

    def accept_offers(self, now: float) -> None:
        if not self.offers or self.inflight_bytes >= self.max_inflight_bytes:
            return  # runs every loop: skip ordering the offers when none could go in
        accepted = []
        for seq in self.llm.order_incoming(self.offers, now):
            item = self.offer_of[seq]
            if not self.has_room_in_flight(item) or not self.llm.reserve_prompt_kv(item.seq):
                break  # backpressure: the prefill worker holds the blocks until there is room
            accepted.append(seq)
            del self.offer_of[seq]
            item.deadline = now + item.wait_s
            self.incoming[item.transfer_id] = item
            send(self.kv_socket, p.KVReady(item.transfer_id, step_s=round(self.longest_step_s, 3)), item.peer)
        self.offers.remove_all(accepted)
