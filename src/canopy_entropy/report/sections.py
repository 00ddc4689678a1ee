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
from canopy_entropy.report.html import (
    Cell,
    Column,
    alert,
    esc,
    fmt,
    html_table,
    kv,
    meanings,
    note,
    percent,
)
from canopy_entropy.run import freshness
from canopy_entropy.run.layout import GROUP_KEYS
from canopy_entropy.run.manifest import Manifest

LOUD_TRUNCATION = TRUNCATION_WARN_RATE
# Report sections fed by each stage: a failed or stale stage gets a note there.
STAGE_SECTIONS = {
    "generate": ("summary",),
    "embed": ("metrics",),
    "semantic-entropy": ("semantic_entropy",),
    "metrics": ("metrics", "errors"),
    "score": ("correctness",),
    "compare": ("comparison",),
    "regress": ("regression",),
    "reward": ("reward",),
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


# --- the optional analyses: relaxed semantic entropy, robustness fits, reward filtering -------
def _json_file(path: Path) -> dict[str, Any] | None:
    """A JSON document of an optional analysis (None when absent); damaged: a one-line error."""
    from canopy_entropy.errors import CanopyError

    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CanopyError(f"{path} is damaged ({exc}); delete it and re-run its command") from exc


def semantic_entropy(run: Path, alerts: list[str]) -> str | None:
    """Relaxed semantic entropy per model and task, the judge and its cost (None: not run)."""
    from canopy_entropy.semantic.rse import DEFAULT_JUDGE, read_rse

    table = read_rse(run)
    if table is None:
        return None
    info = _json_file(run / "semantic" / "rse.json") or {}
    judge = str(info.get("judge", ""))
    items: list[tuple[str, Any]] = [("judge", judge), ("rollouts judged per prompt (m)",
                                     info.get("m", ""))]  # fmt: skip
    calls, seconds = info.get("calls") or 0, info.get("seconds_judging") or 0.0
    items += [
        ("judge calls", calls),
        ("verdicts reused from the cache", info.get("pairs_cached", 0)),
    ]
    if calls and seconds:
        items.append(("judge throughput (calls/s)", calls / seconds))
    out = [
        "<p>An LLM judge compares every ordered pair of a prompt's m rollouts; two rollouts "
        "share a meaning cluster when both orders say <i>similar</i>, and RSE is the entropy "
        "of the cluster sizes (definitions: docs/semantic-compare.md).</p>",
        kv(items),
    ]
    if judge.endswith(DEFAULT_JUDGE):
        alerts.append(alert("warn", "<b>Weak judge.</b> " + esc(
            f"Relaxed semantic entropy was judged by the packaged {DEFAULT_JUDGE}, a small "
            "model whose verdicts are noisy; treat the RSE numbers as a demonstration and "
            "judge with a stronger instruct model for published results.")))  # fmt: skip
        out.append(note(f"weak judge: {DEFAULT_JUDGE} (the offline default) judged these pairs"))
    g = table.groupby(list(GROUP_KEYS), sort=True, observed=True)
    pooled = g.agg(prompts=("prompt_id", "size"), rse=("rse", "mean"),
                   rse_normalized=("rse_normalized", "mean"),
                   rse_clusters=("rse_clusters", "mean"), m=("rse_m", "max")).reset_index()  # fmt: skip
    columns = [Column.of(k, True) for k in GROUP_KEYS] + [
        Column.of("n_prompts"), Column.of("rse"), Column.of("rse_normalized"),
        Column.of("rse_clusters"), Column("m", tip="rollouts judged per prompt"),
    ]  # fmt: skip
    rows = [[*(getattr(r, k) for k in GROUP_KEYS), int(r.prompts), r.rse, r.rse_normalized,
             r.rse_clusters, int(r.m)] for r in pooled.itertuples(index=False)]  # fmt: skip
    out.append(html_table(columns, rows) + meanings(["rse", "rse_normalized", "rse_clusters"]))
    for text in info.get("notes", []):
        if not str(text).startswith(f"the judge {DEFAULT_JUDGE} is a weak judge"):
            out.append(note(str(text)))
    return "".join(out)


_FIT_COLUMNS = [Column("term", True), Column("estimate"), Column("SE", tip="Wald standard error"),
                Column("z"), Column("p")]  # fmt: skip


def _lmm_fit(name: str, fit: dict[str, Any], ref: dict[str, str]) -> str:
    items: list[tuple[str, Any]] = [
        (label("nobs"), fit["nobs"]), ("prompts (random intercepts)", fit["ngroups"]),
        (label("loglik"), fit["loglik"]), (label("aic"), fit["aic"]),
        ("random-intercept variance", fit["re_var"]), ("residual variance", fit["resid_var"]),
        ("fitted by", "REML" if fit["reml"] else "maximum likelihood"),
        ("converged", fit["converged"]),
    ]  # fmt: skip
    cols = [*_FIT_COLUMNS, Column("95% CI", tip="Wald interval")]
    rows = [[Cell(term_label(t, ref), t), v["estimate"], v["se"], v["z"], v["p"],
             Cell(f"[{fmt(v['lo'])}, {fmt(v['hi'])}]", v["lo"])]
            for t, v in fit["coefficients"].items()]  # fmt: skip
    return (f"<h4>{esc(name)} model</h4>"
            f'<p><span class="formula">{esc(fit["formula"])}</span></p>'
            + kv(items) + html_table(cols, rows))  # fmt: skip


def _beta_fit(doc: dict[str, Any]) -> str:
    ref = doc["reference"]
    out = [f'<p>mean (logit link): <span class="formula">{esc(doc["formula"]["mean"])}</span><br>'
           f'precision (log link): <span class="formula">{esc(doc["formula"]["precision"])}'
           "</span></p>"]  # fmt: skip
    items: list[tuple[str, Any]] = [(label(k), doc[k]) for k in ("nobs", "loglik", "aic")]
    ratio = doc.get("slope_ratio")
    if ratio:
        items.append(("slope ratio (b_R + b_R×instruct) / b_R",
                      f"{fmt(ratio['estimate'])} ± {fmt(ratio['se'], 2)}"))  # fmt: skip
    items.append(("converged", doc["converged"]))
    out.append(kv(items))
    for part, title in (("mean", "Mean model (logit link)"),
                        ("precision", "Precision model (log link)")):  # fmt: skip
        if doc.get(part):
            out.append(f"<h4>{esc(title)}</h4>"
                       + html_table(_FIT_COLUMNS, _coefficient_rows(doc[part], ref)))  # fmt: skip
    return "".join(out)


ROBUSTNESS_TITLES = {
    "lmm": "Linear mixed models (main and interaction)",
    "quadratic": "Quadratic check: squared entropy rate × variant, likelihood-ratio test",
    "vendi": "Beta regression of the Vendi score",
    "rse": "Beta regression of relaxed semantic entropy",
}


def robustness(run: Path, alerts: list[str]) -> str | None:
    """The robustness fits of ``canopy regress --model`` found in RUN/regression/ (None: none)."""
    out = []
    for model, title in ROBUSTNESS_TITLES.items():
        doc = _json_file(run / "regression" / model / "result.json")
        if doc is None:
            continue
        ref = doc.get("reference", {})
        part = [f"<h3>{esc(title)}</h3>",
                f"<p>reference levels: {esc(', '.join(f'{k} = {v}' for k, v in ref.items()))}"
                "</p>"]  # fmt: skip
        if "fits" in doc:
            part += [_lmm_fit(name, fit, ref) for name, fit in doc["fits"].items()]
            if not all(f["converged"] for f in doc["fits"].values()):
                alerts.append(alert("warn", f"<b>{esc(title)}</b>: a fit did not converge."))
        else:
            part.append(_beta_fit(doc))
            if not doc["converged"]:
                alerts.append(alert("warn", f"<b>{esc(title)}</b>: the fit did not converge."))
        lrt = doc.get("lrt")
        if lrt:
            part.append(kv([
                ("likelihood-ratio statistic (quadratic vs interaction)", lrt["statistic"]),
                ("degrees of freedom", lrt["df"]), ("p-value (χ²)", lrt["p_value"]),
            ]))  # fmt: skip
        out.append("".join(part))
    if not out:
        return None
    return (
        "<p>The published robustness checks, fitted by <code>canopy regress RUN --model "
        "lmm|quadratic|vendi|rse</code> (docs/regression.md).</p>" + "".join(out)
    )


def reward(run: Path, alerts: list[str]) -> str | None:
    """The reward-filtered analyses beside the raw ones (None when the reward stage has not
    run): selection, pooled metrics raw vs kept, the comparison and the regression of each."""
    from canopy_entropy.errors import CanopyError
    from canopy_entropy.run.layout import artefact_path, schema_of
    from canopy_entropy.store import read_table

    summary = _json_file(artefact_path(run, "reward.summary"))
    if summary is None:
        return None
    view = run / "reward"
    out = [
        "<p>Every rollout was scored by a reward model; per prompt the "
        f"⌈{fmt(summary['keep'])} · M⌉ best-scored rollouts were kept and the analyses "
        "recomputed on them (<code>RUN/reward/</code>), beside the raw set.</p>",
        kv([("reward model", str(summary["reward_model"])), ("keep", summary["keep"]),
            ("rollouts", summary["n_rollouts"]), ("kept", summary["n_kept"]),
            ("prompts", summary["n_prompts"])]),
    ]  # fmt: skip
    out += [note(str(n)) for n in summary.get("notes", [])]
    path = artefact_path(run, "reward.raw_vs_kept")
    if not path.exists():
        raise CanopyError(f"{path} is missing; re-run 'canopy reward {run}'")
    table = read_table(path, schema_of("reward.raw_vs_kept")).to_pandas()
    keys = [k for k in GROUP_KEYS if k in table.columns]
    columns = [Column.of(k, True) for k in keys] + [
        Column("metric", True), Column("raw", tip="every rollout"),
        Column("kept", tip="the reward-filtered rollouts"), Column("kept − raw"),
        Column("% change", tip="100 · (kept − raw) / |raw|"),
    ]  # fmt: skip
    rows = [[*(getattr(r, k) for k in keys), Cell(label(r.metric), r.metric), r.raw, r.kept,
             r.diff, r.pct] for r in table.itertuples(index=False)]  # fmt: skip
    out.append("<h3>Pooled metrics, raw vs kept</h3>" + html_table(columns, rows)
               + note("Vendi is an effective number of distinct rollouts, so it shrinks with "
                      "the kept set's smaller M by construction; D, a mean distance, does not")
               + meanings(table["metric"].unique()))  # fmt: skip
    out.append(_reward_comparison(run, view))
    out.append(_reward_regression(run, view))
    return "".join(out)


def _reward_comparison(run: Path, view: Path) -> str:
    try:
        kept = data.comparison(view)
    except data.MissingInput:
        return note("no comparison of the kept set (it needs both compared sides)")
    try:
        raw = data.comparison(run)
    except data.MissingInput:
        raw = kept.iloc[:0]
    by = data.comparison_by_columns(kept)
    cols = [*by, "metric", "diff", "diff_se", "pct"]
    merged = kept[cols].merge(raw[cols], on=[*by, "metric"], how="left", suffixes=("_k", "_r"))
    b, a = kept["b_label"].iloc[0], kept["a_label"].iloc[0]
    columns = [Column.of(k, True) for k in by] + [
        Column("metric", True), Column(f"raw {b} − {a}", tip="paired prompt bootstrap, ± SE"),
        Column("raw % change"), Column(f"kept {b} − {a}", tip="paired prompt bootstrap, ± SE"),
        Column("kept % change"),
    ]  # fmt: skip

    def pm(v: Any, se: Any) -> Cell:
        return Cell(f"{fmt(v)} ± {fmt(se, 2)}", v)

    rows = [[*(getattr(r, k) for k in by), Cell(label(r.metric), r.metric),
             pm(r.diff_r, r.diff_se_r), r.pct_r, pm(r.diff_k, r.diff_se_k), r.pct_k]
            for r in merged.itertuples(index=False)]  # fmt: skip
    return f"<h3>Comparison, raw vs kept ({esc(b)} vs {esc(a)})</h3>" + html_table(columns, rows)


def _reward_regression(run: Path, view: Path) -> str:
    try:
        kept = data.regression_result(view)
    except data.MissingInput:
        return note("no regression of the kept set (it needs diversity and both variants)")
    try:
        raw = data.regression_result(run)
    except data.MissingInput:
        raw = {"mean": {}, "slope_ratio": None}
    ref = kept["reference"]
    columns = [Column("term", True), Column("raw estimate", tip="± Wald SE"),
               Column("kept estimate", tip="± Wald SE")]  # fmt: skip

    def pm(v: dict[str, Any] | None) -> Cell:
        return Cell(f"{fmt(v['estimate'])} ± {fmt(v['se'], 2)}", v["estimate"]) if v else Cell("")

    rows = [[Cell(term_label(t, ref), t), pm(raw["mean"].get(t)), pm(v)]
            for t, v in kept["mean"].items()]  # fmt: skip
    items = []
    for name, doc in (("raw", raw), ("kept", kept)):
        ratio = doc.get("slope_ratio")
        if ratio:
            items.append((f"slope ratio ({name})", f"{fmt(ratio['estimate'])} ± "
                                                   f"{fmt(ratio['se'], 2)}"))  # fmt: skip
    return (
        "<h3>Regression, raw vs kept (mean model, logit link)</h3>"
        f'<p><span class="formula">{esc(kept["formula"]["mean"])}</span></p>'
        + (kv(items) if items else "") + html_table(columns, rows)
    )  # fmt: skip
