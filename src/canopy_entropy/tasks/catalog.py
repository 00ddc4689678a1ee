"""The four task kinds and how each one renders few-shot prompts and maps HF datasets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HFSource:
    """Where a task's prompts live on the Hugging Face hub and which field holds the text.

    ``split=None`` means "the latest version split" (BigCodeBench names splits v0.1.0, ...).
    """

    dataset: str
    config: str | None
    split: str | None
    field: str
    id_field: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task kind: its few-shot layout and its Hugging Face dataset."""

    name: str
    description: str
    # 'qa': "Question: ...\nAnswer: ..." blocks; 'concat': exemplar text followed by its answer.
    fewshot_style: str
    hf: HFSource


TASKS: dict[str, TaskSpec] = {
    "math": TaskSpec(
        "math",
        "grade-school word problems (GSM8K)",
        "qa",
        HFSource("openai/gsm8k", "main", "test", "question"),
    ),
    "coding": TaskSpec(
        "coding",
        "function completion (BigCodeBench)",
        "concat",
        HFSource("bigcode/bigcodebench", None, None, "complete_prompt", "task_id"),
    ),
    "completion": TaskSpec(
        "completion",
        "sentence completion (HellaSwag contexts)",
        "concat",
        HFSource("Rowan/hellaswag", None, "validation", "ctx", "ind"),
    ),
    "stories": TaskSpec(
        "stories",
        "creative stories and problem solving (WritingPrompts)",
        "qa",
        HFSource("euclaise/writingprompts", None, "test", "prompt"),
    ),
}

TASK_NAMES = tuple(TASKS)
SOURCES = ("builtin", "jsonl", "paper", "hf")
SAMPLING = ("first", "random")
