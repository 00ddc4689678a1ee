"""Per-prompt statistics from the per-rollout arrays: correlations, the length law, the
truncation bound and the within-prompt variance, on padded [prompt, rollout] matrices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canopy_entropy.run.manifest import Manifest
from canopy_entropy.stats.correlation import pearson_from_sums
from canopy_entropy.stats.length_law import entr


def _row_midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..M within each row of ``x``, ties given their mid-rank (as
    ``scipy.stats.rankdata(x, axis=1)``; a row holding NaN is all NaN), in numpy so the metrics
    stage does not import scipy.stats."""
    n_rows, width = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    new_run = np.ones(xs.shape, dtype=bool)
    new_run[:, 1:] = xs[:, 1:] != xs[:, :-1]
    flat_new = new_run.ravel()
    run_id = np.cumsum(flat_new) - 1
    first = np.tile(np.arange(width, dtype=np.float64), n_rows)[flat_new]
    mid = first + (np.bincount(run_id) - 1) / 2.0 + 1.0
    ranks = np.empty(xs.shape)
    np.put_along_axis(ranks, order, mid[run_id].reshape(xs.shape), axis=1)
    ranks[np.isnan(x).any(axis=1)] = np.nan
    return ranks


def _padded(values: np.ndarray, code: np.ndarray, pos: np.ndarray, shape, fill) -> np.ndarray:
    out = np.full(shape, fill, dtype=np.float64)
    out[code, pos] = values
    return out


def _kendall_tau_b(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Kendall tau-b per row of NaN-padded matrices, by pair-sign products in prompt chunks."""
    P, M = X.shape
    out = np.full(P, np.nan)
    chunk = max(1, int(4_000_000 // max(M * M, 1)))
    for a in range(0, P, chunk):  # loop over chunks of prompts
        x = X[a : a + chunk]
        y = Y[a : a + chunk]
        sx = np.nan_to_num(np.sign(x[:, :, None] - x[:, None, :])).astype(np.int8)
        sy = np.nan_to_num(np.sign(y[:, :, None] - y[:, None, :])).astype(np.int8)
        s = (sx.astype(np.int32) * sy).sum(axis=(1, 2)) / 2.0
        nx = np.count_nonzero(sx, axis=(1, 2)) / 2.0
        ny = np.count_nonzero(sy, axis=(1, 2)) / 2.0
        with np.errstate(invalid="ignore", divide="ignore"):
            tau = s / np.sqrt(nx * ny)
        out[a : a + chunk] = np.where((nx > 0) & (ny > 0), tau, np.nan)
    return out


def _pearson_by_code(x: np.ndarray, y: np.ndarray, code: np.ndarray, P: int, m: np.ndarray):
    """Per-prompt Pearson r, population covariance and sample covariance (ddof 1), centred."""
    xbar = np.bincount(code, x, P) / m
    ybar = np.bincount(code, y, P) / m
    dx = x - xbar[code]
    dy = y - ybar[code]
    sxy = np.bincount(code, dx * dy, P)
    sxx = np.bincount(code, dx * dx, P)
    syy = np.bincount(code, dy * dy, P)
    r = pearson_from_sums(sxy, sxx, syy, np.bincount(code, x * x, P), np.bincount(code, y * y, P))
    with np.errstate(invalid="ignore", divide="ignore"):
        cov_sample = np.where(m > 1, sxy / (m - 1), np.nan)
    return r, sxy / m, cov_sample


def _histogram_entropy(length: np.ndarray, cut: np.ndarray, code: np.ndarray, m: np.ndarray):
    """Plug-in H(N) per prompt; a length reached without EOS is its own outcome."""
    P = len(m)
    key = (code * (2 * (int(length.max()) + 1))) + 2 * length + cut.astype(np.int64)
    uniq, counts = np.unique(key, return_counts=True)
    owner = uniq // (2 * (int(length.max()) + 1))
    p = counts / m[owner]
    return np.bincount(owner, entr(p), P)


@dataclass
class TailFit:
    """Per-prompt geometric fit of the upper length law (above threshold ``u``)."""

    u: np.ndarray
    hazard: np.ndarray  # per-step stopping probability above u
    surv_u: np.ndarray  # empirical P(N > u)
    exposure: np.ndarray  # steps at risk above u
    events: np.ndarray  # stops (not cuts) above u
    n_max: np.ndarray  # longest rollout


def _fit_tail(
    length: np.ndarray,
    truncated: np.ndarray,
    code: np.ndarray,
    m: np.ndarray,
    cap: np.ndarray,
    sorted_len: np.ndarray,
) -> TailFit:
    """Geometric (discrete exponential) fit to the upper survival curve of N, per prompt.

    Threshold u = the 75th-percentile length, kept below the cap T and below the longest
    rollout that stopped (so at least one stop lies above it); above u the per-step
    stopping hazard is fitted by censored maximum likelihood (stops / steps at risk, cut
    rollouts censored), so P(N > t) = P(N > u) (1 - hazard)^(t - u) for t >= u.
    """
    P = len(m)
    idx = np.arange(P)
    u = sorted_len[idx, np.floor(0.75 * (m - 1)).astype(np.int64)]
    longest_stop = np.full(P, -np.inf)  # u stays below the longest rollout that stopped
    np.maximum.at(longest_stop, code[~truncated], length[~truncated])
    u = np.minimum(u, cap - 1)
    u = np.where(np.isfinite(longest_stop), np.minimum(u, longest_stop - 1), u)
    above = length > u[code]
    events = np.bincount(code, above & ~truncated, P)
    exposure = np.bincount(code, np.where(above, length - u[code], 0), P)
    with np.errstate(invalid="ignore", divide="ignore"):
        hazard = events / exposure
    return TailFit(
        u=u,
        hazard=hazard,
        surv_u=np.bincount(code, above, P) / m,
        exposure=exposure,
        events=events,
        n_max=sorted_len[idx, m.astype(np.int64) - 1],
    )


def _tail_sum(fit: TailFit, cap: np.ndarray) -> np.ndarray:
    """sum_{t >= T} P(N > t) = P(N > u) (1 - h)^(T - u) / h under the geometric fit."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        tail = fit.surv_u * np.power(1.0 - fit.hazard, cap - fit.u) / fit.hazard
    tail = np.where(fit.exposure > 0, tail, 0.0)
    return np.where((fit.exposure > 0) & (fit.events == 0), np.inf, tail)


def _caps_and_hmax(
    models: np.ndarray,
    code: np.ndarray,
    N: np.ndarray,
    truncated: np.ndarray,
    manifest: Manifest,
    h_max: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt: the length cap T, H_max and whether T is known.

    T: the length of the prompt's cut rollouts (the data is authoritative), else the
    manifest's max_new_tokens for the model, else the model's cut length, else (not known)
    the prompt's longest rollout. H_max: --h-max, else log top_k / log vocab_size from the
    manifest, else NaN.
    """
    P = len(models)
    cut_len = np.full(P, -np.inf)
    np.maximum.at(cut_len, code[truncated], N[truncated])
    longest = np.full(P, -np.inf)
    np.maximum.at(longest, code, N)
    cap = np.where(np.isfinite(cut_len), cut_len, np.nan)
    hmax = np.empty(P, dtype=np.float64)
    for model in np.unique(models):  # loop over models only
        sel = models == model
        configured = manifest.max_new_tokens(str(model))
        model_cut = cut_len[sel].max()
        fallback = (
            float(configured) if configured else (model_cut if np.isfinite(model_cut) else np.nan)
        )
        cap[sel] = np.where(np.isnan(cap[sel]), fallback, cap[sel])
        hmax[sel] = _h_max_for(manifest, str(model), h_max)
    known = ~np.isnan(cap)
    return np.where(known, cap, longest), hmax, known


def _h_max_for(manifest: Manifest, model: str, h_max: float | None) -> float:
    if h_max is not None:
        return float(h_max)
    record = manifest.model(model)
    bound = record.h_max if record is not None else None
    return float("nan") if bound is None else bound
