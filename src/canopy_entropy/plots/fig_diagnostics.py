"""Figures of teacher-forced token diagnostics (``canopy score``, docs/metrics.md section 10)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from canopy_entropy.errors import CanopyError
from canopy_entropy.plots.style import new_figure, note_axes, style


def _flat(frame: pd.DataFrame, column: str) -> np.ndarray:
    """One column as a flat float array: per-answer list cells (tokens.parquet) or scalars."""
    values = frame[column].to_numpy()
    if values.dtype == object:
        parts = [np.asarray(v, dtype=np.float64) for v in values]
        return np.concatenate(parts) if parts else np.zeros(0)
    return values.astype(np.float64)


def _color_norm(values: np.ndarray) -> Normalize:
    """Diverging around 0 (reference token ranks like a sample) when both signs occur."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (-1.0, 1.0)
    if lo < 0 < hi:
        return TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)


def fig_token_calibration(tokens_frame: pd.DataFrame, prefix: str = "") -> Figure:
    """p_t against H_t of every answer token, coloured by the relative rank log(R_t / E[R_t]).

    ``tokens_frame`` is ``RUN/diagnostics/tokens.parquet`` as a frame (list cells per answer)
    or one row per token; one panel per model, one shared colour scale. ``prefix='policy_'``
    draws the columns scored under the sampling policy. Nothing is written.
    """
    need = ["model", f"{prefix}p", f"{prefix}entropy", f"{prefix}relative_rank"]
    missing = [c for c in need if c not in tokens_frame.columns]
    if missing:
        raise CanopyError(
            f"the token frame lacks {missing}; pass RUN/diagnostics/tokens.parquet as written by "
            "'canopy score'" + (" with a sampling policy" if prefix else "")
        )
    models = sorted(tokens_frame["model"].astype(str).unique())
    panels = {}
    for model in models:
        rows = tokens_frame[tokens_frame["model"].astype(str) == model]
        panels[model] = tuple(_flat(rows, c) for c in need[1:])
    finite = [v[2][np.isfinite(v[2])] for v in panels.values()]
    norm = _color_norm(np.concatenate(finite) if finite else np.zeros(0))
    with style():
        fig = new_figure(3.4 * max(len(models), 1) + 1.0, 3.4)
        axes = fig.subplots(1, max(len(models), 1), squeeze=False, sharey=True)[0]
        mappable = None
        for ax, model in zip(axes, models, strict=False):
            p, entropy, relative = panels[model]
            ax.set_title(model)
            ax.set_xlabel("entropy $H_t$ (nats)")
            if not p.size:
                note_axes(ax, "no tokens")
                continue
            order = np.argsort(np.abs(relative))  # the most extreme tokens on top
            mappable = ax.scatter(
                entropy[order],
                p[order],
                c=relative[order],
                cmap="coolwarm",
                norm=norm,
                s=6,
                linewidths=0,
                alpha=0.8,
                rasterized=True,
            )
            ax.set_ylim(-0.02, 1.02)
        if not models:
            note_axes(axes[0], "no tokens")
        axes[0].set_ylabel("reference token probability $p_t$")
        if mappable is not None:
            bar = fig.colorbar(mappable, ax=list(axes), shrink=0.9)
            bar.set_label("relative rank log($R_t$ / E[$R_t$])")
    return fig
