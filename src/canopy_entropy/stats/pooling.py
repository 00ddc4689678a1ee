"""Pooling of per-prompt statistics across prompts (SPEC section 3).

All functions pool along the last axis, so a ``[replicates, prompts]`` array pools every
bootstrap replicate at once. Non-finite values are dropped (weight 0); when every weight of a
row is 0 the unweighted mean of its finite values is used; a row with no finite value is NaN.
"""

from __future__ import annotations

import numpy as np

FISHER_CLIP = 0.999999


def weighted_mean_with_fallback(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean along the last axis with SPEC section-3 drop/fallback rules."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), values.shape)
    finite = np.isfinite(values)
    w = np.where(finite, weights, 0.0)
    v = np.where(finite, values, 0.0)
    wsum = w.sum(axis=-1)
    nfin = finite.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = (w * v).sum(axis=-1) / wsum
        unweighted = v.sum(axis=-1) / nfin
    out = np.where(wsum > 0, weighted, unweighted)
    return np.where(nfin > 0, out, np.nan)


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
