"""Semantic diversity of a prompt's rollouts from their embeddings (docs/metrics.md section 7).

Per prompt with unit-norm embeddings ``e_1..e_M``: ``d_i = 1 - mean_{j != i} cos(e_i, e_j)``,
``D = mean_i d_i``, and the Vendi score ``exp(-sum lambda log lambda)`` over the eigenvalues of
``K / M`` (``K`` the cosine-similarity matrix); pooled over prompts, D by the mean and Vendi by
the geometric mean. When ``M > dim`` the ``dim x dim`` covariance
form ``E^T E / M`` has the same non-zero spectrum and is cheaper. All arithmetic in float64 on
float32 inputs; prompts of equal size are processed as one batched stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.stats.correlation import pearson

DIVERSITY_COLUMNS = (
    "diversity",
    "vendi",
    "diversity_len_t1",
    "diversity_len_t2",
    "diversity_len_t3",
    "corr_length_d",
    "n_rollouts",
)


def rollout_diversity(embeddings: np.ndarray) -> np.ndarray:
    """Per-rollout ``d_i = 1 - mean_{j != i} cos(e_i, e_j)`` for one prompt ([M, dim] -> [M]).

    Uses ``sum_j cos(e_i, e_j) = e_i . sum_j e_j`` so the cost is O(M dim), not O(M^2 dim).
    Fewer than two rollouts: NaN (no pair to compare).
    """
    e = np.asarray(embeddings, dtype=np.float64)
    m = e.shape[0]
    if m < 2:
        return np.full(m, np.nan)
    total = e @ e.sum(axis=0)
    self_sim = np.einsum("ij,ij->i", e, e)
    return 1.0 - (total - self_sim) / (m - 1)


def _spectral_entropy_exp(eigenvalues: np.ndarray) -> np.ndarray:
    """``exp(-sum lambda log lambda)`` along the last axis, negatives from rounding set to 0."""
    lam = np.clip(eigenvalues, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(lam > 0, lam * np.log(np.where(lam > 0, lam, 1.0)), 0.0)
    return np.exp(-terms.sum(axis=-1))


def vendi_score(embeddings: np.ndarray) -> float | np.ndarray:
    """Vendi score of one prompt ([M, dim]) or a stack of prompts ([P, M, dim]).

    Eigenvalues of ``K / M`` with ``K = E E^T``; for ``M > dim`` those of ``E^T E / M`` (the
    same non-zero spectrum, a ``dim x dim`` problem).
    """
    e = np.asarray(embeddings, dtype=np.float64)
    m, dim = e.shape[-2], e.shape[-1]
    if m == 0:
        return np.nan if e.ndim == 2 else np.full(e.shape[0], np.nan)
    et = np.swapaxes(e, -1, -2)
    gram = (et @ e) if m > dim else (e @ et)
    out = _spectral_entropy_exp(np.linalg.eigvalsh(gram / m))
    return float(out) if e.ndim == 2 else out


def _length_tercile_labels(lengths: np.ndarray, rollout_index: np.ndarray) -> np.ndarray:
    """Tercile 0/1/2 of each rollout by length rank (ties broken by rollout index).

    Rank-based so ties never leave a tercile empty: ``np.array_split`` of the sorted order into
    three nearly equal parts (sizes differ by at most one).
    """
    order = np.lexsort((rollout_index, lengths))
    labels = np.empty(len(lengths), dtype=np.int64)
    for k, part in enumerate(np.array_split(order, 3)):
        labels[part] = k
    return labels


def diversity_tables(
    keys: pd.DataFrame, embeddings: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-prompt and per-rollout diversity from rollout keys and their embeddings.

    ``keys`` has one row per rollout with model, variant, family, task, prompt_id,
    rollout_index and length, aligned with ``embeddings`` ([rows, dim], unit norm). Returns
    ``(prompt_diversity, rollout_diversity)`` frames (see module doc for the columns).
    """
    keys = keys.reset_index(drop=True)
    emb = np.asarray(embeddings, dtype=np.float32)
    if len(keys) != emb.shape[0]:
        raise ValueError(f"{len(keys)} key rows but {emb.shape[0]} embeddings")
    lengths = keys["length"].to_numpy(dtype=np.int64)
    ridx = keys["rollout_index"].to_numpy(dtype=np.int64)
    group_ids = keys.groupby(list(PROMPT_KEYS), sort=True, observed=True).ngroup().to_numpy()
    order = np.lexsort((ridx, group_ids))
    bounds = np.flatnonzero(np.diff(group_ids[order])) + 1
    groups = np.split(order, bounds) if len(order) else []

    d_all = np.full(len(keys), np.nan)
    n_groups = len(groups)
    prompt_rows: dict[str, np.ndarray] = {
        c: np.full(n_groups, np.nan) for c in DIVERSITY_COLUMNS if c != "n_rollouts"
    }
    sizes = np.array([len(g) for g in groups], dtype=np.int64)

    # Vendi batched over prompts of equal size (the usual case: M rollouts everywhere).
    for m in np.unique(sizes):
        which = np.flatnonzero(sizes == m)
        stack = np.stack([emb[groups[g]] for g in which])
        prompt_rows["vendi"][which] = vendi_score(stack)

    for g, rows in enumerate(groups):
        e = emb[rows]
        d = rollout_diversity(e)
        d_all[rows] = d
        prompt_rows["diversity"][g] = d.mean() if len(d) >= 2 else np.nan
        prompt_rows["corr_length_d"][g] = pearson(lengths[rows].astype(np.float64), d)
        terciles = _length_tercile_labels(lengths[rows], ridx[rows])
        for k in range(3):
            sub = e[terciles == k]
            if len(sub) >= 2:
                prompt_rows[f"diversity_len_t{k + 1}"][g] = rollout_diversity(sub).mean()

    first = np.array([g[0] for g in groups], dtype=np.int64)
    prompts = keys.loc[first, list(PROMPT_KEYS)].reset_index(drop=True)
    for c in DIVERSITY_COLUMNS:
        prompts[c] = sizes if c == "n_rollouts" else prompt_rows[c]
    per_rollout = keys[[*PROMPT_KEYS, "rollout_index", "length"]].copy()
    per_rollout["d"] = d_all
    per_rollout = per_rollout.sort_values([*PROMPT_KEYS, "rollout_index"]).reset_index(drop=True)
    return prompts, per_rollout


def pool_vendi(values: np.ndarray) -> float:
    """Vendi pooled over prompts as the geometric mean ``exp(mean_p log VS_p)`` of the finite
    scores (an effective number, as the published code pools it); NaN when none is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.exp(np.log(v).mean())) if v.size else float("nan")


def pooled_diversity(prompts: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group: D by the unweighted mean over prompts, Vendi by the geometric mean
    (``pool_vendi``), docs/metrics.md section 7."""
    grouped = prompts.groupby(list(by), sort=True, observed=True)
    return grouped.agg(diversity=("diversity", "mean"), vendi=("vendi", pool_vendi)).reset_index()
