"""The score stage: every rollout of a task that names a scorer gets ``correct`` and ``score``,
stored once in ``RUN/scores/rollouts.parquet`` with the scorer's version; then the correctness
tables (``metrics.accuracy``) are written next to it.

The per-rollout scores are a cache: a row is reused while its scorer version, response text and
reference are unchanged, so a changed scorer re-scores only its own task's rollouts and nothing
else of the run is recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError, StoreError
from canopy_entropy.run.layout import ROLLOUT_KEYS, artefact_path, schema_of
from canopy_entropy.scoring.code_exec import CodeExecutionDisabled, code_passes
from canopy_entropy.scoring.frame import score_frame
from canopy_entropy.scoring.registry import load_scorer, scorer_name, scorer_version
from canopy_entropy.tasks.spec import TaskSpec

SCORE_FIELDS = ("correct", "score", "answer", "scorer", "scorer_version", "text_hash", "ref_hash")


def task_scorer(spec: TaskSpec, execute_code: bool) -> Any:
    """The task's scorer with its options bound; code execution only with the opt-in."""
    fn = load_scorer(spec.scorer or "")
    options = dict(spec.scorer_options)
    if fn is code_passes or "execute_code" in _parameters(fn):
        if not execute_code:
            raise CodeExecutionDisabled(
                f"task '{spec.name}' scores by running the generated code ({spec.scorer}), which "
                "is off by default; set [scoring] execute_code = true to allow it"
            )
        options["execute_code"] = True
    return functools.partial(fn, **options) if options else fn


def _parameters(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def scoring_settings(specs: Mapping[str, TaskSpec], execute_code: bool) -> dict[str, Any]:
    """What the scores depend on beyond the rollouts: each scorer's version and the state of
    the file holding the references (the score stage's fingerprint)."""
    out: dict[str, Any] = {"execute_code": execute_code}
    for name, spec in sorted(specs.items()):
        fn = load_scorer(spec.scorer or "")
        data = Path(spec.file) if spec.file else None
        state = [data.stat().st_size, data.stat().st_mtime_ns] if data and data.is_file() else None
        out[name] = {
            "scorer": scorer_version(fn, **spec.scorer_options),
            "reference": spec.reference,
            "source": spec.source_text(),
            "data": state,
        }
    return out


def _hash(values: Any) -> list[str]:
    return [
        hashlib.sha1(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
        for v in values
    ]


def _read_cache(run_dir: Path) -> pd.DataFrame | None:
    from canopy_entropy.store import read_table

    path = artefact_path(run_dir, "scores.rollouts")
    if not path.exists():
        return None
    try:
        return read_table(path, schema_of("scores.rollouts")).to_pandas()
    except StoreError:
        return None  # a damaged cache is re-scored


def score_rollouts(
    run_dir: str | os.PathLike[str],
    tasks: Mapping[str, TaskSpec],
    prompts: Mapping[str, Mapping[str, Any]],
    *,
    execute_code: bool = False,
    workers: int = 1,
) -> pd.DataFrame:
    """Score every rollout of ``tasks`` (name -> task with a scorer) in the run folder and save
    ``RUN/scores/rollouts.parquet``; ``prompts`` gives each task's prompt settings (to load the
    references). Cached rows are reused; returns the per-rollout scores."""
    from canopy_entropy.store import RunStore, atomic_write_table
    from canopy_entropy.tasks.loader import load_task_prompts

    run = Path(run_dir)
    table = RunStore(run).read_rollouts(columns=[*ROLLOUT_KEYS, "text"])
    rollouts = table.to_pandas()
    cache = _read_cache(run)
    parts = []
    for name, spec in sorted(tasks.items()):
        scorer = task_scorer(spec, execute_code)
        version = scorer_version(scorer)
        frame = rollouts[rollouts["task"] == name].reset_index(drop=True)
        if frame.empty:
            continue
        p = prompts.get(name, {})
        loaded = load_task_prompts(name, n=None, sample="first", fewshot=int(p.get("fewshot", 0)),
                                   spec=spec)  # fmt: skip
        refs = {q.id: q.reference for q in loaded}
        unknown = sorted(set(frame["prompt_id"]) - set(refs))
        if unknown:
            raise CanopyError(
                f"task '{name}': the run has rollouts of prompt '{unknown[0]}' which its source "
                f"no longer holds ({len(unknown)} prompts); restore the data or start a new run"
            )
        frame["reference"] = frame["prompt_id"].map(refs)
        frame["text_hash"] = _hash(frame["text"])
        frame["ref_hash"] = _hash(frame["reference"])
        frame["scorer"] = scorer_name(scorer)
        fresh = _reuse(frame, cache, version)
        todo = frame[~fresh]
        if len(todo):
            scored = score_frame(todo.reset_index(drop=True), scorer, "reference", workers=workers)
            frame.loc[~fresh, ["correct", "score", "answer"]] = scored[
                ["correct", "score", "answer"]
            ].to_numpy()
        frame["scorer_version"] = version
        parts.append(frame)
    if not parts:
        raise CanopyError(
            f"{run} has no rollouts of the scored tasks {sorted(tasks)}; generate them first"
        )
    out = pd.concat(parts, ignore_index=True)[[*ROLLOUT_KEYS, *SCORE_FIELDS]]
    out["correct"] = out["correct"].astype(bool)
    out["score"] = out["score"].astype(np.float64)
    out["answer"] = [None if a is None or (isinstance(a, float) and np.isnan(a)) else str(a)
                     for a in out["answer"]]  # fmt: skip
    schema = pa.Table.from_pandas(out, preserve_index=False).schema
    schema = schema.set(schema.get_field_index("answer"), pa.field("answer", pa.string()))
    atomic_write_table(
        artefact_path(run, "scores.rollouts"),
        pa.Table.from_pandas(out, schema=schema, preserve_index=False),
        schema_of("scores.rollouts"),
    )
    return out


def _reuse(frame: pd.DataFrame, cache: pd.DataFrame | None, version: str) -> np.ndarray:
    """Which rows of ``frame`` the cache already scored with this version, text and reference
    (their correct/score/answer are copied in)."""
    for col in ("correct", "score", "answer"):
        frame[col] = None
    if cache is None or cache.empty:
        return np.zeros(len(frame), dtype=bool)
    keys = [*ROLLOUT_KEYS, "text_hash", "ref_hash"]
    hit = cache[cache["scorer_version"] == version][[*keys, "correct", "score", "answer"]]
    merged = frame[keys].merge(hit, on=keys, how="left", validate="one_to_one")
    fresh = merged["score"].notna().to_numpy()
    for col in ("correct", "score", "answer"):
        frame.loc[fresh, col] = merged.loc[fresh, col].to_numpy()
    return fresh


def score_run(
    run_dir: str | os.PathLike[str],
    tasks: Mapping[str, TaskSpec],
    prompts: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    execute_code: bool = False,
    workers: int = 1,
) -> Any:
    """The score stage: per-rollout scores (cached), then the correctness tables in RUN/scores/."""
    from canopy_entropy.metrics.accuracy import accuracy_run

    score_rollouts(run_dir, tasks, prompts or {}, execute_code=execute_code, workers=workers)
    result = accuracy_run(run_dir)
    result.save(run_dir)
    return result
