"""``load_task_prompts``: one entry point for every prompt source of every task.

Built-in tasks read their packaged prompts (or a JSONL file, the paper's folder, their hub
dataset); task files read their own source through ``datasets``. Both render through the
task's templates."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from canopy_entropy.errors import CanopyError
from canopy_entropy.tasks.base import Prompt
from canopy_entropy.tasks.catalog import SAMPLING, SOURCES, TASK_NAMES, TASKS
from canopy_entropy.tasks.jsonl import PromptFileError, read_exemplar_file, read_prompt_file
from canopy_entropy.tasks.spec import TaskSpec


def _builtin_file(name: str) -> Path:
    return Path(str(resources.files("canopy_entropy") / "data" / "tasks" / name))


def builtin_exemplars(task: str) -> list[tuple[str, str]]:
    """The few-shot exemplars written for this project for ``task``."""
    return read_exemplar_file(_builtin_file(f"{task}_fewshot.jsonl"))


def _paper_prompts(task: str, folder: Path, fewshot: int) -> list[tuple[str, str]]:
    """The paper's folder layout: ``<task>.jsonl`` and the pre-rendered ``<task>_fewshot.jsonl``.

    Line i of the few-shot file is the few-shot version of line i of the zero-shot file; both
    get the zero-shot line's id (``<task>-<index>``) so the two settings pair up.
    """
    if not folder.is_dir():
        raise PromptFileError(
            f"paper prompt folder {folder} does not exist; pass --prompts-dir or set prompts.path"
        )
    zero_path = folder / f"{task}.jsonl"
    zero = read_prompt_file(zero_path, task)
    if fewshot <= 0:
        return [(f"{task}-{i:04d}", text) for i, (_, text) in enumerate(zero)]
    few_path = folder / f"{task}_fewshot.jsonl"
    few = read_prompt_file(few_path, task)
    if len(few) != len(zero):
        raise PromptFileError(
            f"{few_path} has {len(few)} prompts but {zero_path} has {len(zero)}; the few-shot "
            "file must hold one line per zero-shot prompt, in the same order"
        )
    return [(f"{task}-{i:04d}", text) for i, (_, text) in enumerate(few)]


def _subset(items: list, n: int | None, sample: str, seed: int, what: str) -> list:
    if n is None:
        return items
    if n < 1:
        raise CanopyError(f"the number of prompts must be >= 1 (got {n}); use n = 'all' for all")
    if n > len(items):
        raise CanopyError(
            f"{what} has only {len(items)} prompts but {n} were asked; lower prompts.n or use "
            "another source"
        )
    if sample == "first":
        return items[:n]
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(items), size=n, replace=False))
    return [items[i] for i in keep]


def load_task_prompts(
    task: str,
    n: int | None = None,
    source: str = "builtin",
    path: str | Path | None = None,
    fewshot: int = 0,
    sample: str = "first",
    seed: int = 0,
    fewshot_path: str | Path | None = None,
    spec: TaskSpec | None = None,
) -> list[Prompt]:
    """Prompts of ``task`` from ``source``: the first ``n`` or a seeded random subset of ``n``.

    Sources: ``builtin`` (shipped with the package), ``jsonl`` (``path`` is a file, or a folder
    holding ``<task>.jsonl``), ``paper`` (``path`` is a folder with ``<task>.jsonl`` and
    ``<task>_fewshot.jsonl``), ``hf`` (the task's Hugging Face dataset; needs ``datasets``).
    ``fewshot=k`` prefixes k exemplars (builtin ones unless ``fewshot_path`` gives a JSONL of
    ``question``/``answer`` lines); paper few-shot prompts come pre-rendered. Every prompt goes
    through the task file's template (the coding one drops a closing code fence). ``spec``: a
    task file's task, whose own source is read (``n``, ``sample``, ``seed`` and ``fewshot``
    apply; ``fewshot=0`` keeps the file's ``[fewshot] k``). Ids are stable across runs.
    """
    if spec is not None and not spec.builtin:
        return _spec_subset(spec, n, sample, seed, fewshot)
    if task not in TASKS:
        raise CanopyError(f"unknown task '{task}'; use one of {list(TASK_NAMES)}")
    if source not in SOURCES:
        raise CanopyError(f"unknown prompt source '{source}'; use one of {list(SOURCES)}")
    if sample not in SAMPLING:
        raise CanopyError(f"unknown prompt sampling '{sample}'; use one of {list(SAMPLING)}")
    if fewshot < 0:
        raise CanopyError(f"fewshot must be >= 0 (got {fewshot})")

    if source == "builtin":
        items = read_prompt_file(Path(TASKS[task].file), task)
        what = f"the builtin '{task}' set"
    elif source == "jsonl":
        if path is None:
            raise CanopyError("prompt source 'jsonl' needs a path (prompts.path); set it")
        p = Path(path)
        file = p / f"{task}.jsonl" if p.is_dir() else p
        items = read_prompt_file(file, task)
        what = str(file)
    elif source == "paper":
        if path is None:
            raise CanopyError(
                "prompt source 'paper' needs a folder (prompts.path or --prompts-dir)"
            )
        items = _paper_prompts(task, Path(path), fewshot)
        what = f"{Path(path) / task}.jsonl"
    else:
        from canopy_entropy.tasks.hf import load_hf_prompts

        items = load_hf_prompts(task)
        what = f"dataset {TASKS[task].hub.dataset}"

    items = _subset(items, n, sample, seed, what)

    if fewshot > 0 and source != "paper":
        exemplars = (
            read_exemplar_file(Path(fewshot_path)) if fewshot_path else builtin_exemplars(task)
        )
        if fewshot > len(exemplars):
            raise CanopyError(
                f"fewshot = {fewshot} but only {len(exemplars)} exemplars exist for '{task}'; "
                "lower fewshot or give more exemplars in prompts.fewshot_path"
            )
    spec = TASKS[task]
    shots = []
    if fewshot > 0 and source != "paper":
        shots = [{"question": q, "answer": a} for q, a in exemplars[:fewshot]]
    prompts = []
    for pid, text in items:
        row = {"prompt": text}
        raw = spec.render(row, shots, chat=False)
        chat = spec.render(row, shots, chat=True) if spec.chat != spec.raw else None
        prompts.append(Prompt(id=pid, text=raw, task=task, chat_text=chat))
    return prompts


def _spec_subset(
    spec: TaskSpec, n: int | None, sample: str, seed: int, fewshot: int
) -> list[Prompt]:
    from canopy_entropy.tasks.rows import spec_prompts

    if sample not in SAMPLING:
        raise CanopyError(f"unknown prompt sampling '{sample}'; use one of {list(SAMPLING)}")
    if fewshot < 0:
        raise CanopyError(f"fewshot must be >= 0 (got {fewshot})")
    prompts = spec_prompts(spec, fewshot or None)
    return _subset(prompts, n, sample, seed, f"task '{spec.name}' ({spec.source_text()})")
