"""The report's tables of results: metrics, estimation error, comparison, length matching.

Each takes the frame its stage wrote (read by ``plots.data``) and returns HTML; every header
is a label of ``canopy_entropy.labels`` with its meaning as a tooltip and in a collapsed list.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from canopy_entropy.labels import label
from canopy_entropy.report.html import (
    Cell,
    Column,
    esc,
    fmt,
    html_table,
    is_missing,
    meanings,
    percent,
)
from canopy_entropy.run.layout import GROUP_KEYS

HEADLINE = ("ce_star", "genppl", "bf", "entropy_rate", "mean_length", "truncation_rate",
            "n_prompts", "n_rollouts")  # fmt: skip
SHAPE = ("pearson", "spearman", "kendall", "stop_entropy_share", "length_entropy",
         "content_entropy", "diversity", "vendi")  # fmt: skip
ERROR = ("ce_star", "ce_star_se", "ce_star_var_between", "ce_star_var_within", "dominant",
         "chebyshev_bound", "truncation_bias_bound")  # fmt: skip
SHARES = ("truncation_rate", "stop_entropy_share")
SE_NOTE = (
    "<p>Two kinds of uncertainty appear in this report. <b>SE (analytic)</b> in this section is "
    "the within-prompt analytic standard error of a pooled CE*: SE² = var between + var within, "
    "from the spread of CE* across prompts and the rollout noise inside each prompt (method of "
    "moments). The comparison below uses the <b>prompt bootstrap</b> instead: its ± SE and "
    "intervals come from resampling whole prompts, paired across the two sides, so they also "
    "cover how the two sides move together. <b>var between</b> is clipped at 0: 0 means the "
    "prompts' CE* differ no more than the rollout noise alone explains.</p>"
)


def shown_keys(df: pd.DataFrame) -> list[str]:
    """Key columns worth a column: the model, and any other key taking several values."""
    return [k for k in GROUP_KEYS if k in df.columns and (k == "model" or df[k].nunique() > 1)]


def _value(name: str, value: Any) -> Any:
    return percent(value) if name in SHARES else value


def _metric_table(df: pd.DataFrame, names: tuple[str, ...]) -> str:
    keys = shown_keys(df)
    present = [n for n in names if n in df.columns]
    columns = [Column.of(k, True) for k in keys] + [Column.of(n, n == "dominant") for n in present]
    rows = [
        [rec[k] for k in keys] + [_value(n, rec[n]) for n in present]
        for rec in df.sort_values(keys).to_dict("records")
    ]
    return html_table(columns, rows) + meanings(present)


def with_diversity(pooled: pd.DataFrame, diversity: pd.DataFrame | None) -> pd.DataFrame:
    """Pooled metrics with mean D and Vendi per group when metrics did not merge them."""
    if diversity is None or "diversity" in pooled.columns:
        return pooled
    keys = [k for k in GROUP_KEYS if k in pooled.columns and k in diversity.columns]
    means = diversity.groupby(keys, as_index=False)[["diversity", "vendi"]].mean()
    return pooled.merge(means, on=keys, how="left")


def metrics_tables(pooled: pd.DataFrame) -> str:
    """Headline metrics, then the shape of the distribution (correlations, entropy parts)."""
    return (
        _metric_table(pooled, HEADLINE)
        + "<h3>Length, rate and content</h3>"
        + _metric_table(pooled, SHAPE)
    )


def error_table(pooled: pd.DataFrame) -> str:
    """SE of CE* with its variance parts, which dominates, Chebyshev and truncation bounds."""
    df = pooled.copy()
    between, within = df["ce_star_var_between"], df["ce_star_var_within"]
    df["dominant"] = [
        "—" if is_missing(b) or is_missing(w) else ("prompts" if b >= w else "rollouts")
        for b, w in zip(between, within, strict=True)
    ]
    return (
        SE_NOTE
        + "<p>“dominant” says which would shrink the SE most: more prompts or more rollouts per "
        "prompt. Chebyshev: |estimate − CE*| ≤ bound with probability ≥ 95%. Truncation bias: "
        "the most entropy that can be lost past the length cap.</p>" + _metric_table(df, ERROR)
    )


def comparison_table(comp: pd.DataFrame, by: list[str]) -> str:
    """One row per by-group and metric: each side ± bootstrap SE, difference and % change."""
    a, b = str(comp["a_label"].iloc[0]), str(comp["b_label"].iloc[0])

    def pm(v: Any, se: Any) -> Cell:
        return Cell("n/a" if is_missing(v) else f"{fmt(v)} ± {fmt(se, 2)}", v)

    def ci(centre: Any, lo: Any, hi: Any, unit: str = "") -> Cell:
        if is_missing(centre):
            return Cell("n/a", None)
        return Cell(f"{fmt(centre)}{unit} [{fmt(lo)}, {fmt(hi)}]", centre)

    rows = []
    for rec in comp.to_dict("records"):
        ratio = rec["kind"] == "ratio"
        pct = ci(rec["pct"], rec["pct_lo"], rec["pct_hi"], "%") if ratio else Cell("—", None)
        bca = (
            Cell(f"[{fmt(rec['ratio_lo'])}%, {fmt(rec['ratio_hi'])}%]", rec["ratio_lo"])
            if ratio and not is_missing(rec["ratio_lo"])
            else Cell("—", None)
        )
        rows.append(
            [rec[c] for c in by]
            + [
                label(rec["metric"]),
                pm(rec["a"], rec["a_se"]),
                pm(rec["b"], rec["b_se"]),
                ci(rec["diff"], rec["diff_lo"], rec["diff_hi"]),
                pct,
                bca,
                rec["n_prompts"],
            ]
        )
    columns = [Column.of(c, True) for c in by] + [
        Column("metric", True),
        Column(f"{a} ± SE", tip=f"side A ({a}) with its prompt-bootstrap SE"),
        Column(f"{b} ± SE", tip=f"side B ({b}) with its prompt-bootstrap SE"),
        Column("difference [95% CI]", tip=f"{b} − {a}, percentile interval"),
        Column("% change [95% CI]", tip=f"100 · ({b} − {a}) / {a}, percentile interval"),
        Column("% change, BCa CI", tip="bias-corrected accelerated interval of the ratio B/A"),
        Column.of("n_prompts"),
    ]
    missing = comp[comp["diff"].isna()]
    why = (
        "<p>“n/a”: the statistic is undefined on a side (e.g. a correlation of a side whose "
        "lengths or rates are all equal, or D without semantic diversity).</p>"
        if len(missing)
        else ""
    )
    return (
        f"<p><b>{esc(b)}</b> against <b>{esc(a)}</b> on the same prompts. Paired prompt "
        "bootstrap: ± SE and the percentile intervals come from resampling whole prompts on "
        "both sides together; for ratio metrics also the BCa interval of B/A, as a % change "
        "(% change intervals are skewed).</p>" + html_table(columns, rows) + why
    )


def length_matched_table(lm: pd.DataFrame, by: list[str]) -> str:
    """Within-prompt relations per side, over all rollouts and after length matching."""
    by = [c for c in by if c in lm.columns]
    columns = [Column.of(c, True) for c in by] + [
        Column("side", True),
        Column("statistic", True),
        Column.of("unmatched"),
        Column.of("matched"),
        Column.of("n_rollouts_unmatched"),
        Column.of("n_rollouts_matched"),
        Column.of("n_prompts"),
    ]
    rows = [
        [rec[c] for c in by]
        + [
            rec["label"],
            Cell(label(rec["statistic"]), rec["statistic"]),
            rec["unmatched"],
            rec["matched"],
            rec["n_rollouts_unmatched"],
            rec["n_rollouts_matched"],
            rec["n_prompts"],
        ]
        for rec in lm.to_dict("records")
    ]
    names = ["unmatched", "matched", *dict.fromkeys(lm["statistic"])]
    return (
        "<p>Does the relation survive when both sides get the same length distribution? "
        "Rollouts are subsampled so each side has the same number per length bin.</p>"
        + html_table(columns, rows)
        + meanings(names)
    )
