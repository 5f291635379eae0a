"""The built-in tiny model and the tokenizer path."""

import filecmp

import pytest
from tokenizers import pre_tokenizers

from kairos.engine.sequence import FinishReason, Sequence
from kairos.engine.tiny import write_tiny_model
from kairos.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kairos.scheduler.request import SamplingParams


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


def utf8_length_of(tok: Tokenizer, ids: list[int]) -> int:
    """How many UTF-8 bytes the byte-level tokens stand for: each character of a token's string is
    one byte (the ByteLevel alphabet has 256 characters)."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    strings = [tok._tok.id_to_token(i) for i in ids if i not in tok._tok.get_added_tokens_decoder()]
    assert all(set(s) <= alphabet for s in strings)
    return sum(len(s) for s in strings)


def test_a_character_split_by_the_end_of_the_prompt_belongs_to_the_output(tiny_path):
    # A prompt given as token ids can end inside a multi-byte character; the output's text is
    # every character it completes, so no character is lost or repeated at any cut.
    tok = Tokenizer(tiny_path)
    text = "Héllo wörld 日本語 😀 café"
    ids = tok.encode(text)
    cuts_inside_a_character = 0
    for cut in range(1, len(ids)):
        prompt_bytes = utf8_length_of(tok, ids[:cut])
        chars_in_prompt = 0
        while len(text[: chars_in_prompt + 1].encode()) <= prompt_bytes:
            chars_in_prompt += 1
        cuts_inside_a_character += len(text[:chars_in_prompt].encode()) < prompt_bytes
        detok = IncrementalDetokenizer(tok, ids[:cut])
        deltas = [detok.push(t) for t in ids[cut:]]
        assert "".join(deltas) == detok.text == text[chars_in_prompt:], cut
    assert cuts_inside_a_character >= 3  # the case under test occurs


def test_an_output_ending_inside_a_character_shows_it_as_a_replacement_when_it_finishes(tiny_path):
    tok = Tokenizer(tiny_path)
    ids = tok.encode("ok 日本", add_special_tokens=False)
    prompt = tok.encode("prompt")
    for max_tokens in range(1, len(ids) + 1):
        seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens, temperature=0),
                       detokenizer=IncrementalDetokenizer(tok, prompt))
        reasons = [seq.append_token(t, max_model_len=1024) for t in ids[:max_tokens]]
        assert reasons[-1] is FinishReason.LENGTH
        assert seq.text == tok.decode(ids[:max_tokens])
    assert "\ufffd" in tok.decode(ids[:-1])  # some output above ended inside a character
