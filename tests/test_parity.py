"""The engine against transformers on the same random weights: logits, greedy tokens, and both
again through the prefix cache."""

import importlib.util
import os

import pytest
import torch
from hf_models import VOCAB, make_checkpoint

from kairos.engine import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
# The Triton kernels (in the interpreter on CPU) must give the same answers as the reference.
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
# In the interpreter a Triton run takes a minute, so there the backend runs on the architectures
# whose kernel launches differ: llama (head_dim 8) and qwen3 (head_dim 24, q/k norms). Mistral's
# and qwen2's are llama's on the same shapes (qwen2's biases and tied head go through torch's
# matmul); on a GPU all four run.
KERNEL_TWINS = {"mistral": "llama", "qwen2": "llama"} if os.environ.get("TRITON_INTERPRET") == "1" else {}
# Lengths around the 16-token block size, a single token, and several blocks.
LENGTHS = [1, 15, 16, 17, 33, 50]
# Tokens each greedy comparison decodes: 17 write the KV of 16 new positions, so every prompt's
# decode crosses into a block of its own (the 1-token prompt's last, the 16-token one's first).
NEW_TOKENS = 17


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(request.param, path, seed=ARCHS.index(request.param))
    return request.param, path, hf


def random_prompts(seed, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_logits(hf, prompt):
    return hf(torch.tensor([prompt])).logits[0].float()


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def skip_kernel_twin(arch, backend):
    if backend == "triton" and arch in KERNEL_TWINS:
        pytest.skip(f"interpreted: {arch} launches the kernels {KERNEL_TWINS[arch]} does, on the same shapes")


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_config_is_read_as_transformers_reads_it(checkpoint):
    arch, path, hf = checkpoint
    llm = LLM(str(path), num_kv_blocks=64)
    cfg = llm.model_config
    assert cfg.num_kv_heads < cfg.num_heads  # GQA
    assert cfg.num_heads * cfg.head_dim == hf.model.layers[0].self_attn.q_proj.out_features
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    if arch == "llama":
        assert cfg.rope_scaling["rope_type"] == "llama3"
    if arch == "qwen3":
        assert cfg.qk_norm and cfg.head_dim * cfg.num_heads != cfg.hidden_size
    if arch == "qwen2":
        assert cfg.qkv_bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 4])
def test_logits_match_at_every_position(checkpoint, block_size, backend):
    arch, path, hf = checkpoint
    skip_kernel_twin(arch, backend)
    llm = LLM(str(path), num_kv_blocks=128, block_size=block_size, enable_prefix_caching=False, backend=backend)
    prompts = random_prompts(1)
    ours = llm.prompt_logits(prompts)
    for prompt, logits in zip(prompts, ours):
        assert logits.shape == (len(prompt), VOCAB)
        assert rel_err(logits, hf_logits(hf, prompt)) < 1e-4
    assert llm.num_free_blocks == llm.num_total_blocks


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_tokens_match_generate(checkpoint, backend):
    arch, path, hf = checkpoint
    skip_kernel_twin(arch, backend)
    llm = LLM(str(path), num_kv_blocks=64, backend=backend)
    prompts = random_prompts(2)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS)
        assert out.finish_reason == "length"
    assert llm.num_free_blocks == llm.num_total_blocks


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_hit_gives_the_same_output_with_less_compute(checkpoint, backend):
    arch, path, hf = checkpoint
    skip_kernel_twin(arch, backend)
    llm = LLM(str(path), num_kv_blocks=64, backend=backend)
    prefix, tail_a, tail_b = random_prompts(3, [40, 7, 11])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    first = llm.generate(prefix + tail_a, params)[0]
    assert first.num_cached_tokens == 0
    computed_before = llm.num_prefill_tokens_computed
    second = llm.generate(prefix + tail_b, params)[0]
    computed = llm.num_prefill_tokens_computed - computed_before
    assert second.num_cached_tokens == 32  # the two full 16-token blocks of the shared prefix
    assert computed == len(prefix + tail_b) - 32
    assert first.token_ids == hf_greedy(hf, prefix + tail_a, NEW_TOKENS)
    assert second.token_ids == hf_greedy(hf, prefix + tail_b, NEW_TOKENS)
    # Logits of a prompt read partly from the cache: prefill with a cached prefix.
    (suffix_logits,) = llm.prompt_logits([prefix + tail_a])
    assert suffix_logits.shape[0] == len(prefix + tail_a) - 32
    assert rel_err(suffix_logits, hf_logits(hf, prefix + tail_a)[32:]) < 1e-4
    assert llm.num_free_blocks == llm.num_total_blocks
