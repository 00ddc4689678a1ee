"""The built-in tasks (task files shipped in ``data/tasks``) and finding a task by name or path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from canopy_entropy.errors import CanopyError
from canopy_entropy.tasks.spec import TaskSpec, read_task_file

# the built-in task files, in the default order of a config's ``tasks``
TASK_NAMES = ("math", "coding", "completion", "stories")
SOURCES = ("builtin", "jsonl", "paper", "hf")
SAMPLING = ("first", "random")


def builtin_dir() -> Path:
    """The package folder holding the built-in task files and their prompt data."""
    return Path(str(resources.files("canopy_entropy") / "data" / "tasks"))


TASKS: dict[str, TaskSpec] = {
    name: read_task_file(builtin_dir() / f"{name}.toml", builtin=True) for name in TASK_NAMES
}


def is_task_path(ref: str) -> bool:
    """A task reference that names a file (``*.toml``) rather than a built-in task."""
    return ref.endswith(".toml")


def find_task(ref: str, base_dir: Path | None = None) -> TaskSpec:
    """The built-in task ``ref``, or the task file at path ``ref`` (relative to ``base_dir``)."""
    if is_task_path(ref):
        return read_task_file((Path(base_dir or Path.cwd()) / Path(ref).expanduser()).resolve())
    if ref not in TASKS:
        raise CanopyError(
            f"unknown task '{ref}'; use one of {list(TASK_NAMES)} or the path of a task file "
            "(*.toml)"
        )
    return TASKS[ref]
