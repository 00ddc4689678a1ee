"""Figures from typed results, for notebooks: each returns a matplotlib Figure, writes nothing.

``canopy_entropy.figures.ce_decomposition(run.metrics)`` draws what ``canopy plot`` writes to
``RUN/figures/fig4_ce_decomposition.*``; colours (one per family) and line styles (base dashed,
instruct solid) are the same as in the saved figures.
"""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from canopy_entropy.plots import figures as _fig
from canopy_entropy.plots.style import style
from canopy_entropy.run.layout import GROUP_KEYS


def _pooled_with_keys(metrics: Any) -> Any:
    """The pooled table with every group key (a model's family and variant added from the
    prompts when the metrics were pooled by fewer keys)."""
    pooled = metrics.pooled
    missing = [k for k in GROUP_KEYS if k not in pooled.columns]
    if not missing:
        return pooled
    by = [k for k in GROUP_KEYS if k in pooled.columns]
    keys = metrics.prompts[[*by, *missing]].drop_duplicates(subset=by)
    return pooled.merge(keys, on=by, how="left")


def ce_decomposition(metrics: Any) -> Figure:
    """CE* split into Nbar*Rbar, the within- and between-prompt covariance, and stop/content."""
    pooled = _pooled_with_keys(metrics)
    with style():
        return _fig.ce_decomposition(pooled)


def length_distribution(metrics: Any) -> Figure:
    """Output-length distribution per task and model (log length axis)."""
    rollouts = metrics.rollouts.rename(columns={"r": "rate"})
    with style():
        return _fig.length_distribution(rollouts)


def within_prompt_variance(metrics: Any) -> Figure:
    """Distribution over prompts of the within-prompt variance of the rate r and of N."""
    rollouts = metrics.rollouts.rename(columns={"r": "rate"})
    with style():
        return _fig.within_prompt_variance(rollouts)


def comparison(result: Any) -> Figure:
    """The compared sides' CE*, GenPPL, BF and rho(N, r) with bootstrap intervals."""
    with style():
        return _fig.comparison(result.table)


def coefficients(result: Any) -> Figure:
    """Regression coefficients with 95% intervals (from a ``RegressionResult``)."""
    with style():
        return _fig.coefficients(result.summary)
