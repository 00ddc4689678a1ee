"""The checkpoint-series trend figure: CE*, GenPPL, BF, rho(N, r) and accuracy against step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from canopy_entropy.errors import CanopyError
from canopy_entropy.plots import data
from canopy_entropy.plots.style import FAMILY_PALETTE, new_figure, style
from canopy_entropy.series import SERIES_KEYS, TREND_METRICS

NO_SERIES = "no checkpoint series in this run (set series and step on [[models]] to draw it)"


def series_input(run: Path) -> pd.DataFrame:
    """The series table of a run's saved metrics (MissingInput with a one-line note when the
    metrics are missing or no model is in a series)."""
    from canopy_entropy.metrics import MetricsResult
    from canopy_entropy.series import read_diagnostics, series_table

    if not data.artefact_path(run, "metrics.json").exists():
        raise data.MissingInput(data.missing_note(run, "metrics"))
    metrics = MetricsResult.load(run)
    table = series_table(metrics, data.read_manifest(run), read_diagnostics(run))
    if table.empty:
        raise data.MissingInput(NO_SERIES)
    return table


def _lines(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One line per series and each other key that takes several values (task, variant)."""
    keys = [k for k in ("series", "variant", "family", "task") if k in table.columns]
    keys = [k for k in keys if k == "series" or table[k].nunique() > 1]
    out = []
    for key, rows in table.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        out.append((" · ".join(str(k) for k in key), rows.sort_values("step")))
    return out


def series_trend(table: pd.DataFrame) -> Figure:
    """One panel per trend metric present (CE* with ± its SE), x = the checkpoint's step, one
    line per series (and task / variant when several). ``table`` is ``series_table``'s."""
    missing = [c for c in SERIES_KEYS if c not in table.columns]
    if missing or table.empty:
        raise CanopyError(
            f"the series table {'lacks ' + str(missing) if missing else 'is empty'}; build it "
            "with canopy_entropy.series_table(run) on a run whose models set series and step"
        )
    panels = [(c, name) for c, name in TREND_METRICS
              if c in table.columns and np.isfinite(table[c].to_numpy(np.float64)).any()]  # fmt: skip
    lines = _lines(table)
    series_names = sorted(table["series"].astype(str).unique())
    with style():
        fig = new_figure(3.0 * len(panels) + 0.6, 3.0)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (column, name) in zip(axes, panels, strict=True):
            for i, (label, rows) in enumerate(lines):
                colour = FAMILY_PALETTE[series_names.index(str(rows["series"].iloc[0]))
                                        % len(FAMILY_PALETTE)]  # fmt: skip
                x = rows["step"].to_numpy(np.float64)
                y = rows[column].to_numpy(np.float64)
                style_ = ("-", "--", ":", "-.")[i % 4]
                ax.plot(x, y, style_, marker="o", color=colour, label=label, markersize=4)
                if column == "ce_star" and "ce_star_se" in rows.columns:
                    se = rows["ce_star_se"].to_numpy(np.float64)
                    ax.fill_between(x, y - se, y + se, color=colour, alpha=0.15, linewidth=0)
            ax.set_title(name)
            ax.set_xlabel("step")
        axes[0].legend(loc="best", frameon=False)
    return fig
