"""The length-matched re-analysis: the same relations on rollouts matched by length bin
between the two sides, beside the unmatched values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from canopy_entropy.comparison.columns import pairing_columns
from canopy_entropy.comparison.grouped import grouped_midranks, grouped_pearson
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
    cell = _codes(frame, cell_cols)
    side = (
        (frame[side_col].to_numpy() == frame[side_col].iloc[0]).astype(np.int64)
        if len(frame)
        else np.zeros(0, np.int64)
    )
    return _match(cell, side, frame["length"].to_numpy(), seed, bins_per_octave)


def _codes(frame: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    """Integer id of each row's combination of ``cols``, numbered in the sorted order of the
    combinations (as a sorted groupby numbers them), from one sorted factorize per column."""
    if not cols:
        return np.zeros(len(frame), np.int64)
    codes = [pd.factorize(frame[c].to_numpy(), sort=True)[0] for c in cols]
    return _dense(codes)


def _dense(codes: Sequence[np.ndarray]) -> np.ndarray:
    """Dense ids (0..k-1, lexicographic in ``codes``) of the rows' code tuples."""
    key = np.zeros(len(codes[0]), np.int64)
    for c in codes:
        key = key * (int(c.max()) + 1 if len(c) else 1) + c
    return np.unique(key, return_inverse=True)[1].reshape(-1)


def _match(
    cell: np.ndarray, side: np.ndarray, lengths: np.ndarray, seed: int, bins_per_octave: int
) -> np.ndarray:
    """:func:`match_lengths` on integer cell ids and 0/1 sides (rows in the caller's order)."""
    cell = _dense([cell, length_bins(lengths, bins_per_octave)])
    k = int(cell.max()) + 1 if len(cell) else 0
    counts = np.stack([np.bincount(cell[side == s], minlength=k) for s in (0, 1)])
    keep_n = counts.min(axis=0)
    rng = np.random.default_rng([int(seed), 0x6C656E])
    priority = rng.random(len(cell))
    order = np.lexsort((priority, side, cell))
    cs, ss = cell[order], side[order]
    start = np.r_[True, (cs[1:] != cs[:-1]) | (ss[1:] != ss[:-1])]
    pos = np.arange(len(order))
    rank = pos - np.maximum.accumulate(np.where(start, pos, 0))
    keep = np.zeros(len(cell), dtype=bool)
    keep[order] = rank < keep_n[cs]
    return keep


def _relation_stats(frame: pd.DataFrame, has_d: bool) -> dict[str, float]:
    """Pooled within-prompt rho(N, r) and, with diversity, the rate-diversity relation."""
    d = frame["d"].to_numpy(np.float64) if has_d else None
    return _relations(
        _codes(frame, PROMPT_KEYS),
        frame["length"].to_numpy(np.float64),
        frame["r"].to_numpy(np.float64),
        d,
    )


def _relations(
    g: np.ndarray, n_len: np.ndarray, r: np.ndarray, d: np.ndarray | None
) -> dict[str, float]:
    """:func:`_relation_stats` on dense prompt ids ``g`` (0..k-1) and per-rollout arrays."""
    if len(g) == 0:
        return {}
    n = np.bincount(g).astype(np.float64)
    pearson, _ = grouped_pearson(g, n_len, r)
    spearman, _ = grouped_pearson(g, grouped_midranks(g, n_len), grouped_midranks(g, r))
    out = {
        "rho_pearson_N_r": float(pool_fisher(pearson, n)),
        "rho_spearman_N_r": float(pool_fisher(spearman, n)),
    }
    if d is not None:
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
    Only prompts present on both sides take part. Keys are grouped as integer codes (one
    sorted factorize per column), never as pandas string-key groupbys.
    """
    by = list(by)
    has_d = "d" in rollouts.columns and rollouts["d"].notna().any()
    sides = rollouts[a_key].astype(str).to_numpy()
    rows_ab = np.flatnonzero((sides == a) | (sides == b))
    side = (sides[rows_ab] != a).astype(np.int64)  # 0 = a, 1 = b
    cell_cols = [*by, *pairing_columns(by, a_key)]
    key_cols = list(dict.fromkeys([*PROMPT_KEYS, *cell_cols]))
    codes = {c: pd.factorize(rollouts[c].to_numpy()[rows_ab], sort=True)[0] for c in key_cols}
    ridx = rollouts["rollout_index"].to_numpy()[rows_ab]
    # rows in (side, prompt keys, rollout_index) order
    order = np.lexsort((ridx, *(codes[c] for c in reversed(PROMPT_KEYS)), side))
    side = side[order]
    codes = {c: v[order] for c, v in codes.items()}
    cell = _dense([codes[c] for c in cell_cols])
    n_cells = int(cell.max()) + 1 if len(cell) else 0
    on_side = [np.bincount(cell[side == s], minlength=n_cells) > 0 for s in (0, 1)]
    both = (on_side[0] & on_side[1])[cell]
    rows = rows_ab[order][both]
    side, cell = side[both], cell[both]
    codes = {c: v[both] for c, v in codes.items()}
    n_len = rollouts["length"].to_numpy(np.float64)[rows]
    r = rollouts["r"].to_numpy(np.float64)[rows]
    d = rollouts["d"].to_numpy(np.float64)[rows] if has_d else None
    keep = _match(cell, side, rollouts["length"].to_numpy()[rows], seed, bins_per_octave)
    prompt = _dense([codes[c] for c in PROMPT_KEYS])
    group = _dense([codes[c] for c in by]) if by else np.zeros(len(rows), np.int64)
    labels = {c: rollouts[c].to_numpy()[rows] for c in by}
    out = []
    for gid in range(int(group.max()) + 1 if len(group) else 0):
        in_group = group == gid
        first = int(np.argmax(in_group))
        key = {c: str(labels[c][first]) for c in by}
        for s, (side_name, label) in enumerate((("a", a), ("b", b))):
            sub = np.flatnonzero(in_group & (side == s))
            if not len(sub):
                continue
            matched = sub[keep[sub]]
            un = _relations(*_sub(prompt, sub), n_len[sub], r[sub], _at(d, sub))
            ma = _relations(*_sub(prompt, matched), n_len[matched], r[matched], _at(d, matched))
            n_prompts = len(np.unique(cell[sub]))
            for stat in un:
                out.append(
                    {
                        **key,
                        "side": side_name,
                        "label": label,
                        "statistic": stat,
                        "unmatched": un[stat],
                        "matched": ma.get(stat, np.nan),
                        "n_rollouts_unmatched": len(sub),
                        "n_rollouts_matched": len(matched),
                        "n_prompts": n_prompts,
                    }
                )
    return pd.DataFrame(out)


def _sub(prompt: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray]:
    """Dense prompt ids (sorted order kept) of the selected rows."""
    return (np.unique(prompt[rows], return_inverse=True)[1].reshape(-1),)


def _at(values: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[rows]
