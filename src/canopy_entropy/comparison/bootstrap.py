"""The paired prompt-level cluster bootstrap: one index matrix for both sides, every replicate
from per-prompt sufficient statistics as one count-matrix product."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from canopy_entropy.comparison.columns import (
    CI_LEVEL,
    CORRELATION_METRICS,
    LOG_MEAN_COLUMNS,
    MEAN_COLUMNS,
    RATIO_METRICS,
)
from canopy_entropy.stats.pooling import (
    FISHER_CLIP,
)

# Pooled as unweighted means of the per-prompt value (GenPPL and BF derive from these).


def resample_counts(indices: np.ndarray, n_prompts: int) -> np.ndarray:
    """``[R, P]`` how often each prompt occurs in each row of an ``[R, P']`` index matrix."""
    indices = np.asarray(indices, dtype=np.int64)
    n_rows = indices.shape[0]
    flat = (np.arange(n_rows, dtype=np.int64)[:, None] * n_prompts + indices).ravel()
    counts = np.bincount(flat, minlength=n_rows * n_prompts)
    return counts.reshape(n_rows, n_prompts).astype(np.float64)


def _pool_rows(counts: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """SPEC section-3 weighted means of ``values`` ([K, P], weights [K, P]) per count row.

    Same rule as ``stats.pooling.weighted_mean_with_fallback`` on gathered ``[R, P']`` arrays
    (non-finite dropped, unweighted mean when all weights are 0, NaN when nothing is finite),
    written as one matrix product ``counts [R, P] @ [P, 4K]`` for all replicates. Returns [K, R].
    """
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    w = np.where(finite, weights, 0.0)
    k = values.shape[0]
    sums = counts @ np.concatenate([w * v, w, v, finite.astype(np.float64)]).T
    num, den, unum, uden = (sums[:, i * k : (i + 1) * k] for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / den, unum / uden)
    return np.where(uden > 0, out, np.nan).T


def pooled_statistics(
    prompt_stats: dict[str, np.ndarray],
    indices: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Pool per-prompt statistics over prompts (SPEC sections 2, 3).

    ``prompt_stats[k]`` holds one value per prompt (``[P]``). With ``indices`` (an ``[R, P']``
    matrix of prompt indices, e.g. ``[B, P]`` bootstrap draws) or the equivalent ``counts``
    (``[R, P]``: how often each prompt is drawn in each row) every row is pooled at once and
    each result has shape ``[R]``; without either, the full sample is pooled (scalars).
    Means over prompts for CE*, mean length, entropy rate, H(N) and D, the geometric mean
    ``exp(mean_p log VS_p)`` for Vendi (non-finite values dropped); GenPPL = exp(mean CE* /
    mean Nbar); BF = exp(mean Rbar); Pearson/Spearman Fisher pooled with weights max(n-3, 0),
    Kendall with n(n-1)/2, covariance with n-1.
    """
    n_prompts = len(next(iter(prompt_stats.values())))
    scalar = indices is None and counts is None
    if counts is None:
        counts = np.ones((1, n_prompts)) if indices is None else resample_counts(indices, n_prompts)

    names: list[str] = []
    values: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    ones = np.ones(n_prompts)
    for col in MEAN_COLUMNS:
        if col in prompt_stats:
            names.append(col)
            value = np.asarray(prompt_stats[col], dtype=np.float64)
            if col in LOG_MEAN_COLUMNS:
                with np.errstate(divide="ignore", invalid="ignore"):
                    value = np.log(value)
            values.append(value)
            weights.append(ones)
    if "n_rollouts" in prompt_stats:
        n = np.asarray(prompt_stats["n_rollouts"], dtype=np.float64)
        for col in ("pearson", "spearman"):
            if col in prompt_stats:
                rho = np.asarray(prompt_stats[col], dtype=np.float64)
                names.append(col)
                values.append(np.arctanh(np.clip(rho, -FISHER_CLIP, FISHER_CLIP)))
                weights.append(np.maximum(n - 3.0, 0.0))
        for col, w in (("kendall", n * (n - 1.0) / 2.0), ("covariance", n - 1.0)):
            if col in prompt_stats:
                names.append(col)
                values.append(np.asarray(prompt_stats[col], dtype=np.float64))
                weights.append(w)
    if not names:
        return {}
    pooled = _pool_rows(counts, np.stack(values), np.stack(weights))
    out: dict[str, np.ndarray] = {}
    for k, col in enumerate(names):
        value = pooled[k, 0] if scalar else pooled[k]
        if col in ("pearson", "spearman"):
            value = np.tanh(value)
        elif col in LOG_MEAN_COLUMNS:
            value = np.exp(value)
        out[col] = value
    if "ce_star" in out and "mean_length" in out:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out["genppl"] = np.exp(out["ce_star"] / out["mean_length"])
    if "entropy_rate" in out:
        with np.errstate(over="ignore"):
            out["bf"] = np.exp(out["entropy_rate"])
    return out


def bootstrap_indices(
    n_prompts: int, n_boot: int, seed: int, group_key: Sequence[str] = ()
) -> np.ndarray:
    """``[n_boot, n_prompts]`` prompt indices drawn with replacement.

    The stream depends only on ``seed`` and the group's key, so adding or removing other groups
    never changes a group's replicates.
    """
    salt = zlib.crc32("\x1f".join(map(str, group_key)).encode())
    rng = np.random.default_rng([int(seed), salt])
    return rng.integers(0, n_prompts, size=(n_boot, n_prompts))


def _bca_interval(
    theta_hat: float, replicates: np.ndarray, jackknife: np.ndarray, level: float = CI_LEVEL
) -> tuple[float, float]:
    """BCa interval (Efron 1987) of a statistic from its bootstrap and jackknife values.

    Bias correction ``z0 = Phi^-1(share of replicates < estimate)``, acceleration from the
    jackknife skewness. Falls back to the percentile interval when degenerate (all replicates
    on one side of the estimate, or fewer than three jackknife values).
    """
    reps = replicates[np.isfinite(replicates)]
    alpha = (1.0 - level) / 2.0
    if reps.size < 2 or not np.isfinite(theta_hat):
        return (np.nan, np.nan)
    share = float(np.count_nonzero(reps < theta_hat)) / reps.size
    jack = jackknife[np.isfinite(jackknife)]
    probs = np.array([alpha, 1.0 - alpha])
    if 0.0 < share < 1.0 and jack.size >= 3:
        z0 = ndtri(share)
        dev = jack.mean() - jack
        den = 6.0 * float((dev**2).sum()) ** 1.5
        acc = float((dev**3).sum()) / den if den > 0 else 0.0
        z = ndtri(probs)
        adjusted = ndtr(z0 + (z0 + z) / (1.0 - acc * (z0 + z)))
        if np.all(np.isfinite(adjusted)):
            probs = adjusted
    lo, hi = np.quantile(reps, probs)
    return float(lo), float(hi)


def _sd(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.std(x, ddof=1)) if x.size >= 2 else float("nan")


def _percentile(x: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size < 2:
        return (np.nan, np.nan)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(x, alpha)), float(np.quantile(x, 1.0 - alpha))


@dataclass
class PairedReplicates:
    """Full-sample pooled values and bootstrap replicates of both sides for one group."""

    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    a_reps: dict[str, np.ndarray]
    b_reps: dict[str, np.ndarray]
    a_jack: dict[str, np.ndarray]
    b_jack: dict[str, np.ndarray]
    indices: np.ndarray


def paired_bootstrap(
    a_stats: dict[str, np.ndarray],
    b_stats: dict[str, np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    group_key: Sequence[str] = (),
) -> PairedReplicates:
    """Paired cluster bootstrap: the same ``[B, P]`` prompt indices for both sides.

    ``a_stats[k][p]`` and ``b_stats[k][p]`` are prompt ``p``'s sufficient statistic ``k`` for
    the two sides (already paired by prompt). Also returns leave-one-prompt-out (jackknife)
    values for BCa intervals.
    """
    n_prompts = len(next(iter(a_stats.values())))
    idx = bootstrap_indices(n_prompts, n_boot, seed, group_key)
    counts = resample_counts(idx, n_prompts)
    jack = 1.0 - np.eye(n_prompts)  # leave-one-prompt-out designs as counts
    return PairedReplicates(
        a=pooled_statistics(a_stats),
        b=pooled_statistics(b_stats),
        a_reps=pooled_statistics(a_stats, counts=counts),
        b_reps=pooled_statistics(b_stats, counts=counts),
        a_jack=pooled_statistics(a_stats, counts=jack) if n_prompts >= 2 else {},
        b_jack=pooled_statistics(b_stats, counts=jack) if n_prompts >= 2 else {},
        indices=idx,
    )


def _spread(series: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, ...]:
    """SD (ddof 1) and percentile interval of each row of ``[S, B]`` replicates, batched.

    Non-finite replicates (e.g. a ratio whose denominator resampled to 0) are dropped per row.
    """
    alpha = (1.0 - level) / 2.0
    n_rows = series.shape[0]
    sd, lo, hi = (np.full(n_rows, np.nan) for _ in range(3))
    clean = np.isfinite(series).all(axis=1)
    if clean.any() and series.shape[1] >= 2:
        sub = series[clean]
        sd[clean] = sub.std(axis=1, ddof=1)
        lo[clean], hi[clean] = np.quantile(sub, [alpha, 1.0 - alpha], axis=1)
    for row in np.flatnonzero(~clean):
        sd[row] = _sd(series[row])
        lo[row], hi[row] = _percentile(series[row], level)
    return sd, lo, hi


def summarise_replicates(rep: PairedReplicates) -> list[dict[str, float | str]]:
    """One tidy row per metric: A, B, their SEs and CIs, the change with SE and CIs."""
    metrics = [m for m in (*RATIO_METRICS, *CORRELATION_METRICS) if m in rep.a]
    nan = float("nan")
    series, names = [], []
    for m in metrics:
        ar, br = rep.a_reps[m], rep.b_reps[m]
        series += [ar, br, br - ar]
        names += [(m, "a"), (m, "b"), (m, "diff")]
        if m in RATIO_METRICS:
            with np.errstate(divide="ignore", invalid="ignore"):
                series.append(100.0 * (br - ar) / np.abs(ar))
            names.append((m, "pct"))
    if not metrics:
        return []
    sd, lo, hi = _spread(np.stack(series))
    spread = {name: (sd[k], lo[k], hi[k]) for k, name in enumerate(names)}
    rows: list[dict[str, float | str]] = []
    for m in metrics:
        a, b = float(rep.a[m]), float(rep.b[m])
        row: dict[str, float | str] = {
            "metric": m,
            "kind": "ratio" if m in RATIO_METRICS else "correlation",
            "a": a,
            "b": b,
        }
        for part, prefix in (("a", "a"), ("b", "b"), ("diff", "diff")):
            row[f"{prefix}_se"], row[f"{prefix}_lo"], row[f"{prefix}_hi"] = map(
                float, spread[(m, part)]
            )
        row["diff"] = b - a
        row.update(pct=nan, pct_se=nan, pct_lo=nan, pct_hi=nan, ratio_lo=nan, ratio_hi=nan)
        if m in RATIO_METRICS:
            pct_se, pct_lo, pct_hi = map(float, spread[(m, "pct")])
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio_reps = rep.b_reps[m] / rep.a_reps[m]
                ratio_jack = rep.b_jack[m] / rep.a_jack[m] if rep.a_jack else np.zeros(0)
            r_lo, r_hi = _bca_interval(b / a if a != 0 else nan, ratio_reps, ratio_jack)
            row.update(
                pct=100.0 * (b - a) / abs(a) if a != 0 else nan,
                pct_se=pct_se,
                pct_lo=pct_lo,
                pct_hi=pct_hi,
                ratio_lo=100.0 * (r_lo - 1.0) if a > 0 else nan,
                ratio_hi=100.0 * (r_hi - 1.0) if a > 0 else nan,
            )
        rows.append(row)
    return rows
