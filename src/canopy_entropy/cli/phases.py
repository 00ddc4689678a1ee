"""``canopy phases``: CE*, entropy rate, length and rho(N, r) per reasoning / answer phase."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from canopy_entropy.errors import CanopyError


def command(
    run: Annotated[Path, typer.Argument(help="Run folder with rollouts (token ids stored).")],
    marker: Annotated[
        list[str] | None,
        typer.Option(
            "--marker",
            help="Phase marker, e.g. '</think>' (repeat for several; default: [analysis] "
            "phase_markers of RUN/config.toml).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
    """CE*, entropy rate, length and rho(N, r) per reasoning / answer phase (split at a marker).

    Every rollout is split after the first phase marker; metrics per phase (whole, reasoning,
    answer) from the stored rollouts, no new sampling; writes RUN/metrics/phases.parquet.
    Definitions and the marker matching: docs/metrics.md (section 9).
    """
    from rich.console import Console
    from rich.table import Table

    from canopy_entropy.metrics.phases import PHASE_COLUMNS, compute_phases

    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    markers = list(marker or _config_markers(run))
    if not markers:
        raise CanopyError(
            "no phase markers: pass --marker '</think>' or set [analysis] phase_markers in the "
            "run's config"
        )
    result = compute_phases(run, markers)
    paths = result.save(run)
    err = Console(stderr=True)
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    if as_json:
        from canopy_entropy.jsonvalues import json_records

        doc = {"markers": markers, "phases": json_records(result.pooled), "notes": result.notes}
        print(json.dumps(doc, indent=2, allow_nan=False))
        return
    keys = [*result.by, "phase"]
    cols = [*PHASE_COLUMNS, "n_with_phase", "marker_share"]
    view = Table(title=f"phases split at {markers}")
    for col in [*keys, *cols]:
        view.add_column(col, justify="left" if col in keys else "right")
    for rec in result.pooled[[*keys, *cols]].itertuples(index=False):
        view.add_row(*[str(v) for v in rec[: len(keys)]], *[f"{v:.4g}" for v in rec[len(keys) :]])
    out = Console()
    out.print(view)
    for path in paths:
        out.print(f"wrote {path}", highlight=False)


def _config_markers(run: Path) -> list[str]:
    """[analysis] phase_markers of the run's config.toml (none when it has no config)."""
    from canopy_entropy.config import load_config

    path = run / "config.toml"
    return (
        list(load_config(path, check_models=False).analysis.phase_markers) if path.exists() else []
    )
