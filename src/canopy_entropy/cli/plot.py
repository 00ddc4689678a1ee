"""``canopy plot RUN``: render the figures of a run to RUN/figures/ (PNG + PDF)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from canopy_entropy.errors import ConfigError


def command(
    run: Annotated[Path, typer.Argument(help="Run folder (written by 'canopy run' or 'import').")],
    min_active: Annotated[
        int, typer.Option(help="Trim figure 1 where fewer rollouts than this are still active.")
    ] = 5,
    only: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated figure names to draw (default: all), e.g. fig1_running_rate."
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="Comma-separated output formats: png, pdf, svg.")
    ] = "png,pdf",
) -> None:
    """Draw the figures of a run (PNG + PDF under RUN/figures/); missing stages give notes.

    What each figure shows: docs/figures-report.md.
    """
    from canopy_entropy.plots import FIGURE_NAMES, make_figures

    formats = [f.strip().lower() for f in fmt.split(",") if f.strip()]
    bad = sorted(set(formats) - {"png", "pdf", "svg"})
    if bad or not formats:
        raise ConfigError(f"unknown --format {bad or fmt!r}; use png, pdf and/or svg")
    names = [n.strip() for n in only.split(",") if n.strip()] if only else list(FIGURE_NAMES)
    console = Console(stderr=True)
    with console.status("drawing figures"):
        made = make_figures(run, min_active=min_active, formats=formats, names=names)
    out = Console()
    for path in made:
        out.print(str(path), highlight=False, soft_wrap=True)
    for name, note in made.notes.items():
        console.print(f"[yellow]skipped[/] {name}: {note}", highlight=False, soft_wrap=True)
