"""Prompt sources for the four task kinds (math, coding, completion, stories)."""

from canopy_entropy.tasks.base import Prompt
from canopy_entropy.tasks.catalog import SOURCES, TASK_NAMES, TASKS
from canopy_entropy.tasks.jsonl import PromptFileError
from canopy_entropy.tasks.loader import builtin_exemplars, load_task_prompts

__all__ = [
    "SOURCES",
    "TASKS",
    "TASK_NAMES",
    "Prompt",
    "PromptFileError",
    "builtin_exemplars",
    "load_task_prompts",
]
