"""One self-contained HTML report of a run (``canopy report RUN`` -> ``RUN/report.html``).

Everything is inside the file: figures as base64 PNG, a small inline script that sorts tables
when a header is clicked, inline CSS with print rules. A Content-Security-Policy forbids every
network request, so the page opens offline and can be mailed to a colleague. Every string that
comes from data (model names, prompts, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from canopy_entropy import __version__
from canopy_entropy.plots import data
from canopy_entropy.plots.figures import (
    DEFAULT_MIN_ACTIVE,
    FIGURE_NAMES,
    FIGURE_TITLES,
    FORMATS,
    figures_are_fresh,
    make_figures,
    read_index,
)
from canopy_entropy.run.manifest import Manifest
from canopy_entropy.store import atomic_write_text

HEADLINE_METRICS = (
    ("ce_star", "CE* (nats)"),
    ("genppl", "GenPPL"),
    ("bf", "BF"),
    ("entropy_rate", "R̄ (nats/tok)"),
    ("mean_length", "N̄"),
    ("pearson", "ρ Pearson"),
    ("spearman", "ρ Spearman"),
    ("kendall", "τ Kendall"),
    ("stop_entropy_share", "stop share"),
    ("length_entropy", "H(N)"),
    ("content_entropy", "H(Y|N)"),
    ("diversity", "D"),
    ("vendi", "Vendi"),
    ("truncation_rate", "truncated"),
    ("n_prompts", "prompts"),
    ("n_rollouts", "rollouts"),
)
ERROR_METRICS = (
    ("ce_star", "CE*"),
    ("ce_star_se", "SE"),
    ("ce_star_var_between", "var between"),
    ("ce_star_var_within", "var within"),
    ("dominant", "dominant"),
    ("chebyshev_bound", "Chebyshev 95%"),
    ("truncation_bias_bound", "truncation bias ≤"),
    ("truncation_rate", "truncated"),
)
LOUD_TRUNCATION = 0.05

CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d9dce1; --bg-alt:#f6f7f9; --accent:#0b5cad; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: var(--fg); margin: 0 auto; padding: 24px 32px 48px; max-width: 1280px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: var(--muted); margin: 0 0 16px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
.alert { border-left: 4px solid; padding: 8px 12px; margin: 8px 0; border-radius: 3px; }
.alert.danger { border-color: #c62828; background: #fdecea; }
.alert.warn { border-color: #ef8f00; background: #fff4e0; }
.alert.info { border-color: #1565c0; background: #e8f1fb; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px;
        font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right;
         white-space: nowrap; }
th { background: var(--bg-alt); font-weight: 600; position: sticky; top: 0; }
td.t, th.t { text-align: left; }
tbody tr:nth-child(even) { background: #fbfbfc; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #b0b4ba; font-size: 11px; }
table.sortable th[aria-sort="ascending"]::after { content: " \\2191"; color: var(--fg); }
table.sortable th[aria-sort="descending"]::after { content: " \\2193"; color: var(--fg); }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 6px 0; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; }
figure { margin: 12px 0 24px; page-break-inside: avoid; break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.note { color: var(--muted); font-style: italic; }
pre { background: var(--bg-alt); padding: 10px; overflow-x: auto; font-size: 12px;
      border: 1px solid var(--line); white-space: pre-wrap; word-break: break-word; }
code { font-family: ui-monospace, "SF Mono", Menlo, Consolas, monospace; }
@page { size: A4 landscape; margin: 12mm; }
@media print {
  body { padding: 0; max-width: none; font-size: 11px; }
  nav, .noprint { display: none; }
  h2 { page-break-after: avoid; break-after: avoid; }
  figure, .alert, tr { page-break-inside: avoid; break-inside: avoid; }
  thead { display: table-header-group; }
  table { font-size: 9px; }
  th, td { padding: 2px 5px; }
  td.t, th { white-space: normal; overflow-wrap: anywhere; }
  table.sortable th::after { content: ""; }
  th { position: static; }
  .scroll { overflow: visible; }
  pre { white-space: pre-wrap; }
  a { color: inherit; text-decoration: none; }
}
"""

SCRIPT = """
(function () {
  function key(cell) {
    var v = cell.getAttribute('data-sort');
    if (v === null) v = cell.textContent.trim();
    var n = parseFloat(v);
    if (v !== '' && !isNaN(n) && isFinite(v)) return {num: true, v: n};
    return {num: false, v: v.toLowerCase()};
  }
  function cmp(a, b) {
    if (a.num && b.num) return a.v - b.v;
    if (a.num !== b.num) return a.num ? -1 : 1;
    return a.v < b.v ? -1 : (a.v > b.v ? 1 : 0);
  }
  function sortBy(table, col, th) {
    var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute('aria-sort');
    th.setAttribute('aria-sort', dir);
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === 'ascending' ? 1 : -1;
    rows.sort(function (r1, r2) {
      var a = key(r1.cells[col]), b = key(r2.cells[col]);
      if (a.num !== b.num) return a.num ? -1 : 1;  /* blanks and text after numbers */
      return sign * cmp(a, b);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      th.title = 'click to sort';
      th.addEventListener('click', function () { sortBy(table, col, th); });
      th.addEventListener('keydown', function (e) {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(table, col, th); }
      });
    });
  });
  window.addEventListener('beforeprint', function () {
    document.querySelectorAll('details').forEach(function (d) { d.open = true; });
  });
})();
"""

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included, safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, digits: int = 4) -> str:
    """A compact, readable number (4 significant digits); '—' for missing values."""
    if _is_missing(value):
        return "—"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        if float(v).is_integer() and abs(v) < 1e6:
            return f"{v:.1f}" if abs(v) < 10 else f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(value)


def _sort_value(value: Any) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)


class Cell:
    """A table cell: shown text (escaped on output) and the value used for sorting."""

    def __init__(self, text: str, sort: Any = None, numeric: bool = True):
        self.text, self.sort, self.numeric = text, sort, numeric


def html_table(
    columns: Sequence[tuple[str, bool]], rows: Iterable[Sequence[Any]], sortable: bool = True
) -> str:
    """A table from (header, is_text) columns and rows of values or Cells, all escaped."""
    head = "".join(f'<th class="{"t" if is_text else "n"}">{esc(h)}</th>' for h, is_text in columns)
    body = []
    for row in rows:
        cells = []
        for value, (_, is_text) in zip(row, columns, strict=True):
            if isinstance(value, Cell):
                text, sort = value.text, _sort_value(value.sort)
            else:
                text = str(value) if is_text and not _is_missing(value) else fmt(value)
                sort = _sort_value(value)
            cls = "t" if is_text else "n"
            cells.append(f'<td class="{cls}" data-sort="{esc(sort)}">{esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _alert(kind: str, text: str) -> str:
    return f'<div class="alert {kind}">{text}</div>'


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def _key_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in data.GROUP_KEYS if c in df.columns]


# --- sections ---------------------------------------------------------------------------------
def _policy_items(manifest: Manifest) -> list[tuple[str, Any]]:
    """The recorded decoding policy and seed scheme, from the typed manifest."""
    policy = manifest.policy
    if policy is None:  # imported or reference rollouts: per-model records only
        policies = {m.policy for m in manifest.models.values()}
        policy = policies.pop() if len(policies) == 1 else None
    items: list[tuple[str, Any]] = []
    if policy is not None:
        for k in ("temperature", "top_k", "top_p", "min_p", "max_new_tokens"):
            v = getattr(policy, k)
            items.append((k, "none" if v is None and k == "top_k" else v))
    if manifest.seed_scheme is not None:
        items.append(("seed", manifest.seed_scheme.run_seed))
        items.append(("common_random_numbers", manifest.seed_scheme.common_random_numbers))
    rollouts = {m.rollouts for m in manifest.models.values() if m.rollouts is not None}
    if len(rollouts) == 1:
        items.append(("rollouts per prompt", rollouts.pop()))
    engines = sorted({str(m.engine.get("engine")) for m in manifest.models.values() if m.engine})
    if engines:
        items.append(("engine", ", ".join(engines)))
    return [(k, v) for k, v in items if v is not None]


def _summary(run: Path, manifest: Manifest, alerts: list[str]) -> str:
    parts = []
    items: list[tuple[str, Any]] = [("run folder", str(run.resolve()))]
    if manifest.run:
        items.append(("run", manifest.run))
    items += _policy_items(manifest)
    if manifest.models:
        items.append(("approximate entropies", manifest.approximate))
    parts.append(
        '<dl class="kv">'
        + "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(fmt(v) if not isinstance(v, str) else v)}</dd>"
            for k, v in items
        )
        + "</dl>"
    )
    if manifest.approximate:
        alerts.append(
            _alert(
                "warn",
                "<b>Approximate entropies.</b> The engine saw only the top tokens of each step: "
                "per-step entropies are lower bounds (<code>entropy_upper</code> holds the upper "
                "bounds), so CE*, GenPPL and BF are lower bounds too.",
            )
        )
    try:
        counts = data.rollout_counts(run)
    except data.MissingInput as exc:
        parts.append(_note(str(exc)))
        return "".join(parts)
    keys = data.GROUP_KEYS
    g = counts.groupby(keys, sort=True)
    summary = g.agg(
        prompts=("prompt_id", "nunique"),
        rollouts=("length", "size"),
        tokens=("length", "sum"),
        mean_length=("length", "mean"),
        max_length=("length", "max"),
        truncated=("finish_reason", lambda s: int((s == "length").sum())),
    ).reset_index()
    summary["truncated_share"] = summary["truncated"] / summary["rollouts"]
    total = len(counts)
    n_trunc = int(summary["truncated"].sum())
    n_tokens = int(counts["length"].sum())
    n_prompts = counts[["task", "prompt_id"]].drop_duplicates().shape[0]
    parts.append(
        f"<p>{total:,} rollouts, {n_tokens:,} tokens, {summary['model'].nunique()} models, "
        f"{summary['task'].nunique()} tasks, {n_prompts:,} prompts.</p>"
    )
    rows = [
        [
            r.model,
            r.family,
            r.variant,
            r.task,
            int(r.prompts),
            int(r.rollouts),
            int(r.tokens),
            float(r.mean_length),
            int(r.max_length),
            Cell(f"{100 * r.truncated_share:.1f}%", r.truncated_share),
        ]
        for r in summary.itertuples(index=False)
    ]
    columns = [
        ("model", True),
        ("family", True),
        ("variant", True),
        ("task", True),
        ("prompts", False),
        ("rollouts", False),
        ("tokens", False),
        ("N̄", False),
        ("max N", False),
        ("truncated", False),
    ]
    parts.append(html_table(columns, rows))
    if n_trunc:
        worst = summary.sort_values("truncated_share", ascending=False).iloc[0]
        loud = float(worst["truncated_share"]) > LOUD_TRUNCATION
        text = (
            f"<b>{'Many' if loud else 'Some'} rollouts hit the length cap</b>: {n_trunc:,} of "
            f"{total:,} ({100 * n_trunc / total:.1f}%) are truncated, worst "
            f"{esc(worst['model'])} / {esc(worst['task'])} with "
            f"{100 * float(worst['truncated_share']):.1f}%. CE* is then a lower bound of the "
            "untruncated target; see the truncation-bias bound below"
            + ("; raise <code>max_new_tokens</code> to remove the bias." if loud else ".")
        )
        alerts.append(_alert("danger" if loud else "warn", text))
    return "".join(parts)


def _dominant(pooled: pd.DataFrame) -> pd.Series | None:
    """Which variance component dominates the SE of CE* (more prompts vs more rollouts).

    Accepts either convention for the reported components (raw sigma^2 or contributions to
    Var), choosing the one that reproduces ce_star_se^2; None when neither does.
    """
    cols = ["ce_star_se", "ce_star_var_between", "ce_star_var_within", "n_prompts", "n_rollouts"]
    if any(c not in pooled.columns for c in cols):
        return None
    se2 = pooled["ce_star_se"].astype(float) ** 2
    vb, vw = pooled["ce_star_var_between"].astype(float), pooled["ce_star_var_within"].astype(float)
    p = pooled["n_prompts"].astype(float)
    m = pooled["n_rollouts"].astype(float) / p
    for between, within in ((vb, vw), (vb / p, vw / (p * m))):
        if np.allclose(between + within, se2, rtol=1e-3, atol=1e-12):
            return pd.Series(
                np.where(between >= within, "prompts (between)", "rollouts (within)"),
                index=pooled.index,
            )
    return None


def _metric_tables(run: Path) -> tuple[str, str]:
    """(headline metrics table, estimation error table) from the pooled metrics."""
    try:
        pooled = data.metrics_pooled(run).copy()
    except data.MissingInput as exc:
        return _note(str(exc)), _note(str(exc))
    keys = _key_cols(pooled)
    try:
        div = data.prompt_diversity(run)
        dkeys = [k for k in keys if k in div.columns]
        extra = [c for c in ("diversity", "vendi") if c in div.columns and c not in pooled]
        if extra and dkeys:
            means = div.groupby(dkeys, as_index=False)[extra].mean()
            pooled = pooled.merge(means, on=dkeys, how="left")
    except data.MissingInput:
        pass
    pooled = pooled.sort_values(keys) if keys else pooled
    metrics = [(c, h) for c, h in HEADLINE_METRICS if c in pooled.columns]
    columns = [(k, True) for k in keys] + [(h, False) for _, h in metrics]
    rows = []
    for rec in pooled.to_dict("records"):
        row: list[Any] = [rec[k] for k in keys]
        for c, _ in metrics:
            v = rec[c]
            if c == "truncation_rate" and not _is_missing(v):
                v = Cell(f"{100 * float(v):.1f}%", v)
            row.append(v)
        rows.append(row)
    headline = html_table(columns, rows)
    dom = _dominant(pooled)
    if dom is not None:
        pooled["dominant"] = dom
    err = [(c, h) for c, h in ERROR_METRICS if c in pooled.columns]
    if len(err) <= 1:
        return headline, _note("metrics have no estimation-error columns (ce_star_se, ...)")
    columns = [(k, True) for k in keys] + [(h, c == "dominant") for c, h in err]
    rows = [
        [rec[k] for k in keys]
        + [
            Cell(f"{100 * float(rec[c]):.1f}%", rec[c])
            if c == "truncation_rate" and not _is_missing(rec[c])
            else rec[c]
            for c, _ in err
        ]
        for rec in pooled.to_dict("records")
    ]
    error = (
        "<p>SE of pooled CE* from its between-prompt and within-prompt variance components "
        "(SPEC §5); “dominant” says whether more prompts or more rollouts would shrink it "
        "most. Chebyshev: |estimate − target| ≤ bound with probability ≥ 95%. Truncation "
        "bias: upper bound of the entropy lost past the length cap.</p>" + html_table(columns, rows)
    )
    return headline, error


def _comparison_tables(run: Path) -> str:
    try:
        comp = data.comparison(run)
    except data.MissingInput as exc:
        return _note(str(exc))
    by = data.comparison_by_columns(comp)
    a_label = str(comp["a_label"].iloc[0]) if "a_label" in comp.columns else "A"
    b_label = str(comp["b_label"].iloc[0]) if "b_label" in comp.columns else "B"

    def pm(v: Any, se: Any) -> Cell:
        return Cell("—" if _is_missing(v) else f"{fmt(v)} ± {fmt(se, 2)}", v)

    def ci(lo: Any, hi: Any, centre: Any, unit: str = "") -> Cell:
        if _is_missing(centre):
            return Cell("—", None)
        return Cell(f"{fmt(centre)}{unit} [{fmt(lo)}, {fmt(hi)}]", centre)

    rows = []
    for rec in comp.to_dict("records"):
        ratio = rec.get("kind") == "ratio"
        rows.append(
            [rec[c] for c in by]
            + [
                rec["metric"],
                pm(rec.get("a"), rec.get("a_se")),
                pm(rec.get("b"), rec.get("b_se")),
                ci(rec.get("diff_lo"), rec.get("diff_hi"), rec.get("diff")),
                ci(rec.get("pct_lo"), rec.get("pct_hi"), rec.get("pct"), "%")
                if ratio
                else Cell("—", None),
                Cell(
                    f"[{fmt(rec.get('ratio_lo'))}%, {fmt(rec.get('ratio_hi'))}%]",
                    rec.get("ratio_lo"),
                )
                if ratio and not _is_missing(rec.get("ratio_lo"))
                else Cell("—", None),
                rec.get("n_prompts"),
            ]
        )
    columns = [(c, True) for c in by] + [
        ("metric", True),
        (f"{a_label} ± SE", False),
        (f"{b_label} ± SE", False),
        ("difference [95% CI]", False),
        ("% change [95% CI]", False),
        ("% change BCa CI", False),
        ("prompts", False),
    ]
    out = (
        f"<p>{esc(b_label)} against {esc(a_label)} on the same prompts; paired cluster "
        "bootstrap over prompts (SPEC §5), percentile intervals; for ratio metrics also the BCa "
        "interval of B/A, as a percent change (percent-change intervals are skewed).</p>"
        + html_table(columns, rows)
    )
    path = run / "compare" / "length_matched.parquet"
    if path.exists():
        try:
            lm = data._read_parquet(path, "canopy compare")
            out += "<h3>Length-matched analysis</h3>" + _generic_table(lm)
        except data.MissingInput as exc:  # pragma: no cover - raced deletion
            out += _note(str(exc))
    return out


def _generic_table(df: pd.DataFrame, max_rows: int = 500) -> str:
    """Any frame as a sortable table (text columns left-aligned), first ``max_rows`` rows."""
    columns = [(str(c), not pd.api.types.is_numeric_dtype(df[c])) for c in df.columns]
    rows = df.head(max_rows).itertuples(index=False, name=None)
    note = _note(f"first {max_rows} of {len(df)} rows") if len(df) > max_rows else ""
    return html_table(columns, rows) + note


def _regression_section(run: Path, alerts: list[str]) -> str:
    try:
        result = data.regression_result(run)
    except data.MissingInput as exc:
        return _note(str(exc))
    items: list[tuple[str, Any]] = [
        (k, result[k]) for k in ("nobs", "loglik", "aic") if k in result
    ]
    for group, n in (result.get("ngroups") or {}).items():
        items.append((f"groups ({group})", n))
    ratio = result.get("slope_ratio")
    label = "slope ratio (b_R + b_RxI) / b_R"
    if isinstance(ratio, dict):
        text = f"{fmt(ratio.get('estimate'))} ± {fmt(ratio.get('se'), 2)}"
        if not _is_missing(ratio.get("lo")) and not _is_missing(ratio.get("hi")):
            text += f" [{fmt(ratio['lo'])}, {fmt(ratio['hi'])}] (delta method)"
        items.append((label, text))
    elif ratio is not None:
        items.append((label, ratio))
    for group, sd in (result.get("re_sd") or {}).items():
        items.append((f"random-effect SD ({group})", sd))
    conv = result.get("convergence") if isinstance(result.get("convergence"), dict) else {}
    if "converged" in result:
        items.append(("converged", result["converged"]))
    for k, v in conv.items():
        items.append((f"convergence: {k}", v))
    failed = (
        result.get("converged") is False
        or conv.get("converged") is False
        or conv.get("hessian_positive_definite") is False
        or conv.get("hessian_pd") is False
    )
    if failed:
        alerts.append(
            _alert(
                "danger",
                "<b>The regression did not converge</b>: estimates and SEs are unreliable "
                f"({esc(json.dumps(conv or {'converged': False}, default=str))}).",
            )
        )
    out = [
        '<dl class="kv">'
        + "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(v if isinstance(v, str) else fmt(v))}</dd>"
            for k, v in items
        )
        + "</dl>"
    ]
    for part, title in (
        ("mean", "Mean model (logit link)"),
        ("precision", "Precision model (log link)"),
    ):
        terms = result.get(part) or {}
        if not terms:
            continue
        rows = [
            [t, v.get("estimate"), v.get("se"), v.get("z"), v.get("p")] for t, v in terms.items()
        ]
        out.append(f"<h3>{esc(title)}</h3>")
        out.append(
            html_table(
                [("term", True), ("estimate", False), ("SE", False), ("z", False), ("p", False)],
                rows,
            )
        )
    try:
        doc, _ = data.regression_diagnostics(run)
        flat = _flatten(doc)
        if flat:
            out.append("<h3>Residual diagnostics (DHARMa-style)</h3>")
            out.append(html_table([("quantity", True), ("value", False)], flat.items()))
    except data.MissingInput as exc:
        out.append(_note(str(exc)))
    return "".join(out)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    elif not isinstance(obj, list):
        out[prefix.rstrip(".")] = obj
    return out


def _figures_section(paths: Sequence[Path], notes: dict[str, str]) -> str:
    pngs = {p.stem: p for p in paths if p.suffix == ".png"}
    out = []
    for name in FIGURE_NAMES:
        title = FIGURE_TITLES[name]
        if name in pngs:
            b64 = base64.b64encode(pngs[name].read_bytes()).decode("ascii")
            out.append(
                f'<figure id="{esc(name)}"><img alt="{esc(title)}" '
                f'src="data:image/png;base64,{b64}"><figcaption>{esc(title)} '
                f"(<code>figures/{esc(name)}.png</code>, .pdf)</figcaption></figure>"
            )
        elif name in notes:
            out.append(f"<h3>{esc(title)}</h3>" + _note(f"not drawn: {notes[name]}"))
    return "".join(out)


def _reproducibility(run: Path, manifest: Manifest) -> str:
    out = [
        f"<p>canopy-entropy {esc(__version__)}. To rebuild this page: "
        f"<code>canopy report {esc(run)}</code>.</p>"
    ]
    if manifest != Manifest():
        out.append(
            "<details open><summary>manifest.json</summary><pre><code>"
            + esc(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str))
            + "</code></pre></details>"
        )
    else:
        out.append(_note("manifest.json not found"))
    config = run / "config.toml"
    if config.exists():
        out.append(
            "<details open><summary>config.toml</summary><pre><code>"
            + esc(config.read_text(errors="replace"))
            + "</code></pre></details>"
        )
    return "".join(out)


def render_report(
    run_dir: str | Path,
    *,
    figure_paths: Sequence[Path] = (),
    figure_notes: dict[str, str] | None = None,
) -> str:
    """The report HTML of a run as a string (figures taken from ``figure_paths``)."""
    run = data.check_run_dir(run_dir)
    manifest = data.read_manifest(run)
    alerts: list[str] = []
    summary = _summary(run, manifest, alerts)
    headline, errors = _metric_tables(run)
    comparison = _comparison_tables(run)
    regression = _regression_section(run, alerts)
    figures = _figures_section(figure_paths, figure_notes or {})
    title = f"canopy-entropy report: {manifest.run or run.name}"
    sections = [
        ("summary", "Run summary", summary),
        ("metrics", "Metrics per model and task", headline),
        ("errors", "How sure are the estimates", errors),
        ("comparison", "Base vs instruct", comparison),
        ("regression", "Entropy rate → diversity regression", regression),
        ("figures", "Figures", figures or _note("no figures")),
        ("reproduce", "Reproducibility", _reproducibility(run, manifest)),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{esc(t)}</h2>{content}</section>' for sid, t, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{esc(title)}</h1><p class="sub">Canopy Entropy CE* = H(N, Y | X), '
        "GenPPL, branching factor, length–entropy correlation, diversity and regression. "
        "Tables sort when a header is clicked.</p></header>"
        f"<nav>{nav}</nav>"
        + ("".join(alerts))
        + body
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


def build_report(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    figures: bool | None = None,
    min_active: int = DEFAULT_MIN_ACTIVE,
    formats: Sequence[str] = FORMATS,
) -> Path:
    """Write the self-contained ``report.html`` of a run; returns its path (atomic write).

    ``figures``: True re-draws the figures first; False embeds the PNGs already in
    ``RUN/figures/``; None (default) re-draws only when they are older than their inputs or
    were drawn with another ``min_active`` (so ``canopy run`` does not draw them twice).
    ``formats`` are the files written beside the PNGs when drawing (PDF for papers).
    """
    run = data.check_run_dir(run_dir)
    if figures is None:
        figures = not figures_are_fresh(run, min_active)
    if figures:
        made = make_figures(run, min_active=min_active, formats=sorted({"png", *formats}))
        paths, notes = list(made), made.notes
    else:
        index = read_index(run) or {}
        fig_dir = run / "figures"
        paths = sorted(fig_dir.glob("*.png")) if fig_dir.is_dir() else []
        notes = dict(index.get("notes", {}))
        have = {p.stem for p in paths}
        for name in FIGURE_NAMES:
            if name not in have and name not in notes:
                notes[name] = "not drawn yet: run 'canopy plot' first"
    text = render_report(run, figure_paths=paths, figure_notes=notes)
    target = Path(out) if out is not None else run / "report.html"
    atomic_write_text(target, text)
    return target
