"""Prompts from Hugging Face datasets (GSM8K, BigCodeBench, HellaSwag, WritingPrompts).

``datasets`` is imported lazily; without it the user gets the pip command, not a traceback.
"""

from __future__ import annotations

import re
from typing import Any

from canopy_entropy.errors import CanopyError, MissingExtraError
from canopy_entropy.tasks.spec import HubSource

_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)$")
_WP_TAG = re.compile(r"^\s*\[\s*[A-Za-z]{2,3}\s*\]\s*")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise MissingExtraError(
            "prompt source 'hf' needs the 'datasets' package, which is not installed; "
            "install it with: pip install datasets (or use source = 'builtin' or 'jsonl')"
        ) from exc
    return datasets


def latest_version_split(splits: list[str]) -> str:
    """The newest ``vX.Y.Z`` split name (BigCodeBench publishes one split per release)."""
    versioned = [
        (tuple(int(p) for p in m.group(1).split(".")), s)
        for s in splits
        if (m := _VERSION.match(s))
    ]
    if not versioned:
        raise CanopyError(f"no version-named split among {splits}; set prompts.split explicitly")
    return max(versioned)[1]


def clean_text(task: str, text: str) -> str:
    """Source-specific clean-ups: WritingPrompts' '[ WP ]' tags."""
    if task == "stories":
        text = _WP_TAG.sub("", text)
    return text.strip() if task != "coding" else text


def load_hf_prompts(task: str, source: HubSource | None = None) -> list[tuple[str, str]]:
    """All ``(id, text)`` pairs of the task's dataset split, ids from the source index or id field."""
    if source is None:
        from canopy_entropy.tasks.catalog import TASKS

        source = TASKS[task].hub
    src = source
    datasets = _datasets()
    try:
        split = src.split
        if split is None:
            split = latest_version_split(
                list(datasets.get_dataset_split_names(src.dataset, src.config))
            )
        data = datasets.load_dataset(src.dataset, src.config, split=split)
    except (ConnectionError, OSError) as exc:
        raise CanopyError(
            f"could not load the dataset {src.dataset} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the hub may be unreachable "
            "(HF_DATASETS_OFFLINE=1?): use source = 'builtin', a JSONL file, or cache it first"
        ) from exc
    if src.field not in data.column_names:
        raise CanopyError(
            f"dataset {src.dataset} has no field '{src.field}' (fields: {data.column_names})"
        )
    texts = data[src.field]
    ids = data[src.id_field] if src.id_field and src.id_field in data.column_names else None
    short = src.dataset.split("/")[-1]
    out = []
    for i, text in enumerate(texts):
        raw = f"{short}-{ids[i]}" if ids is not None else f"{short}-{split}-{i}"
        pid = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
        out.append((pid, clean_text(task, text)))
    return out
