"""Render conversations to text with the tokenizer's chat template (or a plain fallback)."""

from __future__ import annotations

import sys
from typing import Any

from jaxalign.errors import ConfigError, DataError
from jaxalign.models.config import GEMMA_MODEL_TYPES

# Used when the tokenizer has no chat template, or with --template plain.
PLAIN_TEMPLATE: str = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'assistant: ' + message['content'] + (eos_token if eos_token else '') + '\\n' }}"
    "{% else %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

# Gemma's turns (as Google's Gemma chat templates): the assistant is "model", a system message is prepended to
# the first user turn, every turn ends "<end_of_turn>\n" (Gemma's stop token; see data.tokenizer.stop_token_ids).
GEMMA_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content']"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_END_OF_TURN = "<end_of_turn>"

TEMPLATE_CHOICES: tuple[str, ...] = ("default", "plain", "gemma")


class ChatRenderer:
    """Renders message lists to text; ``template`` None/"default" uses the tokenizer's own, or when it has
    none the Gemma template for a Gemma ``model_type`` and the plain one otherwise."""

    def __init__(self, tokenizer: Any, template: str | None = None, *, model_type: str | None = None):
        if template not in (None, *TEMPLATE_CHOICES):
            raise ConfigError(
                f"--template {template!r}: choose 'default' (the tokenizer's chat template), 'plain' or 'gemma'"
            )
        if template == "default":
            template = None
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        if template is None and not own and model_type in GEMMA_MODEL_TYPES:
            template = "gemma"
        self.uses_plain = template == "plain" or (template is None and not own)
        self.uses_gemma = template == "gemma"
        self.chat_template: str | None = (
            PLAIN_TEMPLATE if self.uses_plain else GEMMA_TEMPLATE if self.uses_gemma else None
        )
        if template is None and self.uses_plain:
            _notice_plain_fallback(tokenizer)
        self._renders_tools: bool | None = None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool, where: str = "",
               tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation as text (``add_generation_prompt`` opens an assistant turn), with ``tools`` (function
        definitions) rendered where the chat template puts them; a template that ignores them is an error."""
        text = self._render(messages, add_generation_prompt, where, tools)
        if tools:
            if self._renders_tools is None:  # a property of the template: checked on its first row with tools
                self._renders_tools = text != self._render(messages, add_generation_prompt, where, None)
            if not self._renders_tools:
                prefix = f"{where}: " if where else ""
                raise DataError(f'{prefix}the row has "tools" but the chat template does not render them (the plain '
                                f'and gemma templates do not); use a model whose template takes tools, or drop the '
                                f'column')
        return text

    def _render(self, messages, add_generation_prompt: bool, where: str, tools) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                **extra,
            )
        except Exception as e:  # jinja's raise_exception and friends
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            prefix = f"{where}: " if where else ""
            raise DataError(
                f"{prefix}the chat template refused this conversation ({msg}); fix the row or pass --template plain"
            ) from None
        if not isinstance(text, str):  # some versions return a list for batched input
            text = text[0]
        return text

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` (templates already place BOS/EOS, so no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


_NOTICED: set[str] = set()


def _notice_plain_fallback(tokenizer: Any) -> None:
    """One stderr line per tokenizer and process: it has no chat template, so the plain one is used."""
    name = str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    if name in _NOTICED:
        return
    _NOTICED.add(name)
    print(f"jaxalign: note: {name} has no chat template; rendering conversations with the plain template "
          "('role: content' lines); pass --template plain to choose it explicitly", file=sys.stderr)
