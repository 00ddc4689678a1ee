"""Rows of a task file's source through ``datasets.load_dataset`` (hub ids and local files alike),
rendered into prompts with the task's templates and exemplars."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from canopy_entropy.tasks.base import Prompt
from canopy_entropy.tasks.jsonl import content_id
from canopy_entropy.tasks.spec import FILE_FORMATS, TaskFileError, TaskSpec


def load_rows(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Every row of ``split`` of the task's source, as dicts (one-line errors, never empty)."""
    from canopy_entropy.tasks.hf import _datasets

    datasets = _datasets()
    datasets.disable_progress_bars()  # one-line errors and quiet runs: no bars on stderr
    datasets.logging.set_verbosity_error()
    try:
        if spec.file:
            path = Path(spec.file)
            if not path.is_file():
                raise TaskFileError(f"task '{spec.name}': data file {path} does not exist")
            if split != spec.split:
                raise TaskFileError(
                    f"task '{spec.name}': a data file has one split ('{spec.split}'), not "
                    f"'{split}'; draw exemplars from split = '{spec.split}'"
                )
            fmt = FILE_FORMATS[path.suffix.lower()]
            if path.stat().st_size == 0 or (fmt == "json" and not path.read_text().strip()):
                raise TaskFileError(
                    f"task '{spec.name}': split '{split}' of {spec.source_text()} has no rows; "
                    "add rows or pick another split"
                )
            data = datasets.load_dataset(fmt, data_files={split: str(path)}, split=split)
        else:
            data = datasets.load_dataset(spec.dataset, spec.config, split=split)
    except TaskFileError:
        raise
    except Exception as exc:  # datasets raises many types: FileNotFound, ValueError, hub errors
        line = (str(exc).strip().splitlines() or [""])[0][:240]
        raise TaskFileError(
            f"task '{spec.name}': cannot load {spec.source_text()} split '{split}' "
            f"({type(exc).__name__}: {line}); check the source (offline? cache the dataset first)"
        ) from None
    if data.num_rows == 0:
        raise TaskFileError(
            f"task '{spec.name}': split '{split}' of {spec.source_text()} has no rows; "
            "add rows or pick another split"
        )
    columns = set(data.column_names)
    needed = {c: what for c, what in ((spec.id_field, "id"), (spec.reference, "reference"))
              if c}  # fmt: skip
    needed.update({c: "template" for c in spec.columns_used()})
    for col, what in needed.items():
        if col not in columns:
            close = [c for c in sorted(columns) if c.lower() == col.lower()]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TaskFileError(
                f"task '{spec.name}': the {what} column '{col}' is not in {spec.source_text()}"
                f"{hint}; its columns are {sorted(columns)}"
            )
    return data.to_list()


def _draw(rows: list, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(len(rows), size=k, replace=False))


def _row_id(spec: TaskSpec, row: dict[str, Any]) -> str:
    if spec.id_field:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", str(row[spec.id_field]))
    used = {c: row[c] for c in sorted(spec.columns_used() | {spec.reference} - {None})}
    return content_id(spec.name, json.dumps(used, sort_keys=True, default=str))


def spec_prompts(spec: TaskSpec, fewshot: int | None = None) -> list[Prompt]:
    """Every prompt of a file task (ids: the id column, else a hash of the columns used).

    ``fewshot`` overrides the file's ``[fewshot] k``; exemplars drawn from the prompt split
    itself are left out of the prompts.
    """
    k = spec.fewshot_k if fewshot is None else fewshot
    rows = load_rows(spec, spec.split)
    shots: list[dict[str, Any]] = []
    if k and spec.exemplars:
        if k > len(spec.exemplars):
            raise TaskFileError(
                f"task '{spec.name}': fewshot = {k} but only {len(spec.exemplars)} exemplars "
                "are listed"
            )
        shots = [dict(e) for e in spec.exemplars[:k]]
    elif k:
        split = spec.fewshot_split or spec.split
        pool = rows if split == spec.split else load_rows(spec, split)
        if k > len(pool) - (split == spec.split):
            raise TaskFileError(
                f"task '{spec.name}': fewshot = {k} exemplars cannot be drawn from the "
                f"{len(pool)} rows of split '{split}'"
            )
        picked = _draw(pool, k, spec.fewshot_seed)
        shots = [pool[i] for i in picked]
        if split == spec.split:
            rows = [r for i, r in enumerate(rows) if i not in set(picked)]
    out, seen = [], {}
    for i, row in enumerate(rows):
        pid = _row_id(spec, row)
        if pid in seen:
            raise TaskFileError(
                f"task '{spec.name}': rows {seen[pid]} and {i} have the same id '{pid}'; give "
                "each row a unique id (or drop the duplicate)"
            )
        seen[pid] = i
        raw = spec.render(row, shots, chat=False)
        chat = spec.render(row, shots, chat=True) if spec.chat != spec.raw else None
        ref = row[spec.reference] if spec.reference else None
        out.append(Prompt(id=pid, text=raw, task=spec.name, chat_text=chat, reference=ref))
    return out
