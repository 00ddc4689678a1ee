"""Assembling and writing ``RUN/report.html`` (``canopy report RUN``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from canopy_entropy.plots import data
from canopy_entropy.plots.figures import DEFAULT_MIN_ACTIVE
from canopy_entropy.plots.make import (
    FIGURE_NAMES,
    FORMATS,
    REGISTRY,
    figures_are_fresh,
    make_figures,
    read_index,
)
from canopy_entropy.report import sections, studies, tables
from canopy_entropy.report.correctness import correctness
from canopy_entropy.report.html import CSP, asset, esc, note
from canopy_entropy.store import atomic_write_text

TITLES = {
    "summary": "Run summary",
    "metrics": "Metrics per model and task",
    "errors": "How sure are the estimates",
    "comparison": "Comparison",
    "regression": "Entropy rate → diversity regression",
    "correctness": "Correctness and uncertainty",
    "series": "Checkpoint series",
    "phases": "Reasoning and answer phases",
    "figures": "Figures",
    "reproduce": "Provenance",
}


# Sections of the optional analyses, shown (before Figures) only when their results exist.
OPTIONAL = {
    "semantic_entropy": ("Relaxed semantic entropy", sections.semantic_entropy),
    "robustness": ("Robustness fits", sections.robustness),
    "reward": ("Reward-filtered vs raw", sections.reward),
}


def missing_sections(run_dir: str | Path) -> list[tuple[str, str]]:
    """(section title, note naming the command that fills it) for each empty section."""
    run = data.check_run_dir(run_dir)
    out = []
    for section, name in (
        ("metrics", "metrics.pooled"),
        ("errors", "metrics.pooled"),
        ("comparison", "compare.table"),
        ("regression", "regression.result"),
    ):
        try:
            (data.read_json if name.endswith("result") else data.read_frame)(run, name)
        except data.MissingInput as exc:
            out.append((TITLES[section], str(exc)))
    return out


def _results(run: Path, alerts: list[str]) -> dict[str, str]:
    """HTML of the metrics, error and comparison sections (notes when missing)."""
    out: dict[str, str] = {}
    try:
        pooled = data.metrics_pooled(run)
    except data.MissingInput as exc:
        out["metrics"] = out["errors"] = note(str(exc))
    else:
        try:
            diversity = data.prompt_diversity(run)
        except data.MissingInput:
            diversity = None
        pooled = tables.with_diversity(pooled, diversity)
        out["metrics"] = tables.metrics_tables(pooled)
        if diversity is None:
            out["metrics"] += note(data.missing_note(run, "embed", " (D and Vendi)"))
        out["errors"] = tables.error_table(pooled)
    try:
        comp = data.comparison(run)
    except data.MissingInput as exc:
        out["comparison"] = note(str(exc))
    else:
        by = data.comparison_by_columns(comp)
        out["comparison"] = tables.comparison_table(comp, by)
        try:
            lm = data.length_matched(run)
            out["comparison"] += "<h3>Length-matched analysis</h3>" + tables.length_matched_table(
                lm, by
            )
        except data.MissingInput:
            pass
    out["regression"] = sections.regression(run, alerts)
    out["correctness"] = correctness(run, alerts)
    return out


def render_report(run_dir: str | Path, *, figure_index: dict | None = None) -> str:
    """The report HTML of a run as a string (figures as ``figures/index.json`` lists them)."""
    run = data.check_run_dir(run_dir)
    manifest = data.read_manifest(run)
    alerts: list[str] = []
    stage_notes = sections.status_alerts(sections.stage_status(run), alerts)
    content = {"summary": sections.summary(run, manifest, alerts), **_results(run, alerts)}
    index = figure_index if figure_index is not None else (read_index(run) or {}).get("figures", {})
    content["series"], content["phases"] = studies.series_section(run), studies.phases_section(run)
    extra = {}
    for sid, (title, section) in OPTIONAL.items():
        html = section(run, alerts)
        if html is not None:
            content[sid], extra[sid] = html, title
    content["figures"] = sections.figures(run, index) or note("no figures")
    content["reproduce"] = sections.provenance(run, manifest)
    title = f"canopy-entropy report: {manifest.run or run.name}"
    try:
        comp = data.comparison(run)
        titles = {**TITLES, "comparison": f"{comp['b_label'].iloc[0]} vs {comp['a_label'].iloc[0]}"}
    except data.MissingInput:
        titles = dict(TITLES)
    before = list(titles).index("figures")
    items = list(titles.items())
    titles = dict(items[:before] + list(extra.items()) + items[before:])
    nav = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t in titles.items())
    body = "".join(
        f'<section id="{sid}"><h2>{esc(t)}</h2>'
        + (note(stage_notes[sid]) if sid in stage_notes else "")
        + f"{content[sid]}</section>"
        for sid, t in titles.items()
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{asset('report.css')}</style></head><body>"
        f'<header><h1>{esc(title)}</h1><p class="sub">Canopy Entropy CE* = H(N, Y | X), '
        "GenPPL, branching factor, length–entropy correlation, diversity and regression "
        "(definitions: docs/metrics.md). Tables sort when a header is clicked; hover a header "
        "for what it means.</p></header>"
        f"<nav>{nav}</nav>"
        + "".join(alerts)
        + body
        + f"<script>{asset('report.js')}</script></body></html>\n"
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

    ``figures``: True re-draws the figures first; False embeds what ``RUN/figures/`` holds;
    None (default) re-draws only when they are not up to date with their inputs or were drawn
    with another ``min_active`` (so ``canopy run`` does not draw them twice). ``formats``
    are the files written beside the PNGs when drawing (PDF for papers).
    """
    run = data.check_run_dir(run_dir)
    if figures is None:
        figures = not figures_are_fresh(run, min_active)
    if figures:
        make_figures(run, min_active=min_active, formats=sorted({"png", *formats}))
    index = (read_index(run) or {}).get("figures", {})
    for name in FIGURE_NAMES:
        index.setdefault(name, {"title": REGISTRY[name].title, "files": [],
                                "note": "not drawn yet: run `canopy plot` first"})  # fmt: skip
    order = [*FIGURE_NAMES, *(n for n in index if n not in FIGURE_NAMES)]
    text = render_report(run, figure_index={n: index[n] for n in order})
    target = Path(out) if out is not None else run / "report.html"
    atomic_write_text(target, text)
    return target
