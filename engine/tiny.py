"""The built-in `tiny` model: a small Llama with deterministic random weights and a byte-level
BPE tokenizer trained here, written in Hugging Face format to a cache folder on first use.

It needs no network and no download, so the demo and the tests run anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    import torch

# Bump when the tiny model's weights, shapes or tokenizer change, so stale caches are not reused.
TINY_VERSION = 2
SEED = 1234
BOS, EOS = "<|begin|>", "<|end|>"
# A plain "role: content" chat, so that the chat endpoint of the HTTP API serves the tiny model.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
}

CORPUS = """\
Kairos serves large language models under latency targets. A request arrives with a prompt and
two deadlines: the time to its first token and the time between the tokens that follow. The
prefill worker reads the whole prompt at once and writes its keys and values into a paged cache;
the decode worker then produces one token per step for every request in its batch.
Scheduling decides who goes first. A short prompt stuck behind a long one misses its deadline
for no good reason, and a decode batch that grows too large slows every request inside it.
The quick brown fox jumps over the lazy dog. The weather today is clear and the river is calm.
Once upon a time there was a small model that learned to count: one, two, three, four, five.
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
Numbers like 3.14159 and 2.71828 appear in many places; so do dates such as 2024-01-31.
Caf\u00e9, na\u00efve, \u00fcber, \u00e5ngstr\u00f6m, \u65e5\u672c\u8a9e, \U0001f600 and other characters take more than one byte.
"""


def cache_dir() -> Path:
    root = os.environ.get("KAIROS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kairos"
    )
    return Path(root)


def tiny_model_path() -> Path:
    """The tiny model's folder, written on first use. Safe against concurrent first uses."""
    path = cache_dir() / f"tiny-v{TINY_VERSION}"
    if (path / "model.safetensors").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        write_tiny_model(staging)
        os.rename(staging, path)  # atomic: readers see all of it or none of it
    except OSError:
        if not (path / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return tok


def tiny_weights(cfg: dict) -> dict[str, torch.Tensor]:
    # Imported here: the HTTP API reads the tiny model's tokenizer settings without torch.
    import torch

    gen = torch.Generator().manual_seed(SEED)

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    def gain(size):
        return 1.0 + normal(size, std=0.1)

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg["head_dim"]
    q_size = cfg["num_attention_heads"] * head_dim
    kv_size = cfg["num_key_value_heads"] * head_dim
    weights = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": gain(hidden),
            p + "self_attn.q_proj.weight": normal(q_size, hidden, std=hidden**-0.5),
            p + "self_attn.k_proj.weight": normal(kv_size, hidden, std=hidden**-0.5),
            p + "self_attn.v_proj.weight": normal(kv_size, hidden, std=hidden**-0.5),
            p + "self_attn.o_proj.weight": normal(hidden, q_size, std=q_size**-0.5),
            p + "post_attention_layernorm.weight": gain(hidden),
            p + "mlp.gate_proj.weight": normal(inter, hidden, std=hidden**-0.5),
            p + "mlp.up_proj.weight": normal(inter, hidden, std=hidden**-0.5),
            p + "mlp.down_proj.weight": normal(hidden, inter, std=inter**-0.5),
        })
    weights["model.norm.weight"] = gain(hidden)
    weights["lm_head.weight"] = normal(cfg["vocab_size"], hidden, std=hidden**-0.5)
    return weights


def write_tiny_model(path: Path) -> None:
    tok = train_tokenizer(CONFIG["vocab_size"])
    assert tok.get_vocab_size() == CONFIG["vocab_size"], "corpus too small for the vocabulary"
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": CONFIG["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}, indent=2))
    from safetensors.torch import save_file

    save_file(tiny_weights(CONFIG), str(path / "model.safetensors"), metadata={"format": "pt"})
