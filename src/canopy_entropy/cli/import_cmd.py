"""``canopy import``: bring rollouts from any tool (JSONL) into a run folder."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from canopy_entropy.importer import import_jsonl


def command(
    file: Annotated[Path, typer.Argument(help="JSONL file, one rollout per line.")],
    run: Annotated[Path, typer.Option("--run", help="Run folder to import into.")],
    model: Annotated[str | None, typer.Option(help="Model label (per-line 'model' wins).")] = None,
    variant: Annotated[
        str | None, typer.Option(help="base or instruct (per-line 'variant' wins).")
    ] = None,
    family: Annotated[
        str | None, typer.Option(help="Model family (default: the model label).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task name (default: 'default').")] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="Length cap T used when sampling; rollouts of T steps count as cut."),
    ] = None,
    run_name: Annotated[str | None, typer.Option(help="Run name (default: folder name).")] = None,
) -> None:
    """Import rollouts from a JSONL file (prompt_id + per-step entropy per line) into a run."""
    err = Console(stderr=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = import_jsonl(
            file,
            run,
            model=model,
            variant=variant,
            family=family,
            task=task,
            max_new_tokens=max_new_tokens,
            run_name=run_name,
        )
    for w in caught:
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
    err.print(
        f"imported {summary.n_rollouts} rollouts of {summary.n_prompts} prompts into {run} "
        f"({len(summary.shards)} shard(s)); next: canopy metrics {run}",
        highlight=False,
    )
