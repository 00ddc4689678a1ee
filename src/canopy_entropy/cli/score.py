"""``canopy score``: teacher-forced token diagnostics of reference answers into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from canopy_entropy.errors import ConfigError

SHOWN_ANSWERS = 20


def command(
    model: Annotated[str, typer.Option("--model", help="Offline alias, local folder or HF id.")],
    answers: Annotated[
        Path,
        typer.Option(
            "--answers", help="JSONL file: 'prompt', 'answer', optional 'id' and 'task' per line."
        ),
    ],
    run: Annotated[Path, typer.Option("--run", help="Run folder (created or continued).")],
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
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature", help="Also score under this sampling temperature (0 = greedy)."
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Also score under top-k truncation (0 = off).")
    ] = 0,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Also score under top-p truncation (1 = off).")
    ] = 1.0,
    min_p: Annotated[
        float, typer.Option("--min-p", help="Also score under min-p truncation (0 = off).")
    ] = 0.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Answers per forward pass (halves on OOM).")
    ] = 8,
    engine: Annotated[
        str, typer.Option("--engine", help="hf (exact) or vllm (prompt log-probs).")
    ] = "hf",
    prompt_logprobs: Annotated[
        int | None,
        typer.Option(
            "--prompt-logprobs",
            help="vLLM: top-k entries per position (default: the whole vocabulary, exact; "
            "fewer give entropy / expected-rank intervals).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.")
    ] = "auto",
) -> None:
    """Teacher-forced token diagnostics of reference answers: p, H, rank, log(R/E[R]).

    Writes RUN/diagnostics/tokens.parquet and answers.parquet; definitions: docs/metrics.md.
    """
    import time

    from rich import box
    from rich.console import Console
    from rich.table import Table

    from canopy_entropy.diagnostics import pooled_summary, read_answer_file, score_run
    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.models import alias_variant

    variant = variant or alias_variant(model) or "base"
    if variant not in ("base", "instruct"):
        raise ConfigError(f"unknown variant '{variant}'; use base or instruct")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    policy = None
    if temperature is not None or top_k or top_p != 1.0 or min_p != 0.0:
        policy = DecodingPolicy(
            temperature=1.0 if temperature is None else temperature,
            top_k=top_k or None,
            top_p=top_p,
            min_p=min_p,
            eos_token_ids=(0,),  # not used in scoring
        ).validate()
    records = read_answer_file(answers)
    console = Console(stderr=True)
    started = time.perf_counter()
    with console.status(f"scoring {len(records)} answers") as status:
        summary = score_run(
            run,
            model=model,
            answers=records,
            variant=variant,
            family=family,
            model_label=label,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            policy=policy,
            progress=lambda done, total: status.update(f"scored {done}/{total} answers"),
            engine=engine,
            prompt_logprobs=prompt_logprobs,
        )
    frame = summary.answers
    out = Console()
    cols = ["mean_nll", "mean_entropy", "mean_relative_rank", "share_above_expected"]
    heads = ["NLL", "H", "rel", ">E[R]"]
    style = {"box": box.SIMPLE_HEAD, "pad_edge": False, "caption_justify": "left"}
    if policy is not None:
        cols += ["policy_mean_entropy", "policy_mean_relative_rank", "policy_excluded_share"]
        heads += ["pol.H", "pol.rel", "pol.out"]
    table = Table(
        title=f"{summary.model_label} ({variant}): per answer", title_justify="left", **style
    )
    for name in ("task", "prompt_id", "n", *heads):
        left = name in ("task", "prompt_id")
        table.add_column(name, justify="left" if left else "right", no_wrap=not left)
    for row in frame.head(SHOWN_ANSWERS).itertuples(index=False):
        values = [f"{getattr(row, c):.3f}" for c in cols]
        table.add_row(row.task, row.prompt_id, str(row.n_tokens), *values)
    out.print(table)
    if len(frame) > SHOWN_ANSWERS:
        out.print(f"... {len(frame) - SHOWN_ANSWERS} more answers in {summary.paths[1]}")
    pooled = pooled_summary(frame)
    ptable = Table(title="pooled (unweighted mean over answers)", title_justify="left", **style)
    for name in ("task", "answers", *heads):
        ptable.add_column(name, justify="left" if name == "task" else "right", no_wrap=True)
    for row in pooled.itertuples(index=False):
        ptable.add_row(row.task, str(row.answers), *[f"{getattr(row, c):.3f}" for c in cols])
    out.print(ptable)
    out.print(
        "rel: mean log(R/E[R]); >E[R]: share of tokens ranked worse than a sample"
        + ("; pol.*: under the sampling policy, pol.out: share it excludes" if policy else ""),
        highlight=False,
    )
    console.print(
        f"{summary.model_label}: {len(frame)} answers, {summary.tokens:,} tokens "
        f"({summary.tokens_per_s:,.0f} tok/s scoring) -> {summary.paths[0].parent} "
        f"({time.perf_counter() - started:.1f} s)",
        highlight=False,
    )
