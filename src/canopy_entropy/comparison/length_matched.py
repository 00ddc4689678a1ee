"""The length-matched re-analysis: the same relations on rollouts matched by length bin
between the two sides, beside the unmatched values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from canopy_entropy.comparison.columns import pairing_columns
from canopy_entropy.comparison.grouped import _group_ids, grouped_midranks, grouped_pearson
from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.stats.pooling import (
    pool_fisher,
)

# Pooled as unweighted means of the per-prompt value (GenPPL and BF derive from these).


def length_bins(lengths: np.ndarray, bins_per_octave: int = 2) -> np.ndarray:
    """Log-spaced length bin of each length: ``floor(bins_per_octave * log2(N))``."""
    n = np.maximum(np.asarray(lengths, dtype=np.float64), 1.0)
    return np.floor(bins_per_octave * np.log2(n) + 1e-9).astype(np.int64)


def match_lengths(
    frame: pd.DataFrame,
    side_col: str,
    cell_cols: Sequence[str],
    seed: int = 0,
    bins_per_octave: int = 2,
) -> np.ndarray:
    """Boolean mask of rollouts kept so both sides have equal counts in every length bin.

    Within each cell (e.g. by-group and prompt) and log-length bin, both sides are subsampled
    (seeded, uniformly at random) to the smaller of the two counts.
    """
    work = frame[[*cell_cols, side_col]].copy()
    work["_bin"] = length_bins(frame["length"].to_numpy(), bins_per_octave)
    cell = _group_ids(work, [*cell_cols, "_bin"])
    side = (
        (work[side_col].to_numpy() == work[side_col].iloc[0]).astype(np.int64)
        if len(work)
        else np.zeros(0, np.int64)
    )
    k = int(cell.max()) + 1 if len(cell) else 0
    counts = np.stack([np.bincount(cell[side == s], minlength=k) for s in (0, 1)])
    keep_n = counts.min(axis=0)
    rng = np.random.default_rng([int(seed), 0x6C656E])
    priority = rng.random(len(frame))
    order = np.lexsort((priority, side, cell))
    cs, ss = cell[order], side[order]
    start = np.r_[True, (cs[1:] != cs[:-1]) | (ss[1:] != ss[:-1])]
    pos = np.arange(len(order))
    rank = pos - np.maximum.accumulate(np.where(start, pos, 0))
    keep = np.zeros(len(frame), dtype=bool)
    keep[order] = rank < keep_n[cs]
    return keep


def _relation_stats(frame: pd.DataFrame, has_d: bool) -> dict[str, float]:
    """Pooled within-prompt rho(N, r) and, with diversity, the rate-diversity relation."""
    if len(frame) == 0:
        return {}
    g = _group_ids(frame, PROMPT_KEYS)
    n_len = frame["length"].to_numpy(np.float64)
    r = frame["r"].to_numpy(np.float64)
    n = np.bincount(g).astype(np.float64)
    pearson, _ = grouped_pearson(g, n_len, r)
    spearman, _ = grouped_pearson(g, grouped_midranks(g, n_len), grouped_midranks(g, r))
    out = {
        "rho_pearson_N_r": float(pool_fisher(pearson, n)),
        "rho_spearman_N_r": float(pool_fisher(spearman, n)),
    }
    if has_d:
        d = frame["d"].to_numpy(np.float64)
        ok = np.isfinite(d)
        g2, r2, d2, logn = g[ok], r[ok], d[ok], np.log(n_len[ok])
        if len(g2):
            k = int(g.max()) + 1
            n2 = np.bincount(g2, minlength=k).astype(np.float64)
            rho_rd, _ = grouped_pearson(g2, r2, d2)
            rho_rn, _ = grouped_pearson(g2, r2, logn)
            rho_dn, _ = grouped_pearson(g2, d2, logn)
            with np.errstate(invalid="ignore", divide="ignore"):
                partial = (rho_rd - rho_rn * rho_dn) / np.sqrt((1 - rho_rn**2) * (1 - rho_dn**2))
                mr = np.bincount(g2, weights=r2, minlength=k) / n2
                md = np.bincount(g2, weights=d2, minlength=k) / n2
                rc, dc = r2 - mr[g2], d2 - md[g2]
                slope = float((rc * dc).sum() / (rc * rc).sum())
            out["corr_r_d"] = float(pool_fisher(rho_rd, n2))
            # one controlled variable: Fisher weights n - 4 (pool_fisher subtracts 3)
            out["partial_corr_r_d_logN"] = float(pool_fisher(partial, n2 - 1.0))
            out["slope_d_on_r"] = slope
    return out


def length_matched_analysis(
    rollouts: pd.DataFrame,
    a: str,
    b: str,
    by: Sequence[str],
    a_key: str = "variant",
    seed: int = 0,
    bins_per_octave: int = 2,
) -> pd.DataFrame:
    """rho(N, r) and the rate-diversity relation per side, before and after length matching.

    ``rollouts`` has keys, rollout_index, length, r and optionally d (per-rollout diversity).
    Only prompts present on both sides take part.
    """
    by = list(by)
    has_d = "d" in rollouts.columns and rollouts["d"].notna().any()
    frame = rollouts[rollouts[a_key].astype(str).isin([a, b])].copy()
    frame["_side"] = np.where(frame[a_key].astype(str) == a, "a", "b")
    frame = frame.sort_values(["_side", *PROMPT_KEYS, "rollout_index"]).reset_index(drop=True)
    cell = [*by, *pairing_columns(by, a_key)]
    both = frame.groupby(cell, observed=True)["_side"].transform("nunique") == 2
    frame = frame[both.to_numpy()].reset_index(drop=True)
    keep = match_lengths(frame, "_side", cell, seed=seed, bins_per_octave=bins_per_octave)
    frame["_keep"] = keep
    rows = []
    for key, grp in frame.groupby(by, sort=True, observed=True) if by else [((), frame)]:
        key = key if isinstance(key, tuple) else (key,)
        for side, label in (("a", a), ("b", b)):
            sub = grp[grp["_side"] == side]
            un = _relation_stats(sub, has_d)
            ma = _relation_stats(sub[sub["_keep"]], has_d)
            for stat in un:
                rows.append(
                    {
                        **dict(zip(by, map(str, key), strict=True)),
                        "side": side,
                        "label": label,
                        "statistic": stat,
                        "unmatched": un[stat],
                        "matched": ma.get(stat, np.nan),
                        "n_rollouts_unmatched": len(sub),
                        "n_rollouts_matched": int(sub["_keep"].sum()),
                        "n_prompts": len(sub[cell].drop_duplicates()),
                    }
                )
    return pd.DataFrame(rows)
