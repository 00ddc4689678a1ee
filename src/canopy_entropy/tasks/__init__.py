"""Tasks: the four built-in task files and any task file a user writes (TOML: source, Jinja2
templates, few-shot exemplars, stop strings, reference column, scorer)."""

from canopy_entropy.tasks.base import Prompt
from canopy_entropy.tasks.catalog import SOURCES, TASK_NAMES, TASKS, find_task, is_task_path
from canopy_entropy.tasks.jsonl import PromptFileError
from canopy_entropy.tasks.loader import builtin_exemplars, load_task_prompts
from canopy_entropy.tasks.rows import load_rows, spec_prompts
from canopy_entropy.tasks.spec import TaskFileError, TaskSpec, parse_task, read_task_file

__all__ = [
    "SOURCES",
    "TASKS",
    "TASK_NAMES",
    "Prompt",
    "PromptFileError",
    "TaskFileError",
    "TaskSpec",
    "builtin_exemplars",
    "find_task",
    "is_task_path",
    "load_rows",
    "load_task_prompts",
    "parse_task",
    "read_task_file",
    "spec_prompts",
]
