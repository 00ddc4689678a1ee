"""``canopy tables RUN --paper``: the paper's table layouts from a run's saved results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from canopy_entropy.errors import CanopyError


def command(
    run: Annotated[Path, typer.Argument(help="Run folder with a saved comparison.")],
    paper: Annotated[
        bool,
        typer.Option(
            "--paper", help="Write the paper's layouts to RUN/tables/paper_*.{md,tex,csv}."
        ),
    ] = False,
) -> None:
    """Write the paper's tables of a run (--paper): Markdown, LaTeX (booktabs) and CSV.

    GenPPL/BF/CE*, rho(N, r), rank correlations, truncation rates and regression
    coefficients.

    Reads RUN/compare/, RUN/metrics/ and RUN/regression/ (run 'canopy compare' and
    'canopy regress' first). Layouts: docs/figures-report.md.
    """
    from canopy_entropy.paper_tables import write_paper_tables

    if not paper:
        raise CanopyError(
            "pass --paper to write the paper's table layouts (the comparison's own tables are "
            "written by 'canopy compare')"
        )
    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    paths = write_paper_tables(run)
    for path in paths:
        if path.suffix == ".md":
            typer.echo(str(path))
