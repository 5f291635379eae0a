"""The built-in tiny model and the tokenizer path."""

import filecmp

import pytest

from kairos.engine.tiny import write_tiny_model
from kairos.engine.tokenizer import IncrementalDetokenizer, Tokenizer


def test_tiny_model_is_written_identically_every_time(tmp_path, tiny_path):
    write_tiny_model(tmp_path)
    for name in ("config.json", "tokenizer.json", "model.safetensors", "generation_config.json"):
        assert filecmp.cmp(tmp_path / name, tiny_path / name, shallow=False), name


def test_tiny_folder_loads_in_transformers(tiny_path):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_path)
    text = "Hello world, café 日本語"
    assert hf_tok(text).input_ids == Tokenizer(tiny_path).encode(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_path)
    assert model.config.num_key_value_heads == 2


@pytest.mark.parametrize("text", ["plain words and numbers 3.14", "naïve café über 日本語 😀 end", "  spaced\n\nlines"])
def test_incremental_detokenizer_reassembles_multibyte_text(tiny_path, text):
    tok = Tokenizer(tiny_path)
    ids = tok.encode(text)[1:]  # drop the BOS the encoder adds
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
