"""Parsing and validating a whole config (TOML text or file) into an ExperimentConfig."""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from pathlib import Path
from typing import Any

from canopy_entropy.config.checks import _TYPE_NAMES, _check, _check_keys, _Ctx, _get, _suggest
from canopy_entropy.config.models import (
    _parse_model,
    check_model_available,
    check_series,
    check_thinking,
)
from canopy_entropy.config.schema import (
    BACKENDS,
    DEFAULT_STAGES,
    FIGURE_FORMATS,
    STAGE_OPTIONS,
    STAGES,
    AnalysisConfig,
    CompareConfig,
    EmbedConfig,
    EngineConfig,
    ExperimentConfig,
    GenerationConfig,
    PlotsConfig,
    PromptsConfig,
    RayConfig,
    RegressConfig,
    RewardConfig,
    ScoringConfig,
    SemanticEntropyConfig,
)
from canopy_entropy.engines.registry import ENGINES, engine_options_problem
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.run.layout import VARIANTS
from canopy_entropy.tasks.catalog import SAMPLING, SOURCES, TASK_NAMES, TASKS, is_task_path
from canopy_entropy.tasks.spec import TaskSpec, parse_task, read_task_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


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
        enable_thinking=_get(ctx, data, "enable_thinking", bool, False, t),
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
        backend=_get(ctx, data, "backend", str, "local", t),
        workers=_get(ctx, data, "workers", int, 1, t),
        ray=_parse_ray(ctx, _get(ctx, data, "ray", dict, {}, t)),
    )
    if e.backend not in BACKENDS:
        ctx.fail(
            f"unknown engine.backend '{e.backend}'; use one of {list(BACKENDS)} "
            f"({_suggest(e.backend, list(BACKENDS))})",
            t,
            "backend",
        )
    _check(ctx, e.workers >= 1, t, "workers", e.workers, "must be >= 1")
    if e.backend == "local":  # the Ray settings would be silently unused
        _check(ctx, e.workers == 1, t, "workers", e.workers,
               "needs backend = 'ray' (a local run samples a model in one process; or split "
               "the run into jobs with --shard)")  # fmt: skip
        changed = [k for k, v in dataclasses.asdict(e.ray).items()
                   if v != getattr(RayConfig(), k)]  # fmt: skip
        if changed:
            ctx.fail(
                f"engine.ray.{changed[0]} is set but engine.backend is 'local'; set "
                "backend = 'ray' or drop [engine.ray]",
                "engine.ray",
                changed[0],
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


def _parse_ray(ctx: _Ctx, data: dict) -> RayConfig:
    t = "engine.ray"
    _check_keys(ctx, data, [f.name for f in dataclasses.fields(RayConfig)], t)
    d = RayConfig()
    r = RayConfig(
        address=_get(ctx, data, "address", str, d.address, t),
        num_cpus=_get(ctx, data, "num_cpus", float, d.num_cpus, t),
        num_gpus=_get(ctx, data, "num_gpus", float, d.num_gpus, t),
        restarts=_get(ctx, data, "restarts", int, d.restarts, t),
    )
    _check(ctx, r.num_cpus > 0, t, "num_cpus", r.num_cpus, "must be > 0")
    _check(ctx, r.num_gpus >= 0, t, "num_gpus", r.num_gpus, "must be >= 0 (0 = CPU workers)")
    _check(ctx, r.restarts >= 0, t, "restarts", r.restarts, "must be >= 0")
    return r


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
    "semantic_entropy",
    "reward",
    "plots",
    "scoring",
    "task",
    "analysis",
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
    for key in ("generation", "engine", "prompts", "embed", "compare", "regress", "plots",
                "scoring", "task", "analysis", "semantic_entropy", "reward"):  # fmt: skip
        if key in data and not isinstance(data[key], dict):
            ctx.fail(f"'{key}' must be a table ([{key}]), got {data[key]!r}", "", key)

    cfg = ExperimentConfig(source=source)
    cfg.name = _get(ctx, data, "name", str, Path(source).stem or "experiment", "")
    if not re.match(r"^[\w.-]+$", cfg.name):
        ctx.fail(f"name = {cfg.name!r}: use letters, digits, '.', '_' or '-' only", "", "name")

    _parse_tasks(ctx, data, cfg, base_dir)

    stages = _get(ctx, data, "stages", list, list(DEFAULT_STAGES), "")
    for stage in stages:
        if stage not in STAGES:
            ctx.fail(
                f"unknown stage '{stage}'; use some of {list(STAGES)} "
                f"({_suggest(stage, list(STAGES))})",
                "",
                "stages",
            )
    listed = set(stages)

    cfg.generation = _parse_generation(ctx, data.get("generation", {}))
    cfg.engine = _parse_engine(ctx, data.get("engine", {}))

    prompts = dict(data.get("prompts", {}))
    named = {*TASK_NAMES, *cfg.tasks}
    overrides = {k: prompts.pop(k) for k in list(prompts) if k in named}
    cfg.prompts = _parse_prompts(ctx, prompts, "prompts", PromptsConfig(), base_dir)
    for task, sub in overrides.items():
        if not isinstance(sub, dict):
            ctx.fail(f"[prompts.{task}] must be a table of prompt settings", "prompts", task)
        if task not in cfg.tasks:
            ctx.fail(f"[prompts.{task}] is set but '{task}' is not in tasks", f"prompts.{task}")
        cfg.task_prompts[task] = _parse_prompts(ctx, sub, f"prompts.{task}", cfg.prompts, base_dir)
    for task in cfg.task_specs:
        p = cfg.prompts_for(task)
        if p.source != "builtin" or p.path or p.fewshot_path:
            t = f"prompts.{task}" if task in cfg.task_prompts else "prompts"
            ctx.fail(
                f"[{t}] source/path/fewshot_path apply to built-in tasks, but task '{task}' "
                "reads its own [source]; set them in [prompts.<built-in task>] instead",
                t,
            )
    stops = {tuple(cfg.task_spec(t).stop) for t in cfg.tasks}
    if len(stops) > 1:
        ctx.fail(
            f"the tasks declare different stop strings ({sorted(stops)}) but a run samples with "
            "one policy; run them in separate studies or move the stops to [generation] stop",
            "",
            "tasks",
        )

    sc = data.get("scoring", {})
    _check_keys(ctx, sc, [f.name for f in dataclasses.fields(ScoringConfig)], "scoring")
    cfg.scoring = ScoringConfig(
        execute_code=_get(ctx, sc, "execute_code", bool, False, "scoring"),
        workers=_get(ctx, sc, "workers", int, 1, "scoring"),
    )
    _check(ctx, cfg.scoring.workers >= 1, "scoring", "workers", cfg.scoring.workers, "must be >= 1")

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
    check_series(ctx, cfg.models)
    check_thinking(
        ctx, cfg.models, cfg.generation.enable_thinking, cfg.engine.name, cfg.engine.options
    )
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
        reference=_get(ctx, reg, "reference", dict, {}, "regress"),
        options=_stage_options(ctx, reg, "regress"),
    )
    _check_reference(ctx, cfg)
    cfg.semantic_entropy = _parse_semantic_entropy(
        ctx, data.get("semantic_entropy", {}), cfg, base_dir
    )
    cfg.reward = _parse_reward(ctx, data.get("reward", {}))
    if cfg.semantic_entropy.enabled:
        listed.add("semantic-entropy")
    if cfg.reward.enabled:
        listed.add("reward")
    if "reward" in listed and not cfg.reward.model:
        ctx.fail(
            "the reward stage needs [reward] model = '...' (a sequence-classification "
            "reward model, e.g. 'Skywork/Skywork-Reward-V2-Llama-3.1-8B')",
            "reward",
        )
    cfg.stages = [s for s in STAGES if s in listed]

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
    cfg.analysis = _parse_analysis(ctx, data.get("analysis", {}))
    return cfg


def _parse_tasks(ctx: _Ctx, data: dict, cfg: ExperimentConfig, base_dir: Path) -> None:
    """``tasks``: built-in names, task-file paths (``*.toml``) and names of ``[task.NAME]``
    tables; each task once, by its name."""
    tables = data.get("task", {})
    tasks = _get(ctx, data, "tasks", list, list(TASK_NAMES), "")
    names: list[str] = []
    for ref in tasks:
        if not isinstance(ref, str):
            ctx.fail(
                f"tasks holds {ref!r}; list task names or task-file paths (strings)", "", "tasks"
            )
        spec: TaskSpec | None = None
        if ref in tables:
            table = tables[ref]
            if not isinstance(table, dict):
                ctx.fail(f"[task.{ref}] must be a table", "task", ref)
            try:
                spec = parse_task(table, ref, f"{ctx.source} [task.{ref}]", base_dir)
            except CanopyError as exc:
                ctx.fail(str(exc), f"task.{ref}")
            resolved = dict(table)
            if isinstance(table.get("source"), dict) and spec.file:
                resolved["source"] = {**table["source"], "file": spec.file}
            cfg.task_tables[spec.name] = resolved
        elif is_task_path(ref):
            try:
                spec = read_task_file((base_dir / Path(ref).expanduser()).resolve())
            except CanopyError as exc:
                ctx.fail(str(exc), "", "tasks")
        elif ref not in TASKS:
            ctx.fail(
                f"unknown task '{ref}'; use some of {list(TASK_NAMES)} "
                f"({_suggest(ref, list(TASK_NAMES))}), a task file (*.toml) or a [task.{ref}] "
                "table",
                "",
                "tasks",
            )
        name = spec.name if spec is not None else ref
        if spec is not None:
            if name in TASKS:
                ctx.fail(f"task '{ref}' is named '{name}', a built-in task; rename it", "", "tasks")
            cfg.task_specs[name] = spec
        names.append(name)
    for name in tables:
        if name not in tasks:
            ctx.fail(
                f"[task.{name}] is defined but '{name}' is not in tasks; add it", f"task.{name}"
            )
    if not names or len(set(names)) != len(names):
        ctx.fail("tasks must list each task once, at least one", "", "tasks")
    cfg.tasks = names


def _parse_analysis(ctx: _Ctx, data: dict) -> AnalysisConfig:
    """[analysis]: phase_markers, distinct non-empty strings (rollouts split at the first)."""
    t = "analysis"
    _check_keys(ctx, data, [f.name for f in dataclasses.fields(AnalysisConfig)], t)
    markers = _get(ctx, data, "phase_markers", list, [], t)
    for marker in markers:
        _check(ctx, isinstance(marker, str) and bool(marker.strip()), t, "phase_markers", marker,
               "must be a non-empty string such as '</think>'")  # fmt: skip
    _check(ctx, len(set(markers)) == len(markers), t, "phase_markers", markers,
           "lists a marker twice")  # fmt: skip
    return AnalysisConfig(phase_markers=list(markers))


def _check_reference(ctx: _Ctx, cfg: ExperimentConfig) -> None:
    """``[regress] reference``: factor -> level, each level one the study has."""
    ref = cfg.regress.reference
    if "reference" in cfg.regress.options:
        ctx.fail(
            "set the reference levels once, as [regress] reference (not also in options)",
            "regress",
            "options",
        )
    levels = {
        "task": list(cfg.tasks),
        "variant": sorted(cfg.variants()),
        "family": sorted({m.family for m in cfg.models}),
    }
    for factor, level in ref.items():
        if factor not in levels:
            ctx.fail(
                f"regress.reference has unknown factor '{factor}'; use some of "
                f"{list(levels)} ({_suggest(factor, list(levels))})",
                "regress",
                "reference",
            )
        if not isinstance(level, str) or level not in levels[factor]:
            close = difflib.get_close_matches(str(level), levels[factor], n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of {levels[factor]}"
            ctx.fail(
                f"regress.reference.{factor} = {level!r} is not a {factor} of this study; {hint}",
                "regress",
                "reference",
            )


def _parse_semantic_entropy(
    ctx: _Ctx, data: dict, cfg: ExperimentConfig, base_dir: Path
) -> SemanticEntropyConfig:
    t = "semantic_entropy"
    _check_keys(ctx, data, [f.name for f in dataclasses.fields(SemanticEntropyConfig)], t)
    d = SemanticEntropyConfig()
    se = SemanticEntropyConfig(
        enabled=_get(ctx, data, "enabled", bool, d.enabled, t),
        judge=_get(ctx, data, "judge", str, d.judge, t),
        engine=_get(ctx, data, "engine", str, d.engine, t),
        m=_get(ctx, data, "m", int, d.m, t),
        seed=_get(ctx, data, "seed", int, d.seed, t),
        max_new_tokens=_get(ctx, data, "max_new_tokens", int, d.max_new_tokens, t),
        judge_prompts=_get(ctx, data, "judge_prompts", dict, {}, t),
        engine_options=_get(ctx, data, "engine_options", dict, {}, t),
    )
    if se.engine not in ENGINES:
        ctx.fail(
            f"unknown judge engine '{se.engine}'; use one of {list(ENGINES)} "
            f"({_suggest(se.engine, list(ENGINES))})",
            t,
            "engine",
        )
    problem = engine_options_problem(se.engine, se.engine_options)
    if problem:
        ctx.fail(f"[{t}] engine_options: {problem}", t, "engine_options")
    _check(ctx, se.m >= 2, t, "m", se.m, "must be >= 2 (rollouts judged per prompt)")
    _check(ctx, se.max_new_tokens >= 1, t, "max_new_tokens", se.max_new_tokens, "must be >= 1")
    for task, path in se.judge_prompts.items():
        if task not in cfg.tasks:
            ctx.fail(
                f"[{t}] judge_prompts names task '{task}', which is not in tasks "
                f"({_suggest(task, list(cfg.tasks))})",
                t,
                "judge_prompts",
            )
        if not isinstance(path, str):
            ctx.fail(f"[{t}] judge_prompts.{task} must be a file path string", t, "judge_prompts")
        se.judge_prompts[task] = str((base_dir / Path(path).expanduser()).resolve())
    return se


def _parse_reward(ctx: _Ctx, data: dict) -> RewardConfig:
    t = "reward"
    _check_keys(ctx, data, [f.name for f in dataclasses.fields(RewardConfig)], t)
    d = RewardConfig()
    r = RewardConfig(
        enabled=_get(ctx, data, "enabled", bool, d.enabled, t),
        model=_get(ctx, data, "model", str, d.model, t),
        keep=_get(ctx, data, "keep", float, d.keep, t),
        batch_size=_get(ctx, data, "batch_size", int, d.batch_size, t),
        max_length=_get(ctx, data, "max_length", int, d.max_length, t),
        device=_get(ctx, data, "device", str, d.device, t),
        dtype=_get(ctx, data, "dtype", str, d.dtype, t),
    )
    _check(ctx, 0 < r.keep <= 1, t, "keep", r.keep, "must be in (0, 1], e.g. 0.7")
    _check(ctx, r.batch_size >= 1, t, "batch_size", r.batch_size, "must be >= 1")
    _check(ctx, r.max_length >= 8, t, "max_length", r.max_length, "must be >= 8")
    _check(
        ctx,
        bool(re.match(r"^(auto|cpu|mps|cuda(:\d+)?)$", r.device)),
        t,
        "device",
        r.device,
        "is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'",
    )
    dtypes = ("auto", "float32", "bfloat16", "float16")
    _check(ctx, r.dtype in dtypes, t, "dtype", r.dtype, f"is not one of {list(dtypes)}")
    return r


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
