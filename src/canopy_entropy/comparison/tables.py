"""Wide comparison tables (tasks x families, value +- SE) as CSV, Markdown and LaTeX."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from canopy_entropy.comparison.columns import METRIC_SETS
from canopy_entropy.store import atomic_write_text

# Pooled as unweighted means of the per-prompt value (GenPPL and BF derive from these).


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
