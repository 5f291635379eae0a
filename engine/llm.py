"""The offline engine and its Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kairos.engine.block_manager import BlockManager
from kairos.engine.config import ConfigError, EngineConfig, ModelConfig
from kairos.engine.model_runner import ModelRunner, SampledTokens
from kairos.engine.profiler import load_cost_model
from kairos.engine.sequence import Sequence
from kairos.engine.step_scheduler import Batch, StepScheduler
from kairos.engine.step_times import StepTimes
from kairos.engine.tiny import tiny_model_path
from kairos.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kairos.scheduler import DECODE_POLICIES, PREFILL_POLICIES, PolicySettings, native
from kairos.scheduler.cost_model import CalibratedCostModel
from kairos.scheduler.request import PromptTooLong, RequestSLO, SamplingParams
from kairos.scheduler.request_queue import RequestQueue

log = logging.getLogger("kairos")

Prompt = str | list[int]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    num_cached_tokens: int


@dataclass
class LaunchedStep:
    batch: Batch
    tokens: SampledTokens
    started: float  # perf_counter at launch
    work: tuple[int, int] | list[tuple[int, int]]  # what the cost model is told the step did


class StepFailed(RuntimeError):
    """An engine step raised: the requests in it are stuck where the step left them (a caller
    serving others aborts them, which frees their blocks, and goes on)."""

    def __init__(self, request_ids: list[str], cause: Exception):
        super().__init__(f"the engine step failed ({type(cause).__name__}: {cause})")
        self.request_ids = request_ids


def resolve_model_path(model: str) -> Path:
    return tiny_model_path() if model == "tiny" else Path(model)


class LLM:
    def __init__(self, model: str = "tiny", **engine_args):
        self.config = EngineConfig(model=model, **engine_args)
        path = resolve_model_path(model)
        self.model_config = ModelConfig.from_pretrained(path)
        self.tokenizer = self._load_tokenizer(path)
        self.max_model_len = self.config.resolve_max_model_len(self.model_config)
        # The generation config's ends and the tokenizer's own: a chat fine-tune often ends its
        # turns with a token (<|im_end|>) that only its tokenizer names.
        self.eos_token_ids = tuple(dict.fromkeys(
            (*self.model_config.eos_token_ids, *(self.tokenizer.eos_token_ids if self.tokenizer else ()))))
        try:
            self.runner = ModelRunner(self.model_config, self.config, self.max_model_len)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                raise
            reason = str(e).splitlines()[0]
            raise ConfigError(f"not enough memory for the weights, KV cache and step buffers ({reason}): lower "
                              "--num-kv-blocks, --max-num-seqs or --max-model-len") from None
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        kv_tokens = self.runner.num_blocks * self.config.block_size
        if kv_tokens < self.max_model_len:
            # A sequence longer than the cache could never run, not even alone: prompts beyond it
            # are refused, and outputs end there ("length").
            log.warning("the KV cache holds %d tokens, fewer than the maximum length %d: sequences are "
                        "limited to %d tokens", kv_tokens, self.max_model_len, kv_tokens)
            self.max_model_len = kv_tokens
        prefill_policy, decode_policy = self._build_policies()
        self.scheduler = StepScheduler(self.block_manager, self.config.max_num_seqs,
                                       self.config.max_num_batched_tokens, self.max_model_len,
                                       prefill_policy, decode_policy, prefill_only=self.config.role == "prefill")
        self.num_prefill_tokens_computed = 0
        self.num_reserved = 0  # sequences whose prompt KV is on its way here, into reserved blocks
        self._decoding_since: float | None = None  # end of the last decode step, while decoding goes on
        self.overlap = self.config.overlap == "on"
        self._in_flight: LaunchedStep | None = None  # an overlapped decode step, tokens not yet read
        self._last_completed = 0.0  # when the last step's tokens were read (perf_counter)
        self.step_times = StepTimes()
        # Called as a prefill step is launched, with the sequences whose prompts it completes
        # (on a prefill worker: it offers their KV then, so the decode side makes room while
        # the step runs and the KV can leave as soon as it ends).
        self.on_prompts_completing: Callable[[list[Sequence]], None] | None = None
        # Called over and over while a launched step runs on the device (the host is free until
        # its tokens land), each call waiting a millisecond at most for work of its own; it
        # answers False when it has nothing to wait for, and the step is then waited for.
        self.while_step_runs: Callable[[], bool] | None = None

    def _build_policies(self):
        """The scheduling policies; those that predict step times get a cost model, fitted to
        --profile or else to a short profile measured now. With a cost model, every step's time
        recalibrates it (and `cost_model` reports how far serving has drifted from the profile)."""
        cfg = self.config
        needs_cost = (PREFILL_POLICIES.needs_cost_model(cfg.prefill_policy)
                      or DECODE_POLICIES.needs_cost_model(cfg.decode_policy))
        cost = load_cost_model(self, cfg.profile) if needs_cost or cfg.profile else None
        self.cost_model = CalibratedCostModel(cost) if cost is not None else None
        settings = PolicySettings(self.cost_model, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                  cfg.max_prefill_wait_s)
        prefill = PREFILL_POLICIES.build(cfg.prefill_policy, settings)
        if cfg.max_prefill_wait_s is not None and cfg.role != "decode" and not hasattr(prefill, "max_wait_s"):
            log.warning("--max-prefill-wait-s does nothing under the %s prefill policy, which demotes no prompt",
                        cfg.prefill_policy)
        return prefill, DECODE_POLICIES.build(cfg.decode_policy, settings)

    def _load_tokenizer(self, path: Path) -> Tokenizer | None:
        source = self.config.tokenizer
        if source is not None:
            return Tokenizer(resolve_model_path(source))
        return Tokenizer(path) if (path / "tokenizer.json").exists() else None

    # ---- requests -------------------------------------------------------------------------

    def make_sequence(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                      slo: RequestSLO | None = None, add_special_tokens: bool = True,
                      max_tokens_must_fit: bool = False) -> Sequence:
        """Validates a prompt and turns it into a Sequence; raises ValueError naming the problem
        (PromptTooLong for a prompt beyond the model's length, or with max_tokens_must_fit for
        one that leaves less room than max_tokens: otherwise the output ends at the model's
        length). add_special_tokens: whether a text prompt gets the tokenizer's (a BOS), as a
        text that already holds them must not."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, not {type(params).__name__}")
        params.validate()
        vocab = self.model_config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.model_config.path} has no tokenizer.json: pass token ids "
                                  "or a tokenizer (--tokenizer)")
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens)
            if any(t >= vocab for t in ids):
                raise ConfigError(f"the tokenizer gave token id {max(ids)}, beyond the model's vocabulary of {vocab}: "
                                  "it is not this model's tokenizer")
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        else:
            raise TypeError(f"a prompt is a text or a list of token ids, not {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens, but the model's maximum length is "
                             f"{self.max_model_len} (prompt and output together)")
        if max_tokens_must_fit and len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong(f"max_tokens is {params.max_tokens}, but the prompt has {len(ids)} tokens and the "
                                f"model's maximum length is {self.max_model_len} (prompt and output together): "
                                f"at most {self.max_model_len - len(ids)} output tokens fit")
        bad_stop = [t for t in params.stop_token_ids if t >= self.model_config.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids {bad_stop} are outside the vocabulary")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer else None
        return Sequence(ids, params, self.eos_token_ids, detok, request_id, text, slo)

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                    slo: RequestSLO | None = None) -> Sequence:
        seq = self.make_sequence(prompt, params, request_id, slo)
        self.add_sequence(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queues a sequence from make_sequence for prefill."""
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def abort_all(self) -> None:
        """Drops every request: their blocks return to the pool."""
        sched = self.scheduler
        for seq in [*sched.waiting, *sched.running, *sched.ready]:
            self.abort(seq.request_id)

    # ---- disaggregated serving: a prefill worker's hand-off, a decode worker's intake --------

    def release_handed_off(self, seq: Sequence) -> None:
        """Frees a prefilled sequence's blocks once a decode worker has its KV (or gave up)."""
        self.scheduler.release(seq)

    def order_incoming(self, seqs: RequestQueue | list[Sequence], now: float) -> list[Sequence]:
        """Prefilled sequences waiting to move their KV here, in the order the decode policy
        gives them room (under kairos, those that can still meet their TPOT SLO first)."""
        return self.scheduler.decode_policy.order(seqs, self.scheduler.running, now)

    def reserve_prompt_kv(self, seq: Sequence) -> bool:
        """Reserves blocks for a prefilled prompt's KV, keeping free a block per sequence that is
        running, ready or has KV reserved already, and every block the preempted sequences need
        to compute their KV again: taking new KV in then neither forces the running batch into
        preemption at once nor keeps a preempted sequence out for good. False (nothing
        reserved) if they do not fit."""
        sched, blocks = self.scheduler, self.block_manager
        spare = len(sched.running) + len(sched.ready) + self.num_reserved
        spare += sum(blocks.blocks_needed(s, s.num_uncomputed_tokens) for s in sched.waiting)
        if blocks.blocks_needed(seq, seq.num_prompt_tokens) + spare > blocks.num_free_blocks:
            return False
        # Not findable by prefix until the KV is in them.
        blocks.allocate(seq, seq.num_prompt_tokens, register=False)
        self.num_reserved += 1
        return True

    def free_reserved(self, seq: Sequence) -> None:
        """Gives back the blocks reserved for a sequence that will not join the batch."""
        self.block_manager.free_sequence(seq)
        self.num_reserved -= 1

    def add_prefilled(self, seq: Sequence) -> None:
        """A sequence whose prompt KV is now in its reserved blocks, and whose first token was
        sampled elsewhere: it joins the decode batch as the decode policy admits it."""
        seq.num_computed_tokens = seq.num_prompt_tokens
        # Its prompt's blocks may serve a prefix from now on: this sequence's own recompute
        # if it is preempted, as much as another's.
        self.block_manager.register_filled(seq)
        self.num_reserved -= 1
        self.scheduler.add_prefilled(seq)

    def load(self) -> dict:
        """Queue lengths, KV blocks and preemptions so far, as a worker reports them."""
        sched = self.scheduler
        return {"waiting": len(sched.waiting), "running": len(sched.running), "ready": len(sched.ready),
                "free_blocks": self.num_free_blocks, "total_blocks": self.num_total_blocks,
                "preemptions": sched.num_preemptions, "step_seconds": self.step_times.figures()}

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[Sequence] | None:
        """Runs one scheduled batch; returns the sequences that got a token. None if nothing
        could run while blocks are held outside the queues: on a prefill worker by handed-off
        requests, on a decode worker by KV on its way in (a preempted sequence may wait for
        those blocks).

        With overlap, a decode step is launched before the last one's tokens are back: this
        call returns the last step's sequences while the device runs the new one. Their
        tokens were pending meanwhile, and a sequence that turns out to have stopped has its
        extra token dropped. A prefill step is waited for (its prompts hand off or decode
        next), after the step in flight."""
        batch = self.scheduler.schedule()
        if batch is None:
            if self._in_flight is not None:
                in_flight, self._in_flight = self._in_flight, None
                return self._complete(in_flight)
            if self.scheduler.has_unfinished() and not self.scheduler.num_handed_off and not self.num_reserved:
                raise RuntimeError("the scheduler made no progress with requests pending")
            return None
        # The new step is queued before the last one's tokens are read, so the device never
        # waits for the host; it is in flight until read (a failure reading the last one
        # leaves it there for the next call).
        launched = self._launch(batch)
        in_flight, self._in_flight = self._in_flight, launched
        waits_for_launched = batch.is_prefill or not self.overlap
        try:
            stepped = self._complete(in_flight) if in_flight is not None else []
        except StepFailed as e:
            if not waits_for_launched:
                raise
            # The step just launched is never read: its requests fail with the last one's, not
            # go on to decode from tokens that never came back.
            self._in_flight = None
            raise self._step_failed(e.request_ids, batch, e.__cause__) from e.__cause__
        if waits_for_launched:
            self._in_flight = None
            stepped += self._complete(launched)
        return stepped

    def _launch(self, batch: Batch) -> LaunchedStep:
        if batch.is_prefill:
            self.num_prefill_tokens_computed += sum(batch.num_new_tokens)
            work = [(n, seq.num_computed_tokens + n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        else:
            work = (len(batch.seqs), sum(seq.num_tokens for seq in batch.seqs))
        started = time.perf_counter()
        try:
            tokens = self.runner.launch(batch)
        except Exception as e:
            raise self._step_failed([], batch, e) from e
        self.scheduler.advance(batch, tokens.rows)
        if batch.is_prefill and self.on_prompts_completing is not None and tokens.rows:
            self.on_prompts_completing([batch.seqs[row] for row in tokens.rows])
        return LaunchedStep(batch, tokens, started, work)

    def _complete(self, step: LaunchedStep) -> list[Sequence]:
        """Waits for a launched step's tokens and hands them to the scheduler."""
        if self.while_step_runs is not None:
            while not step.tokens.ready() and self.while_step_runs():
                pass
        try:
            sampled = step.tokens.wait()
        except Exception as e:
            raise self._step_failed([], step.batch, e) from e
        ended = time.perf_counter()
        decode = not step.batch.is_prefill
        # What a token costs a running sequence is the whole period from one decode step to the
        # next: a serving loop works between steps (sockets, streaming tokens out, taking KV
        # in), and that time counts toward TPOT as much as the forward pass does. Overlapped
        # steps are launched before the last one ends: the period is the time between their ends.
        since = (self._decoding_since if decode and self._decoding_since is not None
                 else max(step.started, self._last_completed))
        self.step_times.record("decode" if decode else "prefill", ended - since)
        if self.cost_model is not None:
            if decode:
                self.cost_model.observe_decode(*step.work, ended - since)
            else:
                self.cost_model.observe_prefill(step.work, ended - since)
        stepped = self.scheduler.resolve(step.batch, sampled)
        self._last_completed = ended
        self._decoding_since = ended if decode and self.scheduler.running else None
        return stepped

    def _step_failed(self, request_ids: list[str], batch: Batch, cause: BaseException) -> StepFailed:
        """The failure of a batch (after `request_ids`, failed already). The KV its blocks were
        to receive may never have been written, so no later prompt may match them as a prefix."""
        self.block_manager.forget_blocks(b for seq in batch.seqs for b in seq.block_table)
        return StepFailed(request_ids + [seq.request_id for seq in batch.seqs], cause)

    def warm_up(self) -> float:
        """Runs one prefill step of the full token budget (as far as half the KV cache holds)
        and a decode step of it, then every other attention shape with kernels of its own
        (`ModelRunner.run_attention_variants`) and the sampler's top-k/top-p filter, before any
        request: a GPU kernel compiles on first use, and a serving loop that met that on a
        request stalled for over a second (an 8192-token step on an H100 and on an H200, once
        per machine); and the scheduling policies' compiled loops (`kairos.scheduler.native`).
        Distinct random prompts, so the step is all new tokens; neither the calibration, the
        step times, the prefill counter, the decode policy's output lengths nor the prefix cache
        keeps anything of it. Returns the seconds it took."""
        started = time.perf_counter()
        total = min(self.config.max_num_batched_tokens, self.num_total_blocks // 2 * self.config.block_size)
        per_prompt = max(1, min(total, self.max_model_len - 2))
        lengths = [per_prompt] * (total // per_prompt) + ([total % per_prompt] if total % per_prompt else [])
        if not lengths:
            return 0.0
        rng = random.Random(0)
        vocab = self.model_config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
        calibrated, self.cost_model = self.cost_model, None
        computed = self.num_prefill_tokens_computed
        # A prefill worker's engine hands sequences off after their first token: here they
        # decode too, so that the decode kernels are warm as well.
        hands_off, self.scheduler.prefill_only = self.scheduler.prefill_only, False
        self.scheduler.learns_output_lengths = False
        try:
            self.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True, temperature=0))
            self.runner.run_attention_variants()
            self.runner.run_sampler_variants()
            native.warm_up()  # the policies' compiled loops, which long queues use
        finally:
            self.cost_model, self.num_prefill_tokens_computed = calibrated, computed
            self.scheduler.prefill_only = hands_off
            self.scheduler.learns_output_lengths = True
            self._decoding_since = None
            self.step_times = StepTimes()
            self.block_manager.forget_prefixes()
        return time.perf_counter() - started

    # ---- offline API ----------------------------------------------------------------------

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        # Validate everything before any work starts.
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, params)]
        for seq in seqs:
            self.scheduler.add(seq)
        with tqdm(total=len(seqs), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while self.has_unfinished():
                bar.update(sum(seq.is_finished for seq in self.step() or ()))
        return [self._output(seq) for seq in seqs]

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, seq.text,
                             seq.output_token_ids, seq.finish_reason.value, seq.num_cached_tokens)

    @torch.inference_mode()
    def prompt_logits(self, prompts: Prompt | list[Prompt]) -> list[torch.Tensor]:
        """Float32 logits at every prompt position, [len, vocab] per prompt, from one batched
        prefill (reusing cached prefixes where they exist). For teacher-forced comparisons."""
        seqs = [self.make_sequence(p, SamplingParams(max_tokens=1)) for p in _as_prompt_list(prompts)]
        try:
            for seq in seqs:
                self.block_manager.match_prefix(seq)
                n = seq.num_uncomputed_tokens
                if not self.block_manager.can_allocate(seq, n):
                    raise RuntimeError("not enough free KV blocks for these prompts at once")
                self.block_manager.allocate(seq, n)
            batch = Batch(True, seqs, [s.num_uncomputed_tokens for s in seqs])
            return list(self.runner.forward_logits(batch, all_logits=True).split(batch.num_new_tokens))
        except BaseException:
            # Blocks registered for KV the forward pass did not write must not serve a prefix.
            self.block_manager.forget_blocks(b for seq in seqs for b in seq.block_table)
            raise
        finally:
            for seq in seqs:
                if seq.block_table:
                    self.block_manager.free_sequence(seq)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_total_blocks


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    return prompts
