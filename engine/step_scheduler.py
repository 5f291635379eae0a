"""The step scheduler: continuous batching with chunked prefill and preemption by recompute.
Which waiting prompt goes next is the prefill policy's call, and which ready sequence joins the
decode batch the decode policy's (both in scheduler/).

It also runs the two halves of disaggregated serving. On a prefill worker (`prefill_only`) a
sequence leaves after its first token, still holding its blocks, until its KV has been handed
to a decode worker. On a decode worker, sequences arrive with their prompt's KV already in
place (`add_prefilled`) and join the running batch from a ready queue."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kairos.engine.block_manager import BlockManager
from kairos.engine.sequence import FinishReason, Sequence, Status
from kairos.scheduler import ContinuousBatching, DecodePolicy, FCFSPolicy, PrefillPolicy
from kairos.scheduler.request_queue import RequestQueue


@dataclass
class Batch:
    is_prefill: bool
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence: tokens computed this step

    def samples(self, seq: Sequence, n: int) -> bool:
        """Whether this step ends with a token sampled for seq (its prompt is then complete)."""
        return seq.num_computed_tokens + n == len(seq)


class StepScheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, prefill_policy: PrefillPolicy | None = None,
                 decode_policy: DecodePolicy | None = None, prefill_only: bool = False):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.prefill_policy = prefill_policy or FCFSPolicy()
        self.decode_policy = decode_policy or ContinuousBatching(max_num_seqs)
        # The queues a policy ranks keep their sequences' numbers as arrays (RequestQueue): a
        # waiting or ready sequence's numbers hold still until it leaves the queue.
        self.waiting = RequestQueue()
        self.running: list[Sequence] = []  # admission order; every one holds blocks
        self.ready = RequestQueue()  # prefilled elsewhere, KV in place, not yet running
        # Waiting sequences preempted with a token still on the device: they recompute once it is known.
        self.awaiting_token: set[Sequence] = set()
        self.prefill_only = prefill_only
        self.learns_output_lengths = True  # off while warming up: its outputs are not serving's
        self.num_handed_off = 0  # sequences out of every queue, still holding blocks
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_prefilled(self, seq: Sequence) -> None:
        """A sequence whose prompt KV fills its blocks and whose first token is sampled."""
        assert seq.num_computed_tokens == seq.num_prompt_tokens and seq.num_output_tokens == 1
        seq.status = Status.RUNNING
        self.ready.append(seq)

    def release(self, seq: Sequence) -> None:
        """Frees the blocks of a handed-off sequence once the decode side has its KV (or gave up)."""
        assert seq.status is Status.HANDED_OFF
        self.num_handed_off -= 1
        self._finish(seq, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.ready)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running, self.ready):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, FinishReason.ABORT)
                    return seq
        return None

    def schedule(self) -> Batch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> Batch | None:
        budget = self.max_num_batched_tokens
        batch = Batch(True, [], [])

        def add(seq: Sequence) -> bool:
            nonlocal budget
            n = min(seq.num_uncomputed_tokens, budget)
            if n < seq.num_uncomputed_tokens and batch.seqs:
                n = self.prefill_policy.chunk(list(zip(batch.seqs, batch.num_new_tokens)), seq, n, now)
            if n == 0 or not self.blocks.can_allocate(seq, n):
                return False
            self.blocks.allocate(seq, n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            # A chunk closes the step.
            budget = 0 if n < seq.num_uncomputed_tokens else budget - n
            return True

        # Prompts part-way through (chunked) are ranked with the waiting ones, so that an urgent
        # arrival need not wait for a long prompt's every chunk. A prompt starts only if the
        # blocks it will need in all fit beside what every started prompt still needs: a started
        # prompt can always finish, so no mix of part-done prompts can hold the blocks each
        # other needs (they would strand each other, or be preempted and computed again).
        prefilling = [seq for seq in self.running if seq.is_prefilling]
        owed = sum(self.blocks.blocks_needed(seq, seq.num_uncomputed_tokens) for seq in prefilling)
        now = time.monotonic()
        admitting = True
        started = []
        for seq in self.prefill_policy.order(self.waiting.snapshot(prefilling, self.awaiting_token), now):
            if budget == 0:
                break
            if seq.status is not Status.WAITING:
                before = self.blocks.blocks_needed(seq, seq.num_uncomputed_tokens)
                add(seq)  # its blocks are owed to it
                owed -= before - self.blocks.blocks_needed(seq, seq.num_uncomputed_tokens)
                continue
            # New prompts start in the policy's order: once one cannot, none after it may
            # (a small prompt overtaking a long one that waits for blocks would starve it).
            admitting = admitting and len(self.running) < self.max_num_seqs
            if not admitting:
                continue
            self.blocks.match_prefix(seq)
            if owed + self.blocks.blocks_needed(seq, seq.num_uncomputed_tokens) > self.blocks.num_free_blocks \
                    or not add(seq):
                self.blocks.free_sequence(seq)
                admitting = False
                continue
            owed += self.blocks.blocks_needed(seq, seq.num_uncomputed_tokens)  # what its later chunks take
            started.append(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
        self.waiting.remove_all(started)
        return batch if batch.seqs else None

    def _schedule_decode(self) -> Batch | None:
        if self.ready:
            admitted = self.decode_policy.admit(self.running, self.ready, time.monotonic(), self.blocks.num_free_blocks)
            admitted = admitted[: self.max_num_seqs - len(self.running)]
            self.ready.remove_all(admitted)
            self.running.extend(admitted)
        batch = Batch(False, [], [])
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.is_prefilling or self._at_limit(seq):
                continue
            while not self.blocks.can_allocate(seq, 1):
                # Preempt the newest sequence not yet in this batch, then the newest ready one
                # (its KV holds blocks too); seq itself if none is left.
                victim = self.running[-1] if self.running[-1] is not seq or not self.ready else self.ready[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.allocate(seq, 1)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(1)
        return batch if batch.seqs else None

    def _at_limit(self, seq: Sequence) -> bool:
        """Whether a sequence's pending token will end it by length (or by eos_after, which
        stands for an end token): no step may follow."""
        return seq.num_pending > 0 and (seq.num_output_tokens >= seq.max_tokens or len(seq) >= self.max_model_len
                                        or seq.ends_here(seq.num_output_tokens))

    def _preempt(self, seq: Sequence) -> None:
        """Frees the sequence's blocks and sends it back to wait; it will recompute its K/V."""
        (self.running if seq in self.running else self.ready).remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.insert(0, seq)
        if seq.num_pending:
            self.awaiting_token.add(seq)

    def advance(self, batch: Batch, sampling_rows: list[int]) -> None:
        """Records a launched step's progress before its tokens are known: each sequence that
        samples (at these rows of the batch) gets a pending token, so that the next step can
        be scheduled at once."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        for row in sampling_rows:
            seq = batch.seqs[row]
            seq.append_pending()
            seq.pending_row = row

    def resolve(self, batch: Batch, sampled: list[int | None]) -> list[Sequence]:
        """Fills in a step's tokens once they reach the host; returns the sequences that got one
        (finished ones have status FINISHED; with prefill_only the rest are HANDED_OFF).
        Sequences aborted since the launch are skipped: their token was computed in vain."""
        stepped = []
        for seq, token in zip(batch.seqs, sampled):
            if token is None or seq.status is Status.FINISHED:
                continue
            stepped.append(seq)
            reason = seq.resolve_pending(token, self.max_model_len)
            if not seq.num_pending:
                self.awaiting_token.discard(seq)
            if reason is not None:
                # Preempted since the launch, a sequence waits (to recompute) with its token pending.
                (self.running if seq.status is Status.RUNNING else self.waiting).remove(seq)
                self._finish(seq, reason)
            elif self.prefill_only:
                self.running.remove(seq)
                seq.status = Status.HANDED_OFF
                self.num_handed_off += 1
            elif seq.status is Status.RUNNING:
                # A token that completes a block already stepped on (an overlapped step took it
                # as input while pending) lets that block's hash be registered now.
                last = len(seq) - seq.num_pending - 1
                if seq.num_computed_tokens > last and (last + 1) % self.blocks.block_size == 0:
                    self.blocks.register_block(seq, last // self.blocks.block_size)
        return stepped

    def _finish(self, seq: Sequence, reason: FinishReason | None) -> None:
        seq.finish_time = time.monotonic()
        if reason is not None and reason is not FinishReason.ABORT and self.learns_output_lengths:
            self.decode_policy.finished(seq)
            if not self.prefill_only:  # a prefill worker learns of every request from the router
                self.prefill_policy.finished(seq)
        seq.drop_pending()
        self.awaiting_token.discard(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
