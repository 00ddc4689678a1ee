"""Inputs of the figures and the report, read from a run folder by their layout names.

Every artefact is read through the run contract (``run.layout``): the path and schema tag of
``ARTEFACTS[name]``, a verified read (``store.read_table``) and the exact columns its writer
writes. A missing artefact raises :class:`MissingInput`, whose message is the note shown in
place of a figure or section and names the command that makes it; a damaged one is a one-line
:class:`~canopy_entropy.errors.CanopyError`. The per-rollout values and the running-rate
curves come from the metrics stage's single scan (its saved tables), never from the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from canopy_entropy.errors import CanopyError
from canopy_entropy.run.layout import ARTEFACTS, GROUP_KEYS, PROMPT_KEYS, artefact_path, schema_of
from canopy_entropy.run.manifest import Manifest
from canopy_entropy.run.manifest import read_manifest as read_run_manifest
from canopy_entropy.store import RunStore, read_table

GROUP_KEY_LIST = list(GROUP_KEYS)  # model, variant, family, task
# What each stage's outputs are called in a note, and the command that writes them.
_WHAT = {
    "generate": ("no rollouts", "`canopy generate` or `canopy import`"),
    "metrics": ("no metrics", "`canopy metrics {run}`"),
    "embed": ("no semantic diversity", "`canopy embed {run}`"),
    "compare": ("no comparison", "`canopy compare {run}`"),
    "regress": ("no regression", "`canopy regress {run}`"),
}


class MissingInput(Exception):
    """An input of a figure/report section is absent; the message is the note to show."""


def missing_note(run: Path, stage: str, extra: str = "") -> str:
    """'no comparison: run `canopy compare RUN` or the compare stage of `canopy run`'."""
    what, command = _WHAT[stage]
    return f"{what}{extra}: run {command.format(run=run)} or the {stage} stage of `canopy run`"


def read_frame(run: Path, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Artefact ``name`` (a Parquet table) as a DataFrame, verified against its schema tag."""
    path = artefact_path(run, name)
    if not path.exists():
        raise MissingInput(missing_note(run, ARTEFACTS[name].stage))
    return read_table(path, schema_of(name), columns=columns).to_pandas()


def read_json(run: Path, name: str) -> dict[str, Any]:
    """Artefact ``name`` (a JSON document); damaged JSON is a one-line error with the fix."""
    path = artefact_path(run, name)
    if not path.exists():
        raise MissingInput(missing_note(run, ARTEFACTS[name].stage))
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        stage = ARTEFACTS[name].stage
        raise CanopyError(
            f"{path} is damaged ({exc}); delete it and re-run the {stage} stage"
        ) from exc
    if not isinstance(doc, dict):
        raise CanopyError(f"{path} is not a JSON object; delete it and re-run its stage")
    return doc


def check_run_dir(run_dir: str | Path) -> Path:
    """The run folder as a Path, or a one-line error when it is not a run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    markers = ("manifest", "rollouts", "metrics.pooled", "compare.table", "regression.result")
    if not any(artefact_path(run, m).exists() for m in markers):
        raise CanopyError(
            f"{run} is not a canopy run folder (no manifest.json, rollouts/ or metrics/); "
            "pass the folder written by 'canopy run' or 'canopy import --run'"
        )
    return run


def read_manifest(run: Path) -> Manifest:
    """The run's typed manifest (empty when the folder has none)."""
    return read_run_manifest(run, missing_ok=True)


# --- rollouts ------------------------------------------------------------------------------
ROLLOUT_FRAME_COLUMNS = [*GROUP_KEY_LIST, "prompt_id", "length", "finish_reason", "H", "r"]


def rollouts_frame(run: Path) -> pd.DataFrame:
    """Per rollout: keys, prompt_id, length N, finish_reason, H = sum_t H_t and rate = H / N,
    from the per-rollout table of the metrics stage (metrics/rollouts.parquet); the per-step
    data are not read again."""
    frame = read_frame(run, "metrics.rollouts", ROLLOUT_FRAME_COLUMNS)
    return frame.rename(columns={"r": "rate"})


def running_rate(run: Path) -> pd.DataFrame:
    """The running entropy rate per (model, variant, family, task, position): ``mean_rate``
    of the prefix rates ``sum_{s<=t} H_s / t`` of the ``n_active`` rollouts with N >= t, as
    the metrics stage's scan saved it (metrics/running_rate.parquet)."""
    if (
        artefact_path(run, "metrics.json").exists()
        and not artefact_path(run, "metrics.running_rate").exists()
    ):
        raise MissingInput(
            f"no running-rate curves (the metrics were saved by an older version): run "
            f"`canopy metrics {run}` or the metrics stage of `canopy run`"
        )
    frame = read_frame(run, "metrics.running_rate")
    if frame.empty:
        raise MissingInput("every rollout in rollouts/ is empty (zero steps)")
    return frame


def _store(run: Path) -> RunStore:
    store = RunStore(run)
    if not store.shard_files():
        raise MissingInput(missing_note(run, "generate"))
    return store


def rollout_counts(run: Path) -> pd.DataFrame:
    """Per rollout: keys, prompt_id, length and finish_reason (no per-step columns read)."""
    cols = [*GROUP_KEY_LIST, "prompt_id", "length", "finish_reason"]
    return _store(run).read_rollouts(columns=cols).to_pandas()


def length_caps(run: Path) -> dict[str, int]:
    """model label -> its length cap (max_new_tokens) as the manifest records it."""
    manifest = read_manifest(run)
    return {
        label: int(m.policy.max_new_tokens)
        for label, m in manifest.models.items()
        if m.policy.max_new_tokens
    }


# --- stage outputs -------------------------------------------------------------------------
def with_group_keys(run: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Give a frame grouped without some key column its family/variant back from the typed
    manifest (by model label) and task 'all' when it was pooled over tasks."""
    df = df.copy()
    if "task" not in df.columns:
        df["task"] = "all"
    missing = [c for c in ("family", "variant") if c not in df.columns]
    if missing and "model" in df.columns:
        models = read_manifest(run).models
        for col in missing:
            df[col] = [
                getattr(models[m], col) if m in models else "" for m in df["model"].astype(str)
            ]
    return df


def metrics_pooled(run: Path) -> pd.DataFrame:
    """Pooled metrics per group (metrics/pooled.parquet), with every group key present."""
    return with_group_keys(run, read_frame(run, "metrics.pooled"))


def metrics_prompts(run: Path) -> pd.DataFrame:
    """Per-prompt metrics (metrics/prompts.parquet)."""
    return read_frame(run, "metrics.prompts")


def prompt_diversity(run: Path) -> pd.DataFrame:
    """Per-prompt semantic diversity (semantic/prompt_diversity.parquet)."""
    return read_frame(run, "semantic.prompts")


def embed_info(run: Path) -> dict[str, Any]:
    """What the embed stage used (semantic/embed.json: encoder, dim, counts, notes)."""
    return read_json(run, "semantic.info")


def comparison(run: Path) -> pd.DataFrame:
    """The tidy comparison table (compare/comparison.parquet)."""
    return read_frame(run, "compare.table")


def comparison_by_columns(df: pd.DataFrame) -> list[str]:
    """The by-columns of a comparison table: the writer puts them before its tidy columns."""
    from canopy_entropy.comparison import TIDY_COLUMNS

    return [c for c in df.columns if c not in TIDY_COLUMNS]


def length_matched(run: Path) -> pd.DataFrame:
    """The length-matched analysis (compare/length_matched.parquet)."""
    return read_frame(run, "compare.length_matched")


def regression_result(run: Path) -> dict[str, Any]:
    """The fitted regression (regression/result.json, ``stats.regression.result_json``)."""
    return read_json(run, "regression.result")


def regression_panel(run: Path) -> pd.DataFrame:
    return read_frame(run, "regression.panel")


def regression_curves(run: Path) -> pd.DataFrame:
    """Population-level predicted D (column ``D``) along R_sc per task and variant."""
    return read_frame(run, "regression.curves")


def regression_diagnostics(run: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """DHARMa-like tests (diagnostics.json) and scaled residuals (diagnostics.parquet)."""
    try:
        doc = read_json(run, "regression.diagnostics")
        df = read_frame(run, "regression.residuals")
    except MissingInput as exc:
        raise MissingInput(
            f"no residual diagnostics: run `canopy regress {run}` with diagnostics on"
        ) from exc
    return doc, df


def rate_diversity_points(run: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """Scatter points (x, D, task, family, variant) and fitted curves (x, D, task, variant).

    From the regression panel (x = R_sc, the z-scored rate the curves use); without a
    regression, per-prompt entropy rate joined with diversity (x in nats/token, no curves).
    """
    try:
        panel = regression_panel(run)
    except MissingInput:
        panel = None
    if panel is not None:
        points = panel.rename(columns={"R_sc": "x"})
        try:
            curves = regression_curves(run).rename(columns={"R_sc": "x"})
        except MissingInput:
            curves = None
        return points, curves, "entropy rate (z-score over the panel)"
    div = prompt_diversity(run)
    pm = metrics_prompts(run)
    keys = list(PROMPT_KEYS)
    points = pm[[*keys, "entropy_rate"]].merge(div[[*keys, "diversity"]], on=keys)
    points = points.rename(columns={"entropy_rate": "x", "diversity": "D"})
    if points.empty:
        raise MissingInput("no prompt has both metrics and diversity")
    return points, None, "entropy rate R̄ (nats/token)"
