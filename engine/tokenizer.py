"""Tokenizer loading (tokenizer.json via the `tokenizers` library) and incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from kairos.engine.config import ConfigError


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"no tokenizer.json in {path}")
        self._tok = HFTokenizer.from_file(str(file))
        self.eos_token_ids: tuple[int, ...] = ()
        config_file = file.parent / "tokenizer_config.json"
        if config_file.exists():
            eos = json.loads(config_file.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            eos_id = self._tok.token_to_id(eos) if eos else None
            if eos_id is not None:
                self.eos_token_ids = (eos_id,)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch call releases the GIL (a single encode holds it throughout): a worker's
        # heartbeat thread keeps beating while a long prompt is tokenized. A 4-million-character
        # prompt once silenced a worker long enough for the router to drop it.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A token can end in the middle of a multi-byte character, and some tokenizers render a token
    differently at the start of a string (a dropped leading space). So each step decodes a short
    window that begins a few tokens back, and emits only the text past what that window already
    produced, holding back while the text ends in an incomplete character.

    A character whose bytes straddle the end of the prompt (a prompt given as token ids can end
    inside one) belongs to the output: the output's text is the characters it completes.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Emits the text held back, an incomplete last character as U+FFFD (as a decode of the
        whole output would show it): called when the output ends."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if hold_incomplete and window.endswith("\ufffd"):
            return ""
        start = len(prefix)
        if prefix.endswith("\ufffd") and not window.startswith(prefix):
            # Only the prompt's window can end in an incomplete character (an output window is
            # held until complete); the output completed it, so the character is the output's.
            start -= 1
        if len(window) <= start:
            return ""
        delta = window[start:]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
