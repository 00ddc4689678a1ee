"""The report's checkpoint-series and phase sections (each a table, or a note saying how to
get one)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from canopy_entropy.plots import data
from canopy_entropy.report.html import Column, html_table, meanings, note

SERIES_SHOWN = ("ce_star", "genppl", "bf", "entropy_rate", "mean_length", "pearson", "accuracy",
                "tf_mean_nll", "tf_mean_entropy", "tf_mean_relative_rank")  # fmt: skip
PHASE_SHOWN = ("ce_star", "mean_length", "entropy_rate", "genppl", "bf", "pearson",
               "n_with_phase", "marker_share")  # fmt: skip


def _table(df: pd.DataFrame, keys: list[str], shown: tuple[str, ...]) -> str:
    keys = [k for k in keys if k in df.columns]
    present = [c for c in shown if c in df.columns]
    columns = [Column.of(k, True) for k in keys] + [Column.of(c) for c in present]
    rows = [[rec[c] for c in (*keys, *present)] for rec in df.to_dict("records")]
    return html_table(columns, rows) + meanings(present)


def series_section(run: Path) -> str:
    """Pooled metrics per series, step and task (``series_table``), or a note."""
    from canopy_entropy.errors import CanopyError
    from canopy_entropy.plots.fig_series import series_input

    try:
        table = series_input(run)
    except (data.MissingInput, CanopyError) as exc:  # none, or metrics not per model
        return note(str(exc))
    keys = ["series", "step", "model", *(k for k in ("variant", "task") if table[k].nunique() > 1)]
    return (
        "<p>One row per checkpoint and task: the model's pooled metrics against its step. "
        "Compare two steps with <code>canopy compare RUN --on step --a STEP --b STEP</code>.</p>"
        + _table(table, keys, SERIES_SHOWN)
    )


def phases_section(run: Path) -> str:
    """Per-phase metrics (``metrics/phases.parquet``), or a note."""
    from canopy_entropy.errors import CanopyError
    from canopy_entropy.metrics.phases import read_phases

    try:
        saved = read_phases(run)
    except CanopyError as exc:
        return note(str(exc))
    if saved is None:
        return note(
            "no phase split: set [analysis] phase_markers (e.g. ['</think>']) or run "
            f"`canopy phases {run} --marker '</think>'`"
        )
    pooled, markers = saved
    keys = [k for k in ("model", "variant", "family", "task") if k in pooled.columns]
    keys = [k for k in keys if k == "model" or pooled[k].nunique() > 1] + ["phase"]
    return (
        f"<p>Rollouts split after the first of {', '.join(repr(m) for m in markers)}: "
        "reasoning = up to and including the marker, answer = the rest; a rollout without a "
        "marker is all reasoning (marker share: the share with one).</p>"
        + _table(pooled, keys, PHASE_SHOWN)
    )
