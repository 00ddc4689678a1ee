"""A task as a small TOML file (or a ``[task.NAME]`` table of an experiment config).

The file names where the rows come from (``[source]``: a local JSONL/JSON/Parquet/CSV file or a
Hugging Face dataset id with config and split), how a row becomes a prompt (``[template]``:
Jinja2 ``raw`` text for base models and ``chat`` text for instruct models, both seeing the row's
columns and the ``fewshot`` exemplar rows), the few-shot exemplars (``[fewshot]``: a fixed list
or ``k`` rows drawn from a split with a seed), ``stop`` strings, the reference-answer column and
the scorer (a built-in name or ``module:function``). Every mistake is a one-line error.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta

from canopy_entropy.errors import CanopyError
from canopy_entropy.tasks.render import strip_closing_fence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class TaskFileError(CanopyError):
    """A task file (or ``[task.NAME]`` table) that cannot be used."""


FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_KEYS = {
    "": ("name", "description", "source", "template", "fewshot", "stop", "scorer", "hub"),
    "source": ("file", "dataset", "config", "split", "id", "reference"),
    "template": ("raw", "chat"),
    "fewshot": ("k", "exemplars", "split", "seed"),
    "scorer": ("name", "options"),
    "hub": ("dataset", "config", "split", "field", "id_field"),
}


@dataclass(frozen=True)
class HubSource:
    """A built-in task's Hugging Face dataset (``prompts.source = 'hf'``) and its text field.

    ``split=None`` means "the latest version split" (BigCodeBench names splits v0.1.0, ...).
    """

    dataset: str
    config: str | None
    split: str | None
    field: str
    id_field: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One task: its rows, prompt templates, exemplars, stop strings, reference and scorer."""

    name: str
    description: str
    raw: str  # Jinja2 template of the base-model prompt
    chat: str  # Jinja2 template of the instruct-model user turn
    file: str = ""  # local data file (absolute), or
    dataset: str = ""  # a Hugging Face dataset id
    config: str | None = None
    split: str = "train"
    id_field: str | None = None
    reference: str | None = None  # the column holding the reference answer
    fewshot_k: int = 0
    exemplars: tuple[dict[str, Any], ...] = ()  # a fixed exemplar list, or
    fewshot_split: str | None = None  # rows drawn from this split with fewshot_seed
    fewshot_seed: int = 0
    stop: tuple[str, ...] = ()
    scorer: str | None = None
    scorer_options: dict[str, Any] = field(default_factory=dict)
    hub: HubSource | None = None  # built-in tasks only
    path: str = ""  # the file it came from ('' for a config table)
    builtin: bool = False

    def columns_used(self) -> set[str]:
        """The row columns the templates read (``fewshot`` is the exemplar list, not a column)."""
        return (template_variables(self.raw) | template_variables(self.chat)) - {"fewshot"}

    def render(self, row: dict[str, Any], shots: list[dict[str, Any]], chat: bool) -> str:
        """The prompt text of ``row`` (raw, or the chat user turn) with ``shots`` as exemplars."""
        template = self.chat if chat else self.raw
        try:
            return compiled(template).render({**row, "fewshot": shots})
        except jinja2.UndefinedError as exc:
            raise TaskFileError(
                f"task '{self.name}': the {'chat' if chat else 'raw'} template uses an undefined "
                f"value ({exc.message}); the rows have columns {sorted(row)}"
            ) from None
        except jinja2.TemplateError as exc:
            raise TaskFileError(f"task '{self.name}': the template failed ({exc})") from None

    def source_text(self) -> str:
        """Where the rows come from, in words."""
        if self.file:
            return f"file {self.file} (split {self.split})"
        if self.dataset:
            cfg = f", config {self.config}" if self.config else ""
            return f"dataset {self.dataset}{cfg}, split {self.split}"
        return "packaged prompts"


def _rstrip(value: str) -> str:
    return str(value).rstrip()


_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)
_ENV.filters["strip_closing_fence"] = strip_closing_fence
_ENV.filters["rstrip"] = _rstrip
_COMPILED: dict[str, jinja2.Template] = {}


def compiled(template: str) -> jinja2.Template:
    """The Jinja2 template (strict: an unknown name is an error, never an empty string)."""
    if template not in _COMPILED:
        _COMPILED[template] = _ENV.from_string(template)
    return _COMPILED[template]


def template_variables(template: str) -> set[str]:
    """The top-level names a template reads."""
    return set(meta.find_undeclared_variables(_ENV.parse(template)))


def _fail(where: str, msg: str) -> TaskFileError:
    return TaskFileError(f"{where}: {msg}")


def _check_keys(where: str, data: dict, table: str) -> None:
    valid = _KEYS[table]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
            place = f" in [{table}]" if table else ""
            raise _fail(where, f"unknown key '{key}'{place}; {hint}")


def _typed(where: str, data: dict, key: str, kind: type | tuple, table: str, default=None):
    if key not in data:
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kinds)
        name = f"{table}.{key}" if table else key
        raise _fail(where, f"{name} must be a {names}, got {value!r}")
    return value


def parse_task(data: dict[str, Any], name: str, where: str, base_dir: Path) -> TaskSpec:
    """Validate one task table (the parsed TOML) into a TaskSpec; paths resolve at ``base_dir``."""
    _check_keys(where, data, "")
    tables = {}
    for table in ("source", "template", "fewshot", "hub"):
        sub = data.get(table, {})
        if not isinstance(sub, dict):
            raise _fail(where, f"'{table}' must be a table ([{table}]), got {sub!r}")
        _check_keys(where, sub, table)
        tables[table] = sub
    name = _typed(where, data, "name", str, "", name)
    description = _typed(where, data, "description", str, "", "")
    template = tables["template"]
    raw = _typed(where, template, "raw", str, "template")
    if raw is None:
        raise _fail(where, "no [template] raw; add raw = '...' (Jinja2, e.g. '{{ question }}')")
    chat = _typed(where, template, "chat", str, "template", raw)
    for text in (raw, chat):
        try:
            template_variables(text)
        except jinja2.TemplateSyntaxError as exc:
            raise _fail(
                where, f"template syntax error ({exc.message}, line {exc.lineno})"
            ) from None

    src, hub = tables["source"], tables["hub"]
    if not src and not hub:
        raise _fail(where, "no [source]; set file = 'rows.jsonl' or dataset = 'org/name'")
    file = _typed(where, src, "file", str, "source", "")
    dataset = _typed(where, src, "dataset", str, "source", "")
    if src and bool(file) == bool(dataset):
        raise _fail(where, "[source] needs exactly one of file = '...' or dataset = '...'")
    if file:
        resolved = (base_dir / Path(file).expanduser()).resolve()
        if resolved.suffix.lower() not in FILE_FORMATS:
            raise _fail(
                where,
                f"[source] file {file} has an unknown format; use one of {sorted(FILE_FORMATS)}",
            )
        file = str(resolved)
    split = _typed(where, src, "split", str, "source", "train" if file else None)
    if dataset and not split:
        raise _fail(where, f"[source] dataset = '{dataset}' needs split = '...' (e.g. 'test')")

    few = tables["fewshot"]
    k = _typed(where, few, "k", int, "fewshot", 0)
    exemplars = _typed(where, few, "exemplars", list, "fewshot", [])
    if not all(isinstance(e, dict) for e in exemplars):
        raise _fail(where, "[fewshot] exemplars must be a list of tables (one per exemplar)")
    fewshot_split = _typed(where, few, "split", str, "fewshot")
    if k < 0:
        raise _fail(where, f"fewshot.k = {k} must be >= 0")
    if exemplars and fewshot_split:
        raise _fail(where, "[fewshot] takes exemplars = [...] or split = '...', not both")
    if k and not exemplars and not fewshot_split:
        raise _fail(where, f"fewshot.k = {k} needs exemplars = [...] or split = '...' to draw from")
    if exemplars and k > len(exemplars):
        raise _fail(where, f"fewshot.k = {k} but only {len(exemplars)} exemplars are listed")

    stop = _typed(where, data, "stop", list, "", [])
    if not all(isinstance(s, str) and s for s in stop):
        raise _fail(where, f"stop = {stop!r} must be a list of non-empty strings")
    scorer_raw = data.get("scorer")
    options: dict[str, Any] = {}
    if isinstance(scorer_raw, dict):
        _check_keys(where, scorer_raw, "scorer")
        scorer = _typed(where, scorer_raw, "name", str, "scorer")
        options = _typed(where, scorer_raw, "options", dict, "scorer", {})
        if scorer is None:
            raise _fail(where, "[scorer] needs name = '...' (a built-in or 'module:function')")
    else:
        scorer = _typed(where, data, "scorer", str, "")
    reference = _typed(where, src, "reference", str, "source")
    if scorer and not reference:
        raise _fail(where, f"scorer '{scorer}' needs [source] reference = '<answer column>'")
    if scorer:
        from canopy_entropy.scoring import load_scorer

        try:
            load_scorer(scorer)
        except CanopyError as exc:
            raise _fail(where, str(exc)) from None
    hub_source = None
    if hub:
        hub_source = HubSource(
            dataset=_typed(where, hub, "dataset", str, "hub", ""),
            config=_typed(where, hub, "config", str, "hub"),
            split=_typed(where, hub, "split", str, "hub"),
            field=_typed(where, hub, "field", str, "hub", "prompt"),
            id_field=_typed(where, hub, "id_field", str, "hub"),
        )
    return TaskSpec(
        name=name,
        description=description,
        raw=raw,
        chat=chat,
        file=file,
        dataset=dataset,
        config=_typed(where, src, "config", str, "source"),
        split=split or "train",
        id_field=_typed(where, src, "id", str, "source"),
        reference=reference,
        fewshot_k=k,
        exemplars=tuple(exemplars),
        fewshot_split=fewshot_split,
        fewshot_seed=_typed(where, few, "seed", int, "fewshot", 0),
        stop=tuple(stop),
        scorer=scorer,
        scorer_options=dict(options),
        hub=hub_source,
    )


def read_task_file(path: str | Path, builtin: bool = False) -> TaskSpec:
    """Parse the task file at ``path`` (its name defaults to the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist; check the path")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    spec = parse_task(data, path.stem, str(path), path.parent)
    return replace(spec, path=str(path.resolve()), builtin=builtin)
