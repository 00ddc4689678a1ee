"""The paper's table layouts from a run's saved results, as Markdown, LaTeX (booktabs) and CSV.

From the saved comparison (``CompareResult.load``): GenPPL / BF / CE* by task x family with
side A, side B and the % change (each ± its paired prompt-bootstrap SE); rho(N, r) Pearson and
the Spearman / Kendall versions with the absolute change. From the saved metrics: the share of
rollouts that hit the length cap. From every saved regression (``regression/result.json`` and
``regression/<model>/result.json``): the coefficient tables. Written to
``RUN/tables/paper_<name>.{md,tex,csv}``; the CSV holds the unrounded numbers.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from canopy_entropy.errors import CanopyError
from canopy_entropy.labels import label, term_label
from canopy_entropy.store import atomic_write_text

# name -> (title, metrics) of the comparison layouts
COMPARISON_LAYOUTS = {
    "entropy": ("GenPPL, branching factor and CE*", ("genppl", "bf", "ce_star")),
    "pearson": ("Within-prompt Pearson correlation ρ(N, r)", ("pearson",)),
    "rank_correlations": ("Spearman and Kendall correlations of N and r", ("spearman", "kendall")),
}
REGRESSION_TITLES = {
    "beta": "Beta mixed model of semantic diversity D (mean model, logit link)",
    "lmm": "Linear mixed models of D (ML)",
    "quadratic": "Quadratic robustness check: linear mixed models of D (ML)",
    "vendi": "Beta mixed model of the Vendi score V = (VS − 1) / (M − 1) (mean model)",
    "rse": "Beta mixed model of relaxed semantic entropy RSE / log m (mean model)",
}


@dataclass(frozen=True)
class PaperTable:
    """One table: ``numbers`` (long: row keys, ``column`` group, ``stat``, ``value``, ``se``)
    and ``cells`` (the formatted wide layout); ``note`` goes under the table."""

    name: str
    title: str
    numbers: pd.DataFrame
    cells: pd.DataFrame
    note: str = ""


def _num(value: float, digits: int, signed: bool = False, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:{'+' if signed else ''}.{digits}f}{unit}"


def _cell(value: float, se: float, digits: int, signed: bool = False, unit: str = "") -> str:
    body = _num(value, digits, signed, unit)
    if body == "–" or se is None or not math.isfinite(se):
        return body
    return f"{body} ± {_num(se, digits, unit=unit)}"


def _digits(metric: str, value: float) -> int:
    if metric in ("pearson", "spearman", "kendall", "covariance"):
        return 3
    return 2 if abs(value) >= 10 else 3


def comparison_table(comparison: pd.DataFrame, name: str) -> PaperTable:
    """A comparison layout (``COMPARISON_LAYOUTS[name]``) from the tidy comparison table."""
    title, metrics = COMPARISON_LAYOUTS[name]
    sub = comparison[comparison["metric"].isin(metrics)]
    if sub.empty:
        raise CanopyError(
            f"the comparison has none of {', '.join(metrics)}; re-run 'canopy compare'"
        )
    a_label, b_label = str(sub["a_label"].iloc[0]), str(sub["b_label"].iloc[0])
    records, cells = [], {}
    for _, r in sub.iterrows():
        metric = str(r["metric"])
        task = str(r["task"]) if "task" in r else "all"
        family = str(r["family"]) if "family" in r else "all"
        ratio = r["kind"] == "ratio"
        change_name = "% change" if ratio else "Δ"
        centre, se = ("pct", "pct_se") if ratio else ("diff", "diff_se")
        largest = sub.loc[sub["metric"] == metric, ["a", "b"]].abs().max().max()
        digits = _digits(metric, float(largest))
        row = (label(metric), task)
        for stat, value, err in (
            (a_label, r["a"], r["a_se"]),
            (b_label, r["b"], r["b_se"]),
            (change_name, r[centre], r[se]),
        ):
            records.append(
                {
                    "metric": metric,
                    "task": task,
                    "family": family,
                    "stat": stat,
                    "value": float(value),
                    "se": float(err),
                }
            )
            if stat == change_name:
                text = _cell(
                    float(value), float(err), 1 if ratio else digits, True, "%" if ratio else ""
                )
            else:
                text = _cell(float(value), float(err), digits)
            cells.setdefault(row, {})[(family, stat)] = text
    numbers = pd.DataFrame(records)
    wide = pd.DataFrame.from_dict(cells, orient="index")
    rows = [
        (label(m), t)
        for m in metrics
        for t in sorted(set(numbers["task"]))
        if (label(m), t) in cells
    ]
    families = sorted(set(numbers["family"]))
    changes = list(dict.fromkeys(numbers["stat"][~numbers["stat"].isin([a_label, b_label])]))
    columns = [(f, s) for f in families for s in (a_label, b_label, *changes) if (f, s) in wide]
    wide = wide.loc[rows, columns]
    wide.index = pd.MultiIndex.from_tuples(rows, names=["metric", "task"])
    wide.columns = pd.MultiIndex.from_tuples(columns)
    n = sorted({int(v) for v in sub["n_prompts"]})
    note = (
        f"Paired prompt bootstrap (± one SE) over {n[0]}–{n[-1]} prompts per cell."
        if len(n) > 1
        else f"Paired prompt bootstrap (± one SE) over {n[0]} prompts per cell."
    )
    return PaperTable(f"paper_{name}", title, numbers, wide, note)


def truncation_table(pooled: pd.DataFrame) -> PaperTable:
    """Share of rollouts that hit the length cap per task x family and variant (in %)."""
    need = {"task", "family", "variant", "truncation_rate"}
    if not need <= set(pooled.columns):
        raise CanopyError("the saved metrics lack task/family/variant; re-run 'canopy metrics'")
    records, cells = [], {}
    for _, r in pooled.iterrows():
        task, family, variant = str(r["task"]), str(r["family"]), str(r["variant"])
        value = 100 * float(r["truncation_rate"])
        records.append(
            {"task": task, "family": family, "stat": variant, "value": value, "se": float("nan")}
        )
        cells.setdefault((task,), {})[(family, variant)] = _num(value, 1, unit="%")
    wide = pd.DataFrame.from_dict(cells, orient="index")
    wide.index = pd.Index([k[0] for k in wide.index], name="task")
    wide = wide.sort_index()[sorted(wide.columns)]
    numbers = pd.DataFrame(records).sort_values(["task", "family", "stat"]).reset_index(drop=True)
    return PaperTable(
        "paper_truncation",
        "Rollouts that hit the length cap (%)",
        numbers,
        wide,
        "Truncated rollouts make CE* a lower bound.",
    )


def _fits(doc: dict) -> dict[str, tuple[dict, dict]]:
    """fit name -> (coefficients by term, fit statistics) of a regression result.json."""
    if "fits" in doc:
        return {
            name: (
                fit["coefficients"],
                {"loglik": fit["loglik"], "aic": fit["aic"], "nobs": fit["nobs"]},
            )
            for name, fit in doc["fits"].items()
        }
    name = doc.get("response", "D")
    return {name: (doc["mean"], {"loglik": doc["loglik"], "aic": doc["aic"], "nobs": doc["nobs"]})}


def regression_table(doc: dict, model: str) -> PaperTable:
    """Coefficient table (estimate ± SE and p per fit) of one saved regression."""
    ref = doc.get("reference") or {}
    records, cells, notes = [], {}, []
    for fit_name, (coefs, fit_stats) in _fits(doc).items():
        for term, row in coefs.items():
            est, se, p = (
                float("nan") if row[k] is None else float(row[k]) for k in ("estimate", "se", "p")
            )
            records.append(
                {"term": term, "fit": fit_name, "stat": "estimate", "value": est, "se": se, "p": p}
            )
            cells.setdefault(term_label(term, ref), {})[(fit_name, "estimate")] = _cell(est, se, 3)
            cells[term_label(term, ref)][(fit_name, "p")] = (
                "–" if not math.isfinite(p) else ("< 0.001" if p < 1e-3 else f"{p:.3f}")
            )
        notes.append(
            f"{fit_name}: logLik {fit_stats['loglik']:.2f}, AIC {fit_stats['aic']:.2f}, "
            f"n = {fit_stats['nobs']}"
        )
    lrt = doc.get("lrt")
    if lrt:
        notes.append(
            f"likelihood-ratio test, quadratic vs interaction: χ² = {lrt['statistic']:.3f} on "
            f"{lrt['df']} df, p = {lrt['p_value']:.3g}"
        )
    wide = pd.DataFrame.from_dict(cells, orient="index").fillna("")
    wide.index.name = "term"
    wide.columns = pd.MultiIndex.from_tuples(wide.columns)
    return PaperTable(
        f"paper_regression_{model}",
        REGRESSION_TITLES.get(model, model),
        pd.DataFrame(records),
        wide,
        "; ".join(notes) + ".",
    )


def paper_tables(run_dir: str | Path) -> list[PaperTable]:
    """Every paper layout a run's saved results allow: the comparison tables (required), the
    truncation rates (with saved metrics) and each saved regression's coefficients."""
    from canopy_entropy.comparison import CompareResult
    from canopy_entropy.run.layout import artefact_path

    run = Path(run_dir)
    if not artefact_path(run, "compare.table").exists():
        raise CanopyError(f"{run} has no saved comparison; run 'canopy compare {run}' first")
    comparison = CompareResult.load(run).table
    tables = [
        comparison_table(comparison, name)
        for name, (_, metrics) in COMPARISON_LAYOUTS.items()
        if comparison["metric"].isin(metrics).any()
    ]
    pooled_path = artefact_path(run, "metrics.pooled")
    if pooled_path.exists():
        from canopy_entropy.plots.data import metrics_pooled

        tables.append(truncation_table(metrics_pooled(run)))
    else:
        warnings.warn(f"no saved metrics in {run}: the truncation table is left out", stacklevel=2)
    results = [("beta", artefact_path(run, "regression.result"))]
    results += [
        (m, run / "regression" / m / "result.json") for m in ("lmm", "quadratic", "vendi", "rse")
    ]
    for model, path in results:
        if path.exists():
            try:
                doc = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CanopyError(f"{path} is damaged ({exc}); re-run 'canopy regress'") from exc
            tables.append(regression_table(doc, model))
    return tables


# ------------------------------------------------------------------------------ rendering
def _flat_columns(wide: pd.DataFrame) -> list[str]:
    return [
        " ".join(str(p) for p in c if p != "") if isinstance(c, tuple) else str(c)
        for c in wide.columns
    ]


def to_markdown(table: PaperTable) -> str:
    """A GitHub Markdown table with its title and note."""
    wide = table.cells
    heads = [*wide.index.names, *_flat_columns(wide)]
    lines = [
        "**" + table.title.replace("*", r"\*") + "**",
        "",
        "| " + " | ".join(map(str, heads)) + " |",
        "|" + "---|" * len(wide.index.names) + "---:|" * len(wide.columns),
    ]
    for idx, row in wide.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        values = ["" if pd.isna(v) else str(v) for v in row]
        lines.append("| " + " | ".join([*map(str, idx), *values]) + " |")
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def _tex(text: object) -> str:
    s = str(text)
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("#", r"\#"),
        ("$", r"\$"),
        ("±", r"$\pm$"),
        ("–", "--"),
        ("−", "-"),
        ("Δ", r"$\Delta$"),
        ("ρ", r"$\rho$"),
        ("τ", r"$\tau$"),
        ("χ²", r"$\chi^2$"),
        ("×", r"$\times$"),
        ("²", r"$^2$"),
        ("<", r"$<$"),
        ("*", r"$^*$"),
        ("·", r"$\cdot$"),
        ("N̄", r"$\bar{N}$"),
        ("R̄", r"$\bar{R}$"),
    ):
        s = s.replace(a, b)
    return s


def to_latex(table: PaperTable) -> str:
    """A booktabs ``table`` environment: grouped column heads with cmidrules."""
    wide = table.cells
    n_idx = len(wide.index.names)
    groups = [c[0] for c in wide.columns] if isinstance(wide.columns, pd.MultiIndex) else None
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex(table.title)}}}",
        rf"\begin{{tabular}}{{{'l' * n_idx}{'r' * len(wide.columns)}}}",
        r"\toprule",
    ]
    if groups is not None:
        top, rules, start = [""] * n_idx, [], n_idx + 1
        for group in dict.fromkeys(groups):
            span = groups.count(group)
            top.append(rf"\multicolumn{{{span}}}{{c}}{{{_tex(group)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
            start += span
        lines += [" & ".join(top) + r" \\", " ".join(rules)]
        heads = [c[1] for c in wide.columns]
    else:
        heads = list(wide.columns)
    lines.append(" & ".join(_tex(h) for h in [*wide.index.names, *heads]) + r" \\")
    lines.append(r"\midrule")
    for idx, row in wide.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        values = ["" if pd.isna(v) else _tex(v) for v in row]
        lines.append(" & ".join([*map(_tex, idx), *values]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.note:
        lines.append(rf"\par\smallskip{{\footnotesize {_tex(table.note)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_paper_tables(run_dir: str | Path) -> list[Path]:
    """Write every paper table as ``RUN/tables/paper_<name>.{md,tex,csv}`` (atomic); the CSV
    holds the unrounded numbers in long form."""
    run = Path(run_dir)
    paths = []
    for table in paper_tables(run):
        base = run / "tables" / table.name
        for suffix, text in (
            (".md", to_markdown(table)),
            (".tex", to_latex(table)),
            (".csv", table.numbers.to_csv(index=False)),
        ):
            atomic_write_text(base.with_suffix(suffix), text)
            paths.append(base.with_suffix(suffix))
    return paths


__all__ = [
    "COMPARISON_LAYOUTS",
    "PaperTable",
    "comparison_table",
    "paper_tables",
    "regression_table",
    "to_latex",
    "to_markdown",
    "truncation_table",
    "write_paper_tables",
]
