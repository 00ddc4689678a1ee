"""Correctness figures: accuracy by entropy-rate decile (with Wilson intervals) and the AUROC
of each per-rollout uncertainty for flagging an incorrect rollout, per model.

``accuracy_tables(run)`` reads the score stage's tables; the drawing functions write nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from canopy_entropy.plots.data import MissingInput, check_run_dir
from canopy_entropy.plots.style import Palette, new_figure, panel_title, suptitle


def accuracy_tables(run_dir: str | Path):
    """The run's correctness tables (``metrics.accuracy.AccuracyResult``); MissingInput when
    no task was scored."""
    from canopy_entropy.metrics.accuracy import AccuracyResult
    from canopy_entropy.run.layout import artefact_path

    run = check_run_dir(run_dir)
    if not artefact_path(run, "scores.bins").exists():
        raise MissingInput(
            "no correctness scores: give a task a scorer and run the score stage of `canopy run`"
        )
    return AccuracyResult.load(run)


def _label(row: pd.Series) -> str:
    return f"{row['model']} ({row['variant']})"


def accuracy_vs_rate(result, palette: Palette | None = None) -> Figure:
    """Accuracy of the rollouts in each entropy-rate decile, one panel per task, one line per
    model; bars: 95% Wilson intervals; x: the decile's mean of its lowest and highest rate."""
    bins = result.bins
    tasks = sorted(bins["task"].unique())
    palette = palette or Palette.of(bins)
    fig = new_figure(3.4 * len(tasks) + 0.6, 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(tasks), squeeze=False)[0])
    for ax, task in zip(axes, tasks, strict=True):
        sub = bins[bins["task"] == task]
        for (model, variant, family), g in sub.groupby(["model", "variant", "family"], sort=True):
            x = (g["lo"] + g["hi"]).to_numpy() / 2
            y = g["accuracy"].to_numpy()
            err = np.vstack([y - g["ci_lo"].to_numpy(), g["ci_hi"].to_numpy() - y])
            ax.errorbar(x, y, yerr=err, capsize=2, label=f"{model} ({variant})",
                        **palette.line_kwargs(family, variant))  # fmt: skip
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("entropy rate (nats/token), decile")
        ax.set_ylabel("accuracy")
        panel_title(ax, task, len(tasks))
        ax.legend(fontsize="small")
    suptitle(fig, "Accuracy vs entropy rate")
    return fig


def auroc_bars(result, palette: Palette | None = None) -> Figure:
    """AUROC of each uncertainty for predicting an incorrect rollout, pooled over prompts, one
    bar per model and measure, one panel per task; dashed: chance (0.5)."""
    link = result.link.dropna(subset=["auroc"])
    if link.empty:
        raise MissingInput("no AUROC: every scored group is all correct or all incorrect")
    tasks = sorted(link["task"].unique())
    palette = palette or Palette.of(link)
    fig = new_figure(3.6 * len(tasks) + 0.6, 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(tasks), squeeze=False)[0])
    for ax, task in zip(axes, tasks, strict=True):
        sub = link[link["task"] == task]
        labels = list(dict.fromkeys(sub["label"]))
        models = sub[["model", "variant", "family"]].drop_duplicates().to_numpy().tolist()
        width = 0.8 / max(len(models), 1)
        for j, (model, variant, family) in enumerate(models):
            g = sub[(sub["model"] == model) & (sub["variant"] == variant)].set_index("label")
            x = np.arange(len(labels)) + (j - (len(models) - 1) / 2) * width
            ax.bar(x, g.reindex(labels)["auroc"].to_numpy(), width, label=f"{model} ({variant})",
                   color=palette.color(family), hatch="//" if variant == "instruct" else None)  # fmt: skip
        ax.axhline(0.5, ls="--", lw=0.8, color="0.4")
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("AUROC (incorrect rollout)")
        panel_title(ax, task, len(tasks))
        ax.legend(fontsize="small")
    suptitle(fig, "How well each uncertainty flags incorrect rollouts")
    return fig
