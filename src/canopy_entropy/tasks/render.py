"""The closing-code-fence fix for coding prompts (a filter of the task templates)."""

from __future__ import annotations

import re

_CLOSING_FENCE = re.compile(r"\n?```[ \t]*\s*\Z")


def strip_closing_fence(text: str) -> str:
    """Drop a trailing closing code fence (base models otherwise stop at once), keep a newline.

    Only a fence that closes an open block is removed: the text must contain an even number
    of fences, the last one at the very end.
    """
    if text.count("```") % 2 or not _CLOSING_FENCE.search(text):
        return text
    return _CLOSING_FENCE.sub("", text).rstrip(" \t") + "\n"
