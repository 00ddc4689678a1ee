"""``canopy status``: how far a run folder is, per model and task, and which shard jobs lag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def command(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    config: Annotated[
        Path | None,
        typer.Argument(help="Experiment config (TOML). Default: RUN/config.toml."),
    ] = None,
) -> None:
    """Show a run's progress per model and task, and which shard jobs' prompts are missing.

    Reads only; safe while jobs are writing. Sharded jobs: docs/scaling.md.
    """
    from canopy_entropy.config import load_config
    from canopy_entropy.errors import ConfigError
    from canopy_entropy.runner.generation import (
        check_run_folder,
        load_prompts,
        shard_of_units,
    )

    if not run.is_dir():
        raise ConfigError(f"run folder {run} does not exist; check the path")
    path = config if config is not None else run / "config.toml"
    if not path.is_file():
        raise ConfigError(
            f"{run} has no config.toml yet; give the config: canopy status {run} CONFIG"
        )
    cfg = load_config(path)
    prompts = load_prompts(cfg)
    counts = check_run_folder(run, cfg, prompts) if (run / "rollouts").is_dir() else {}
    M = cfg.generation.rollouts
    units = [(m.label, t, p.id) for m in cfg.models for t in cfg.tasks for p in prompts[t]]
    missing = [u for u in units if counts.get(u, 0) < M]
    typer.echo(f"run folder {run} (config {path}; {M} rollouts per prompt)")
    width = max(len(m.label) for m in cfg.models)
    for m in cfg.models:
        for t in cfg.tasks:
            done = sum(counts.get((m.label, t, p.id), 0) >= M for p in prompts[t])
            typer.echo(f"  {m.label:<{width}}  {t:<10}  {done}/{len(prompts[t])} prompts")
    typer.echo(f"{len(units) - len(missing)}/{len(units)} prompts complete")
    records = _shard_records(run)
    for count in sorted({c for c, _ in records}):
        owner = shard_of_units(cfg, prompts, count)
        lacking: dict[int, list[tuple[str, str, str]]] = {}
        for u in missing:
            lacking.setdefault(owner[u], []).append(u)
        typer.echo(f"shard jobs (of {count}):")
        for i in range(1, count + 1):
            rec = records.get((count, i))
            state = f"{rec['state']} {rec['time']} on {rec['host']}" if rec else "never started"
            gaps = lacking.get(i, [])
            what = "all its prompts in" if not gaps else _gaps(gaps)
            typer.echo(f"  shard {i}/{count}: {state}; {what}")
    if not missing:
        typer.echo(f"generation complete; analyse with: canopy run {path} --out {run}")


def _gaps(gaps: list[tuple[str, str, str]]) -> str:
    m, t, p = gaps[0]
    return f"{len(gaps)} prompts missing (e.g. model '{m}', task '{t}', prompt '{p}')"


def _shard_records(run: Path) -> dict[tuple[int, int], dict]:
    """(count, index) -> the job's record in RUN/.canopy/shards/ (unreadable ones skipped)."""
    out = {}
    for p in sorted((run / ".canopy" / "shards").glob("*-of-*.json")):
        try:
            rec = json.loads(p.read_text())
            index, count = (int(x) for x in p.stem.split("-of-"))
        except (OSError, ValueError):
            continue
        out[(count, index)] = rec
    return out
