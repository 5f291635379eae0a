"""Chat templates: a conversation rendered to one prompt with the model's own Jinja template, as
transformers renders it (a sandboxed environment, blocks trimmed, the tokenizer's special tokens
and `raise_exception` in scope), so that a model chats here as it was trained to.

The template comes from the model folder's `chat_template.jinja`, or else the `chat_template` of
its `tokenizer_config.json`. The rendered text holds the template's special tokens (a BOS), so
it is tokenized without adding them again."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A conversation the template refuses (it raised), or a template that does not render."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationMarks(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks the assistant's text for
    training masks: rendering a prompt renders what it encloses."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _GenerationMarks])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template does not compile: {e}") from None
        self.special_tokens = special_tokens

    @classmethod
    def for_model(cls, model: str) -> ChatTemplate | None:
        """The chat template of `model` (a Hugging Face model folder, or "tiny"), or None if it
        has none."""
        if model == "tiny":
            from kairos.engine import tiny

            return cls(tiny.CHAT_TEMPLATE, {"bos_token": tiny.BOS, "eos_token": tiny.EOS})
        folder = Path(model)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        special = {name: _token_text(value) for name, value in config.items()
                   if name.endswith("_token") and _token_text(value) is not None}
        if (folder / "chat_template.jinja").exists():
            return cls((folder / "chat_template.jinja").read_text(), special)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one serves plain chat
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        return cls(source, special) if isinstance(source, str) else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt of a conversation (messages with `role` and text `content`), with `extra`
        values for the template (a request's chat_template_kwargs); raises ChatTemplateError if
        the template refuses it. `tools` and `documents` are None unless given, as transformers
        passes them: a template testing `tools is not none` must not see them as given."""
        try:
            return self.template.render(**{"tools": None, "documents": None, **self.special_tokens, **extra,
                                           "messages": messages, "add_generation_prompt": add_generation_prompt})
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: its text, or a map with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
