"""Experiment config: one TOML file describing a whole study, validated with one-line errors.

A config names the models (each with variant and family), the tasks, how many prompts per
task and where they come from, how many rollouts per prompt, the decoding policy, the engine,
and options for the analysis stages. Every field has a default (see ``docs/running.md`` and
``FIELD_DOCS`` below); ``resolved_config_toml`` writes the fully resolved config back out so
a run folder records exactly what was run. Relative paths in a config file are resolved
against the folder that holds the file.

Errors name the file, the line (where the key can be found in the text), the key and the fix,
e.g. ``demo.toml line 7: unknown key 'temprature' in [generation]; did you mean 'temperature'?``
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canopy_entropy.engines.registry import ENGINES, engine_options_problem
from canopy_entropy.errors import ConfigError
from canopy_entropy.run.layout import VARIANTS
from canopy_entropy.tasks.catalog import SAMPLING, SOURCES, TASK_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STAGES = ("generate", "embed", "metrics", "tables", "compare", "regress", "plots", "report")
# What a stage's ``[section] options`` table may hold (name -> type), passed to the stage as
# keyword arguments; anything else is a config error. tests/test_config.py checks each name is
# a parameter of the stage's function.
STAGE_OPTIONS: dict[str, dict[str, type]] = {
    "embed": {"device": str},
    "compare": {},
    "regress": {"nsim": int, "seed": int, "reference": dict, "mean": str, "precision": str},
}
FIGURE_FORMATS = ("png", "pdf", "svg")
OFFLINE_ALIASES = ("gemma3-270m", "smollm2-135m-instruct")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSpec:
    """One model of the study: what to load, which variant it is, which family it belongs to."""

    model: str  # HF hub id, local folder or offline alias (gemma3-270m, smollm2-135m-instruct)
    variant: str = "base"  # 'base' or 'instruct' (instruct prompts go through the chat template)
    family: str = ""  # pairs a base with its instruct model; default: the label
    label: str = ""  # name in tables and the store; default: last part of `model`
    engine_options: dict[str, Any] = field(default_factory=dict)  # merged over [engine].options


@dataclass
class GenerationConfig:
    """Rollouts per prompt and the decoding policy (SPEC section 1)."""

    rollouts: int = 10  # rollouts per prompt (M)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    min_p: float = 0.0  # 0 = no min-p cut
    max_new_tokens: int = 512  # length cap T
    stop: list[str] = field(default_factory=list)  # optional stop strings
    seed: int = 0  # run seed: rollout seeds derive from (seed, prompt id, rollout index)
    common_random_numbers: bool = False  # reuse the same random streams across models
    batch_size: int = 0  # 0 = engine default / adaptive


@dataclass
class EngineConfig:
    """Which sampling engine runs the models."""

    name: str = "hf"  # 'hf' (transformers), 'vllm' or 'openai' (an OpenAI-compatible server)
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
    options: dict[str, Any] = field(default_factory=dict)  # passed to the engine as is


@dataclass
class PromptsConfig:
    """Where each task's prompts come from and how many are used."""

    n: int | None = None  # prompts per task; None ('all' in TOML) = every prompt of the source
    source: str = "builtin"  # 'builtin', 'jsonl', 'paper' or 'hf'
    path: str = ""  # JSONL file or folder ('jsonl'), paper prompt folder ('paper')
    fewshot: int = 0  # k exemplars before each prompt (0 = zero-shot)
    fewshot_path: str = ""  # JSONL of question/answer exemplars; default: the builtin ones
    sample: str = "first"  # 'first' n prompts or a seeded 'random' subset
    seed: int = 0  # seed of the random subset


@dataclass
class EmbedConfig:
    """Semantic diversity: the sentence-transformers encoder."""

    encoder: str = ""  # '' = the library default encoder
    prefix: str | None = None  # document prefix; None = the encoder's default
    batch_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareConfig:
    """Paired base-vs-instruct comparison with a cluster bootstrap over prompts."""

    on: str = "variant"  # compare variants ('base' vs 'instruct') or two models by label ('model')
    a: str = "base"  # side A: a variant, or a model label when on = 'model'
    b: str = "instruct"  # side B
    by: list[str] = field(default_factory=lambda: ["family", "task"])
    bootstrap: int = 2000
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegressConfig:
    """Beta mixed-effects regression of diversity on entropy rate (SPEC section 7)."""

    diagnostics: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlotsConfig:
    """Figures (and the report's copies of them)."""

    formats: list[str] = field(default_factory=lambda: ["png", "pdf"])
    min_active: int = 5  # running-rate curves stop where fewer rollouts are still active


@dataclass
class ExperimentConfig:
    """A whole study. Build it with ``load_config`` / ``parse_config``."""

    name: str = "experiment"
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    models: list[ModelSpec] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    task_prompts: dict[str, PromptsConfig] = field(default_factory=dict)  # per-task overrides
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    regress: RegressConfig = field(default_factory=RegressConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)
    source: str = ""  # the file it came from (not written back)

    def prompts_for(self, task: str) -> PromptsConfig:
        """The prompt settings of ``task`` ([prompts] with its [prompts.<task>] overrides)."""
        return self.task_prompts.get(task, self.prompts)

    def model_labels(self) -> list[str]:
        return [m.label for m in self.models]

    def variants(self) -> set[str]:
        return {m.variant for m in self.models}


# ------------------------------------------------------------------------------------------
# parsing


class _Ctx:
    """Where errors point: the file name and its text (to find a key's line)."""

    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source or "config"
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None, index: int | None = None) -> int | None:
        """Line number of ``key = ...`` inside ``[table]`` (the index-th ``[[table]]``)."""
        current, count, header_line = "", -1, None
        header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
        for no, line in enumerate(self.lines, start=1):
            m = header.match(line)
            if m:
                current = m.group(2).replace('"', "").replace(" ", "")
                if current == table:
                    count += 1
                    if key is None and (index is None or index == count):
                        header_line = no
                continue
            if current != table or (index is not None and count != index):
                continue
            if key is not None and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
                return no
        return header_line

    def fail(self, msg: str, table: str = "", key: str | None = None, index: int | None = None):
        line = self.line_of(table, key, index)
        where = f"{self.source} line {line}" if line else self.source
        raise ConfigError(f"{where}: {msg}")


def _name(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(valid))}"


def _check_keys(ctx: _Ctx, data: dict, valid: list[str], table: str, index: int | None = None):
    for key in data:
        if key not in valid:
            where = f"[{table}]" if table else "the top level"
            ctx.fail(f"unknown key '{key}' in {where}; {_suggest(key, valid)}", table, key, index)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _get(ctx: _Ctx, data: dict, key: str, kind: type, default: Any, table: str, index=None):
    """``data[key]`` checked to be of ``kind`` (ints accepted for floats), else ``default``."""
    if key not in data:
        return default
    value = data[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        ctx.fail(f"{_name(table, key)} = {value!r} must be a finite number", table, key, index)
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is dict:
        ok = isinstance(value, dict)
    if not ok:
        want = _TYPE_NAMES.get(kind, "a list of strings" if kind is list else "a table")
        ctx.fail(
            f"{_name(table, key)} must be {want}, got {value!r}; fix the value", table, key, index
        )
    return value


def _check(ctx: _Ctx, ok: bool, table: str, key: str, value: Any, rule: str, index=None):
    if not ok:
        ctx.fail(f"{_name(table, key)} = {value!r} {rule}", table, key, index)


def _parse_generation(ctx: _Ctx, data: dict) -> GenerationConfig:
    t = "generation"
    valid = [f.name for f in dataclasses.fields(GenerationConfig)]
    _check_keys(ctx, data, valid, t)
    d = GenerationConfig()
    g = GenerationConfig(
        rollouts=_get(ctx, data, "rollouts", int, d.rollouts, t),
        temperature=_get(ctx, data, "temperature", float, d.temperature, t),
        top_k=_get(ctx, data, "top_k", int, d.top_k, t),
        top_p=_get(ctx, data, "top_p", float, d.top_p, t),
        min_p=_get(ctx, data, "min_p", float, d.min_p, t),
        max_new_tokens=_get(ctx, data, "max_new_tokens", int, d.max_new_tokens, t),
        stop=_get(ctx, data, "stop", list, d.stop, t),
        seed=_get(ctx, data, "seed", int, d.seed, t),
        common_random_numbers=_get(ctx, data, "common_random_numbers", bool, False, t),
        batch_size=_get(ctx, data, "batch_size", int, d.batch_size, t),
    )
    _check(ctx, g.rollouts >= 1, t, "rollouts", g.rollouts, "must be >= 1")
    _check(ctx, g.temperature >= 0, t, "temperature", g.temperature, "must be >= 0 (0 = greedy)")
    _check(ctx, g.top_k >= 0, t, "top_k", g.top_k, "must be >= 0 (0 = no top-k cut)")
    _check(ctx, 0 < g.top_p <= 1, t, "top_p", g.top_p, "must be in (0, 1]; use 1 for no cut")
    _check(ctx, 0 <= g.min_p < 1, t, "min_p", g.min_p, "must be in [0, 1); use 0 for no cut")
    _check(ctx, g.max_new_tokens >= 1, t, "max_new_tokens", g.max_new_tokens, "must be >= 1")
    _check(ctx, g.batch_size >= 0, t, "batch_size", g.batch_size, "must be >= 0 (0 = auto)")
    _check(ctx, 0 <= g.seed < 2**63, t, "seed", g.seed, "must be in [0, 2**63)")
    _check(ctx, all(g.stop), t, "stop", g.stop, "must not contain an empty string")
    return g


def _parse_engine(ctx: _Ctx, data: dict) -> EngineConfig:
    t = "engine"
    _check_keys(ctx, data, [f.name for f in dataclasses.fields(EngineConfig)], t)
    e = EngineConfig(
        name=_get(ctx, data, "name", str, "hf", t),
        device=_get(ctx, data, "device", str, "auto", t),
        dtype=_get(ctx, data, "dtype", str, "auto", t),
        options=_get(ctx, data, "options", dict, {}, t),
    )
    if e.name not in ENGINES:
        ctx.fail(
            f"unknown engine '{e.name}'; use one of {list(ENGINES)} "
            f"({_suggest(e.name, list(ENGINES))})",
            t,
            "name",
        )
    problem = engine_options_problem(e.name, e.options)
    if problem:
        ctx.fail(f"[engine] options: {problem}", t, "options")
    dtypes = ("auto", "float32", "bfloat16", "float16")
    _check(ctx, e.dtype in dtypes, t, "dtype", e.dtype, f"is not one of {list(dtypes)}")
    _check(
        ctx,
        bool(re.match(r"^(auto|cpu|mps|cuda(:\d+)?)$", e.device)),
        t,
        "device",
        e.device,
        "is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'",
    )
    return e


_PROMPT_KEYS = [f.name for f in dataclasses.fields(PromptsConfig)]


def _parse_prompts(ctx: _Ctx, data: dict, t: str, base: PromptsConfig, base_dir: Path):
    _check_keys(ctx, data, _PROMPT_KEYS, t)
    n = base.n
    if "n" in data:
        raw = data["n"]
        if raw == "all":
            n = None
        elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
            n = raw
        else:
            ctx.fail(f"{t}.n = {raw!r} must be an integer >= 1 or 'all'", t, "n")
    p = PromptsConfig(
        n=n,
        source=_get(ctx, data, "source", str, base.source, t),
        path=_get(ctx, data, "path", str, base.path, t),
        fewshot=_get(ctx, data, "fewshot", int, base.fewshot, t),
        fewshot_path=_get(ctx, data, "fewshot_path", str, base.fewshot_path, t),
        sample=_get(ctx, data, "sample", str, base.sample, t),
        seed=_get(ctx, data, "seed", int, base.seed, t),
    )
    for key in ("path", "fewshot_path"):
        value = getattr(p, key)
        if key in data and value:
            setattr(p, key, str((base_dir / Path(value).expanduser()).resolve()))
    if p.source not in SOURCES:
        ctx.fail(f"unknown prompt source '{p.source}'; use one of {list(SOURCES)}", t, "source")
    if p.sample not in SAMPLING:
        ctx.fail(f"{t}.sample = {p.sample!r}; use one of {list(SAMPLING)}", t, "sample")
    _check(ctx, p.fewshot >= 0, t, "fewshot", p.fewshot, "must be >= 0 (0 = zero-shot)")
    if p.source in ("jsonl", "paper") and not p.path:
        ctx.fail(f"prompt source '{p.source}' needs {t}.path; set it (or pass --prompts-dir)", t)
    return p


def _parse_model(ctx: _Ctx, data: Any, index: int, base_dir: Path) -> ModelSpec:
    t = "models"
    if not isinstance(data, dict):
        ctx.fail(f"models[{index}] must be a table like {{ model = '...', variant = 'base' }}", t)
    _check_keys(ctx, data, [f.name for f in dataclasses.fields(ModelSpec)], t, index)
    if "model" not in data:
        ctx.fail(
            f"models[{index}] has no 'model' key; set model = '<hub id, folder or alias>'",
            t,
            None,
            index,
        )
    model = _get(ctx, data, "model", str, "", t, index)
    if model.startswith((".", "~")) or (os.sep in model and not _HUB_ID.match(model)):
        model = str((base_dir / Path(model).expanduser()).resolve())
    elif not _HUB_ID.match(model) and model not in _aliases() and (base_dir / model).is_dir():
        model = str((base_dir / model).resolve())
    variant = _get(ctx, data, "variant", str, "base", t, index)
    if variant not in VARIANTS:
        ctx.fail(
            f"models[{index}].variant = {variant!r}; use 'base' or 'instruct'",
            t,
            "variant",
            index,
        )
    label = _get(ctx, data, "label", str, "", t, index) or Path(model.rstrip("/")).name
    family = _get(ctx, data, "family", str, "", t, index) or label
    options = _get(ctx, data, "engine_options", dict, {}, t, index)
    return ModelSpec(
        model=model, variant=variant, family=family, label=label, engine_options=options
    )


def _aliases() -> tuple[str, ...]:
    """Offline model aliases (from canopy_entropy.models when present)."""
    try:
        from canopy_entropy.models import ALIASES

        return tuple(ALIASES)
    except ImportError:
        return OFFLINE_ALIASES


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_available(spec: ModelSpec, engine: str) -> str | None:
    """Why ``spec.model`` cannot be found, or None when it can (aliases, folders, hub ids)."""
    name = spec.model
    if engine == "openai" or name in _aliases():
        return None
    if Path(name).is_absolute() or name.startswith((".", "~")):
        if Path(name).expanduser().is_dir():
            return None
        return f"model folder {name} does not exist; fix the path"
    if not _HUB_ID.match(name):
        return (
            f"model '{name}' is not a local folder, an offline alias ({', '.join(_aliases())}) "
            "or a hub id like 'org/name'; fix the name or path"
        )
    if _hub_offline() and not _in_hub_cache(name):
        return (
            f"model '{name}' is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1); download it first (huggingface-cli download {name}) or unset "
            "HF_HUB_OFFLINE"
        )
    return None


_TOP_KEYS = [
    "name",
    "tasks",
    "models",
    "stages",
    "generation",
    "engine",
    "prompts",
    "embed",
    "compare",
    "regress",
    "plots",
]


def parse_config(
    text: str,
    source: str = "config",
    base_dir: Path | None = None,
    check_models: bool = True,
) -> ExperimentConfig:
    """Parse and validate config ``text``; ``base_dir`` anchors relative paths."""
    ctx = _Ctx(text, source)
    base_dir = Path(base_dir or Path.cwd())
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{ctx.source}: not valid TOML ({exc}); fix the syntax") from exc
    _check_keys(ctx, data, _TOP_KEYS, "")
    for key in ("generation", "engine", "prompts", "embed", "compare", "regress", "plots"):
        if key in data and not isinstance(data[key], dict):
            ctx.fail(f"'{key}' must be a table ([{key}]), got {data[key]!r}", "", key)

    cfg = ExperimentConfig(source=source)
    cfg.name = _get(ctx, data, "name", str, Path(source).stem or "experiment", "")
    if not re.match(r"^[\w.-]+$", cfg.name):
        ctx.fail(f"name = {cfg.name!r}: use letters, digits, '.', '_' or '-' only", "", "name")

    tasks = _get(ctx, data, "tasks", list, list(TASK_NAMES), "")
    for task in tasks:
        if task not in TASK_NAMES:
            ctx.fail(
                f"unknown task '{task}'; use some of {list(TASK_NAMES)} "
                f"({_suggest(task, list(TASK_NAMES))})",
                "",
                "tasks",
            )
    if not tasks or len(set(tasks)) != len(tasks):
        ctx.fail("tasks must list each task once, at least one", "", "tasks")
    cfg.tasks = list(tasks)

    stages = _get(ctx, data, "stages", list, list(STAGES), "")
    for stage in stages:
        if stage not in STAGES:
            ctx.fail(
                f"unknown stage '{stage}'; use some of {list(STAGES)} "
                f"({_suggest(stage, list(STAGES))})",
                "",
                "stages",
            )
    cfg.stages = [s for s in STAGES if s in stages]

    cfg.generation = _parse_generation(ctx, data.get("generation", {}))
    cfg.engine = _parse_engine(ctx, data.get("engine", {}))

    prompts = dict(data.get("prompts", {}))
    overrides = {k: prompts.pop(k) for k in list(prompts) if k in TASK_NAMES}
    cfg.prompts = _parse_prompts(ctx, prompts, "prompts", PromptsConfig(), base_dir)
    for task, sub in overrides.items():
        if not isinstance(sub, dict):
            ctx.fail(f"[prompts.{task}] must be a table of prompt settings", "prompts", task)
        if task not in cfg.tasks:
            ctx.fail(f"[prompts.{task}] is set but '{task}' is not in tasks", f"prompts.{task}")
        cfg.task_prompts[task] = _parse_prompts(ctx, sub, f"prompts.{task}", cfg.prompts, base_dir)

    models = data.get("models")
    if not models:
        ctx.fail(
            "no models; add [[models]] tables with model = '...', variant = 'base'|'instruct'", ""
        )
    if not isinstance(models, list):
        ctx.fail("models must be an array of tables ([[models]])", "", "models")
    cfg.models = [_parse_model(ctx, m, i, base_dir) for i, m in enumerate(models)]
    seen: dict[str, int] = {}
    for i, m in enumerate(cfg.models):
        if m.label in seen:
            ctx.fail(
                f"models[{i}] has the same label '{m.label}' as models[{seen[m.label]}]; give "
                "each model a unique label",
                "models",
                "label" if "label" in models[i] else "model",
                i,
            )
        seen[m.label] = i
    for i, m in enumerate(cfg.models):
        problem = engine_options_problem(
            cfg.engine.name, {**cfg.engine.options, **m.engine_options}
        )
        if problem:
            ctx.fail(f"models[{i}].engine_options: {problem}", "models", "engine_options", i)
    if check_models:
        for i, m in enumerate(cfg.models):
            problem = check_model_available(m, cfg.engine.name)
            if problem:
                ctx.fail(f"models[{i}]: {problem}", "models", "model", i)

    emb = data.get("embed", {})
    _check_keys(ctx, emb, [f.name for f in dataclasses.fields(EmbedConfig)], "embed")
    cfg.embed = EmbedConfig(
        encoder=_get(ctx, emb, "encoder", str, "", "embed"),
        prefix=_get(ctx, emb, "prefix", str, None, "embed"),
        batch_size=_get(ctx, emb, "batch_size", int, 64, "embed"),
        options=_stage_options(ctx, emb, "embed"),
    )
    _check(
        ctx, cfg.embed.batch_size >= 1, "embed", "batch_size", cfg.embed.batch_size, "must be >= 1"
    )

    cmp_ = data.get("compare", {})
    _check_keys(ctx, cmp_, [f.name for f in dataclasses.fields(CompareConfig)], "compare")
    cfg.compare = CompareConfig(
        on=_get(ctx, cmp_, "on", str, "variant", "compare"),
        a=_get(ctx, cmp_, "a", str, "base", "compare"),
        b=_get(ctx, cmp_, "b", str, "instruct", "compare"),
        by=_get(ctx, cmp_, "by", list, ["family", "task"], "compare"),
        bootstrap=_get(ctx, cmp_, "bootstrap", int, 2000, "compare"),
        seed=_get(ctx, cmp_, "seed", int, 0, "compare"),
        options=_stage_options(ctx, cmp_, "compare"),
    )
    on = cfg.compare.on
    _check(ctx, on in ("variant", "model"), "compare", "on", on, "must be 'variant' or 'model'")
    sides = VARIANTS if on == "variant" else tuple(cfg.model_labels())
    for key in ("a", "b"):
        value = getattr(cfg.compare, key)
        rule = f"must be one of {list(sides)}" + (" (model labels)" if on == "model" else "")
        _check(ctx, value in sides, "compare", key, value, rule)
    if cfg.compare.a == cfg.compare.b:
        ctx.fail(
            f"compare.a and compare.b are both {cfg.compare.a!r}; compare two different sides",
            "compare",
            "b",
        )
    by_ok = ("model", "variant", "family", "task")
    for col in cfg.compare.by:
        _check(ctx, col in by_ok, "compare", "by", col, f"is not one of {list(by_ok)}")
    _check(
        ctx,
        cfg.compare.bootstrap >= 1,
        "compare",
        "bootstrap",
        cfg.compare.bootstrap,
        "must be >= 1",
    )

    reg = data.get("regress", {})
    _check_keys(ctx, reg, [f.name for f in dataclasses.fields(RegressConfig)], "regress")
    cfg.regress = RegressConfig(
        diagnostics=_get(ctx, reg, "diagnostics", bool, True, "regress"),
        options=_stage_options(ctx, reg, "regress"),
    )

    plots = data.get("plots", {})
    _check_keys(ctx, plots, [f.name for f in dataclasses.fields(PlotsConfig)], "plots")
    cfg.plots = PlotsConfig(
        formats=_get(ctx, plots, "formats", list, ["png", "pdf"], "plots"),
        min_active=_get(ctx, plots, "min_active", int, 5, "plots"),
    )
    for f in cfg.plots.formats:
        _check(
            ctx, f in FIGURE_FORMATS, "plots", "formats", f, f"is not one of {list(FIGURE_FORMATS)}"
        )
    _check(ctx, bool(cfg.plots.formats), "plots", "formats", [], "must name at least one format")
    _check(
        ctx, cfg.plots.min_active >= 1, "plots", "min_active", cfg.plots.min_active, "must be >= 1"
    )
    return cfg


def _stage_options(ctx: _Ctx, data: dict, section: str) -> dict[str, Any]:
    """``[section] options``: only the names the stage declares, each of its declared type."""
    options = _get(ctx, data, "options", dict, {}, section)
    spec = STAGE_OPTIONS[section]
    for key, value in options.items():
        if key not in spec:
            valid = ", ".join(sorted(spec)) or "none"
            close = difflib.get_close_matches(key, list(spec), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid options: {valid}"
            ctx.fail(f"unknown option '{key}' in [{section}] options; {hint}", section, "options")
        kind = spec[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not ok:
            want = _TYPE_NAMES.get(kind, "a table")
            ctx.fail(f"[{section}] options.{key} must be {want}, got {value!r}", section, "options")
    return dict(options)


def load_config(path: str | Path, check_models: bool = True) -> ExperimentConfig:
    """Read and validate the TOML config at ``path`` (relative paths resolve against its folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from exc
    return parse_config(text, source=str(path), base_dir=path.parent, check_models=check_models)


def demo_config_path() -> Path:
    """The demo config shipped inside the package (the default of ``canopy run``)."""
    from importlib import resources

    return Path(str(resources.files("canopy_entropy") / "configs" / "demo.toml"))


# ------------------------------------------------------------------------------------------
# writing back


def config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain TOML-able data (None written as TOML-friendly values)."""
    prompts = _prompts_dict(cfg.prompts)
    for task, p in cfg.task_prompts.items():
        prompts[task] = _prompts_dict(p)
    embed = dataclasses.asdict(cfg.embed)
    if embed["prefix"] is None:
        del embed["prefix"]
    return {
        "name": cfg.name,
        "tasks": list(cfg.tasks),
        "stages": list(cfg.stages),
        "generation": dataclasses.asdict(cfg.generation),
        "engine": dataclasses.asdict(cfg.engine),
        "prompts": prompts,
        "embed": embed,
        "compare": dataclasses.asdict(cfg.compare),
        "regress": dataclasses.asdict(cfg.regress),
        "plots": dataclasses.asdict(cfg.plots),
        "models": [dataclasses.asdict(m) for m in cfg.models],
    }


def _prompts_dict(p: PromptsConfig) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["n"] = "all" if p.n is None else p.n
    return d


def resolved_config_toml(cfg: ExperimentConfig) -> str:
    """The fully resolved config as TOML (saved to RUN/config.toml); it parses back to ``cfg``."""
    import tomli_w

    header = (
        "# Resolved canopy-entropy experiment config: every field explicit.\n"
        f"# Source: {cfg.source or '(built in)'}\n"
    )
    return header + tomli_w.dumps(copy.deepcopy(config_dict(cfg)))


def generation_fingerprint(cfg: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """The parts of a config (or of its ``config_dict``) that determine the rollouts (a
    changed one needs a new run)."""
    d = config_dict(cfg) if isinstance(cfg, ExperimentConfig) else cfg
    models = [{k: m[k] for k in ("model", "variant", "family", "label")} for m in d["models"]]
    gen = dict(d["generation"])
    gen.pop("batch_size", None)  # results do not depend on batch size
    return {
        "generation": gen,
        "engine": {"name": d["engine"]["name"]},
        "prompts": d["prompts"],
        "tasks": d["tasks"],
        "models": models,
    }
