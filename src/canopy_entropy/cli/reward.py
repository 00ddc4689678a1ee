"""``canopy reward``: reward-model filtering of a run's rollouts and the analyses of the kept set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from canopy_entropy.errors import CanopyError


def command(
    run: Annotated[Path, typer.Argument(help="Run folder with rollouts/ (texts) and metrics/.")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Sequence-classification reward model (HF id or local folder), e.g. "
            "Skywork/Skywork-Reward-V2-Llama-3.1-8B.",
        ),
    ],
    keep: Annotated[
        float, typer.Option("--keep", help="Share of each prompt's rollouts kept: ceil(keep * M).")
    ] = 0.7,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda when available), cpu, cuda, cuda:N.")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (bfloat16 on GPU, float32 on CPU), float32, ...")
    ] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rollouts per forward pass.")] = 8,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Tokens of prompt + response the model reads.")
    ] = 4096,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap replicates of the kept-set comparison.")
    ] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
) -> None:
    """Reward-filter a run: score every rollout, keep each prompt's best, re-analyse the kept set.

    Scores are cached per rollout in RUN/reward/scores.parquet (a rerun scores only new
    rollouts); metrics, diversity, comparison and the regression of the kept set go to
    RUN/reward/ (a run-shaped folder), raw vs kept in RUN/reward/raw_vs_kept.parquet.
    Details: docs/semantic-compare.md.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from canopy_entropy.labels import label
    from canopy_entropy.reward import reward_run

    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    if bootstrap < 1:
        raise CanopyError(f"--bootstrap must be at least 1, not {bootstrap}")
    console = Console(stderr=True)
    columns = (TextColumn("[bold]scoring rollouts"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task_id = bar.add_task("score", total=None)
        result = reward_run(
            run, model, keep, device=device, dtype=dtype, max_length=max_length,
            batch_size=batch_size, compare={"n_boot": bootstrap, "seed": seed},
            progress=lambda done, total: bar.update(task_id, completed=done, total=total),
        )  # fmt: skip
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    out = Console()
    s = result.summary()
    out.print(
        f"reward model {s['reward_model']}: {s['n_rollouts']} rollouts ({s['n_scored']} scored, "
        f"{s['n_cached']} from the cache); kept {s['n_kept']} (keep = {keep}, ceil(keep * M) "
        f"per prompt) of {s['n_prompts']} prompts",
        highlight=False,
    )
    table = result.raw_vs_kept
    keys = [c for c in table.columns if c not in ("metric", "raw", "kept", "diff", "pct")]
    for metric in ("ce_star", "genppl", "diversity"):
        for row in table[table["metric"] == metric].itertuples(index=False):
            group = " ".join(str(getattr(row, k)) for k in keys)
            out.print(
                f"  {group}: {label(metric)} raw {row.raw:.4g} -> kept {row.kept:.4g}",
                highlight=False,
            )
    out.print(f"wrote {run / 'reward'}", highlight=False)
