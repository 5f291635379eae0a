"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

The layers hold no attention state of their own: each forward pass receives an
AttentionContext, and the runner hands every Attention layer its slice of the KV cache.
Q/K/V and gate/up projections are packed into single matmuls; the loader fills them from the
separate Hugging Face tensors.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from kairos.engine.config import ModelConfig
from kairos.engine.context import AttentionContext


class Linear(nn.Linear):
    """nn.Linear without its random init: the model is built on the meta device and the loader
    (or the dummy init) fills every weight. The init on meta tensors also imports torch's
    compiler stack, about 2 s of every engine's start."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without its random init, as Linear."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: SimpleNamespace):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: SimpleNamespace):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None
        self.ops = ops
        self.k_cache = self.v_cache = torch.empty(0)  # set by the runner once the pool exists

    def forward(self, positions, qkv, ctx: AttentionContext, cos_sin_cache):
        """qkv: the packed projection of the normalized input (the layer computes it with its norm)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        self.ops.rope_and_store_kv(positions, q, k, v, cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill:
            o = self.ops.prefill_attention(
                q, k, v, self.k_cache, self.v_cache,
                ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.block_tables, self.scale, ctx.max_seqlen_q,
            )
        else:
            o = self.ops.decode_attention(
                q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens, self.scale
            )
        return self.ops.linear(o.reshape(-1, self.q_size), self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: SimpleNamespace):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.ops = ops

    def forward(self, gate_up):
        """gate_up: the packed projection of the normalized input (the layer computes it with its norm)."""
        return self.ops.silu_and_mul_linear(gate_up, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: SimpleNamespace):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)
        self.ops = ops

    def forward(self, positions, hidden, residual, ctx, cos_sin_cache):
        # Each block's norm (with the residual add) and its input projection are one op: one
        # launch in a decode step that the skinny matmul takes.
        qkv, residual = self._norm_and_project(hidden, residual, self.input_layernorm, self.self_attn.qkv_proj)
        hidden = self.self_attn(positions, qkv, ctx, cos_sin_cache)
        gate_up, residual = self._norm_and_project(hidden, residual, self.post_attention_layernorm,
                                                   self.mlp.gate_up_proj)
        return self.mlp(gate_up), residual

    def _norm_and_project(self, hidden, residual, norm: RMSNorm, proj: Linear):
        return self.ops.rms_norm_linear(hidden, residual, norm.weight, norm.eps, proj.weight, proj.bias)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: SimpleNamespace):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class CausalLM(nn.Module):
    """The decoder plus its LM head; Hugging Face parameter names, with q/k/v and gate/up packed."""

    # HF tensor name suffix -> (packed parameter name, shard index)
    PACKED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, ops: SimpleNamespace):
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.model = DecoderModel(cfg, ops)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cos_sin_cache = torch.empty(0)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def shard_sizes(self, packed_name: str) -> list[int]:
        cfg = self.config
        if packed_name == "qkv_proj":
            kv = cfg.num_kv_heads * cfg.head_dim
            return [cfg.num_heads * cfg.head_dim, kv, kv]
        return [cfg.intermediate_size, cfg.intermediate_size]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext):
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual, ctx, self.cos_sin_cache)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head.weight).float()


def rope_cos_sin_cache(cfg: ModelConfig, max_positions: int, device) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos then sin of position * inverse frequency."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None and scaling["rope_type"] == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band between them interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > original_len / low
    short_wave = wavelen < original_len / high
    scaled = torch.where(long_wave, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    return torch.where(~long_wave & ~short_wave, interpolated, scaled)
