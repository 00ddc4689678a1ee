"""Entry point of the ``canopy`` command: a typer group whose commands load on demand.

Every command lives in its own module under ``canopy_entropy.cli`` and exposes a function
``command`` typed for typer. Only the command being run is imported, so ``canopy --help`` and
``canopy --version`` never load the numerical stack. ``main`` maps outcomes to exit codes.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import sys
from typing import Annotated

import typer
import typer.main
import typer.models
from typer.core import TyperCommand, TyperGroup

from canopy_entropy import __version__
from canopy_entropy.errors import CanopyError, ConfigError

# command name -> (module under canopy_entropy.cli, one-line summary for `canopy --help`);
# tests check each summary against the first line of the command's docstring
COMMANDS = {
    "run": (
        "run",
        "Run every stage of a study from one config file, resumably, into one results folder.",
    ),
    "generate": (
        "generate",
        "Sample M rollouts per prompt, recording each step's exact entropy (resumable).",
    ),
    "status": (
        "status",
        "Show a run's progress per model and task, and which shard jobs' prompts are missing.",
    ),
    "import": (
        "import_cmd",
        "Import rollouts from a JSONL file (prompt_id + per-step entropy per line) into a run.",
    ),
    "tasks": (
        "tasks",
        "List the available tasks, or show one task's rendered prompt for base and instruct.",
    ),
    "metrics": (
        "metrics",
        "Compute CE*, GenPPL, BF, rho(N, r), decompositions and error bounds for a run.",
    ),
    "series": (
        "series",
        "Metrics against the step of each checkpoint of a series: CE*, GenPPL, BF, rho, accuracy.",
    ),
    "phases": (
        "phases",
        "CE*, entropy rate, length and rho(N, r) per reasoning / answer phase (split at a marker).",
    ),
    "score": (
        "score",
        "Teacher-forced token diagnostics of reference answers: p, H, rank, log(R/E[R]).",
    ),
    "embed": (
        "embed",
        "Embed rollout texts (cached) and write per-prompt diversity, Vendi and length terciles.",
    ),
    "semantic-entropy": (
        "semantic_entropy",
        "Relaxed semantic entropy: an LLM judge clusters each prompt's rollouts (cached, resumable).",
    ),
    "reward": (
        "reward",
        "Reward-filter a run: score every rollout, keep each prompt's best, re-analyse the kept set.",
    ),
    "compare": (
        "compare",
        "Compare two models (paired prompt bootstrap): CE*, GenPPL, BF, rho, D with SEs and CIs.",
    ),
    "regress": ("regress", "Fit the Beta mixed-effects regression of diversity on entropy rate."),
    "tables": (
        "tables",
        "Write the paper's tables of a run (--paper): Markdown, LaTeX (booktabs) and CSV.",
    ),
    "plot": (
        "plot",
        "Draw the figures of a run (PNG + PDF under RUN/figures/); missing stages give notes.",
    ),
    "report": (
        "report",
        "Write a self-contained HTML report of a run (opens offline, prints cleanly).",
    ),
}

EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = (
    "Exit codes: 0 success; 1 a stage or command failed (see the summary and RUN/logs/); "
    "2 a user error (bad input, option or config; the message names the fix); 130 interrupted."
    "\n\n"
    "Docs: docs/running.md (configs, stages, the results folder), docs/metrics.md, "
    "docs/semantic-compare.md, docs/regression.md, docs/figures-report.md, docs/engines.md."
)

_OS_HINTS = {
    errno.EACCES: "check its permissions or choose a folder you can write to",
    errno.EPERM: "check its permissions or choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.ENOSPC: "the disk is full; free some space and run the command again",
    errno.EDQUOT: "the disk quota is used up; free some space and run the command again",
    errno.ENOENT: "check that the path exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder, not a file; check the path",
    errno.EEXIST: "it already exists; remove it or choose another path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run again",
    errno.ECONNREFUSED: "nothing answers there; check the server URL and that it is running",
}


def _hide_flag_types(command: TyperCommand | TyperGroup, ctx: typer.Context) -> None:
    """Flags take no value: blank their ``<bool>`` type hint in the help panel."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class CanopyCommand(TyperCommand):
    """A typer command whose help shows no value hint for flags."""

    def format_help(self, ctx, formatter) -> None:
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


class LazyGroup(TyperGroup):
    """Resolves a command by name, importing only its module; help lists the summaries."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._summaries_only = False

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in COMMANDS:
            return None
        module, summary = COMMANDS[cmd_name]
        if self._summaries_only:  # the command list of `canopy --help`
            return TyperCommand(name=cmd_name, help=summary)
        if cmd_name not in self.commands:
            mod = importlib.import_module(f"canopy_entropy.cli.{module}")
            info = typer.models.CommandInfo(name=cmd_name, callback=mod.command, cls=CanopyCommand)
            self.commands[cmd_name] = typer.main.get_command_from_info(
                info, pretty_exceptions_short=True, rich_markup_mode=self.rich_markup_mode
            )
        return self.commands[cmd_name]

    def resolve_command(self, ctx, args: list[str]):
        name = args[0]
        if name not in COMMANDS and not name.startswith("-"):
            close = [c for c in COMMANDS if c.startswith(name.lower())]
            close = close or difflib.get_close_matches(name.lower(), list(COMMANDS), n=1)
            guesses = " or ".join(f"'{c}'" for c in close)
            hint = f"did you mean {guesses}?" if close else f"use one of {', '.join(COMMANDS)}"
            raise ConfigError(f"no command '{name}'; {hint}")
        return super().resolve_command(ctx, args)

    def format_help(self, ctx, formatter) -> None:
        _hide_flag_types(self, ctx)
        self._summaries_only = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._summaries_only = False


app = typer.Typer(
    name="canopy",
    cls=LazyGroup,
    add_completion=False,
    pretty_exceptions_enable=False,
    epilog=EPILOG,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"canopy-entropy {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Canopy Entropy: how a language model spends its uncertainty over whole generations."""
    if ctx.invoked_subcommand is None:  # bare `canopy`: the help, as a usage error
        text = ctx.get_help()  # rich help prints itself and returns ''
        if text:
            typer.echo(text)
        raise typer.Exit(EXIT_USER)


def _os_error_message(exc: OSError) -> str:
    """One line naming the path(s), the problem and what to do about it."""
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(
        f"'{os.fsdecode(p) if isinstance(p, bytes | os.PathLike) else p}'" for p in paths
    )
    problem = exc.strerror or str(exc) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno) or ("check the path and try again" if paths else "")
    message = f"{where}: {problem}" if where else problem
    return f"{message}; {hint}" if hint else message


def _usage_message(exc: typer.TyperException) -> str:
    """A click usage error as one line, pointing to the command's help."""
    text = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        text += f"; see '{ctx.command_path} --help'"
    return text


def _error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library notes (``warnings.warn``) become one ``warning:`` line, a :class:`Notice` one
    ``note:`` line (third-party warnings only with -W / PYTHONWARNINGS, as Python's default
    filters decide)."""
    from canopy_entropy.errors import Notice

    text = " ".join(str(message).split())
    kind = "note" if issubclass(category, Notice) else "warning"
    print(f"{kind}: {text}", file=sys.stderr if file is None else file)


def main() -> None:
    """Run the CLI: 0 success, 1 failure, 2 user error, 130 interrupted (see EPILOG)."""
    import warnings

    warnings.showwarning = _show_warning
    try:
        code = app(prog_name="canopy", standalone_mode=False)
    except CanopyError as exc:
        _error(str(exc))
        code = EXIT_USER
    except OSError as exc:
        _error(_os_error_message(exc))
        code = EXIT_USER
    except (typer.Abort, KeyboardInterrupt):  # typer itself turns Ctrl-C into exit code 130
        code = EXIT_INTERRUPTED
    except typer.TyperException as exc:  # click usage errors (bad option, missing argument)
        _error(_usage_message(exc))
        code = EXIT_USER
    if code == EXIT_INTERRUPTED:
        print("interrupted", file=sys.stderr)
    if isinstance(code, int) and code != EXIT_OK:  # success returns (exit status 0)
        sys.exit(code)


if __name__ == "__main__":
    main()
