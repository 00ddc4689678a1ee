"""Paired comparison of two models on the same prompts (SPEC section 5), plus length matching.

``compare_run`` pairs the prompts of side A and side B (same family/task/prompt_id within each
by-group), draws one ``[B, P]`` matrix of resampled prompt indices per group and applies it to
both sides, so every replicate compares the two models on the same prompts. Every pooled statistic is
recomputed from per-prompt sufficient statistics (CE*_p, Nbar_p, Rbar_p, H(N)_p, D_p, Vendi_p,
per-prompt correlations and their n_p) with the SPEC pooling rules, all replicates at once; no
per-step data is touched after the per-prompt table is built.

Outputs: ``RUN/compare/comparison.parquet`` (+ ``.csv``), a tidy long table; ``RUN/tables/
compare_<set>.{csv,md,tex}`` (rows: tasks, columns: families, cells ``value ± SE``);
``RUN/compare/length_matched.parquet`` (rho(N, r) and rate-diversity relations before/after
matching the two models' rollouts on length).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.special import ndtr, ndtri

from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.metrics.result import MetricsResult, current_metrics
from canopy_entropy.run.layout import artefact_path, schema_of
from canopy_entropy.stats.correlation import pearson_from_sums
from canopy_entropy.stats.pooling import (
    FISHER_CLIP,
    pool_fisher,
)
from canopy_entropy.store import KEY_COLUMNS, atomic_write_table, atomic_write_text, read_table

# Pooled as unweighted means of the per-prompt value (GenPPL and BF derive from these).
MEAN_COLUMNS = ("ce_star", "mean_length", "entropy_rate", "length_entropy", "diversity", "vendi")
# ... of which these are pooled on the log scale: exp(mean_p log v_p), an effective number
LOG_MEAN_COLUMNS = ("vendi",)
RATIO_METRICS = (
    "ce_star",
    "genppl",
    "bf",
    "entropy_rate",
    "mean_length",
    "length_entropy",
    "diversity",
    "vendi",
)
CORRELATION_METRICS = ("pearson", "spearman", "kendall", "covariance")
METRIC_SETS = {
    "entropy": ("ce_star", "genppl", "bf", "entropy_rate", "mean_length", "length_entropy"),
    "correlation": CORRELATION_METRICS,
    "diversity": ("diversity", "vendi"),
}
PROMPT_KEYS = (*KEY_COLUMNS, "prompt_id")
CI_LEVEL = 0.95
TIDY_COLUMNS = (
    "metric",
    "kind",
    "a",
    "b",
    "a_se",
    "b_se",
    "diff",
    "diff_se",
    "diff_lo",
    "diff_hi",
    "pct",
    "pct_se",
    "pct_lo",
    "pct_hi",
    "ratio_lo",
    "ratio_hi",
    "n_prompts",
    "a_label",
    "b_label",
    "a_lo",
    "a_hi",
    "b_lo",
    "b_hi",
)


# --------------------------------------------------------------------------------------------
# pooled statistics from per-prompt sufficient statistics, vectorised over replicates
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# per-rollout and per-prompt statistics from a run folder
# --------------------------------------------------------------------------------------------
def _group_ids(frame: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    return frame.groupby(list(cols), sort=True, observed=True).ngroup().to_numpy()


def grouped_pearson(g: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of x and y within each group id; NaN where a side is constant."""
    k = int(g.max()) + 1 if len(g) else 0
    n = np.bincount(g, minlength=k).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = np.bincount(g, weights=x, minlength=k) / n
        my = np.bincount(g, weights=y, minlength=k) / n
        xc, yc = x - mx[g], y - my[g]
        sxy = np.bincount(g, weights=xc * yc, minlength=k)
        sxx = np.bincount(g, weights=xc * xc, minlength=k)
        syy = np.bincount(g, weights=yc * yc, minlength=k)
    sqx = np.bincount(g, weights=x * x, minlength=k)
    sqy = np.bincount(g, weights=y * y, minlength=k)
    return pearson_from_sums(sxy, sxx, syy, sqx, sqy), n


def grouped_midranks(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x within each group, ties given their mid-rank."""
    order = np.lexsort((x, g))
    gs, xs = g[order], x[order]
    m = len(x)
    if m == 0:
        return np.zeros(0)
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    new_run = new_group | np.r_[True, xs[1:] != xs[:-1]]
    pos = np.arange(m, dtype=np.float64)
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0.0))
    run_id = np.cumsum(new_run) - 1
    run_first = pos[new_run]
    run_last = np.r_[run_first[1:] - 1, m - 1]
    mid = (run_first + run_last) / 2.0
    ranks_sorted = mid[run_id] - group_start + 1.0
    ranks = np.empty(m)
    ranks[order] = ranks_sorted
    return ranks


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------
@dataclass
class CompareResult:
    """A paired comparison: the tidy table (one row per group x metric), the length-matched
    re-analysis and notes. ``save`` writes RUN/compare/; ``load`` reads it back."""

    table: pd.DataFrame
    length_matched: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    by: tuple[str, ...] = ()

    def save(self, run_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write comparison.parquet/.csv, length_matched.parquet and the wide tables."""
        run = Path(run_dir)
        paths: dict[str, Path] = {}
        for name, frame in (("compare.table", self.table), ("compare.length_matched",
                                                             self.length_matched)):  # fmt: skip
            path = artefact_path(run, name)
            atomic_write_table(path, pa.Table.from_pandas(frame, preserve_index=False),
                               schema_of(name))  # fmt: skip
            paths[name] = path
        csv = artefact_path(run, "compare.table").with_suffix(".csv")
        atomic_write_text(csv, self.table.to_csv(index=False))
        paths["comparison.csv"] = csv
        for p in write_tables(run, comparison_tables(self.table, self.by)):
            paths[p.name] = p
        return paths

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> CompareResult:
        """Read RUN/compare/ (verified)."""
        frames = {
            name: read_table(artefact_path(run_dir, name), schema_of(name)).to_pandas()
            for name in ("compare.table", "compare.length_matched")
        }
        table = frames["compare.table"]
        by = tuple(c for c in table.columns if c not in TIDY_COLUMNS)
        return cls(table=table, length_matched=frames["compare.length_matched"], by=by)


def _validate_sides(prompts: pd.DataFrame, a: str, b: str, a_key: str) -> None:
    if a_key not in ("variant", "model"):
        raise ConfigError(f"--on must be 'variant' or 'model', got '{a_key}'")
    present = sorted(prompts[a_key].astype(str).unique())
    for side, value in (("--a", a), ("--b", b)):
        if value not in present:
            raise ConfigError(
                f"{side} '{value}' matches no {a_key} in this run; choose from {present}"
                + ("" if a_key == "model" else " (or compare model names with --on model)")
            )
    if a == b:
        raise ConfigError(f"--a and --b are both '{a}'; pick two different {a_key}s")


def pairing_columns(by: Sequence[str], a_key: str) -> list[str]:
    """Columns identifying the same prompt on both sides, beyond the by-columns.

    A prompt is (family, task, prompt_id) when comparing variants of a family, and
    (task, prompt_id) when comparing models by name (they may belong to different families).
    """
    cols = ["family", "task"] if a_key == "variant" else ["task"]
    return [c for c in cols if c not in by] + ["prompt_id"]


def compare_prompts(
    prompts: pd.DataFrame,
    a: str = "base",
    b: str = "instruct",
    by: Sequence[str] = ("family", "task"),
    n_boot: int = 2000,
    seed: int = 0,
    a_key: str = "variant",
) -> tuple[pd.DataFrame, list[str]]:
    """Paired bootstrap comparison from a per-prompt table (one row per side and prompt)."""
    by = list(by)
    bad = [c for c in by if c not in prompts.columns or c == a_key]
    if bad:
        raise ConfigError(
            f"cannot group by {bad}; use columns of the run other than '{a_key}', e.g. family,task"
        )
    if n_boot < 2:
        raise ConfigError(f"--bootstrap must be at least 2 replicates, got {n_boot}")
    _validate_sides(prompts, a, b, a_key)
    notes: list[str] = []
    metric_cols = [
        c
        for c in (*MEAN_COLUMNS, "pearson", "spearman", "kendall", "covariance", "n_rollouts")
        if c in prompts.columns
    ]
    pair_cols = [c for c in pairing_columns(by, a_key) if c in prompts.columns]
    rows: list[dict] = []
    frame = prompts.copy()
    for col in by:
        frame[col] = frame[col].astype(str)
    frame = frame[frame[a_key].astype(str).isin([a, b])]
    grouped = frame.groupby(by, sort=True, observed=True) if by else [((), frame)]
    for key, sel in grouped:
        key = tuple(key) if isinstance(key, tuple) else (key,)
        label = "/".join(key) if key else "all"
        sel_a = sel[sel[a_key].astype(str) == a]
        sel_b = sel[sel[a_key].astype(str) == b]
        for side, part in (("A", sel_a), ("B", sel_b)):
            if part.duplicated(pair_cols).any():
                raise CanopyError(
                    f"group {label} has several {side} rows per prompt ({'/'.join(pair_cols)}): "
                    "more than one model per side; compare model names with --on model or add "
                    "'model' to --by"
                )
        pairs = sel_a[[*pair_cols, *metric_cols]].merge(
            sel_b[[*pair_cols, *metric_cols]], on=pair_cols, suffixes=("_a", "_b")
        )
        pairs = pairs.sort_values(pair_cols, kind="stable").reset_index(drop=True)
        dropped = len(sel_a) + len(sel_b) - 2 * len(pairs)
        if dropped:
            notes.append(
                f"{label}: {dropped} prompts present on only one side were dropped "
                f"({len(pairs)} paired)"
            )
        if len(pairs) < 2:
            notes.append(f"{label}: fewer than two paired prompts; no comparison")
            continue
        a_stats = {c: pairs[f"{c}_a"].to_numpy(np.float64) for c in metric_cols}
        b_stats = {c: pairs[f"{c}_b"].to_numpy(np.float64) for c in metric_cols}
        rep = paired_bootstrap(a_stats, b_stats, n_boot=n_boot, seed=seed, group_key=key)
        for row in summarise_replicates(rep):
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    **row,
                    "n_prompts": len(pairs),
                    "a_label": a,
                    "b_label": b,
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table[[*by, *TIDY_COLUMNS]]
    return table, notes


# --------------------------------------------------------------------------------------------
# length-matched analysis
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# human tables
# --------------------------------------------------------------------------------------------
def _fmt(value: float, se: float, pct: bool = False) -> str:
    if not np.isfinite(value):
        return "–"
    unit = "%" if pct else ""
    digits = 1 if pct else 4 if abs(value) < 10 else 2
    body = f"{value:+.{digits}f}{unit}" if pct else f"{value:.{digits}f}"
    return f"{body} ± {se:.{digits}f}{unit}" if np.isfinite(se) else body


def comparison_tables(table: pd.DataFrame, by: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Wide tables per metric set: rows (metric, task), columns (family, A/B/change)."""
    out: dict[str, pd.DataFrame] = {}
    if table.empty:
        return out
    by = list(by)
    row_cols = ["task"] if "task" in by else []
    row_cols += [c for c in by if c not in ("task", "family")]
    col_key = "family" if "family" in by else None
    a_label, b_label = table["a_label"].iloc[0], table["b_label"].iloc[0]
    for name, metrics in METRIC_SETS.items():
        sub = table[table["metric"].isin(metrics)]
        if sub.empty:
            continue
        records = []
        for _, r in sub.iterrows():
            ratio = r["kind"] == "ratio"
            change = (
                _fmt(r["pct"], r["pct_se"], pct=True) if ratio else _fmt(r["diff"], r["diff_se"])
            )
            rec = {"metric": r["metric"], **{c: r[c] for c in row_cols}}
            fam = r[col_key] if col_key else "all"
            rec.update(
                {
                    (fam, a_label): _fmt(r["a"], r["a_se"]),
                    (fam, b_label): _fmt(r["b"], r["b_se"]),
                    (fam, "change"): change,
                }
            )
            records.append(rec)
        wide = pd.DataFrame(records)
        index_cols = ["metric", *row_cols]
        wide = wide.groupby(index_cols, sort=False).first()
        wide.columns = pd.MultiIndex.from_tuples(wide.columns)
        order = [m for m in metrics if m in wide.index.get_level_values(0)]
        wide = wide.reindex(order, level=0)
        out[name] = wide
    return out


def _markdown(wide: pd.DataFrame) -> str:
    heads = [*wide.index.names, *[f"{f} {s}" for f, s in wide.columns]]
    lines = ["| " + " | ".join(map(str, heads)) + " |", "|" + "---|" * len(heads)]
    for idx, row in wide.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = [*map(str, idx), *[("" if pd.isna(v) else str(v)) for v in row]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex(wide: pd.DataFrame) -> str:
    def esc(s: str) -> str:
        return (
            str(s)
            .replace("\\", r"\textbackslash{}")
            .replace("_", r"\_")
            .replace("%", r"\%")
            .replace("&", r"\&")
            .replace("±", r"$\pm$")
            .replace("–", "--")
        )

    n_idx = len(wide.index.names)
    fams = list(dict.fromkeys(f for f, _ in wide.columns))
    spec = "l" * n_idx + "".join(
        "|" + "r" * sum(1 for f2, _ in wide.columns if f2 == f) for f in fams
    )
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\hline"]
    top = [""] * n_idx + [
        rf"\multicolumn{{{sum(1 for f2, _ in wide.columns if f2 == f)}}}{{c}}{{{esc(f)}}}"
        for f in fams
    ]
    lines.append(" & ".join(top) + r" \\")
    lines.append(
        " & ".join([*map(esc, wide.index.names), *[esc(s) for _, s in wide.columns]]) + r" \\"
    )
    lines.append(r"\hline")
    for idx, row in wide.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = [*map(esc, idx), *[("" if pd.isna(v) else esc(v)) for v in row]]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(run_dir: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Write each wide table as CSV, Markdown and LaTeX under RUN/tables/."""
    paths = []
    for name, wide in tables.items():
        base = run_dir / "tables" / f"compare_{name}"
        flat = wide.copy()
        flat.columns = [f"{f} {s}" for f, s in wide.columns]
        atomic_write_text(base.with_suffix(".csv"), flat.reset_index().to_csv(index=False))
        atomic_write_text(base.with_suffix(".md"), _markdown(wide))
        atomic_write_text(base.with_suffix(".tex"), _latex(wide))
        paths += [base.with_suffix(s) for s in (".csv", ".md", ".tex")]
    return paths


def compare(
    metrics: MetricsResult,
    a: str = "base",
    b: str = "instruct",
    by: Sequence[str] = ("family", "task"),
    n_boot: int = 2000,
    seed: int = 0,
    on: str = "variant",
) -> CompareResult:
    """Compare side ``a`` with side ``b`` (values of the key ``on``: variants, or model labels
    with ``on="model"``) per ``by`` group: a paired prompt bootstrap of every metric and the
    length-matched re-analysis, from a metrics result (nothing is read or written)."""
    if a == b:
        raise ConfigError(f"both sides are {a!r}; compare two different sides")
    table, notes = compare_prompts(metrics.prompts, a=a, b=b, by=by, n_boot=n_boot, seed=seed,
                                   a_key=on)  # fmt: skip
    if table.empty:
        hint = (
            " (the sides are different families: compare by model with on='model')"
            if on == "variant" and "family" in by
            else ""
        )
        raise CanopyError(
            f"no group has at least two prompts on both '{a}' and '{b}'{hint}; check by and the "
            "sides"
        )
    if metrics.rollouts is None:
        raise CanopyError(
            "these metrics have no per-rollout table (saved by an older version); recompute them "
            "with 'canopy metrics'"
        )
    matched = length_matched_analysis(metrics.rollouts, a, b, by, a_key=on, seed=seed)
    if "diversity" not in metrics.prompts.columns:
        notes.append("no semantic diversity in this run; run 'canopy embed' to compare D and Vendi")
    return CompareResult(table=table, length_matched=matched, notes=notes, by=tuple(by))


def compare_run(
    run_dir: str | os.PathLike[str],
    a: str = "base",
    b: str = "instruct",
    by: Sequence[str] = ("family", "task"),
    n_boot: int = 2000,
    seed: int = 0,
    a_key: str = "variant",
) -> CompareResult:
    """The compare stage: compare the run's saved metrics and write RUN/compare/."""
    result = compare(current_metrics(run_dir), a=a, b=b, by=by, n_boot=n_boot, seed=seed, on=a_key)
    result.save(run_dir)
    return result
