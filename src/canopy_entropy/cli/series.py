"""``canopy series``: a run's metrics against the step of each checkpoint of a series."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from canopy_entropy.errors import CanopyError

SHOWN = ("ce_star", "genppl", "bf", "entropy_rate", "mean_length", "pearson", "accuracy",
         "tf_mean_nll", "tf_mean_relative_rank")  # fmt: skip


def command(
    run: Annotated[Path, typer.Argument(help="Run folder whose models set series and step.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
    """Metrics against the step of each checkpoint of a series: CE*, GenPPL, BF, rho, accuracy.

    One row per series, step and task, with the teacher-forced diagnostics of 'canopy score'
    when present; writes RUN/tables/series.csv.

    Compare two steps with 'canopy compare RUN --on step --a 1000 --b 2000'. Definitions:
    docs/metrics.md (section 8).
    """
    from rich.console import Console
    from rich.table import Table

    from canopy_entropy.metrics import current_metrics
    from canopy_entropy.run.manifest import read_manifest
    from canopy_entropy.series import read_diagnostics, series_path, series_table
    from canopy_entropy.store import atomic_write_text

    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    table = series_table(current_metrics(run), read_manifest(run), read_diagnostics(run))
    if table.empty:
        raise CanopyError(
            f"no model of {run} is in a checkpoint series; set series and step on its "
            "[[models]] (series = 'sft-run', step = 1000) and re-run"
        )
    path = series_path(run)
    atomic_write_text(path, table.to_csv(index=False))
    if as_json:
        from canopy_entropy.jsonvalues import json_records

        print(json.dumps(json_records(table), indent=2, allow_nan=False))
        return
    keys = ["series", "step", *(k for k in ("model", "variant", "task") if k in table.columns)]
    shown = [c for c in SHOWN if c in table.columns]
    view = Table(title="checkpoint series")
    for col in [*keys, *shown]:
        view.add_column(col, justify="left" if col in keys else "right")
    for rec in table[[*keys, *shown]].itertuples(index=False):
        view.add_row(*[str(v) for v in rec[: len(keys)]], *[f"{v:.4g}" for v in rec[len(keys) :]])
    out = Console()
    out.print(view)
    out.print(f"wrote {path}", highlight=False)
