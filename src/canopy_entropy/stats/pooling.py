"""Pooling of per-prompt statistics across prompts (docs/metrics.md section 4).

All functions pool along the last axis, so a ``[replicates, prompts]`` array pools every
bootstrap replicate at once. Non-finite values are dropped (weight 0); when every weight of a
row is 0 the unweighted mean of its finite values is used; a row with no finite value is NaN.
"""

from __future__ import annotations

import numpy as np

FISHER_CLIP = 0.999999
# per-prompt columns pooled by their (unweighted) mean over prompts ...
MEAN_COLUMNS = (
    "ce_star",
    "mean_length",
    "entropy_rate",
    "length_entropy",
    "diversity",
    "vendi",
    "rse",
    "rse_normalized",
    # correctness (metrics.accuracy), merged in when the run was scored
    "accuracy",
    "majority",
    "pass_at_5",
    "pass_at_10",
)
# ... of which these are pooled on the log scale: exp(mean_p log v_p), an effective number
LOG_MEAN_COLUMNS = ("vendi",)


def weighted_mean_with_fallback(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean along the last axis with the drop/fallback rules (one row of
    ``pool_counts`` per leading index: the same implementation as every bootstrap replicate)."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), values.shape)
    n = values.shape[-1]
    flat = pool_counts(np.ones((1, n)), values.reshape(-1, n), weights.reshape(-1, n))[:, 0]
    return flat.reshape(values.shape[:-1]) if values.ndim > 1 else flat[0]


def pool_fisher(rho: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Pearson/Spearman: clip |rho| <= 0.999999, Fisher z, weights max(n-3, 0), tanh back."""
    rho = np.asarray(rho, dtype=np.float64)
    z = np.arctanh(np.clip(rho, -FISHER_CLIP, FISHER_CLIP))
    w = np.maximum(np.asarray(n, dtype=np.float64) - 3.0, 0.0)
    return np.tanh(weighted_mean_with_fallback(z, w))


def pool_kendall(tau: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Kendall tau-b: weighted mean on the tau scale, weights n(n-1)/2."""
    n = np.asarray(n, dtype=np.float64)
    return weighted_mean_with_fallback(tau, n * (n - 1.0) / 2.0)


def pool_covariance(cov: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Sample covariance (ddof 1): weighted mean, weights n-1."""
    return weighted_mean_with_fallback(cov, np.asarray(n, dtype=np.float64) - 1.0)


def resample_counts(indices: np.ndarray, n_prompts: int) -> np.ndarray:
    """``[R, P]`` how often each prompt occurs in each row of an ``[R, P']`` index matrix."""
    indices = np.asarray(indices, dtype=np.int64)
    n_rows = indices.shape[0]
    flat = (np.arange(n_rows, dtype=np.int64)[:, None] * n_prompts + indices).ravel()
    counts = np.bincount(flat, minlength=n_rows * n_prompts)
    return counts.reshape(n_rows, n_prompts).astype(np.float64)


def pool_counts(counts: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """docs/metrics.md section-4 weighted means of ``values`` ([K, P], weights [K, P]) per count row.

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
    """Pool per-prompt statistics over prompts (docs/metrics.md sections 3-4).

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
    pooled = pool_counts(counts, np.stack(values), np.stack(weights))
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
