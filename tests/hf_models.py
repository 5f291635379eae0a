"""Tiny random-weight Hugging Face checkpoints of each supported architecture, made by the tests."""

from __future__ import annotations

import torch

VOCAB = 320

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
    bos_token_id=1, eos_token_id=2,
)


def make_config(arch: str, **overrides):
    """overrides: config fields other than COMMON's (sizes, say)."""
    import transformers as tf

    common = {**COMMON, **overrides}
    if arch == "llama":
        # llama3 scaling with a short original context, so the scaled band matters at these lengths
        return tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        # head_dim 24 differs from hidden / heads = 8
        return tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
    raise ValueError(arch)


def make_checkpoint(arch: str, path, seed: int = 0, dtype=torch.float32, **overrides):
    """Writes a random-weight checkpoint to path and returns the transformers model."""
    import transformers as tf

    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype).eval()
    with torch.no_grad():
        # The default init is too flat to tell positions apart; widen it so attention matters.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model
