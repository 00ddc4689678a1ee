"""``canopy generate``: sample rollouts with exact per-step entropy into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from canopy_entropy.errors import ConfigError


def command(
    model: Annotated[str, typer.Option("--model", help="Offline alias, local folder or HF id.")],
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts", help="JSONL file ('prompt', optional 'id', 'task') or a task name."
        ),
    ],
    run: Annotated[Path, typer.Option("--run", help="Run folder (created or continued).")],
    rollouts: Annotated[int, typer.Option("--rollouts", help="Rollouts per prompt (M).")] = 100,
    variant: Annotated[
        str,
        typer.Option(
            "--variant",
            help="base (raw text) or instruct (chat template).",
            show_default="the alias's variant, else base",
        ),
    ] = "",
    family: Annotated[
        str | None, typer.Option("--family", help="Model family label (default: the model label).")
    ] = None,
    label: Annotated[
        str | None,
        typer.Option("--label", help="Model label in the store (default: the model name)."),
    ] = None,
    n_prompts: Annotated[
        int | None, typer.Option("--n-prompts", help="Use only the first N prompts.")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 1.0,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")
    ] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus mass (1 = off).")] = 1.0,
    min_p: Annotated[
        float, typer.Option("--min-p", help="Keep p >= min_p * p_max (0 = off).")
    ] = 0.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Length cap T.")] = 512,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")
    ] = None,
    eos_id: Annotated[
        list[int] | None,
        typer.Option("--eos-id", help="EOS id (repeatable; default: the model's)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Run seed.")] = 0,
    common_random_numbers: Annotated[
        bool, typer.Option("--common-random-numbers", help="Same random streams for every model.")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Rollouts stepped together (halves on OOM).")
    ] = None,
    enable_thinking: Annotated[
        bool,
        typer.Option(
            "--enable-thinking", help="Instruct prompts: the chat template's thinking on."
        ),
    ] = False,
    series: Annotated[
        str | None, typer.Option("--series", help="Checkpoint series of this model (with --step).")
    ] = None,
    step: Annotated[int | None, typer.Option("--step", help="Its step in the series.")] = None,
    engine: Annotated[str, typer.Option("--engine", help="hf, vllm or openai.")] = "hf",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")
    ] = "auto",
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard", help="I/N: only job I's share of N (jobs fill one --run concurrently)."
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Show third-party progress bars and warnings."),
    ] = False,
) -> None:
    """Sample M rollouts per prompt, recording each step's exact entropy (resumable).

    Engines, decoding policy and seeds: docs/engines.md.
    """
    if verbose:
        import os

        os.environ["CANOPY_VERBOSE"] = "1"  # the engines (and their child processes) read it
    import dataclasses
    import time

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.generate import Shard, generate_run, load_prompts
    from canopy_entropy.models import alias_variant

    job = Shard.parse(shard) if shard is not None else None
    variant = variant or alias_variant(model) or "base"
    if variant not in ("base", "instruct"):
        raise ConfigError(f"unknown variant '{variant}'; use base or instruct")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if enable_thinking and variant != "instruct":
        raise ConfigError(
            "--enable-thinking changes the chat template: use it with --variant instruct"
        )
    if (series is None) != (step is None) or (step is not None and step < 0):
        raise ConfigError("a checkpoint needs --series NAME and --step N (N >= 0) together")
    policy = DecodingPolicy(
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p,
        min_p=min_p,
        max_new_tokens=max_new_tokens,
        eos_token_ids=tuple(eos_id or ()),
        stop_strings=tuple(stop or ()),
    )
    if policy.eos_token_ids or policy.stop_strings:
        policy.validate()
    else:  # EOS ids come from the model: check everything else now
        dataclasses.replace(policy, eos_token_ids=(0,)).validate()
    from canopy_entropy.config.models import check_model_available
    from canopy_entropy.config.schema import ModelSpec

    problem = check_model_available(ModelSpec(model=model), engine)  # before the heavy imports
    if problem:
        raise ConfigError(problem)
    from canopy_entropy.runner.core import run_lock

    prompt_list = load_prompts(prompts, n_prompts)
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rollouts]} rollouts  {task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    started = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    with run_lock(run, shared=True), Progress(*columns, console=console) as bar:
        task_id = bar.add_task("prompts", total=None, rollouts=0, rate="-")

        def on_progress(event: dict) -> None:
            rate = event["tokens"] / max(event["elapsed_s"], 1e-9)
            bar.update(
                task_id,
                total=event["prompts_total"],
                completed=event["prompts_done"],
                rollouts=event["rollouts_done"],
                rate=f"{rate:,.0f}",
            )

        from canopy_entropy.threads import configure_threads

        configure_threads()
        summary = generate_run(
            run,
            model=model,
            prompts=prompt_list,
            rollouts=rollouts,
            policy=policy,
            variant=variant,
            family=family,
            model_label=label,
            engine=engine,
            device=device,
            dtype=dtype,
            seed=seed,
            common_random_numbers=common_random_numbers,
            batch_size=batch_size,
            progress=on_progress,
            shard=job,
            enable_thinking=enable_thinking,
            series=series,
            step=step,
        )
        bar.update(task_id, total=summary.prompts_total, completed=summary.prompts_total)
    console.print(
        f"{summary.model_label}{f' (shard {job})' if job else ''}: "
        f"{summary.prompts_generated} prompts generated, "
        f"{summary.prompts_skipped} already done; {summary.tokens:,} tokens "
        f"({summary.tokens_per_s:,.0f} tok/s); {summary.truncated} rollouts hit the length cap "
        f"-> {run} ({time.perf_counter() - started:.1f} s)",
        highlight=False,
    )
