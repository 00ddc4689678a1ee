"""``canopy metrics``: every trajectory metric of a run folder (defined in docs/metrics.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from canopy_entropy.errors import CanopyError

# canopy_entropy.metrics.DEFAULT_BY (not imported: `canopy metrics --help` stays light; a test
# keeps the two equal)
DEFAULT_BY = "model,variant,task"

TABLE_COLUMNS = (
    ("ce_star", "CE*"),
    ("ce_star_se", "±SE"),
    ("genppl", "GenPPL"),
    ("bf", "BF"),
    ("entropy_rate", "rate"),
    ("mean_length", "N̄"),
    ("spearman", "ρ_s(N,r)"),
    ("length_entropy", "H(N)"),
    ("stop_entropy_share", "stop share"),
    ("truncation_rate", "cut"),
    ("n_prompts", "P"),
    ("n_rollouts", "rollouts"),
)


def _fmt(value: object) -> str:
    if isinstance(value, (int,)) or (
        isinstance(value, float) and value.is_integer() and value > 99
    ):
        return f"{int(value)}"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def command(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    by: Annotated[
        str, typer.Option(help="Comma-separated grouping keys (model, variant, family, task).")
    ] = DEFAULT_BY,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON document here.")] = None,
    delta: Annotated[float, typer.Option(help="Chebyshev bound level (1 - delta).")] = 0.05,
    h_max: Annotated[
        float | None,
        typer.Option("--h-max", help="Per-step entropy bound for the truncation bias (nats)."),
    ] = None,
) -> None:
    """Compute CE*, GenPPL, BF, rho(N, r), decompositions and error bounds for a run.

    Writes RUN/metrics/{prompts,pooled}.parquet and metrics.json. Definitions: docs/metrics.md.
    """
    from canopy_entropy.metrics import write_metrics
    from canopy_entropy.store import atomic_write_text

    keys = tuple(k.strip() for k in by.split(",") if k.strip())
    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder given to --run")
    result = write_metrics(run, by=keys, delta=delta, h_max=h_max)
    if out is not None or json_out:
        text = json.dumps(result.to_json(), indent=2, allow_nan=False)
        if out is not None:
            atomic_write_text(out, text + "\n")
        if json_out:
            typer.echo(text)
            return
    table = Table(title=f"canopy metrics — {run}", title_justify="left")
    for k in keys:
        table.add_column(k, no_wrap=True)
    for _, label in TABLE_COLUMNS:
        table.add_column(label, justify="right")
    for _, row in result.pooled.iterrows():
        table.add_row(*[str(row[k]) for k in keys], *[_fmt(row[c]) for c, _ in TABLE_COLUMNS])
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)
    for key, notes in result.notes.items():
        for note in notes:
            if "length cap" not in note:  # already shown as a warning
                console.print(f"[dim]{'/'.join(map(str, key))}: {note}[/]", highlight=False)
    console.print(f"[dim]wrote {run / 'metrics'}/{{prompts,pooled}}.parquet and metrics.json[/]")
