"""Entry point of the ``canopy`` command: registers each command module's ``command``.

Every command lives in its own module under ``canopy_entropy.cli`` and exposes a function
``command`` typed for typer. A CanopyError becomes one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console
from rich.markup import escape

from canopy_entropy.errors import CanopyError

app = typer.Typer(
    name="canopy",
    help="Canopy Entropy: how a language model spends its uncertainty over whole generations.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Canopy Entropy: how a language model spends its uncertainty over whole generations."""


# command name -> module under canopy_entropy.cli
COMMANDS = {
    "run": "run",
    "generate": "generate",
    "import": "import_cmd",
    "metrics": "metrics",
    "embed": "embed",
    "compare": "compare",
    "regress": "regress",
    "plot": "plot",
    "report": "report",
}

for _name, _module in COMMANDS.items():
    try:
        _mod = importlib.import_module(f"canopy_entropy.cli.{_module}")
    except ModuleNotFoundError as _exc:  # a command not built yet
        if _exc.name != f"canopy_entropy.cli.{_module}":
            raise
        continue
    app.command(_name, help=(_mod.command.__doc__ or "").strip().split("\n")[0])(_mod.command)


def main() -> None:
    """Run the CLI, turning user errors into one-line messages."""
    err = Console(stderr=True)
    try:
        app(standalone_mode=False)
    except CanopyError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("[yellow]aborted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors (typer may vendor its own copy of click)
        if any(cls.__name__ == "ClickException" for cls in type(exc).__mro__):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
