"""Turning a prompt text into the token ids a model sees (docs/engines.md).

Base models get the raw text (tokenised with the tokenizer's own special tokens, e.g. one
BOS). Instruct models get the chat template (one user turn, generation prompt on, thinking
off where supported unless ``enable_thinking``); the templated string already holds its BOS,
so it is tokenised WITHOUT adding special tokens again (the double-BOS defect of the original
code).
"""

from __future__ import annotations

from typing import Any

from canopy_entropy.errors import CanopyError
from canopy_entropy.run.layout import VARIANTS


def render_prompt(
    tokenizer: Any, text: str, variant: str, enable_thinking: bool = False
) -> tuple[str, list[int]]:
    """Return ``(rendered_text, token_ids)`` for ``text`` as the ``variant`` model sees it;
    ``enable_thinking`` is passed to the chat template (thinking-mode models branch on it)."""
    if variant not in VARIANTS:
        raise CanopyError(f"unknown variant '{variant}'; use one of {list(VARIANTS)}")
    if variant == "base":
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        return text, ids
    if not getattr(tokenizer, "chat_template", None):
        raise CanopyError(
            "variant 'instruct' needs a tokenizer with a chat template, and this one has none; "
            "use --variant base or a tokenizer that ships a chat template"
        )
    messages = [{"role": "user", "content": text}]
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
    except TypeError:  # pragma: no cover - templates without extra kwargs support
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return rendered, ids
