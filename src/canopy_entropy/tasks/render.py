"""Zero-shot and few-shot prompt rendering, and the closing-code-fence fix for coding prompts."""

from __future__ import annotations

import re
from collections.abc import Sequence

from canopy_entropy.tasks.catalog import TASKS

_CLOSING_FENCE = re.compile(r"\n?```[ \t]*\s*\Z")


def strip_closing_fence(text: str) -> str:
    """Drop a trailing closing code fence (base models otherwise stop at once), keep a newline.

    Only a fence that closes an open block is removed: the text must contain an even number
    of fences, the last one at the very end.
    """
    if text.count("```") % 2 or not _CLOSING_FENCE.search(text):
        return text
    return _CLOSING_FENCE.sub("", text).rstrip(" \t") + "\n"


def render_fewshot(task: str, text: str, exemplars: Sequence[tuple[str, str]], k: int) -> str:
    """Prefix ``text`` with the first ``k`` exemplars in the task's few-shot layout.

    'qa' tasks use ``Question: q\\nAnswer: a`` blocks and end with ``Answer:``; 'concat' tasks
    put each exemplar (question immediately followed by its answer) before the prompt.
    """
    if k <= 0:
        return text
    shots = list(exemplars)[:k]
    if TASKS[task].fewshot_style == "qa":
        blocks = [f"Question: {q.strip()}\nAnswer: {a.strip()}" for q, a in shots]
        return "\n\n".join([*blocks, f"Question: {text.strip()}\nAnswer:"])
    blocks = [(q + a).rstrip() for q, a in shots]
    return "\n\n".join([*blocks, text])
