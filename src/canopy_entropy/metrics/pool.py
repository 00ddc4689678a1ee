"""Pooling per-prompt rows into one row per group: unweighted means over prompts, correlations
by the Fisher/Kendall/covariance rules, the rate/length split, the SE components and notes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from canopy_entropy.metrics.columns import METRIC_COLUMNS, PROMPT_KEYS, TRUNCATION_WARN_RATE
from canopy_entropy.stats.pooling import (
    MEAN_COLUMNS,
    pool_fisher,
    pooled_statistics,
)


def _pool(
    prompts: pd.DataFrame,
    by: tuple[str, ...],
    delta: float,
    approximate: bool,
    hmax: np.ndarray,
) -> tuple[pd.DataFrame, dict[tuple, list[str]]]:
    rows = []
    notes: dict[tuple, list[str]] = {}
    grouped = prompts.groupby(list(by), sort=True) if by else [((), prompts)]
    for key, g in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row, group_notes = pool_group(g, delta)
        if approximate:
            group_notes.append(
                "entropies come from top-k logprobs only: CE* and rates are lower bounds"
            )
        if not np.isfinite(hmax[g.index.to_numpy()]).all():
            group_notes.append(
                "truncation_bias_bound unknown: no top_k or vocab_size in the manifest; "
                "pass --h-max"
            )
        rows.append({**dict(zip(by, key, strict=True)), **row})
        notes[key] = group_notes
    pooled = pd.DataFrame(rows, columns=[*by, *METRIC_COLUMNS, *_extra_columns(prompts)])
    return pooled, notes


def _extra_columns(prompts: pd.DataFrame) -> list[str]:
    """Merged per-prompt columns (e.g. diversity) pooled beside the metrics."""
    known = {*PROMPT_KEYS, *METRIC_COLUMNS}
    return [c for c in prompts.columns if c not in known]


def pool_group(g: pd.DataFrame, delta: float = 0.05) -> tuple[dict[str, float], list[str]]:
    """Pool one group's per-prompt rows (docs/metrics.md sections 2-6); returns (metrics, notes)."""
    notes: list[str] = []
    n = g["n_rollouts"].to_numpy(dtype=np.float64)
    P = len(g)
    ce = g["ce_star"].to_numpy()
    nbar = g["mean_length"].to_numpy()
    rbar = g["entropy_rate"].to_numpy()
    # the pooling rules: the one implementation every bootstrap replicate uses too
    pooled_cols = [*MEAN_COLUMNS, "pearson", "spearman", "kendall", "covariance", "n_rollouts"]
    shared = pooled_statistics({c: g[c].to_numpy() for c in pooled_cols if c in g.columns})
    ce_pool = float(shared["ce_star"])
    nbar_pool = float(shared["mean_length"])
    rbar_pool = float(shared["entropy_rate"])
    rate_length = nbar_pool * rbar_pool
    between = float(np.mean((nbar - nbar_pool) * (rbar - rbar_pool)))
    within = float(g["within_cov_term"].mean())
    stop_pool = float(g["stop_entropy"].mean())
    h_n = float(shared["length_entropy"])
    h_hist = float(g["length_entropy_hist"].mean())
    h_content = h_n if math.isfinite(h_n) else h_hist

    # docs/metrics.md section 6: Var = s_b^2 / P + E[s_w^2 / M] / P (method of moments, s_b^2 >= 0)
    within_mean = g["ce_star_var_within"].to_numpy()  # s_w^2 / M_p per prompt (NaN for M = 1)
    known = np.isfinite(within_mean)
    # prompts with one rollout have no within variance: estimate E[s_w^2 / M] from the others
    var_within = float(within_mean[known].mean()) / P if known.any() else float("nan")
    if P >= 2:
        var_prompts = float(np.var(ce, ddof=1))
        if math.isfinite(var_within):
            var_between = max(var_prompts - var_within * P, 0.0) / P
            variance = var_between + var_within
            if not known.all():
                notes.append(
                    f"{int((~known).sum())} prompts have one rollout: the within-prompt variance "
                    f"is estimated from the {int(known.sum())} prompts with two or more"
                )
            if variance == 0:
                notes.append("SE is 0: every rollout has the same total entropy (e.g. greedy)")
            elif var_between >= var_within:
                notes.append("SE dominated by between-prompt variance: add more prompts")
            else:
                notes.append("SE dominated by within-prompt variance: add more rollouts per prompt")
        else:
            var_between = float("nan")
            variance = var_prompts / P
    else:
        var_between = float("nan")
        variance = var_within
        notes.append("one prompt: the SE is conditional on this prompt (no between-prompt part)")
    trunc_rate = float(g["truncation_rate"].mean())
    if trunc_rate > TRUNCATION_WARN_RATE:
        notes.append(
            f"{100 * trunc_rate:.1f}% of rollouts hit the length cap: CE* is a lower bound "
            "(see truncation_bias_bound); raise max_new_tokens"
        )
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = {
            "ce_star": ce_pool,
            "ce_star_surprisal": float(g["ce_star_surprisal"].mean()),
            "mean_length": nbar_pool,
            "genppl": float(shared["genppl"]),
            "entropy_rate": rbar_pool,
            "bf": float(shared["bf"]),
            "truncation_rate": trunc_rate,
            "pearson": float(shared["pearson"]),
            "spearman": float(shared["spearman"]),
            "kendall": float(shared["kendall"]),
            "covariance": float(shared["covariance"]),
            "rate_length_term": rate_length,
            "within_cov_term": within,
            "between_cov_term": between,
            "stop_entropy": stop_pool,
            "stop_entropy_share": stop_pool / ce_pool if ce_pool != 0 else float("nan"),
            "length_entropy": h_n,
            "length_entropy_hist": h_hist,
            "content_entropy": ce_pool - h_content,
            "ce_star_se": math.sqrt(variance) if math.isfinite(variance) else float("nan"),
            "ce_star_var_between": var_between,
            "ce_star_var_within": var_within,
            "chebyshev_bound": math.sqrt(variance / delta)
            if math.isfinite(variance)
            else float("nan"),
            "truncation_bias_bound": float(g["truncation_bias_bound"].mean()),
            "n_rollouts": int(n.sum()),
            "n_prompts": P,
        }
    for col in _extra_columns(g):
        values = g[col].to_numpy(dtype=np.float64)
        if col == "corr_length_d":
            out[col] = float(pool_fisher(values, n))
        elif col in shared:  # diversity (mean) and vendi (geometric mean)
            out[col] = float(shared[col])
        else:
            finite = values[np.isfinite(values)]
            out[col] = float(finite.mean()) if finite.size else float("nan")
    return out, notes


def _warn_notes(notes: dict[tuple, list[str]]) -> None:
    """Say loudly (a warning per group) where many rollouts hit the length cap."""
    for key, msgs in notes.items():
        for msg in msgs:
            if "length cap" in msg:
                warnings.warn(f"{'/'.join(map(str, key))}: {msg}", UserWarning, stacklevel=3)
