"""The prompt record shared by tasks, engines and the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task. ``id`` is stable across runs (same source -> same id).

    ``text`` is what a base model sees; ``chat_text`` (when the task's chat template differs)
    is the user turn an instruct model gets; ``reference`` is the reference answer, if any.
    """

    id: str
    text: str
    task: str
    chat_text: str | None = None
    reference: Any = None

    def text_for(self, variant: str) -> str:
        """The prompt text for a ``base`` or ``instruct`` model."""
        return self.chat_text if variant == "instruct" and self.chat_text is not None else self.text
