"""The comparison of two sides of a run (variants, or two models): typed result, the library
function and the compare stage."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.comparison.bootstrap import paired_bootstrap, summarise_replicates
from canopy_entropy.comparison.columns import TIDY_COLUMNS, pairing_columns
from canopy_entropy.comparison.length_matched import length_matched_analysis
from canopy_entropy.comparison.tables import comparison_tables, write_tables
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.metrics.result import MetricsResult, current_metrics
from canopy_entropy.run.layout import artefact_path, schema_of
from canopy_entropy.stats.pooling import MEAN_COLUMNS
from canopy_entropy.store import atomic_write_table, atomic_write_text, read_table

# Pooled as unweighted means of the per-prompt value (GenPPL and BF derive from these).


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
    from canopy_entropy.metrics.accuracy import compare_auroc, scored_frame

    scored = scored_frame(run_dir)  # AUROCs of a scored run, bootstrapped the same way
    if scored is not None:
        extra = compare_auroc(scored, a, b, by=by, n_boot=n_boot, seed=seed, a_key=a_key)
        result.table = pd.concat([result.table, extra], ignore_index=True)
    result.save(run_dir)
    return result
