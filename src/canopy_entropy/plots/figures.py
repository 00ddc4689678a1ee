"""The figures of SPEC section 8 (issue 7), each a function from frames to a matplotlib Figure.

``make_figures(run_dir)`` renders every figure whose inputs exist into ``RUN/figures/`` as PNG
and PDF (atomic writes) and returns the written paths; figures whose inputs are missing are
skipped with a note (``.notes`` on the returned list, also ``figures/notes.json``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from scipy.stats import gaussian_kde

from canopy_entropy.errors import CanopyError
from canopy_entropy.plots import data
from canopy_entropy.plots.style import (
    COMPONENT_COLORS,
    Palette,
    new_figure,
    note_axes,
    style,
)
from canopy_entropy.store import atomic_write_bytes, atomic_write_json

DEFAULT_MIN_ACTIVE = 5
FORMATS = ("png", "pdf")
COMPARISON_METRICS = (
    ("ce_star", "CE* (nats)"),
    ("genppl", "GenPPL"),
    ("bf", "Branching factor"),
    ("pearson", "ρ(N, r) Pearson"),
    ("diversity", "Diversity D"),
)
HEADLINE_TERM_HINTS = ("R_sc:variantinstruct", "R_sc:instruct")


def _models(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(model, family, variant) triples present in ``df``, ordered family, variant, model."""
    triples = df[["model", "family", "variant"]].drop_duplicates().astype(str)
    triples = triples.sort_values(["family", "variant", "model"])
    return [tuple(r) for r in triples.itertuples(index=False, name=None)]


def _tasks(df: pd.DataFrame) -> list[str]:
    return sorted(df["task"].astype(str).unique())


def _legend(fig: Figure, axes: Sequence[Any]) -> None:
    """One legend for the figure from the first axes that has labelled artists."""
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in seen and not lab.startswith("_"):
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))


# --- figure 1 --------------------------------------------------------------------------------
def fig_running_rate(
    rr: pd.DataFrame, palette: Palette, min_active: int = DEFAULT_MIN_ACTIVE
) -> Figure:
    """Running entropy rate of still-active rollouts vs position; lower panels: active count.

    ``rr`` is :func:`data.running_rate`'s frame. Each line stops where fewer than
    ``min_active`` rollouts remain, and the x-axis is trimmed there.
    """
    tasks = _tasks(rr)
    fig = new_figure(3.6 * len(tasks) + 0.6, 4.6)
    grid = fig.add_gridspec(2, len(tasks), height_ratios=[3, 1])
    axes = []
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(grid[0, j])
        ax_n = fig.add_subplot(grid[1, j], sharex=ax)
        axes.append(ax)
        sub = rr[rr["task"] == task]
        xmax = 0
        for model, family, variant in _models(sub):
            line = sub[sub["model"] == model].sort_values("position")
            line = line[line["n_active"] >= min_active]
            if line.empty:
                continue
            kw = palette.line_kwargs(family, variant)
            ax.plot(line["position"], line["mean_rate"], label=model, **kw)
            ax_n.plot(line["position"], line["n_active"], label=model, **kw)
            xmax = max(xmax, int(line["position"].max()))
        ax.set_title(task)
        if xmax == 0:
            note_axes(ax, f"fewer than {min_active} rollouts at every position")
            note_axes(ax_n, "")
            continue
        ax.set_xlim(1, max(xmax, 2))
        ax_n.set_xlabel("token position t")
        ax_n.set_ylim(bottom=0)
        ax.tick_params(labelbottom=False)
        if j == 0:
            ax.set_ylabel("running entropy rate (nats/token)")
            ax_n.set_ylabel("active rollouts")
    fig.suptitle(f"Running entropy rate of active rollouts (trimmed at < {min_active} active)")
    _legend(fig, axes)
    return fig


# --- figure 2 --------------------------------------------------------------------------------
def _log_density(lengths: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Density of log10(N) on ``grid`` (log10 units): Gaussian KDE, or a histogram when the
    lengths take fewer than 3 distinct values (a KDE of a near-constant sample is singular)."""
    logs = np.log10(np.maximum(lengths, 1).astype(float))
    if np.unique(logs).size >= 3:
        return gaussian_kde(logs)(grid)
    edges = np.linspace(grid[0], grid[-1], 31)
    hist, _ = np.histogram(logs, bins=edges, density=True)
    return hist[np.clip(np.searchsorted(edges, grid, side="right") - 1, 0, hist.size - 1)]


def fig_length_distribution(rollouts: pd.DataFrame, palette: Palette) -> Figure:
    """Output length distribution per task and model: KDE of log10 N on a log length axis.

    A dotted line marks the length cap when rollouts were truncated there (share in the label).
    """
    tasks = _tasks(rollouts)
    fig = new_figure(3.6 * len(tasks) + 0.6, 3.6)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        sub = rollouts[rollouts["task"] == task]
        lengths = np.maximum(sub["length"].to_numpy(), 1)
        lo, hi = np.log10(lengths.min()), np.log10(lengths.max())
        pad = max(0.1 * (hi - lo), 0.05)
        grid = np.linspace(max(lo - pad, 0.0), hi, 200)  # no mass drawn past the longest
        for model, family, variant in _models(sub):
            rows = sub[sub["model"] == model]
            density = _log_density(rows["length"].to_numpy(), grid)
            ax.plot(10**grid, density, label=model, **palette.line_kwargs(family, variant))
        truncated = sub[sub["finish_reason"] == "length"]
        if len(truncated):
            cap = int(truncated["length"].max())
            share = 100 * len(truncated) / len(sub)
            ax.axvline(cap, color="#777777", linestyle=":", linewidth=1.0, label=f"_cap {task}")
            ax.annotate(
                f"cap {cap}: {share:.0f}% truncated",
                (cap, 1.0),
                xycoords=("data", "axes fraction"),
                ha="right",
                va="top",
                fontsize=7,
                color="#555555",
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(task)
        ax.set_xlabel("output length N (tokens, log scale)")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("density of log10 N")
    fig.suptitle("Output length distribution")
    _legend(fig, axes)
    return fig


# --- figure 3 --------------------------------------------------------------------------------
def within_prompt_variance(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: sample variance (ddof 1) of the rollouts' rate r and length N."""
    keys = [*data.GROUP_KEYS, "prompt_id"]
    g = rollouts.groupby(keys, sort=True, observed=True)
    out = g.agg(var_rate=("rate", "var"), var_length=("length", "var"), m=("rate", "size"))
    return out.reset_index()


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(values)
    return x, np.arange(1, x.size + 1) / x.size


def fig_within_prompt_variance(rollouts: pd.DataFrame, palette: Palette) -> Figure:
    """Distribution over prompts (ECDF) of the within-prompt variance of r and of N."""
    var = within_prompt_variance(rollouts)
    tasks = _tasks(var)
    fig = new_figure(3.4 * len(tasks) + 0.6, 5.2)
    axes = fig.subplots(2, len(tasks), squeeze=False)
    quantities = (("var_rate", "Var within prompt of r"), ("var_length", "Var within prompt of N"))
    for j, task in enumerate(tasks):
        sub = var[var["task"] == task]
        for i, (column, label) in enumerate(quantities):
            ax = axes[i, j]
            values = sub[column].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                note_axes(ax, "needs >= 2 rollouts per prompt")
                continue
            for model, family, variant in _models(sub):
                v = sub.loc[sub["model"] == model, column].to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if v.size:
                    x, y = _ecdf(v)
                    ax.step(x, y, where="post", label=model, **palette.line_kwargs(family, variant))
            positive = finite[finite > 0]
            if positive.size == finite.size:
                ax.set_xscale("log")
            elif positive.size:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylim(0, 1.02)
            if i == 0:
                ax.set_title(task)
            if j == 0:
                ax.set_ylabel("share of prompts ≤ x")
    fig.suptitle("Within-prompt variance of entropy rate r and length N across prompts")
    _legend(fig, axes.ravel())
    return fig


# --- figure 4 --------------------------------------------------------------------------------
DECOMPOSITION_TERMS = (
    ("rate_length_term", "N̄ · R̄"),
    ("within_cov_term", "within-prompt Cov(N, r)"),
    ("between_cov_term", "between-prompt Cov"),
)


def _bars(
    ax: Any,
    x: np.ndarray,
    heights: np.ndarray,
    bottom: Any,
    variants: list[str],
    color: str,
    label: str,
) -> None:
    """Bars with the variant code of every figure: base outlined dashed, instruct solid."""
    bars = ax.bar(
        x,
        heights,
        bottom=bottom,
        color=color,
        label=label,
        width=0.7,
        edgecolor="black",
        linewidth=0.7,
    )
    for patch, variant in zip(bars.patches, variants, strict=True):
        patch.set_linestyle(Palette.linestyle(variant))


def fig_ce_decomposition(pooled: pd.DataFrame, palette: Palette) -> Figure:
    """CE* split into N̄·R̄ and covariance terms (top) and stop vs content share (bottom)."""
    data._require_columns(
        pooled, ["model", "family", "variant", "task", "rate_length_term"], "metrics/pooled"
    )
    tasks = _tasks(pooled)
    fig = new_figure(max(3.6 * len(tasks), 4.5) + 0.6, 5.6)
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for j, task in enumerate(tasks):
        sub = pooled[pooled["task"] == task]
        models = _models(sub)
        x = np.arange(len(models))
        ax = axes[0, j]
        pos_base = np.zeros(len(models))
        neg_base = np.zeros(len(models))
        rows = [sub[sub["model"] == m].iloc[0] for m, _, _ in models]
        variants = [v for _, _, v in models]
        for column, label in DECOMPOSITION_TERMS:
            if column not in sub.columns:
                continue
            v = np.array([float(r[column]) for r in rows])
            v = np.where(np.isfinite(v), v, 0.0)
            bottom = np.where(v >= 0, pos_base, neg_base)
            _bars(ax, x, v, bottom, variants, COMPONENT_COLORS[column], label)
            pos_base += np.where(v >= 0, v, 0)
            neg_base += np.where(v < 0, v, 0)
        if "ce_star" in sub.columns:
            ce = [float(r["ce_star"]) for r in rows]
            ax.plot(x, ce, linestyle="none", marker="_", markersize=18, color="black", label="CE*")
            # the covariance terms are often small next to N̄·R̄: print their share of CE*
            cov = sum(
                np.array([float(r[c]) for r in rows])
                for c in ("within_cov_term", "between_cov_term")
                if c in sub.columns
            )
            for xi, top, c_i, ce_i in zip(x, pos_base, np.atleast_1d(cov), ce, strict=False):
                if np.isfinite(c_i) and ce_i:
                    ax.annotate(
                        f"cov {100 * c_i / ce_i:+.1f}%",
                        (xi, top),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        xytext=(0, 2),
                        textcoords="offset points",
                    )
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(task)
        ax.set_xticks(x, [m for m, _, _ in models], rotation=30, ha="right")
        for tick, (_, family, _) in zip(ax.get_xticklabels(), models, strict=True):
            tick.set_color(palette.color(family))
        if j == 0:
            ax.set_ylabel("nats")
        ax2 = axes[1, j]
        share = (
            np.array([float(r["stop_entropy_share"]) for r in rows])
            if "stop_entropy_share" in sub.columns
            else np.full(len(models), np.nan)
        )
        if not np.isfinite(share).any():
            note_axes(ax2, "stop/content split needs eos_prob")
            continue
        share = np.where(np.isfinite(share), share, 0.0)
        _bars(ax2, x, share, 0.0, variants, COMPONENT_COLORS["stop"], "stopping decisions")
        _bars(ax2, x, 1 - share, share, variants, COMPONENT_COLORS["content"], "content")
        ax2.set_ylim(0, 1)
        ax2.set_xticks(x, [m for m, _, _ in models], rotation=30, ha="right")
        for tick, (_, family, _) in zip(ax2.get_xticklabels(), models, strict=True):
            tick.set_color(palette.color(family))
        if j == 0:
            ax2.set_ylabel("share of CE*")
    fig.suptitle("Where CE* sits: rate × length vs covariance; stopping vs content")
    _legend(fig, axes.ravel())
    return fig


# --- figure 5 --------------------------------------------------------------------------------
def fig_comparison(comp: pd.DataFrame, palette: Palette) -> Figure:
    """Base vs instruct: % change (ratio metrics) or difference (correlations) with bootstrap CIs."""
    by = data.comparison_by_columns(comp)
    present = [(m, t) for m, t in COMPARISON_METRICS if m in set(comp["metric"])]
    if not present:
        raise data.MissingInput(
            f"compare/comparison.parquet has none of {[m for m, _ in COMPARISON_METRICS]}"
        )
    task_col = "task" if "task" in by else None
    fam_col = "family" if "family" in by else None
    fig = new_figure(3.0 * len(present) + 0.6, 3.6)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    a_label = str(comp["a_label"].iloc[0]) if "a_label" in comp.columns else "A"
    b_label = str(comp["b_label"].iloc[0]) if "b_label" in comp.columns else "B"
    for ax, (metric, title) in zip(axes, present, strict=True):
        sub = comp[comp["metric"] == metric]
        ratio = str(sub["kind"].iloc[0]) == "ratio"
        centre, lo, hi = ("pct", "pct_lo", "pct_hi") if ratio else ("diff", "diff_lo", "diff_hi")
        tasks = sorted(sub[task_col].astype(str).unique()) if task_col else ["all"]
        families = sorted(sub[fam_col].astype(str).unique()) if fam_col else [""]
        width = 0.7 / max(len(families), 1)
        for k, family in enumerate(families):
            rows = sub[sub[fam_col].astype(str) == family] if fam_col else sub
            xs, ys, err = [], [], [[], []]
            for i, task in enumerate(tasks):
                r = rows[rows[task_col].astype(str) == task] if task_col else rows
                if r.empty:
                    continue
                r = r.iloc[0]
                y = float(r[centre])
                xs.append(i - 0.35 + width * (k + 0.5))
                ys.append(y)
                err[0].append(max(y - float(r.get(lo, np.nan)), 0.0))
                err[1].append(max(float(r.get(hi, np.nan)) - y, 0.0))
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=np.nan_to_num(np.array(err)),
                    fmt="o",
                    capsize=3,
                    color=palette.color(family) if family else "#333333",
                    label=family or "all",
                )
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_title(title)
        ax.set_ylabel("% change" if ratio else "difference")
    fig.suptitle(f"{b_label} vs {a_label} with 95% bootstrap intervals")
    _legend(fig, axes)
    return fig


# --- figure 6 --------------------------------------------------------------------------------
CURVE_COLUMNS = ("D_pred", "predicted_D", "predicted", "D_hat", "fitted", "mu", "D")


def rate_diversity_points(run: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """Scatter points (x, D, task, family, variant) and fitted curves (x, D, task, variant).

    Prefers the regression panel (x = R_sc, the z-scored entropy rate the curves use); without
    a regression it joins per-prompt entropy rate with diversity (x in nats/token, no curves).
    """
    try:
        panel = data.regression_panel(run)
        data._require_columns(panel, ["R_sc", "D", "task", "variant"], "regression/panel")
        points = panel.rename(columns={"R_sc": "x"})
        if "family" not in points.columns:
            points["family"] = ""
        try:
            curves = data.regression_curves(run)
            col = data.pick_column(curves, CURVE_COLUMNS, "regression/curves.parquet")
            data._require_columns(curves, ["R_sc", "task", "variant"], "regression/curves")
            curves = curves.rename(columns={"R_sc": "x", col: "D_curve"})
        except data.MissingInput:
            curves = None
        return points, curves, "entropy rate (z-score, R_sc)"
    except data.MissingInput:
        pass
    div = data.prompt_diversity(run)
    pm = data.metrics_prompts(run)
    keys = [*data.GROUP_KEYS, "prompt_id"]
    data._require_columns(div, [*keys, "diversity"], "semantic/prompt_diversity")
    data._require_columns(pm, [*keys, "entropy_rate"], "metrics/prompts")
    points = pm[[*keys, "entropy_rate"]].merge(div[[*keys, "diversity"]], on=keys)
    points = points.rename(columns={"entropy_rate": "x", "diversity": "D"})
    if points.empty:
        raise data.MissingInput("no prompt has both metrics and diversity")
    return points, None, "entropy rate R̄ (nats/token)"


def fig_rate_vs_diversity(
    points: pd.DataFrame, curves: pd.DataFrame | None, palette: Palette, xlabel: str
) -> Figure:
    """Per task: entropy rate vs diversity, base vs instruct, with fitted regression curves."""
    tasks = _tasks(points)
    fig = new_figure(3.4 * len(tasks) + 0.6, 3.6)
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    for ax, task in zip(axes, tasks, strict=True):
        sub = points[points["task"] == task]
        groups = sub[["family", "variant"]].drop_duplicates().astype(str)
        for family, variant in sorted(groups.itertuples(index=False, name=None)):
            rows = sub[(sub["family"].astype(str) == family) & (sub["variant"] == variant)]
            face = palette.color(family) if variant != "base" else "none"
            ax.scatter(
                rows["x"],
                rows["D"],
                s=14,
                marker=Palette.marker(variant),
                facecolors=face,
                edgecolors=palette.color(family),
                alpha=0.75,
                linewidths=0.8,
                label=f"{family} {variant}".strip(),
            )
        if curves is not None:
            cur = curves[curves["task"] == task]
            for variant in sorted(cur["variant"].astype(str).unique()):
                c = cur[cur["variant"] == variant].sort_values("x")
                ax.plot(
                    c["x"],
                    c["D_curve"],
                    color="black",
                    linestyle=Palette.linestyle(variant),
                    label=f"fit {variant}",
                )
        ax.set_title(task)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("semantic diversity D")
    fig.suptitle("Entropy rate vs semantic diversity")
    _legend(fig, axes)
    return fig


def _float(value: Any) -> float:
    """JSON number or null -> float (null -> NaN)."""
    return float("nan") if value is None else float(value)


def _headline_term(terms: Sequence[str]) -> str | None:
    for hint in HEADLINE_TERM_HINTS:
        if hint in terms:
            return hint
    cands = [t for t in terms if "R_sc" in t and ":" in t and "instruct" in t]
    return cands[0] if cands else None


def fig_coefficients(result: dict[str, Any]) -> Figure:
    """Forest plot of the mean-model coefficients with 95% Wald intervals."""
    mean = result.get("mean") or {}
    terms = [t for t in mean if t != "(Intercept)"]
    if not terms:
        raise data.MissingInput("regression/result.json has no mean-model coefficients")
    est = np.array([_float(mean[t].get("estimate")) for t in terms])
    se = np.array([_float(mean[t].get("se")) for t in terms])
    fig = new_figure(6.0, 1.2 + 0.28 * len(terms))
    ax = fig.add_subplot()
    y = np.arange(len(terms))[::-1]
    head = _headline_term(terms)
    colors = ["#D55E00" if t == head else "#333333" for t in terms]
    for e, s, yy, color in zip(est, np.nan_to_num(se), y, colors, strict=True):
        ax.errorbar([e], [yy], xerr=[1.96 * s], fmt="o", color=color, capsize=2, markersize=4)
    ax.axvline(0, color="black", linewidth=0.7)
    ax.set_yticks(y, terms)
    ax.set_xlabel("estimate (logit scale) ± 1.96 SE")
    title = "Beta mixed model: mean coefficients"
    ratio = result.get("slope_ratio")
    if isinstance(ratio, dict):
        ratio = ratio.get("estimate")
    if ratio is not None and np.isfinite(_float(ratio)):
        title += f" (slope ratio {float(ratio):.2f})"
    conv = result.get("convergence") if isinstance(result.get("convergence"), dict) else {}
    if result.get("converged") is False or conv.get("converged") is False:
        title += "\nNOT CONVERGED: estimates unreliable"
    if not np.isfinite(se).all():
        ax.set_xlabel("estimate (logit scale) ± 1.96 SE (no bar: SE not available)")
    ax.set_title(title)
    return fig


DIAGNOSTIC_P = (
    ("ks", "KS"),
    ("dispersion", "dispersion"),
    ("outlier", "outliers"),
)


def _diagnostic_pvalues(doc: dict[str, Any]) -> list[str]:
    """'conditional ks p=0.41'-style lines from diagnostics.json (any reasonable nesting).

    A number counts as a p-value when its key is ``p``/``pvalue``/``p_value`` or ends in
    ``_p``, and its path names one of the KS, dispersion or outlier tests.
    """
    found: list[str] = []

    def is_p(key: str) -> bool:
        return key in ("p", "pvalue", "p_value") or key.endswith("_p")

    def walk(obj: Any, path: list[str]) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, [*path, str(k).lower()])
        elif isinstance(obj, int | float) and not isinstance(obj, bool) and path:
            joined = ".".join(path)
            if is_p(path[-1]) and any(key in joined for key, _ in DIAGNOSTIC_P):
                name = " ".join(path[:-1]) if path[-1] in ("p", "pvalue", "p_value") else joined
                found.append(f"{name}: p={float(obj):.3g}")

    walk(doc, [])
    return found


def fig_qq(doc: dict[str, Any], residuals: pd.DataFrame) -> Figure:
    """DHARMa-style QQ plot of the scaled residuals against Uniform(0, 1)."""
    cols = data.residual_columns(residuals)
    fig = new_figure(4.2, 4.2)
    ax = fig.add_subplot()
    colors = ("#0072B2", "#D55E00", "#009E73")
    for col, color in zip(cols, colors, strict=False):
        r = np.sort(residuals[col].to_numpy(dtype=float))
        r = r[np.isfinite(r)]
        expected = (np.arange(1, r.size + 1) - 0.5) / r.size
        ax.plot(expected, r, linestyle="none", marker=".", markersize=3, color=color, label=col)
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, label="_diagonal")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("expected (uniform quantiles)")
    ax.set_ylabel("observed scaled residual")
    lines = _diagnostic_pvalues(doc)
    if lines:
        ax.text(0.03, 0.97, "\n".join(lines[:6]), transform=ax.transAxes, va="top", fontsize=7)
    ax.set_title("Scaled residuals QQ (DHARMa-style)")
    if len(cols) > 1:
        ax.legend(loc="lower right")
    return fig


# --- orchestration ---------------------------------------------------------------------------
class FigureFiles(list):  # list[Path] with the notes of the skipped figures
    """Paths written by :func:`make_figures`; ``notes`` maps skipped figure names to reasons."""

    def __init__(self, paths: Sequence[Path] = (), notes: dict[str, str] | None = None):
        super().__init__(paths)
        self.notes: dict[str, str] = dict(notes or {})


@dataclass
class _Inputs:
    """Lazily loaded, shared inputs of one run (each read at most once)."""

    run: Path
    min_active: int

    def __post_init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, name: str, loader: Callable[[], Any]) -> Any:
        if name not in self._cache:
            try:
                self._cache[name] = loader()
            except data.MissingInput as exc:
                self._cache[name] = exc
        value = self._cache[name]
        if isinstance(value, data.MissingInput):
            raise value
        return value

    def scan(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.get("scan", lambda: data.scan_rollouts(self.run))

    def rollouts(self) -> pd.DataFrame:
        return self.scan()[0]

    def palette(self) -> Palette:
        families: set[str] = set()
        for loader in (
            self.rollouts,
            lambda: data.metrics_pooled(self.run),
            lambda: data.comparison(self.run),
        ):
            try:
                frame = loader()
            except data.MissingInput:
                continue
            if "family" in frame.columns:
                families.update(frame["family"].astype(str))
        return Palette(families)


FIGURE_NAMES = (
    "fig1_running_rate",
    "fig2_length_distribution",
    "fig3_within_prompt_variance",
    "fig4_ce_decomposition",
    "fig5_comparison",
    "fig6_rate_vs_diversity",
    "fig6_coefficients",
    "fig6_qq",
)
FIGURE_TITLES = {
    "fig1_running_rate": "Running entropy rate vs token position",
    "fig2_length_distribution": "Output length distributions",
    "fig3_within_prompt_variance": "Within-prompt variance of entropy rate and length",
    "fig4_ce_decomposition": "CE* decomposition",
    "fig5_comparison": "Base vs instruct with bootstrap intervals",
    "fig6_rate_vs_diversity": "Entropy rate vs diversity with fitted curves",
    "fig6_coefficients": "Regression coefficients",
    "fig6_qq": "Residual QQ plot",
}


def build_figure(name: str, inputs: _Inputs, palette: Palette) -> Figure:
    """Build one named figure from the run's inputs (raises MissingInput with a note)."""
    run = inputs.run
    if name == "fig1_running_rate":
        return fig_running_rate(inputs.scan()[1], palette, inputs.min_active)
    if name == "fig2_length_distribution":
        return fig_length_distribution(inputs.rollouts(), palette)
    if name == "fig3_within_prompt_variance":
        return fig_within_prompt_variance(inputs.rollouts(), palette)
    if name == "fig4_ce_decomposition":
        return fig_ce_decomposition(data.metrics_pooled(run), palette)
    if name == "fig5_comparison":
        return fig_comparison(data.comparison(run), palette)
    if name == "fig6_rate_vs_diversity":
        points, curves, xlabel = rate_diversity_points(run)
        return fig_rate_vs_diversity(points, curves, palette, xlabel)
    if name == "fig6_coefficients":
        return fig_coefficients(data.regression_result(run))
    if name == "fig6_qq":
        return fig_qq(*data.regression_diagnostics(run))
    raise CanopyError(f"unknown figure '{name}'; choose from {', '.join(FIGURE_NAMES)}")


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """Serialise a figure (no creation dates, so re-runs give byte-identical files)."""
    buf = io.BytesIO()
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    with style():
        fig.savefig(buf, format=fmt, metadata=metadata)
    return buf.getvalue()


def make_figures(
    run_dir: str | Path,
    *,
    min_active: int = DEFAULT_MIN_ACTIVE,
    formats: Sequence[str] = FORMATS,
    names: Sequence[str] = FIGURE_NAMES,
) -> FigureFiles:
    """Render every figure whose inputs exist to ``RUN/figures/<name>.<fmt>`` (atomic writes).

    Returns the written paths; ``.notes`` says why each other figure was skipped. Both are
    recorded in ``figures/index.json`` (with ``min_active``) so the report can tell whether
    the figures are up to date. Stale files of a skipped figure are removed so the folder
    never shows a figure from older inputs.
    """
    run = data.check_run_dir(run_dir)
    if min_active < 1:
        raise CanopyError(f"--min-active must be >= 1 (got {min_active})")
    unknown = sorted(set(names) - set(FIGURE_NAMES))
    if unknown:
        raise CanopyError(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURE_NAMES)}")
    out_dir = run / "figures"
    inputs = _Inputs(run, min_active)
    palette = inputs.palette()
    written = FigureFiles()
    for name in names:
        try:
            with style():
                fig = build_figure(name, inputs, palette)
        except data.MissingInput as exc:
            written.notes[name] = str(exc)
            for fmt in formats:
                (out_dir / f"{name}.{fmt}").unlink(missing_ok=True)
            continue
        for fmt in formats:
            path = out_dir / f"{name}.{fmt}"
            atomic_write_bytes(path, figure_bytes(fig, fmt))
            written.append(path)
    # figures not drawn in this call keep their entries (same min_active only)
    old = read_index(run) or {}
    same = old.get("min_active") == min_active
    kept_files = [f for f in old.get("files", []) if same and Path(f).stem not in names]
    kept_notes = {k: v for k, v in old.get("notes", {}).items() if same and k not in names}
    atomic_write_json(
        out_dir / INDEX_NAME,
        {
            "min_active": min_active,
            "files": sorted({*kept_files, *(p.name for p in written)}),
            "notes": {**kept_notes, **written.notes},
        },
    )
    return written


INDEX_NAME = "index.json"
# Everything a figure reads: a change (or a deletion, via the folder's mtime) makes them stale.
INPUT_GLOBS = (
    "manifest.json",
    "rollouts",
    "rollouts/*.parquet",
    "metrics",
    "metrics/*",
    "semantic",
    "semantic/*.parquet",
    "compare",
    "compare/*.parquet",
    "regression",
    "regression/*",
)


def read_index(run_dir: str | Path) -> dict[str, Any] | None:
    """figures/index.json of a run, or None when absent or unreadable."""
    path = Path(run_dir) / "figures" / INDEX_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def figures_are_fresh(run_dir: str | Path, min_active: int = DEFAULT_MIN_ACTIVE) -> bool:
    """True when figures/ was drawn (with ``min_active``) after every input last changed."""
    run = Path(run_dir)
    index = read_index(run)
    if index is None or index.get("min_active") != min_active:
        return False
    stamp = (run / "figures" / INDEX_NAME).stat().st_mtime_ns
    for pattern in INPUT_GLOBS:
        for path in run.glob(pattern):
            if path.stat().st_mtime_ns > stamp:
                return False
    return all((run / "figures" / name).exists() for name in index.get("files", []))
