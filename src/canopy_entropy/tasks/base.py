"""The prompt record shared by tasks, engines and the runner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task. ``id`` is stable across runs (same source -> same id)."""

    id: str
    text: str
    task: str
