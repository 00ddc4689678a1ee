"""What ``canopy run`` prints and writes at the end: the headline table (also the tables
stage's CSV/Markdown), the loud notes, and where the results are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from canopy_entropy.config import ExperimentConfig
from canopy_entropy.errors import CanopyError
from canopy_entropy.labels import label, meaning
from canopy_entropy.metrics.columns import TRUNCATION_WARN_RATE
from canopy_entropy.run.layout import GROUP_KEYS, artefact_path, schema_of
from canopy_entropy.runner.display import StageResult
from canopy_entropy.store import atomic_write_text
from canopy_entropy.threads import summary_line

# the headline columns; their names come from the one label table (canopy_entropy.labels)
HEADLINE = (
    "ce_star",
    "ce_star_se",
    "genppl",
    "bf",
    "entropy_rate",
    "mean_length",
    "spearman",
    "truncation_rate",
    "diversity",
)


def headline_frame(run_dir: Path) -> Any:
    """Pooled metrics per model x task (diversity included when the embed stage ran: the
    metrics stage merges it), read through the content check."""
    from canopy_entropy.store import read_table

    pooled = read_table(
        artefact_path(run_dir, "metrics.pooled"), schema_of("metrics.pooled")
    ).to_pandas()
    keys = [k for k in GROUP_KEYS if k in pooled.columns]
    return pooled.sort_values(keys).reset_index(drop=True)


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if v != v:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def write_tables(run_dir: Path) -> None:
    """RUN/tables/metrics.csv (every pooled column) and metrics.md (the headline columns)."""
    frame = headline_frame(run_dir)
    out = Path(run_dir) / "tables"
    atomic_write_text(out / "metrics.csv", frame.to_csv(index=False))
    cols = [k for k in GROUP_KEYS if k in frame.columns] + [
        c for c in HEADLINE if c in frame.columns
    ]
    header = [label(c) for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    note = (
        "\n\n"
        + "; ".join(f"{label(c)}: {meaning(c)}" for c in cols if c not in GROUP_KEYS and meaning(c))
        + " (docs/metrics.md).\n"
    )
    atomic_write_text(out / "metrics.md", "\n".join(lines) + note)


def headline_table(run_dir: Path) -> Table | None:
    """The rich version of the headline table printed at the end of a run."""
    if not artefact_path(run_dir, "metrics.pooled").exists():
        return None
    frame = headline_frame(run_dir)
    cols = [k for k in ("model", "variant", "task") if k in frame.columns]
    cols += [c for c in HEADLINE if c in frame.columns]
    table = Table(title="Pooled metrics per model x task", title_justify="left")
    for c in cols:
        table.add_column(label(c), justify="left" if c in GROUP_KEYS else "right")
    for _, row in frame[cols].iterrows():
        table.add_row(*[_fmt(row[c]) for c in cols])
    return table


def family_note(cfg: ExperimentConfig) -> str | None:
    """Say plainly when base and instruct models are different families (not a clean effect)."""
    by_family: dict[str, set[str]] = {}
    for m in cfg.models:
        by_family.setdefault(m.family, set()).add(m.variant)
    if cfg.variants() >= {"base", "instruct"} and not any(
        v >= {"base", "instruct"} for v in by_family.values()
    ):
        base = ", ".join(sorted({m.family for m in cfg.models if m.variant == "base"}))
        inst = ", ".join(sorted({m.family for m in cfg.models if m.variant == "instruct"}))
        return (
            f"Note: the base model(s) ({base}) and the instruct model(s) ({inst}) are different "
            "families, so base-vs-instruct differences here mix architecture, data and "
            "fine-tuning: they are not a clean fine-tuning effect."
        )
    return None


def truncation_note(
    run_dir: Path, cfg: ExperimentConfig, limit: float = TRUNCATION_WARN_RATE
) -> str | None:
    """Say loudly when many rollouts hit the length cap (CE* is then a lower bound)."""
    if not artefact_path(run_dir, "metrics.pooled").exists():
        return None
    pooled = headline_frame(run_dir)
    bad = pooled[pooled["truncation_rate"] > limit]
    if bad.empty:
        return None
    worst = float(bad["truncation_rate"].max())
    return (
        f"Warning: in {len(bad)} of {len(pooled)} model x task groups more than {limit:.0%} of "
        f"rollouts hit max_new_tokens = {cfg.generation.max_new_tokens} (up to {worst:.0%}): "
        "CE* and GenPPL are lower bounds there (see truncation_bias_bound); raise "
        "generation.max_new_tokens for a measurement rather than a demonstration."
    )


_ARTEFACTS = [
    ("config.toml", "resolved config"),
    ("manifest.json", "run manifest"),
    ("rollouts", "rollouts (Parquet)"),
    ("metrics", "metrics (Parquet + JSON)"),
    ("semantic", "embeddings and diversity"),
    ("tables", "tables (CSV + Markdown)"),
    ("compare", "comparisons"),
    ("regression", "regression"),
    ("reward", "reward-filtered analyses (kept set beside raw)"),
    ("figures", "figures (PNG + PDF)"),
    ("report.html", "report"),
]


def print_summary(
    console: Console, run_dir: Path, cfg: ExperimentConfig, results: list[StageResult]
) -> None:
    """Stage outcomes, the thread counts used, the headline table, loud notes and where the
    results are."""
    status = Table(title="Stages", title_justify="left", show_header=False, box=None)
    colours = {"done": "green", "skipped": "green", "failed": "red"}
    for r in results:
        secs = f"{r.seconds:.1f}s" if r.seconds else ""
        status.add_row(
            r.name, Text(r.status, style=colours.get(r.status, "dim")), secs, Text(r.detail)
        )
    console.print(status)
    threads = summary_line()
    if threads:
        console.print(threads, highlight=False, markup=False)
    try:
        table = headline_table(run_dir)
        notes = [truncation_note(run_dir, cfg), family_note(cfg)]
    except CanopyError as exc:  # damaged metrics: say so, the stage list already shows why
        table, notes = None, [f"Metrics could not be read: {exc}"]
    if table is not None:
        console.print(table)
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        notes.append(f"Failed stages: {', '.join(failed)} (exit code 1); see RUN/logs/.")
    for note in notes:
        if note:
            console.print(f"[bold yellow]{escape(note)}[/]", highlight=False)
    console.print(f"[bold]Results in[/] {run_dir.resolve()}", highlight=False)
    for rel, what in _ARTEFACTS:
        p = run_dir / rel
        if p.exists() and (p.is_file() or any(p.iterdir())):
            console.print(f"  {rel:<14} {what}", highlight=False)
