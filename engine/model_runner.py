"""Owns the model and its KV cache on one device: builds the inputs of a step, runs the forward
pass and samples."""

from __future__ import annotations

import logging

import torch

from kairos.engine.config import EngineConfig, ModelConfig
from kairos.engine.context import AttentionContext
from kairos.engine.cuda_graphs import DecodeGraphs
from kairos.engine.loader import init_dummy_weights, load_weights
from kairos.engine.model import CausalLM, rope_cos_sin_cache
from kairos.engine.sampler import Sampler
from kairos.engine.sequence import Sequence
from kairos.engine.step_inputs import DecodeInputs, PrefillInputs
from kairos.engine.step_scheduler import Batch
from kairos.kernels import get_backend
from kairos.scheduler.request import SamplingParams

log = logging.getLogger("kairos")


class ModelRunner:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, max_model_len: int):
        self.model_config = model_config
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype(model_config)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.model = self._build_model()
        self.num_blocks = self._allocate_kv_cache()
        self.sampler = Sampler(self.device, config.seed, self.backend.top_k_top_p_cutoff)
        self.prefill_inputs = PrefillInputs(self.device)
        self.decode_inputs = DecodeInputs(config.max_num_seqs, -(-max_model_len // self.block_size),
                                          self.block_size, self.device)
        self.graphs = self._capture_decode_graphs()

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        """Decode replays CUDA graphs unless told not to (--enforce-eager), off CUDA, on a
        prefill worker (which decodes nothing), or with a backend whose steps cannot be
        captured (see `kairos.kernels`)."""
        cfg = self.config
        if self.device.type != "cuda" or cfg.enforce_eager or cfg.role == "prefill" or not self.backend.capturable:
            return None
        graphs = DecodeGraphs(self.model, self.decode_inputs)
        graphs.capture()
        return graphs

    def _build_model(self) -> CausalLM:
        self.backend = get_backend(self.config.backend, self.device.type, self.config.skinny_matmul_tokens)
        with torch.device("meta"):
            model = CausalLM(self.model_config, self.backend)
        model = model.to(dtype=self.dtype).to_empty(device=self.device)
        model.tie_weights()
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed)
        else:
            load_weights(model, self.model_config.path)
        model.cos_sin_cache = rope_cos_sin_cache(self.model_config, self.max_model_len, self.device)
        return model.eval().requires_grad_(False)

    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def _allocate_kv_cache(self) -> int:
        cfg = self.model_config
        per_block = self.kv_bytes_per_block()
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            num_blocks = self._blocks_fitting_gpu_memory(per_block)
        else:
            # CPU: a fixed budget, but no more than every sequence at full length could use.
            budget_blocks = int(self.config.cpu_kv_cache_gb * 2**30) // per_block
            num_blocks = min(budget_blocks, self.config.max_num_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens, fewer than the "
                f"{blocks_per_seq} one sequence of max_model_len={self.max_model_len} needs; "
                "raise the KV memory or lower --max-model-len"
            )
        shape = (2, cfg.num_layers, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        # On a CPU, untouched pages of an empty tensor are not committed: the cache would grow
        # the process by a block's pages each time serving first writes one (450 MB to 1.6 GB
        # over 4,000 requests with the default 1 GiB), and each first touch faults mid-step.
        # Zeroing commits it all at start-up. GPU memory is committed when allocated.
        alloc = torch.zeros if self.device.type == "cpu" else torch.empty
        self.kv_cache = alloc(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                 num_blocks * per_block / 2**20)
        return num_blocks

    def _blocks_fitting_gpu_memory(self, per_block: int) -> int:
        """Blocks that fit in gpu_memory_utilization of the device, after the weights and the
        activations of the largest prefill step (measured by running one)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        self._profile_forward(num_tokens)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.gpu_memory_utilization - used_by_others - peak
        torch.cuda.empty_cache()
        return max(0, int(budget) // per_block)

    @torch.inference_mode()
    def _profile_forward(self, num_tokens: int) -> None:
        """A prefill of num_tokens over a throwaway one-block-per-layer cache, for its memory peak."""
        cfg = self.model_config
        scratch = torch.zeros((2, cfg.num_layers, 1, self.block_size, cfg.num_kv_heads, cfg.head_dim),
                              dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = scratch[0, i], scratch[1, i]
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device)
        ctx = AttentionContext(True, torch.full_like(ids, -1), cu, cu, num_tokens)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), ctx)
        self.model.compute_logits(hidden[-1:])

    @torch.inference_mode()
    def run_attention_variants(self) -> None:
        """One forward pass of each attention shape that takes kernels of its own: a prefill
        over a cached prefix (as a chunked prompt's later chunks are), and a decode step at the
        shortest and at the longest context (the decode kernel splits a long one's keys and
        merges the parts). A GPU kernel compiles on first use, and these may first come up
        mid-serving. The passes read block 0 over and over and store nothing."""
        one = self._tensor([0])
        nowhere = self._tensor([-1])
        prefix_len = min(2 * self.block_size, self.max_model_len)  # positions the RoPE table holds
        self.model(one, self._tensor([prefix_len - 1]), AttentionContext(
            is_prefill=True, slot_mapping=nowhere, cu_seqlens_q=self._tensor([0, 1], torch.int32),
            cu_seqlens_k=self._tensor([0, prefix_len], torch.int32), max_seqlen_q=1,
            block_tables=self._tensor([[0, 0]], torch.int32)))
        for context_len in (1, self.max_model_len):
            blocks = -(-context_len // self.block_size)
            self.model(one, self._tensor([context_len - 1]), AttentionContext(
                is_prefill=False, slot_mapping=nowhere, block_tables=self._tensor([[0] * blocks], torch.int32),
                context_lens=self._tensor([context_len], torch.int32)))

    @torch.inference_mode()
    def run_sampler_variants(self) -> None:
        """One draw through the top-k and top-p filter, whose GPU kernels compile on first use
        (one variant serves every batch)."""
        logits = torch.zeros(1, self.model_config.vocab_size, device=self.device)
        self.sampler(logits, [SamplingParams(temperature=1.0, top_k=1, top_p=0.5)], [0])

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(
            self.device, non_blocking=True)

    def _decode_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        n = len(seqs)
        if self.graphs is not None and n <= self.graphs.max_batch:
            rows = self.graphs.bucket(n)
            self.decode_inputs.fill(seqs, rows)
            return self.graphs.replay(rows)[:n]
        self.decode_inputs.fill(seqs, n)
        return self.model.compute_logits(self.model(*self.decode_inputs.forward_args(n)))

    @torch.inference_mode()
    def forward_logits(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """Float32 logits of the rows that sample (every prompt row with all_logits)."""
        if not batch.is_prefill:
            return self._decode_logits(batch.seqs)
        rows, offset = [], 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if all_logits:
                rows += range(offset, offset + n)
            elif batch.samples(seq, n):
                rows.append(offset + n - 1)
            offset += n
        ids, positions, ctx, logit_rows = self.prefill_inputs.build(batch.seqs, batch.num_new_tokens,
                                                                    self.block_size, rows)
        hidden = self.model(ids, positions, ctx)
        if not rows:
            return hidden.new_empty((0, self.model_config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[logit_rows])

    def launch(self, batch: Batch) -> SampledTokens:
        """Queues one step on the device, sampling included, and returns at once (on a GPU):
        its tokens reach the host through `SampledTokens.wait()`."""
        logits = self.forward_logits(batch)
        rows = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)) if batch.samples(s, n)]
        if not rows:
            return SampledTokens(None, rows, len(batch.seqs))
        sampling = [batch.seqs[i] for i in rows]
        token_ids = self.sampler(logits, [s.params for s in sampling], [s.num_output_tokens for s in sampling])
        if not batch.is_prefill:
            self.decode_inputs.keep_sampled(token_ids)
        return SampledTokens(token_ids, rows, len(batch.seqs))

    def run(self, batch: Batch) -> list[int | None]:
        """One step, waited for: a sampled token per sequence, None where the prompt is not done."""
        return self.launch(batch).wait()


class SampledTokens:
    """A step's sampled ids on their way to the host: one non-blocking copy into pinned memory,
    and an event that says when it has landed."""

    def __init__(self, token_ids: torch.Tensor | None, rows: list[int], batch_size: int):
        self.rows, self.batch_size = rows, batch_size
        self.host = self.landed = None
        if token_ids is not None:
            on_cuda = token_ids.device.type == "cuda"
            self.host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=on_cuda)
            self.host.copy_(token_ids, non_blocking=on_cuda)
            if on_cuda:
                self.landed = torch.cuda.Event()
                self.landed.record()

    def ready(self) -> bool:
        """Whether the tokens have reached the host (a step on the CPU is done once launched)."""
        return self.landed is None or self.landed.query()

    def wait(self) -> list[int | None]:
        """A token per sequence of the batch (None for those that sampled nothing)."""
        tokens: list[int | None] = [None] * self.batch_size
        if self.host is not None:
            if self.landed is not None:
                self.landed.synchronize()
            for row, token in zip(self.rows, self.host.tolist()):
                tokens[row] = token
        return tokens
