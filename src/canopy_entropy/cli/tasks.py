"""``canopy tasks``: the available tasks; ``canopy tasks show NAME``: one task's prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from canopy_entropy.errors import ConfigError


def command(
    action: Annotated[
        str | None, typer.Argument(help="'show' to print a task's rendered prompts.")
    ] = None,
    name: Annotated[
        str | None, typer.Argument(help="A built-in task or the path of a task file (*.toml).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Also list (or show) the tasks this experiment config names."
        ),
    ] = None,
    index: Annotated[int, typer.Option("--index", help="Which prompt to show (0 = first).")] = 0,
) -> None:
    """List the available tasks, or show one task's rendered prompt for base and instruct.

    Built-in tasks ship with the package; any task file (*.toml) works too: see docs/tasks.md.
    """
    from rich.console import Console
    from rich.table import Table

    from canopy_entropy.tasks import TASKS, find_task

    specs = dict(TASKS)
    if config is not None:
        from canopy_entropy.config import load_config

        cfg = load_config(config, check_models=False)
        specs.update(cfg.task_specs)
    out = Console(highlight=False)
    if action is None:
        table = Table(title="tasks", title_justify="left", pad_edge=False)
        for col in ("task", "description", "source", "scorer"):
            table.add_column(col, overflow="fold")
        for task, spec in specs.items():
            origin = "built-in" if spec.builtin else spec.path or "config table"
            table.add_row(task, spec.description, f"{spec.source_text()} ({origin})",
                          spec.scorer or "-")  # fmt: skip
        out.print(table)
        out.print("canopy tasks show NAME prints a task's rendered prompt for base and instruct")
        return
    if action != "show":
        raise ConfigError(
            f"unknown action '{action}'; use 'canopy tasks' or 'canopy tasks show NAME'"
        )
    if not name:
        raise ConfigError("canopy tasks show needs a task: a built-in name or a task file path")
    spec = specs[name] if name in specs else find_task(name)
    _show(out, spec, index)


def _show(out, spec, index: int) -> None:
    from rich.rule import Rule

    from canopy_entropy.tasks import load_task_prompts

    prompts = load_task_prompts(spec.name, spec=spec)
    if not 0 <= index < len(prompts):
        raise ConfigError(f"--index {index} is outside the {len(prompts)} prompts of '{spec.name}'")
    p = prompts[index]
    out.print(f"task {spec.name}: {spec.description or '(no description)'}")
    out.print(f"source: {spec.source_text()}; {len(prompts)} prompts; prompt id {p.id}")
    out.print(f"stop: {list(spec.stop) or 'none'}; scorer: {spec.scorer or 'none'}"
              + (f"; reference: {p.reference!r}" if spec.reference else ""))  # fmt: skip
    out.print(Rule("base (raw text, as the model sees it)"))
    out.print(p.text_for("base"), markup=False, soft_wrap=True)
    out.print(Rule("instruct (the user turn, inside the model's chat template)"))
    out.print(p.text_for("instruct"), markup=False, soft_wrap=True)
