"""Checkpoint series: metrics reported against the training step of each model.

A model of a study may name a ``series`` (e.g. one fine-tuning run) and its ``step`` in it
(``[[models]] series = "sft-run"``, ``step = 1000``); the manifest records both per model
label. ``series_table`` joins the pooled metrics (and the teacher-forced diagnostics of
``canopy score`` and the accuracy, when present) to the steps: one row per series, step and
group. ``compare_steps`` is the paired prompt bootstrap of ``comparison.compare`` between the
models at two steps. Nothing here reads the per-step rollout data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.run.manifest import Manifest, read_manifest

SERIES_KEYS = ("series", "step")
# the trend figure's panels: (column, axis label); a panel without data is left out
TREND_METRICS = (
    ("ce_star", "CE* (nats)"),
    ("genppl", "GenPPL"),
    ("bf", "branching factor"),
    ("pearson", "ρ(N, r)"),
    ("accuracy", "accuracy"),
)
# teacher-forced diagnostics (diagnostics/answers.parquet), pooled as means over answers
DIAGNOSTIC_COLUMNS = ("mean_nll", "mean_entropy", "mean_relative_rank", "share_above_expected")
DIAGNOSTIC_PREFIX = "tf_"


def checkpoints(manifest: Manifest | str | os.PathLike[str]) -> pd.DataFrame:
    """``model``, ``series``, ``step`` of every model label that belongs to a series, sorted
    by series and step (empty when the run has no series)."""
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    rows = [
        {"model": label, "series": r.series, "step": int(r.step)}
        for label, r in manifest.models.items()
        if r.series and r.step is not None
    ]
    frame = pd.DataFrame(rows, columns=["model", "series", "step"])
    frame["step"] = frame["step"].astype(np.int64)
    return frame.sort_values(["series", "step"], ignore_index=True)


def _accuracy(metrics: Any) -> pd.DataFrame | None:
    """Pooled accuracy per metrics group when the rollouts carry a ``correct`` column."""
    rollouts = getattr(metrics, "rollouts", None)
    if "accuracy" in metrics.pooled.columns or rollouts is None or "correct" not in rollouts:
        return None
    from canopy_entropy.scoring import pool_correctness, prompt_correctness

    prompts = prompt_correctness(rollouts, score_col=None, answer_col=None)
    by = list(metrics.by)
    return pool_correctness(prompts, by=by)[[*by, "accuracy"]]


def _diagnostics(answers: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per-answer diagnostics pooled per ``keys`` (unweighted means over answers)."""
    present = [c for c in DIAGNOSTIC_COLUMNS if c in answers.columns]
    grouped = answers.groupby(list(keys), sort=True)
    out = grouped[present].mean()
    out.insert(0, "answers", grouped.size())
    out.columns = [DIAGNOSTIC_PREFIX + c for c in out.columns]
    return out.reset_index()


def series_table(
    metrics: Any,
    manifest: Manifest | str | os.PathLike[str] | None = None,
    diagnostics: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per series, step and metrics group: the model's pooled metrics row as it is,
    with ``series`` and ``step`` in front; ``accuracy`` when the rollouts are scored; and the
    teacher-forced diagnostics (``tf_mean_nll``, ``tf_mean_entropy``, ...) pooled per model
    and task when ``diagnostics`` (``diagnostics/answers.parquet``) is given.

    ``metrics``: a ``MetricsResult`` or a run (path or ``open_run`` view: its metrics, manifest
    and diagnostics are used). Models outside any series are left out; empty when none is in
    one. The metrics must be grouped by model (the default ``by``)."""
    if isinstance(metrics, (str, os.PathLike)):
        from canopy_entropy.run.view import open_run

        metrics = open_run(metrics)
    if hasattr(metrics, "manifest") and hasattr(metrics, "path"):  # a Run view
        run = metrics
        manifest = run.manifest if manifest is None else manifest
        if diagnostics is None:
            diagnostics = read_diagnostics(run.path)
        metrics = run.metrics
    if manifest is None:
        raise CanopyError("series_table needs the run's manifest (where the steps are recorded)")
    if "model" not in metrics.by:
        raise CanopyError(
            f"these metrics are grouped by {list(metrics.by)}; series need them per model "
            "(compute them with by=('model', 'variant', 'task'))"
        )
    steps = checkpoints(manifest)
    by = list(metrics.by)
    pooled = metrics.pooled
    accuracy = _accuracy(metrics)
    if accuracy is not None:
        pooled = pooled.merge(accuracy, on=by, how="left")
    if diagnostics is not None and len(diagnostics):
        keys = [c for c in by if c in diagnostics.columns]
        pooled = pooled.merge(_diagnostics(diagnostics, keys), on=keys, how="outer")
    table = steps.merge(pooled, on="model", how="inner")
    rest = [c for c in table.columns if c not in (*SERIES_KEYS, *by)]
    table = table[[*SERIES_KEYS, *by, *rest]]
    order = [*SERIES_KEYS, *(c for c in by if c != "model")]
    return table.sort_values(order, kind="stable", ignore_index=True)


def read_diagnostics(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``RUN/diagnostics/answers.parquet`` of ``canopy score`` (verified), or None."""
    from canopy_entropy.diagnostics import ANSWERS_SCHEMA_VERSION, diagnostics_paths
    from canopy_entropy.store import read_table

    path = diagnostics_paths(run_dir)[1]
    return read_table(path, ANSWERS_SCHEMA_VERSION).to_pandas() if path.exists() else None


def step_label(
    manifest: Manifest | str | os.PathLike[str], step: int | str, series: str | None = None
) -> str:
    """The model label at ``step`` of ``series`` (the only series when None); a ConfigError
    naming the steps there are otherwise."""
    steps = checkpoints(manifest)
    if steps.empty:
        raise ConfigError(
            "this run has no checkpoint series; set series and step on its models "
            "([[models]] series = 'sft-run', step = 1000) and re-run"
        )
    names = sorted(steps["series"].unique())
    if series is None:
        if len(names) > 1:
            raise ConfigError(f"the run has several series {names}; name one with --series")
        series = names[0]
    if series not in names:
        raise ConfigError(f"no series '{series}' in this run; choose from {names}")
    rows = steps[steps["series"] == series]
    try:
        wanted = int(step)
    except (TypeError, ValueError):
        raise ConfigError(f"step {step!r} is not an integer; pass a step like 1000") from None
    hit = rows[rows["step"] == wanted]
    if hit.empty:
        raise ConfigError(
            f"series '{series}' has no step {wanted}; its steps are {rows['step'].tolist()}"
        )
    return str(hit["model"].iloc[0])


def compare_steps(
    metrics: Any,
    manifest: Manifest | str | os.PathLike[str],
    a: int | str,
    b: int | str,
    *,
    series: str | None = None,
    by: Sequence[str] = ("task",),
    n_boot: int = 2000,
    seed: int = 0,
) -> Any:
    """Paired prompt bootstrap of step ``b`` against step ``a`` of a series: exactly
    ``comparison.compare`` of the two steps' model labels (``on="model"``)."""
    from canopy_entropy.comparison import compare

    la, lb = step_label(manifest, a, series), step_label(manifest, b, series)
    return compare(metrics, a=la, b=lb, by=by, n_boot=n_boot, seed=seed, on="model")


def series_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where ``canopy series`` and the report keep the table: ``RUN/tables/series.csv``."""
    return Path(run_dir) / "tables" / "series.csv"
