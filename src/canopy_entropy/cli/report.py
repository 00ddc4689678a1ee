"""``canopy report RUN``: one self-contained report.html with tables and figures."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def command(
    run: Annotated[Path, typer.Argument(help="Run folder (written by 'canopy run' or 'import').")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the HTML (default RUN/report.html).")
    ] = None,
    open_: Annotated[
        bool, typer.Option("--open", help="Open the report in the default browser.")
    ] = False,
    figures: Annotated[
        bool | None,
        typer.Option(
            help="Re-draw the figures first (--no-figures: embed RUN/figures/*.png as they are; "
            "default: re-draw only when their inputs changed)."
        ),
    ] = None,
    min_active: Annotated[
        int, typer.Option(help="Trim figure 1 where fewer rollouts than this are still active.")
    ] = 5,
) -> None:
    """Write a self-contained HTML report of a run (opens offline, prints cleanly).

    What the report holds: docs/figures-report.md.
    """
    from canopy_entropy.report import build_report, missing_sections

    err = Console(stderr=True)
    with err.status("building report"):
        path = build_report(run, out=out, figures=figures, min_active=min_active)
    Console().print(str(path), highlight=False, soft_wrap=True)
    for title, note in missing_sections(run):
        err.print(f"[yellow]not in the report[/] {title}: {note}", highlight=False, soft_wrap=True)
    if open_:
        webbrowser.open(path.resolve().as_uri())
