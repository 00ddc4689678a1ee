"""``canopy run``: a whole study from one TOML config (the packaged demo when none is given)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from canopy_entropy.config import STAGES


def command(
    config: Annotated[
        Path | None,
        typer.Argument(help="Experiment config (TOML). Default: the packaged offline demo."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder. Default: ./canopy-runs/<config name>."),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help=f"Comma-separated stages to run, from: {', '.join(STAGES)} (they always run "
            "in this order). Default: the config's stages.",
        ),
    ] = None,
    force: Annotated[
        list[str] | None,
        typer.Option("--force", help="Redo this stage even if it is up to date (repeatable)."),
    ] = None,
    prompts_dir: Annotated[
        Path | None,
        typer.Option(
            "--prompts-dir", help="Folder of <task>.jsonl prompt files replacing the config's."
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: generate only job I's share of N (jobs fill one --out concurrently; a "
            "final run without --shard does the analysis). See docs/scaling.md.",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Validate the config, every stage's options, the prompts, ray (backend = "
            "'ray'; the cluster is named, not contacted) and the run folder, print the plan "
            "(models, tasks, prompts, rollouts, stages) and stop.",
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Show third-party progress bars and warnings."),
    ] = False,
) -> None:
    """Run every stage of a study from one config file, resumably, into one results folder.

    With no CONFIG it runs the built-in offline demo (two small models x four tasks on CPU).
    Killing it and running it again continues where it stopped. Exits 1 when a stage failed.
    Configs, stages and the results folder: docs/running.md.
    """
    if verbose:
        import os

        os.environ["CANOPY_VERBOSE"] = "1"  # the engines (and their child processes) read it
    from canopy_entropy.cli.main import EXIT_FAILED
    from canopy_entropy.config import demo_config_path, load_config
    from canopy_entropy.generate import Shard
    from canopy_entropy.runner import default_out_dir, plan_run, run_experiment, with_prompts_dir

    job = Shard.parse(shard) if shard is not None else None
    cfg = load_config(config if config is not None else demo_config_path())
    if prompts_dir is not None:
        cfg = with_prompts_dir(cfg, prompts_dir)
    target = out if out is not None else default_out_dir(cfg)
    if check:
        plan = plan_run(cfg, target, stages=[stages] if stages else None, force=force)
        typer.echo(f"config {cfg.source or 'demo'} is valid; the run would do:")
        for line in plan.lines():
            typer.echo(f"  {line}")
        return
    if job is not None and stages is None:
        stages = "generate"
    results = run_experiment(
        cfg, target, stages=[stages] if stages else None, force=force, shard=job
    )
    if any(r.status == "failed" for r in results):
        raise typer.Exit(EXIT_FAILED)
