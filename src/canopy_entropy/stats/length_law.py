"""H(N) under a length cap T from the EOS hazard (docs/metrics.md section 5), as pure numpy functions.

The observed length is ``min(N, T)``: its law lives on ``{1..T}`` plus the outcome "cut at T".
``p_hat(n) = (1/M) sum_i 1{N_i >= n} lambda_in`` estimates ``P(N = n)`` without bias for every
``n <= T`` (it is 0 beyond the longest rollout ``n_max``), so the leftover
``A = 1 - sum_n p_hat(n)`` (clipped at 0) estimates ``P(N > n_max)``. That leftover either goes
whole to the cut outcome, or, when every rollout ended by EOS, is spread over the unseen lengths
``n_max < n <= T`` by a truncated geometric law (per-step stopping hazard ``q`` fitted to the
upper lengths) with the rest on "cut at T". No mass is ever put beyond T.
"""

from __future__ import annotations

import numpy as np


def entr(x) -> np.ndarray:
    """``-x log x`` elementwise in float64: 0 at 0 and -inf below 0, as ``scipy.special.entr``
    (in numpy, so the metrics stage does not import scipy.special)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(-x * np.log(x))
    out[x == 0.0] = 0.0
    out[x < 0.0] = -np.inf
    return out[()] if out.ndim == 0 else out


def hazard_law(hazard_sums: list[np.ndarray], m: np.ndarray) -> np.ndarray:
    """``[P, W]`` matrix of ``p_hat(n)``, column ``j`` for length ``n = j + 1``, from each
    prompt's per-step sums ``sum_i 1{N_i >= n} lambda_in`` and its rollout count ``m``
    (clipped at 0; ``W`` is the longest accumulator)."""
    width = max((h.size for h in hazard_sums), default=0)
    law = np.zeros((len(hazard_sums), width))
    for g, h in enumerate(hazard_sums):  # loop over prompts only
        law[g, : h.size] = h
    law /= np.asarray(m, dtype=np.float64)[:, None]
    return np.clip(law, 0.0, None, out=law)


def eos_tail_hazard(p_hat: np.ndarray, m: np.ndarray, u: np.ndarray, exposure: np.ndarray):
    """Per-step stopping hazard above length ``u``: the EOS probability summed over the steps
    at risk beyond ``u`` divided by their number ``exposure`` (a smooth, Rao-Blackwellised
    form of stops / steps at risk). NaN where nothing is at risk."""
    cols = np.arange(p_hat.shape[1])
    above = cols[None, :] >= np.asarray(u, dtype=np.float64)[:, None]  # column j is n = j + 1
    mass = np.where(above, p_hat, 0.0).sum(axis=1) * np.asarray(m, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(exposure > 0, mass / exposure, np.nan)


def geometric_run_entropy(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Entropy of the first success among at most ``k`` Bernoulli(q) trials, "no success" being
    one more outcome: ``h(q) (1 - (1 - q)^k) / q`` (``h(q) / q`` for ``k = inf``)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    h = entr(q) + entr(1.0 - q)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        reached = -np.expm1(k * np.log1p(-q))  # 1 - (1 - q)^k, exactly 1 for k = inf
        return np.where(q > 0, h * reached / q, 0.0)


def capped_length_entropy(
    p_hat: np.ndarray,
    n_max: np.ndarray,
    cap: np.ndarray,
    tail_hazard: np.ndarray,
    tail_mass: np.ndarray,
) -> np.ndarray:
    """H of the observed length ``min(N, T)`` (support ``{1..T}`` plus "cut at T") per prompt.

    ``p_hat``: ``[P, W]`` from ``hazard_law``; ``n_max``: the longest rollout; ``cap``: T
    (``inf`` when no cap applies). Up to ``tail_mass`` of the leftover ``1 - sum p_hat`` is
    spread over the unseen lengths ``(n_max, T]`` as a geometric law with ``tail_hazard`` (its
    part beyond T joins "cut"); the rest of the leftover is the cut outcome (0 where
    ``tail_mass`` is 0). When ``sum p_hat > 1`` the body is scaled to mass 1, nothing is left.
    """
    total = p_hat.sum(axis=1)
    body = p_hat / np.maximum(total, 1.0)[:, None]
    leftover = np.clip(1.0 - total, 0.0, None)
    room = np.clip(np.asarray(cap, dtype=np.float64) - n_max, 0.0, None)
    q = np.asarray(tail_hazard, dtype=np.float64)
    ok = (room > 0) & (q > 0) & (q <= 1)
    q = np.where(ok, q, 0.5)
    spread = np.where(ok, np.minimum(leftover, np.nan_to_num(tail_mass, nan=0.0)), 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        past_cap = np.exp(room * np.log1p(-q))  # (1 - q)^(T - n_max): the geometric's part > T
    past_cap = np.where(np.isfinite(room), past_cap, 0.0)
    within = 1.0 - past_cap
    # sum_{n_max < n <= T} entr(spread * g_n) = within * entr(spread) + spread * (H(g) - entr(past))
    tail = within * entr(spread) + spread * (geometric_run_entropy(q, room) - entr(past_cap))
    cut = leftover - spread + spread * past_cap
    return entr(body).sum(axis=1) + tail + entr(cut)


def eos_length_entropy(
    p_hat: np.ndarray,
    m: np.ndarray,
    n_max: np.ndarray,
    cap: np.ndarray,
    u: np.ndarray,
    surv_u: np.ndarray,
    exposure: np.ndarray,
    ended_by_eos: np.ndarray,
) -> np.ndarray:
    """The reported ``length_entropy``: ``capped_length_entropy`` whose tail over
    ``(n_max, T]`` (only where every rollout ended by EOS) carries at most the fitted
    ``P(N > n_max) = P(N > u) (1 - q)^(n_max - u)``, ``q`` the EOS hazard above ``u``.

    Capping the spread mass by the fit keeps the estimate consistent (the fitted tail vanishes
    as M grows) while removing most of the small-M bias (benchmarks/bench_length_law.py).
    """
    q = eos_tail_hazard(p_hat, m, u, exposure)
    with np.errstate(invalid="ignore", over="ignore"):
        fitted = surv_u * np.power(1.0 - q, n_max - u)
    return capped_length_entropy(p_hat, n_max, cap, q, np.where(ended_by_eos, fitted, 0.0))
