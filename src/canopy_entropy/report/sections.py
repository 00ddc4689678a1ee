"""The report's sections that are not result tables: run summary, stage status, regression,
figures and provenance. Each returns HTML and appends its warnings to ``alerts``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from canopy_entropy.labels import label, term_label
from canopy_entropy.metrics.columns import TRUNCATION_WARN_RATE
from canopy_entropy.plots import data
from canopy_entropy.plots.make import figure_caption
from canopy_entropy.report.html import Cell, Column, alert, esc, fmt, html_table, kv, note, percent
from canopy_entropy.run import freshness
from canopy_entropy.run.layout import GROUP_KEYS
from canopy_entropy.run.manifest import Manifest

LOUD_TRUNCATION = TRUNCATION_WARN_RATE
# Report sections fed by each stage: a failed or stale stage gets a note there.
STAGE_SECTIONS = {
    "generate": ("summary",),
    "embed": ("metrics",),
    "metrics": ("metrics", "errors"),
    "score": ("correctness",),
    "compare": ("comparison",),
    "regress": ("regression",),
    "plots": ("figures",),
}


def stage_status(run: Path) -> dict[str, tuple[str, str]]:
    """stage -> ('failed', why) or ('stale', why) from the markers of ``canopy run``.

    A stage is stale when its recorded input fingerprint no longer matches its inputs (the
    settings come from the run's config.toml); stages run by single commands have no marker.
    """
    from canopy_entropy.runner.stages import stage_named

    cfg = None
    out: dict[str, tuple[str, str]] = {}
    for stage in STAGE_SECTIONS:
        marker = freshness.read_marker(run, stage)
        if marker is None:
            continue
        if marker.get("status") == "failed":
            out[stage] = ("failed", str(marker.get("detail") or "no reason recorded"))
            continue
        if cfg is None:
            cfg = _config(run)
            if cfg is False:
                break
        spec = stage_named(stage)
        now = freshness.input_fingerprint(run, spec.inputs, spec.settings(cfg))
        if marker.get("fingerprint") != now:
            out[stage] = ("stale", "its inputs changed after it ran")
    return out


def _config(run: Path) -> Any:
    """The run's resolved config (False when it cannot be read: no staleness check)."""
    from canopy_entropy.config import load_config
    from canopy_entropy.errors import CanopyError

    path = run / "config.toml"
    if not path.exists():
        return False
    try:
        return load_config(path)
    except (CanopyError, OSError):
        return False


def status_alerts(status: dict[str, tuple[str, str]], alerts: list[str]) -> dict[str, str]:
    """Alerts for failed and stale stages; returns section id -> note to show there."""
    notes: dict[str, str] = {}
    for stage, (state, why) in status.items():
        if state == "failed":
            text = f"{stage} failed: {why}; its results are not shown"
            alerts.append(
                alert(
                    "danger", f"<b>{esc(stage)} failed</b>: {esc(why)}; its results are not shown."
                )
            )
        else:
            text = f"{stage} results are stale ({why}): re-run `canopy run` to refresh them"
            alerts.append(alert("warn", esc(f"{stage} results are stale ({why}); re-run it.")))
        for section in STAGE_SECTIONS[stage]:
            notes.setdefault(section, text)
    return notes


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
        items.append(("common random numbers", manifest.seed_scheme.common_random_numbers))
    rollouts = {m.rollouts for m in manifest.models.values() if m.rollouts is not None}
    if len(rollouts) == 1:
        items.append(("rollouts per prompt", rollouts.pop()))
    engines = sorted({str(m.engine.get("engine")) for m in manifest.models.values() if m.engine})
    if engines:
        items.append(("engine", ", ".join(engines)))
    return [(k, v) for k, v in items if v is not None]


def summary(run: Path, manifest: Manifest, alerts: list[str]) -> str:
    """Run folder, policy, encoder, and per group the counts and the truncated share."""
    items: list[tuple[str, Any]] = [("run folder", str(run.resolve()))]
    if manifest.run:
        items.append(("run", manifest.run))
    items += _policy_items(manifest)
    try:
        info = data.embed_info(run)
        items.append(("sentence encoder", str(info["encoder"])))
    except data.MissingInput:
        pass
    if manifest.models:
        items.append(("approximate entropies", manifest.approximate))
    parts = [kv(items)]
    if manifest.approximate:
        alerts.append(alert("warn",
            "<b>Approximate entropies.</b> The engine saw only the top tokens of each step: "
            "per-step entropies are lower bounds (<code>entropy_upper</code> holds the upper "
            "bounds), so CE*, GenPPL and BF are lower bounds too."))  # fmt: skip
    try:
        counts = data.rollout_counts(run)
    except data.MissingInput as exc:
        return "".join([*parts, note(str(exc))])
    g = counts.groupby(list(GROUP_KEYS), sort=True)
    table = g.agg(
        prompts=("prompt_id", "nunique"),
        rollouts=("length", "size"),
        tokens=("length", "sum"),
        mean_length=("length", "mean"),
        max_length=("length", "max"),
        truncated=("finish_reason", lambda s: int((s == "length").sum())),
    ).reset_index()
    table["share"] = table["truncated"] / table["rollouts"]
    total, n_trunc = len(counts), int(table["truncated"].sum())
    n_prompts = counts[["task", "prompt_id"]].drop_duplicates().shape[0]
    parts.append(
        f"<p>{total:,} rollouts, {int(counts['length'].sum()):,} tokens, "
        f"{table['model'].nunique()} models, {table['task'].nunique()} tasks, "
        f"{n_prompts:,} prompts.</p>"
    )
    columns = [Column.of(k, True) for k in GROUP_KEYS] + [
        Column.of("n_prompts"), Column.of("n_rollouts"), Column("tokens"),
        Column.of("mean_length"), Column("max N", tip="longest rollout"),
        Column.of("truncation_rate"),
    ]  # fmt: skip
    rows = [
        [*(getattr(r, k) for k in GROUP_KEYS), int(r.prompts), int(r.rollouts), int(r.tokens),
         float(r.mean_length), int(r.max_length), percent(r.share)]
        for r in table.itertuples(index=False)
    ]  # fmt: skip
    parts.append(html_table(columns, rows))
    if n_trunc:
        worst = table.sort_values("share", ascending=False).iloc[0]
        loud = float(worst["share"]) > LOUD_TRUNCATION
        alerts.append(alert("danger" if loud else "warn",
            f"<b>{'Many' if loud else 'Some'} rollouts hit the length cap</b>: {n_trunc:,} of "
            f"{total:,} ({100 * n_trunc / total:.1f}%) are truncated, worst "
            f"{esc(worst['model'])} / {esc(worst['task'])} with "
            f"{100 * float(worst['share']):.1f}%. CE* is then a lower bound of the "
            "untruncated target; see the truncation-bias bound below"
            + ("; raise <code>max_new_tokens</code> to remove the bias." if loud else ".")))  # fmt: skip
    return "".join(parts)


def _coefficient_rows(terms: dict[str, Any], ref: dict[str, str]) -> list[list[Any]]:
    return [
        [Cell(term_label(t, ref), t), v["estimate"], v["se"], v["z"], v["p"]]
        for t, v in terms.items()
    ]


def regression(run: Path, alerts: list[str]) -> str:
    """Formula, fit statistics, slope ratio, coefficients (in words) and DHARMa tests."""
    try:
        result = data.regression_result(run)
    except data.MissingInput as exc:
        return note(str(exc))
    formula, ref = result["formula"], result["reference"]
    kind = "Beta mixed model" if result["re_sd"] else "Beta regression (fixed effects only)"
    out = [
        f"<p>{kind} of semantic diversity D on the entropy rate, per prompt.</p>"
        f'<p>mean (logit link): <span class="formula">{esc(formula["mean"])}</span><br>'
        f'precision (log link): <span class="formula">{esc(formula["precision"])}</span><br>'
        f"reference levels: {esc(', '.join(f'{k} = {v}' for k, v in ref.items()))}</p>"
    ]
    items: list[tuple[str, Any]] = [(label(k), result[k]) for k in ("nobs", "loglik", "aic")]
    for group, n in result["ngroups"].items():
        items.append((f"groups ({group})", n))
    ratio = result["slope_ratio"]
    if ratio:
        text = f"{fmt(ratio['estimate'])} ± {fmt(ratio['se'], 2)}"
        if ratio["lo"] is not None and ratio["hi"] is not None:
            text += f" [{fmt(ratio['lo'])}, {fmt(ratio['hi'])}] (delta method)"
        items.append(("slope ratio (b_R + b_R×instruct) / b_R", text))
    for group, sd in result["re_sd"].items():
        items.append((f"random-effect SD ({group})", sd))
    conv = result["convergence"]
    items.append(("converged", result["converged"]))
    items.append(("Hessian positive definite", conv["hessian_positive_definite"]))
    if not result["converged"] or not conv["hessian_positive_definite"]:
        alerts.append(alert("danger",
            "<b>The regression did not converge</b>: estimates and SEs are unreliable "
            f"({esc(json.dumps(conv, default=str))})."))  # fmt: skip
    out.append(kv(items))
    columns = [Column("term", True), Column("estimate"), Column("SE", tip="Wald standard error"),
               Column("z"), Column("p")]  # fmt: skip
    for part, title in (
        ("mean", "Mean model (logit link)"),
        ("precision", "Precision model (log link)"),
    ):
        if result[part]:
            out.append(
                f"<h3>{esc(title)}</h3>" + html_table(columns, _coefficient_rows(result[part], ref))
            )
    diag = result.get("diagnostics")
    if diag:
        out.append(f"<h3>Residual diagnostics (DHARMa-style, {int(diag['nsim'])} simulations)</h3>")
        rows = [
            [kind, t["ks"]["p"], t["dispersion"]["ratio"], t["dispersion"]["p"],
             Cell(f"{t['outliers']['outliers']} of {t['outliers']['n']}", t["outliers"]["outliers"]),
             t["outliers"]["p"]]
            for kind, t in ((k, diag[k]) for k in ("conditional", "unconditional"))
        ]  # fmt: skip
        out.append(html_table([
            Column("simulation", True, "conditional: fitted random effects; unconditional: new ones"),
            Column("KS p", tip="Kolmogorov-Smirnov test of uniform scaled residuals"),
            Column("dispersion ratio", tip="observed / simulated residual variance (1 is right)"),
            Column("dispersion p"), Column("outliers", tip="observations outside every simulation"),
            Column("outliers p"),
        ], rows) + "<p>Small p-values flag a misfit. The QQ and residual plots are in Figures.</p>")  # fmt: skip
    else:
        out.append(note(f"no residual diagnostics: run `canopy regress {run}` with diagnostics on"))
    return "".join(out)


def figures(run: Path, index: dict[str, Any]) -> str:
    """Every figure of the index, embedded as PNG with its caption, or the note why not."""
    out = []
    for name, entry in index.items():
        title = entry["title"]
        png = run / "figures" / f"{name}.png"
        if f"{name}.png" in entry["files"] and png.exists():
            b64 = base64.b64encode(png.read_bytes()).decode("ascii")
            try:
                caption = figure_caption(name, run)
            except data.MissingInput:
                caption = ""
            others = ", ".join(
                f".{f.rsplit('.', 1)[1]}" for f in entry["files"] if not f.endswith(".png")
            )
            out.append(
                f'<figure id="{esc(name)}"><img alt="{esc(title)}" '
                f'src="data:image/png;base64,{b64}"><figcaption><b>{esc(title)}</b>'
                + (f": {esc(caption)}" if caption else "")
                + f" (<code>figures/{esc(name)}.png</code>{esc(', ' + others) if others else ''})"
                "</figcaption></figure>"
            )
        elif entry["note"]:
            out.append(f"<h3>{esc(title)}</h3>" + note(f"not drawn: {entry['note']}"))
    return "".join(out)


def provenance(run: Path, manifest: Manifest) -> str:
    """How to rebuild the page, then manifest and config, collapsed."""
    from canopy_entropy import __version__

    out = [
        f"<p>canopy-entropy {esc(__version__)}. To rebuild this page: "
        f"<code>canopy report {esc(run)}</code>.</p>"
    ]
    if manifest != Manifest():
        out.append(
            "<details><summary>manifest.json (how the rollouts were made)</summary><pre><code>"
            + esc(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str))
            + "</code></pre></details>"
        )
    else:
        out.append(note("manifest.json not found"))
    config = run / "config.toml"
    if config.exists():
        out.append(
            "<details><summary>config.toml (the study as run)</summary><pre><code>"
            + esc(config.read_text(errors="replace"))
            + "</code></pre></details>"
        )
    return "".join(out)
