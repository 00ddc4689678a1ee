"""``canopy semantic-entropy``: relaxed semantic entropy of every prompt, judged by an LLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from canopy_entropy.errors import CanopyError, ConfigError

DEFAULT_JUDGE = (
    "smollm2-135m-instruct"  # = semantic.rse.DEFAULT_JUDGE (not imported: help stays light)
)


def _parse_prompts(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(
                f"--judge-prompt {item!r} must look like TASK=FILE, e.g. math=my_math_judge.txt"
            )
        task, path = item.split("=", 1)
        out[task.strip()] = path.strip()
    return out


def command(
    run: Annotated[Path, typer.Argument(help="Run folder with rollouts/ (texts required).")],
    judge: Annotated[
        str,
        typer.Option(
            "--judge",
            help="Judge model: offline alias, local folder, HF id, or the served model name "
            "(--engine openai). The offline default is a weak judge.",
        ),
    ] = DEFAULT_JUDGE,
    engine: Annotated[str, typer.Option("--engine", help="hf, openai or vllm.")] = "hf",
    m: Annotated[int, typer.Option("--m", help="Rollouts per prompt (seeded subsample).")] = 24,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsample.")] = 0,
    judge_prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--judge-prompt",
            help="TASK=FILE: a judge prompt with {question}, {response_a}, {response_b} "
            "(repeatable; default: the packaged prompt of the task).",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Tokens per verdict (greedy).")
    ] = 16,
    device: Annotated[str, typer.Option("--device", help="hf engine: cpu, cuda or auto.")] = "auto",
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", help="openai engine: server URL (default $OPENAI_BASE_URL)."),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="openai engine: send the judge prompt as a chat turn.")
    ] = False,
) -> None:
    """Relaxed semantic entropy: an LLM judge clusters each prompt's rollouts (cached, resumable).

    Per prompt m(m-1) ordered-pair verdicts; writes RUN/semantic/rse.parquet, rse.json and the
    verdict cache rse_verdicts.parquet. Measure and judge: docs/semantic-compare.md.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from canopy_entropy.semantic.rse import rse_run

    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    options: dict = {}
    if engine == "hf":
        if base_url or chat:
            raise ConfigError("--base-url and --chat apply to --engine openai only")
        options["device"] = device
    elif engine == "openai":
        if base_url:
            options["base_url"] = base_url
        if chat:
            options["chat"] = True
    elif base_url or chat:
        raise ConfigError("--base-url and --chat apply to --engine openai only")
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]judging pairs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[prompts]} prompts  {task.fields[rate]} calls/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task_id = bar.add_task("pairs", total=None, prompts="0/?", rate="-")

        def on_progress(event: dict) -> None:
            rate = event["calls"] / event["elapsed_s"] if event["elapsed_s"] > 0 else 0.0
            bar.update(
                task_id,
                total=event["pairs_total"],
                completed=event["pairs_done"],
                prompts=f"{event['prompts_done']}/{event['prompts_total']}",
                rate=f"{rate:.2f}",
            )

        result = rse_run(
            run,
            judge=judge,
            engine=engine,
            m=m,
            seed=seed,
            judge_prompts=_parse_prompts(judge_prompt),
            max_new_tokens=max_new_tokens,
            engine_options=options,
            progress=on_progress,
        )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    out = Console()
    rate = f", {result.calls_per_second:.2f} calls/s" if result.calls else ""
    out.print(
        f"judge {result.judge}: {result.n_prompts} prompts, m = {m}; {result.calls} judge calls"
        f"{rate}, {result.pairs_cached} verdicts reused from cache; "
        f"{result.n_left_out} prompt(s) left out",
        highlight=False,
    )
    table = result.table
    if table is not None and len(table):
        summary = table.groupby(["model", "variant", "task"], observed=True)[
            ["rse", "rse_normalized", "rse_clusters"]
        ].mean()
        for (model, variant, task), row in summary.iterrows():
            out.print(
                f"  {model} [{variant}] {task}: RSE = {row['rse']:.4f} "
                f"(normalised {row['rse_normalized']:.4f}), {row['rse_clusters']:.2f} clusters",
                highlight=False,
            )
    out.print(f"wrote {run / 'semantic' / 'rse.parquet'}", highlight=False)
