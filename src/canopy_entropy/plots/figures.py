"""The figures of a run, each a public function from frames to a matplotlib Figure.

Nothing here reads or writes files: a notebook calls ``ce_decomposition(pooled)`` on the frames
of ``canopy_entropy.plots.data`` (or its own), and ``plots.make`` renders them for a run folder.
Every function takes an optional :class:`Palette` (default: from the frame's families), so a
family keeps its colour across figures; base is dashed, instruct solid.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from canopy_entropy.labels import header, label, term_label
from canopy_entropy.plots.style import (
    COMPONENT_COLORS,
    Palette,
    new_figure,
    note_axes,
    panel_title,
    style,
    suptitle,
    wrap,
)
from canopy_entropy.run.layout import PROMPT_KEYS

DEFAULT_MIN_ACTIVE = 5
FEW_PROMPTS = 10  # comparison intervals from fewer prompts than this get a caution
COMPARISON_METRICS = ("ce_star", "genppl", "bf", "pearson", "diversity")


def _models(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(model, family, variant) triples present in ``df``, ordered family, variant, model."""
    triples = df[["model", "family", "variant"]].drop_duplicates().astype(str)
    triples = triples.sort_values(["family", "variant", "model"])
    return [tuple(r) for r in triples.itertuples(index=False, name=None)]


def _tasks(df: pd.DataFrame) -> list[str]:
    return sorted(df["task"].astype(str).unique())


def _width(n_panels: int, per_panel: float = 3.4, least: float = 5.6) -> float:
    """Figure width: one column per panel, never so narrow that a title must wrap twice."""
    return max(per_panel * n_panels + 0.6, least)


def _legend(fig: Figure, axes: Sequence[Any], loc: str = "outside lower center") -> None:
    """One legend for the figure from every labelled artist of ``axes`` (each label once)."""
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in seen and not lab.startswith("_"):
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if handles:
        ncols = max(1, min(len(labels), int(fig.get_figwidth() // 1.8)))
        fig.legend(handles, labels, loc=loc, ncols=ncols if "center" in loc else 1)


def _log_ticks(axis: Any) -> None:
    """Readable ticks on a log axis: 1, 2, 5, 10, 20, ... in plain numbers."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


# --- figure 1 --------------------------------------------------------------------------------
def running_rate(
    rr: pd.DataFrame, palette: Palette | None = None, min_active: int = DEFAULT_MIN_ACTIVE
) -> Figure:
    """Running entropy rate of still-active rollouts vs position; lower panels: active count.

    ``rr`` is the running-rate frame of ``data.running_rate``. Each line stops where fewer
    than ``min_active`` rollouts remain, and the x-axis is trimmed there.
    """
    palette = palette or Palette.of(rr)
    tasks = _tasks(rr)
    fig = new_figure(_width(len(tasks), 3.6), 4.8)
    grid = fig.add_gridspec(2, len(tasks), height_ratios=[3, 1])
    axes, lowers = [], []
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(grid[0, j], sharey=axes[0] if axes else None)
        ax_n = fig.add_subplot(grid[1, j], sharex=ax, sharey=lowers[0] if lowers else None)
        axes.append(ax)
        lowers.append(ax_n)
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
        panel_title(ax, task, len(tasks))
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
    suptitle(fig, f"Running entropy rate of active rollouts (lines stop at < {min_active} active)")
    _legend(fig, axes)
    return fig


# --- figure 2 --------------------------------------------------------------------------------
def _ecdf(values: np.ndarray, start: float) -> tuple[np.ndarray, np.ndarray]:
    """Step coordinates of an ECDF that rises from 0 at ``start`` (draw with where='post')."""
    x = np.sort(np.asarray(values, dtype=float))
    return np.r_[start, x], np.r_[0.0, np.arange(1, x.size + 1) / x.size]


def length_distribution(
    rollouts: pd.DataFrame,
    caps: Mapping[str, int] | None = None,
    palette: Palette | None = None,
) -> Figure:
    """Output length distribution per task and model: ECDF of N on a log length axis.

    An ECDF never runs past the longest rollout, and a group whose rollouts all hit the cap is
    a single rise at the cap. The cap (``caps``: model -> max_new_tokens, else the longest
    truncated rollout) is marked, with each model's share of truncated rollouts.
    """
    palette = palette or Palette.of(rollouts)
    tasks = _tasks(rollouts)
    fig = new_figure(_width(len(tasks), 3.6), 3.9)
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True, sharex=True)[0]
    longest = float(max(rollouts["length"].max(), 2))
    for ax, task in zip(axes, tasks, strict=True):
        sub = rollouts[rollouts["task"] == task]
        shares = []
        cap_values = set()
        for model, family, variant in _models(sub):
            rows = sub[sub["model"] == model]
            x, y = _ecdf(np.maximum(rows["length"].to_numpy(), 1), 1.0)
            ax.step(x, y, where="post", label=model, **palette.line_kwargs(family, variant))
            truncated = rows["finish_reason"] == "length"
            cap = (caps or {}).get(model)
            if cap is None and truncated.any():
                cap = int(rows.loc[truncated, "length"].max())
            if cap is not None:
                cap_values.add(int(cap))
                shares.append(f"{model}: {100 * truncated.mean():.0f}%")
        for cap in sorted(cap_values):
            ax.axvline(cap, color="#777777", linestyle=":", linewidth=1.0)
        if cap_values:
            caps_text = "/".join(str(c) for c in sorted(cap_values))
            ax.text(
                0.03,
                0.97,
                wrap(f"at the cap ({caps_text}):", 1.6, 7) + "\n" + "\n".join(shares),
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=7,
                color="#444444",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5},
            )
        ax.set_xscale("log")
        ax.set_xlim(1, longest * 1.15)
        _log_ticks(ax.xaxis)
        panel_title(ax, task, len(tasks))
        ax.set_xlabel("output length N (tokens, log scale)")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("share of rollouts with length ≤ N")
    suptitle(fig, "Output length distribution (dotted: the length cap)")
    _legend(fig, axes)
    return fig


# --- figure 3 --------------------------------------------------------------------------------
def within_prompt_frame(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: sample variance (ddof 1) of the rollouts' rate r and length N."""
    g = rollouts.groupby(list(PROMPT_KEYS), sort=True, observed=True)
    out = g.agg(var_rate=("rate", "var"), var_length=("length", "var"), m=("rate", "size"))
    return out.reset_index()


def within_prompt_variance(rollouts: pd.DataFrame, palette: Palette | None = None) -> Figure:
    """Distribution over prompts (ECDF from 0) of the within-prompt variance of r and of N."""
    palette = palette or Palette.of(rollouts)
    var = within_prompt_frame(rollouts)
    tasks = _tasks(var)
    fig = new_figure(_width(len(tasks)), 5.4)
    axes = fig.subplots(2, len(tasks), squeeze=False, sharey=True)
    quantities = (
        ("var_rate", "within-prompt Var of rate r (nats²/token²)"),
        ("var_length", "within-prompt Var of length N (tokens²)"),
    )
    for i, (column, xlabel) in enumerate(quantities):
        values = var[column].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        positive = finite[finite > 0]
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            sub = var[var["task"] == task]
            if not np.isfinite(sub[column].to_numpy(dtype=float)).any():
                note_axes(ax, "needs ≥ 2 rollouts per prompt")
                continue
            start = float(positive.min()) / 2 if positive.size else 0.0
            for model, family, variant in _models(sub):
                v = sub.loc[sub["model"] == model, column].to_numpy(dtype=float)
                v = v[np.isfinite(v)]
                if v.size:
                    x, y = _ecdf(v, min(start, float(v.min())))
                    ax.step(x, y, where="post", label=model, **palette.line_kwargs(family, variant))
            if positive.size == finite.size and positive.size:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=10, numticks=5))
                ax.xaxis.set_minor_formatter(NullFormatter())
            elif positive.size:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(wrap(xlabel, fig.get_figwidth() / len(tasks) - 0.3, 9))
            ax.set_ylim(0, 1.02)
            if i == 0:
                panel_title(ax, task, len(tasks))
            if j == 0:
                ax.set_ylabel("share of prompts ≤ x")
    suptitle(fig, "Within-prompt variance of entropy rate r and length N, across prompts")
    _legend(fig, axes.ravel())
    return fig


# --- figure 4 --------------------------------------------------------------------------------
def _bars(ax: Any, x: Any, heights: Any, bottom: Any, variants: list[str], **kw: Any) -> None:
    """Bars with the variant code of every figure: base outlined dashed, instruct solid."""
    bars = ax.bar(x, heights, bottom=bottom, edgecolor="black", linewidth=0.7, **kw)
    for patch, variant in zip(bars.patches, variants, strict=True):
        patch.set_linestyle(Palette.linestyle(variant))


def _model_ticks(ax: Any, models: list[tuple[str, str, str]], palette: Palette) -> None:
    ax.set_xticks(range(len(models)), [m for m, _, _ in models], rotation=30, ha="right")
    for tick, (_, family, _) in zip(ax.get_xticklabels(), models, strict=True):
        tick.set_color(palette.color(family))
    ax.grid(False, axis="x")


def ce_decomposition(pooled: pd.DataFrame, palette: Palette | None = None) -> Figure:
    """CE* = N̄·R̄ + within- + between-prompt covariance (top, nats), the covariance terms as
    a share of CE* (middle, %: they are slivers in nats) and the stopping decisions' share of
    CE* (bottom, %); rows share their y scale across tasks."""
    palette = palette or Palette.of(pooled)
    tasks = _tasks(pooled)
    fig = new_figure(_width(len(tasks), 3.6), 7.4)
    axes = fig.subplots(3, len(tasks), squeeze=False, sharey="row")
    cov_terms = ("within_cov_term", "between_cov_term")
    for j, task in enumerate(tasks):
        sub = pooled[pooled["task"] == task]
        models = _models(sub)
        rows = pd.DataFrame([sub[sub["model"] == m].iloc[0] for m, _, _ in models])
        variants = [v for _, _, v in models]
        x = np.arange(len(models))
        ax = axes[0, j]
        pos_base, neg_base = np.zeros(len(models)), np.zeros(len(models))
        for column in ("rate_length_term", *cov_terms):
            v = np.nan_to_num(rows[column].to_numpy(dtype=float))
            bottom = np.where(v >= 0, pos_base, neg_base)
            _bars(ax, x, v, bottom, variants, color=COMPONENT_COLORS[column], label=header(column))
            pos_base += np.where(v >= 0, v, 0)
            neg_base += np.where(v < 0, v, 0)
        ce = rows["ce_star"].to_numpy(dtype=float)
        ax.plot(x, ce, linestyle="none", marker="_", markersize=18, color="black", label="CE*")
        ax.axhline(0, color="black", linewidth=0.6)
        panel_title(ax, task, len(tasks))
        _model_ticks(ax, models, palette)
        ax.tick_params(labelbottom=False)
        ax2 = axes[1, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = {c: 100 * rows[c].to_numpy(dtype=float) / ce for c in cov_terms}
        width = 0.38
        for k, column in enumerate(cov_terms):
            _bars(
                ax2,
                x + (k - 0.5) * width,
                np.nan_to_num(shares[column]),
                0.0,
                variants,
                width=width,
                color=COMPONENT_COLORS[column],
            )
        ax2.axhline(0, color="black", linewidth=0.6)
        _model_ticks(ax2, models, palette)
        ax2.tick_params(labelbottom=False)
        ax3 = axes[2, j]
        stop = 100 * rows["stop_entropy_share"].to_numpy(dtype=float)
        _model_ticks(ax3, models, palette)
        if not np.isfinite(stop).any():
            note_axes(
                ax3, "no stop/content split: the rollouts carry no end-of-sequence probability"
            )
        elif np.nanmax(np.abs(stop)) == 0:
            note_axes(ax3, "nothing to show: stopping decisions carry no entropy (0% of CE*)")
        else:
            _bars(ax3, x, np.nan_to_num(stop), 0.0, variants, color=COMPONENT_COLORS["stop"])
            for xi, s in zip(x, stop, strict=True):
                if np.isfinite(s):
                    ax3.annotate(
                        f"{s:.1f}%",
                        (xi, s),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        xytext=(0, 1),
                        textcoords="offset points",
                    )
        if j == 0:
            ax.set_ylabel("CE* and parts (nats)")
            ax2.set_ylabel("covariances (% of CE*)")
            ax3.set_ylabel("stopping (% of CE*)")
    fig.align_ylabels(axes[:, 0])
    suptitle(fig, "Where CE* sits: rate × length vs covariance; share of stopping decisions")
    _legend(fig, axes[0])
    return fig


# --- figure 5 --------------------------------------------------------------------------------
def comparison(comp: pd.DataFrame, palette: Palette | None = None) -> Figure:
    """B vs A: % change (ratio metrics) or difference (correlations) with the 95% paired
    prompt-bootstrap intervals, per task and family; empty slots read 'n/a'."""
    from canopy_entropy.plots.data import comparison_by_columns

    palette = palette or Palette.of(comp)
    by = comparison_by_columns(comp)
    metrics = [m for m in COMPARISON_METRICS if m in set(comp["metric"])]
    task_col = "task" if "task" in by else None
    fam_col = "family" if "family" in by else None
    tasks = sorted(comp[task_col].astype(str).unique()) if task_col else ["all tasks"]
    families = sorted(comp[fam_col].astype(str).unique()) if fam_col else [""]
    fig = new_figure(max(2.6 * len(metrics) + 0.6, 5.6), 3.9)
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    a_label, b_label = str(comp["a_label"].iloc[0]), str(comp["b_label"].iloc[0])
    width = 0.7 / len(families)
    for ax, metric in zip(axes, metrics, strict=True):
        sub = comp[comp["metric"] == metric]
        ratio = str(sub["kind"].iloc[0]) == "ratio"
        centre, lo, hi = ("pct", "pct_lo", "pct_hi") if ratio else ("diff", "diff_lo", "diff_hi")
        for k, family in enumerate(families):
            rows = sub[sub[fam_col].astype(str) == family] if fam_col else sub
            for i, task in enumerate(tasks):
                r = rows[rows[task_col].astype(str) == task] if task_col else rows
                xpos = i - 0.35 + width * (k + 0.5)
                y = float(r[centre].iloc[0]) if len(r) else float("nan")
                if not np.isfinite(y):
                    ax.annotate(
                        "n/a",
                        (xpos, 0),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="#666666",
                        xytext=(0, 3),
                        textcoords="offset points",
                    )
                    continue
                err = [[max(y - float(r[lo].iloc[0]), 0.0)], [max(float(r[hi].iloc[0]) - y, 0.0)]]
                few = int(r["n_prompts"].iloc[0]) < FEW_PROMPTS
                color = palette.color(family) if family else "#333333"
                ax.errorbar(
                    [xpos],
                    [y],
                    yerr=np.nan_to_num(np.array(err)),
                    fmt="o",
                    capsize=3,
                    color=color,
                    markerfacecolor="white" if few else color,
                    label=family if family else "_",
                )
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.grid(False, axis="x")
        panel_title(ax, label(metric), len(metrics))
        ax.set_ylabel("% change" if ratio else "difference")
    suptitle(fig, f"{b_label} vs {a_label}: change with 95% paired prompt-bootstrap intervals")
    few = sorted({int(n) for n in comp.loc[comp["n_prompts"] < FEW_PROMPTS, "n_prompts"]})
    if few:
        counts = f"{few[0]}" if len(few) == 1 else f"{few[0]}–{few[-1]}"
        text = (
            f"Caution: hollow points rest on {counts} prompts (fewer than {FEW_PROMPTS}); "
            "their intervals are rough."
        )
        fig.supxlabel(wrap(text, fig.get_figwidth() - 0.3, 8), fontsize=8, color="#8a4b00")
    _legend(fig, axes, loc="outside right upper")
    return fig


# --- figure 6 --------------------------------------------------------------------------------
def rate_vs_diversity(
    points: pd.DataFrame,
    curves: pd.DataFrame | None = None,
    xlabel: str = "entropy rate",
    palette: Palette | None = None,
) -> Figure:
    """Per task: entropy rate vs diversity per prompt (hollow base, filled instruct) with the
    fitted mean curves (dashed base, solid instruct) when a regression was fitted."""
    palette = palette or Palette.of(points)
    tasks = _tasks(points)
    fig = new_figure(_width(len(tasks)), 3.9)
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    for ax, task in zip(axes, tasks, strict=True):
        sub = points[points["task"] == task]
        groups = sub[["family", "variant"]].drop_duplicates().astype(str)
        for family, variant in sorted(groups.itertuples(index=False, name=None)):
            rows = sub[(sub["family"].astype(str) == family) & (sub["variant"] == variant)]
            color = palette.color(family)
            ax.scatter(
                rows["x"],
                rows["D"],
                s=14,
                marker=Palette.marker(variant),
                facecolors=color if variant != "base" else "none",
                edgecolors=color,
                alpha=0.75,
                linewidths=0.8,
                label=f"{family} {variant}",
            )
        if curves is not None:
            cur = curves[curves["task"] == task]
            for variant in sorted(cur["variant"].astype(str).unique()):
                c = cur[cur["variant"] == variant].sort_values("x")
                ax.plot(
                    c["x"],
                    c["D"],
                    color="black",
                    linestyle=Palette.linestyle(variant),
                    label=f"fitted mean, {variant}",
                )
        panel_title(ax, task, len(tasks))
        ax.set_xlabel(wrap(xlabel, fig.get_figwidth() / len(tasks) - 0.3, 9))
    axes[0].set_ylabel("semantic diversity D")
    suptitle(fig, "Entropy rate vs semantic diversity per prompt")
    _legend(fig, axes)
    return fig


def _float(value: Any) -> float:
    """JSON number or null -> float (null -> NaN)."""
    return float("nan") if value is None else float(value)


def coefficients(result: Mapping[str, Any]) -> Figure:
    """Forest plot of the mean-model coefficients with 95% Wald intervals (``result`` is
    regression/result.json); the rate x instruct interaction in orange."""
    mean = result["mean"]
    terms = [t for t in mean if t != "(Intercept)"]
    ref = result.get("reference") or {}
    slope = result.get("slope_ratio")
    head = slope["interaction"] if slope else None
    fig = new_figure(6.4, 1.5 + 0.3 * max(len(terms), 1))
    ax = fig.add_subplot()
    if not terms:
        note_axes(ax, "the mean model has only an intercept")
    est = np.array([_float(mean[t]["estimate"]) for t in terms])
    se = np.array([_float(mean[t]["se"]) for t in terms])
    y = np.arange(len(terms))[::-1]
    for t, e, s, yy in zip(terms, est, np.nan_to_num(se), y, strict=True):
        color = "#D55E00" if t == head else "#333333"
        ax.errorbar([e], [yy], xerr=[1.96 * s], fmt="o", color=color, capsize=2, markersize=4)
    ax.axvline(0, color="black", linewidth=0.7)
    ax.set_yticks(y, [term_label(t, ref) for t in terms])
    ax.grid(False, axis="y")
    xlabel = "estimate (logit scale) ± 1.96 SE"
    if not np.isfinite(se).all():
        xlabel += " (no bar: SE not available)"
    ax.set_xlabel(xlabel)
    kind = "Beta mixed model" if result.get("re_sd") else "Beta regression (fixed effects only)"
    title = f"{kind}: mean-model coefficients"
    if slope and np.isfinite(_float(slope["estimate"])):
        title += f" (slope ratio {float(slope['estimate']):.2f})"
    if not result["converged"]:
        title += " — NOT CONVERGED: estimates unreliable"
    suptitle(fig, title)
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """Serialise a figure (no creation dates, so re-runs give byte-identical files)."""
    buf = io.BytesIO()
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    with style():
        fig.savefig(buf, format=fmt, metadata=metadata)
    return buf.getvalue()


def figure_formats(fig: Figure, formats: Sequence[str]) -> dict[str, bytes]:
    """The figure in every format from one layout: the first save lays it out
    (constrained layout, the costliest part of drawing a many-panel figure) and the others
    reuse those axes positions instead of solving the layout again."""
    out: dict[str, bytes] = {}
    for fmt in formats:
        out[fmt] = figure_bytes(fig, fmt)
        if fig.get_layout_engine() is not None:
            fig.set_layout_engine("none")  # keeps the positions the first save computed
    return out
