"""Vectorised per-group statistics over rollouts (Pearson r, mid-ranks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from canopy_entropy.stats.correlation import pearson_from_sums

# Pooled as unweighted means of the per-prompt value (GenPPL and BF derive from these).


def _group_ids(frame: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    return frame.groupby(list(cols), sort=True, observed=True).ngroup().to_numpy()


def grouped_pearson(g: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of x and y within each group id; NaN where a side is constant."""
    k = int(g.max()) + 1 if len(g) else 0
    n = np.bincount(g, minlength=k).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = np.bincount(g, weights=x, minlength=k) / n
        my = np.bincount(g, weights=y, minlength=k) / n
        xc, yc = x - mx[g], y - my[g]
        sxy = np.bincount(g, weights=xc * yc, minlength=k)
        sxx = np.bincount(g, weights=xc * xc, minlength=k)
        syy = np.bincount(g, weights=yc * yc, minlength=k)
    sqx = np.bincount(g, weights=x * x, minlength=k)
    sqy = np.bincount(g, weights=y * y, minlength=k)
    return pearson_from_sums(sxy, sxx, syy, sqx, sqy), n


def grouped_midranks(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x within each group, ties given their mid-rank."""
    order = np.lexsort((x, g))
    gs, xs = g[order], x[order]
    m = len(x)
    if m == 0:
        return np.zeros(0)
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    new_run = new_group | np.r_[True, xs[1:] != xs[:-1]]
    pos = np.arange(m, dtype=np.float64)
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0.0))
    run_id = np.cumsum(new_run) - 1
    run_first = pos[new_run]
    run_last = np.r_[run_first[1:] - 1, m - 1]
    mid = (run_first + run_last) / 2.0
    ranks_sorted = mid[run_id] - group_start + 1.0
    ranks = np.empty(m)
    ranks[order] = ranks_sorted
    return ranks
