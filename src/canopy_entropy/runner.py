"""``canopy run``: every stage of a study from one config, resumable, into one results folder.

Stages run in order: generate -> embed -> metrics -> tables -> compare -> regress -> plots ->
report. They are defined in ONE table, ``STAGE_TABLE``; each names the function it calls as
``"module:function"``, looked up only when the stage runs, so a capability that is not part of
this installation (or not built yet) is reported as "not available" instead of crashing.

Resumability: generation is resumable inside the engine loop (one atomic shard per prompt,
seeds that depend only on (run seed, prompt id, rollout index)), and the generate stage counts
as done when the store holds every configured rollout. Every later stage writes a marker
``RUN/.canopy/stages/<stage>.json`` holding a fingerprint of its inputs (file names, sizes and
modification times of the run-folder paths it reads) and of its config section; it is skipped
when the marker matches and its outputs exist. ``force`` redoes a stage (for generate: deletes
the rollouts first); later stages follow because their inputs changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from canopy_entropy.config import (
    STAGES,
    ExperimentConfig,
    config_dict,
    generation_fingerprint,
    resolved_config_toml,
)
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.run.manifest import PolicyRecord, read_manifest, update_manifest
from canopy_entropy.store import RunStore, atomic_write_json, atomic_write_text
from canopy_entropy.tasks import Prompt, load_task_prompts

# ------------------------------------------------------------------------------------------
# the stage table


@dataclass(frozen=True)
class Stage:
    """One stage: what it calls, what it reads and writes, which stages it needs."""

    name: str
    target: str  # "module:function" (looked up lazily) or "runner:<function>" (built in)
    inputs: tuple[str, ...]  # run-folder paths whose state the outputs depend on
    outputs: tuple[str, ...]  # paths that exist when the stage is done
    needs: tuple[str, ...] = ()  # stages whose outputs must exist first
    needs_pair: bool = False  # only meaningful with both compared variants present
    kwargs: Callable[[ExperimentConfig, Path], dict[str, Any]] = lambda cfg, run_dir: {}
    config_key: str = ""  # config section that changes the results (part of the fingerprint)
    what: str = ""


def _embed_kwargs(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    kw: dict[str, Any] = {"encoder": cfg.embed.encoder or None, "batch_size": cfg.embed.batch_size}
    if cfg.embed.prefix is not None:
        kw["prefix"] = cfg.embed.prefix
    return {**kw, **cfg.embed.options}


def _compare_kwargs(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    c = cfg.compare
    kw = {"a": c.a, "b": c.b, "by": tuple(c.by), "n_boot": c.bootstrap, "seed": c.seed}
    kw["a_key"] = c.on
    return {**kw, **c.options}


STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        "generate",
        "canopy_entropy.generate:generate_run",
        inputs=(),
        outputs=("rollouts",),
        what="sample rollouts with per-step entropies",
    ),
    Stage(
        "embed",
        "canopy_entropy.semantic:embed_run",
        inputs=("rollouts",),
        outputs=("semantic/prompt_diversity.parquet",),
        needs=("generate",),
        kwargs=_embed_kwargs,
        config_key="embed",
        what="semantic diversity and Vendi score",
    ),
    Stage(
        "metrics",
        "canopy_entropy.metrics:write_metrics",
        inputs=("rollouts", "semantic/prompt_diversity.parquet"),
        outputs=("metrics/prompts.parquet", "metrics/pooled.parquet", "metrics/metrics.json"),
        needs=("generate",),
        what="CE*, GenPPL, BF, correlations, decompositions, error bounds",
    ),
    Stage(
        "tables",
        "canopy_entropy.runner:write_tables",
        inputs=("metrics/pooled.parquet", "semantic/prompt_diversity.parquet"),
        outputs=("tables/metrics.csv", "tables/metrics.md"),
        needs=("metrics",),
        what="pooled metrics per model x task (CSV, Markdown)",
    ),
    Stage(
        "compare",
        "canopy_entropy.compare:compare_run",
        inputs=("rollouts", "metrics", "semantic"),
        outputs=("compare/comparison.parquet",),
        needs=("metrics",),
        needs_pair=True,
        kwargs=_compare_kwargs,
        config_key="compare",
        what="paired base-vs-instruct bootstrap comparison",
    ),
    Stage(
        "regress",
        "canopy_entropy.stats.regression:regress_run",
        inputs=("metrics", "semantic"),
        outputs=("regression/result.json",),
        needs=("metrics", "embed"),
        needs_pair=True,
        kwargs=lambda cfg, run_dir: {"diagnostics": cfg.regress.diagnostics, **cfg.regress.options},
        config_key="regress",
        what="Beta mixed-effects regression of diversity on entropy rate",
    ),
    Stage(
        "plots",
        "canopy_entropy.plots:make_figures",
        inputs=("rollouts", "metrics", "semantic", "compare", "regression"),
        outputs=("figures",),
        needs=("metrics",),
        what="figures (PNG + PDF)",
    ),
    Stage(
        "report",
        "canopy_entropy.report:build_report",
        inputs=("metrics", "semantic", "compare", "regression", "figures", "tables"),
        outputs=("report.html",),
        needs=("metrics",),
        # embed the figures of the plots stage as they are; render them only when there are none
        kwargs=lambda cfg, run_dir: {"figures": not _outputs_exist(run_dir, stage_named("plots"))},
        what="self-contained HTML report",
    ),
)
assert tuple(s.name for s in STAGE_TABLE) == STAGES


def stage_named(name: str) -> Stage:
    """The STAGE_TABLE entry called ``name``."""
    return next(s for s in STAGE_TABLE if s.name == name)


HEADLINE = [
    ("ce_star", "CE*"),
    ("ce_star_se", "SE"),
    ("genppl", "GenPPL"),
    ("bf", "BF"),
    ("entropy_rate", "rate"),
    ("mean_length", "mean N"),
    ("spearman", "rho_s(N,r)"),
    ("truncation_rate", "trunc"),
    ("diversity", "D"),
]
KEYS = ["model", "variant", "family", "task"]


class StageUnavailable(Exception):
    """The stage's module is not part of this installation (yet)."""


def stage_function(stage: Stage) -> Callable[..., Any]:
    """Import the function a stage calls; StageUnavailable when its module is missing."""
    module_name, func_name = stage.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise StageUnavailable(f"{exc.name} is not part of this installation") from exc
    except ImportError as exc:
        raise StageUnavailable(str(exc)) from exc
    fn = getattr(module, func_name, None)
    if fn is None:
        raise StageUnavailable(f"{module_name} has no {func_name}()")
    return fn


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments it accepts (stages evolve independently)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return fn(*args, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# fingerprints and markers


def _path_state(root: Path, rel: str) -> list[tuple[str, int, int]]:
    path = root / rel
    if path.is_file():
        st = path.stat()
        return [(rel, st.st_size, st.st_mtime_ns)]
    if not path.is_dir():
        return []
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            st = p.stat()
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def stage_fingerprint(run_dir: Path, stage: Stage, cfg: ExperimentConfig) -> str:
    """Hash of the stage's input files (name, size, mtime), its config section and version."""
    from canopy_entropy import __version__

    state: list[Any] = [stage.name, __version__]
    for rel in stage.inputs:
        state.append(_path_state(run_dir, rel))
    if stage.config_key:
        state.append(config_dict(cfg)[stage.config_key])
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()


def _marker(run_dir: Path, name: str) -> Path:
    return run_dir / ".canopy" / "stages" / f"{name}.json"


def _outputs_exist(run_dir: Path, stage: Stage) -> bool:
    for rel in stage.outputs:
        p = run_dir / rel
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return False
    return True


def stage_is_done(run_dir: Path, stage: Stage, cfg: ExperimentConfig) -> bool:
    """True when the stage's marker matches its current inputs and its outputs exist."""
    marker = _marker(run_dir, stage.name)
    if not marker.exists() or not _outputs_exist(run_dir, stage):
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved.get("fingerprint") == stage_fingerprint(run_dir, stage, cfg)


# ------------------------------------------------------------------------------------------
# the live display


@dataclass
class StageResult:
    name: str
    status: str  # done | skipped | not available | failed | not run
    detail: str = ""
    seconds: float = 0.0


@dataclass
class RunDisplay:
    """Rich live view: current stage, model x task grid, tokens/s and ETA."""

    cfg: ExperimentConfig
    console: Console
    totals: dict[tuple[str, str], int] = field(default_factory=dict)
    done: dict[tuple[str, str], int] = field(default_factory=dict)
    stage: str = ""
    tokens_per_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    session_prompts: int = 0
    results: list[StageResult] = field(default_factory=list)
    live: Live | None = None

    def render(self) -> Group:
        grid = Table(title=f"canopy run · {self.cfg.name}", title_justify="left", expand=False)
        grid.add_column("model")
        grid.add_column("variant")
        for task in self.cfg.tasks:
            grid.add_column(task, justify="right")
        for m in self.cfg.models:
            cells = []
            for task in self.cfg.tasks:
                d, t = self.done.get((m.label, task), 0), self.totals.get((m.label, task), 0)
                style = "green" if t and d >= t else ("yellow" if d else "dim")
                cells.append(Text(f"{d}/{t}", style=style))
            grid.add_row(m.label, m.variant, *cells)
        lines = [Text.assemble(("stage: ", "bold"), (self.stage or "-", "cyan"))]
        if self.stage == "generate":
            lines.append(Text(f"{self.tokens_per_s:,.0f} tokens/s   ETA {self.eta()}"))
        for r in self.results:
            lines.append(Text(f"  {r.name:<9} {r.status}{': ' + r.detail if r.detail else ''}"))
        return Group(grid, *lines)

    def eta(self) -> str:
        total = sum(self.totals.values())
        remaining = total - sum(self.done.values())
        elapsed = time.monotonic() - self.started
        if remaining <= 0:
            return "0s"
        if self.session_prompts == 0 or elapsed <= 0:
            return "estimating…"
        secs = remaining * elapsed / self.session_prompts
        return time.strftime("%H:%M:%S", time.gmtime(secs)) if secs >= 60 else f"{secs:.0f}s"

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def set_stage(self, name: str) -> None:
        self.stage = name
        if self.live is None:
            self.console.print(f"[bold]stage[/] {name} …", highlight=False)
        self.refresh()

    def add_result(self, result: StageResult) -> None:
        self.results.append(result)
        if self.live is None:
            extra = f": {result.detail}" if result.detail else ""
            self.console.print(f"  {result.name}: {result.status}{extra}", highlight=False)
        self.refresh()

    @contextlib.contextmanager
    def running(self) -> Iterator[RunDisplay]:
        if not self.console.is_terminal:
            yield self
            return
        with Live(self.render(), console=self.console, refresh_per_second=4) as live:
            self.live = live
            try:
                yield self
            finally:
                self.live = None


# ------------------------------------------------------------------------------------------
# the generate stage


def load_prompts(cfg: ExperimentConfig) -> dict[str, list[Prompt]]:
    """The configured prompts of every task."""
    out = {}
    for task in cfg.tasks:
        p = cfg.prompts_for(task)
        out[task] = load_task_prompts(
            task,
            n=p.n,
            source=p.source,
            path=p.path or None,
            fewshot=p.fewshot,
            sample=p.sample,
            seed=p.seed,
            fewshot_path=p.fewshot_path or None,
        )
    return out


def _store_counts(run_dir: Path) -> dict[tuple[str, str, str], int]:
    """Rollouts per (model, task, prompt_id) already in the store."""
    store = RunStore(run_dir)
    if not store.shard_files():
        return {}
    table = store.read_rollouts(columns=["model", "task", "prompt_id"])
    if table.num_rows == 0:
        return {}
    counts = table.group_by(["model", "task", "prompt_id"]).aggregate([("prompt_id", "count")])
    cols = counts.to_pydict()
    return {
        (m, t, p): int(c)
        for m, t, p, c in zip(
            cols["model"], cols["task"], cols["prompt_id"], cols["prompt_id_count"], strict=True
        )
    }


def check_store_matches(
    run_dir: Path, cfg: ExperimentConfig, prompts: dict[str, list[Prompt]]
) -> dict[tuple[str, str, str], int]:
    """Refuse a run folder holding rollouts this config would not produce (never mix studies)."""
    counts = _store_counts(run_dir)
    wanted = {(m.label, t, p.id) for m in cfg.models for t in cfg.tasks for p in prompts[t]}
    extra = [k for k in counts if k not in wanted]
    if extra:
        m, t, p = extra[0]
        raise ConfigError(
            f"{run_dir} holds rollouts this config does not ask for ({len(extra)} prompts, e.g. "
            f"model '{m}', task '{t}', prompt '{p}'); use another --out folder or "
            "--force generate to start over"
        )
    over = [k for k, c in counts.items() if c > cfg.generation.rollouts]
    if over:
        m, t, p = over[0]
        raise ConfigError(
            f"{run_dir} holds {counts[over[0]]} rollouts for model '{m}', prompt '{p}' but the "
            f"config asks for {cfg.generation.rollouts}; use another --out folder or --force "
            "generate"
        )
    return counts


_POLICY_KEYS = {"stop_strings": "stop"}  # PolicyRecord field -> [generation] key


def _check_config_compatible(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A run folder made with other generation settings cannot be continued with these.

    The manifest is the authority (config.toml is only a copy for people): its recorded policy
    and seed scheme, and the experiment config that ``canopy run`` recorded there.
    """
    if not RunStore(run_dir).shard_files():
        return
    manifest = read_manifest(run_dir)  # rollouts without a manifest: an error with a hint
    wanted = PolicyRecord.from_policy(_policy(cfg))
    if manifest.policy is not None:
        for k in manifest.policy.differences(wanted):
            if k == "eos_token_ids":
                continue  # [generation] has no EOS ids: the engine resolves them
            key = f"generation.{_POLICY_KEYS.get(k, k)}"
            raise ConfigError(
                f"{run_dir} was generated with {key} = {getattr(manifest.policy, k)!r}, this "
                f"config has {getattr(wanted, k)!r}; use another --out folder or --force generate"
            )
    seed = manifest.seed_scheme
    g = cfg.generation
    if seed is not None and (seed.run_seed, seed.common_random_numbers) != (
        g.seed,
        g.common_random_numbers,
    ):
        raise ConfigError(
            f"{run_dir} was generated with generation.seed = {seed.run_seed} (common random "
            f"numbers {seed.common_random_numbers}), this config has {g.seed} "
            f"({g.common_random_numbers}); use another --out folder or --force generate"
        )
    if manifest.experiment is None:
        return
    old, new = generation_fingerprint(manifest.experiment), generation_fingerprint(cfg)
    for key in ("generation", "engine"):
        for k in sorted(set(old[key]) | set(new[key])):
            if old[key].get(k) != new[key].get(k):
                raise ConfigError(
                    f"{run_dir} was generated with {key}.{k} = {old[key].get(k)!r}, this config "
                    f"has {new[key].get(k)!r}; use another --out folder or --force generate"
                )
    old_models = {m["label"]: m for m in old["models"]}
    for m in new["models"]:
        prev = old_models.get(m["label"])
        if prev is not None and prev != m:
            raise ConfigError(
                f"{run_dir} has model label '{m['label']}' for {prev['model']} "
                f"({prev['variant']}), this config uses it for {m['model']} ({m['variant']}); "
                "use another --out folder or a different label"
            )
    ignore = ("path", "fewshot_path", "n")
    for task, p_new in new["prompts"].items():
        p_old = old["prompts"].get(task)
        if task in cfg.tasks and isinstance(p_new, dict) and isinstance(p_old, dict):
            diff = [k for k in p_new if k not in ignore and p_new.get(k) != p_old.get(k)]
            if diff:
                raise ConfigError(
                    f"{run_dir} was generated with prompts.{diff[0]} = {p_old.get(diff[0])!r}, "
                    f"this config has {p_new.get(diff[0])!r}; use another --out folder or "
                    "--force generate"
                )


def _policy(cfg: ExperimentConfig) -> Any:
    from canopy_entropy.engines.base import DecodingPolicy

    g = cfg.generation
    return DecodingPolicy(
        temperature=g.temperature,
        top_k=g.top_k or None,
        top_p=g.top_p,
        min_p=g.min_p,
        max_new_tokens=g.max_new_tokens,
        stop_strings=tuple(g.stop),
    )


def _engine_options(cfg: ExperimentConfig, model: Any) -> dict[str, Any]:
    """[engine].options with the model's overrides; vLLM takes its dtype as an option."""
    options = {**cfg.engine.options, **model.engine_options}
    if cfg.engine.name == "vllm" and cfg.engine.dtype != "auto":
        options.setdefault("dtype", cfg.engine.dtype)
    return options


def run_generate(run_dir: Path, cfg: ExperimentConfig, display: RunDisplay, force: bool) -> str:
    """Generate every missing rollout, model by model (one model in memory at a time)."""
    fn = stage_function(STAGE_TABLE[0])
    prompts = load_prompts(cfg)
    counts = check_store_matches(run_dir, cfg, prompts)
    M = cfg.generation.rollouts
    for m in cfg.models:
        for task in cfg.tasks:
            display.totals[(m.label, task)] = len(prompts[task])
            display.done[(m.label, task)] = sum(
                counts.get((m.label, task, p.id), 0) >= M for p in prompts[task]
            )
    display.refresh()
    generated = 0
    for m in cfg.models:
        todo = [t for t in cfg.tasks if display.done[(m.label, t)] < len(prompts[t])]
        if not todo:
            continue
        flat = [p for t in todo for p in prompts[t]]
        pending = [
            p for p in flat if counts.get((m.label, p.task, p.id), 0) < M
        ]  # what the engine will actually sample, in order
        base_done = {t: display.done[(m.label, t)] for t in todo}
        t0 = time.monotonic()

        def progress(
            event: dict[str, Any], m=m, flat=flat, pending=pending, base=base_done, t0_=t0
        ) -> None:
            # prompts_done counts the prompts already in the store first, then the new ones
            k = int(event.get("prompts_done", 0)) - (len(flat) - len(pending))
            per_task = dict(base)
            for p in pending[: max(k, 0)]:
                per_task[p.task] += 1
            before = sum(display.done[(m.label, t)] for t in per_task)
            for t, d in per_task.items():
                display.done[(m.label, t)] = min(d, display.totals[(m.label, t)])
            display.session_prompts += sum(display.done[(m.label, t)] for t in per_task) - before
            elapsed = float(event.get("elapsed_s", time.monotonic() - t0_)) or 1e-9
            display.tokens_per_s = float(event.get("tokens", 0)) / elapsed
            display.refresh()
            if display.live is None:  # logs: one line per prompt
                task = pending[k - 1].task if 0 < k <= len(pending) else ""
                d, t = display.done.get((m.label, task), 0), display.totals.get((m.label, task), 0)
                display.console.print(
                    f"    {m.label} · {task} {d}/{t} prompts · "
                    f"{display.tokens_per_s:,.0f} tokens/s · ETA {display.eta()}",
                    highlight=False,
                )

        _call(
            fn,
            run_dir,
            model=m.model,
            prompts=flat,
            rollouts=M,
            policy=_policy(cfg),
            variant=m.variant,
            family=m.family,
            model_label=m.label,
            engine=cfg.engine.name,
            device=cfg.engine.device,
            dtype=cfg.engine.dtype,
            seed=cfg.generation.seed,
            common_random_numbers=cfg.generation.common_random_numbers,
            batch_size=cfg.generation.batch_size or None,
            engine_options=_engine_options(cfg, m),
            progress=progress,
            run_name=cfg.name,
        )
        generated += len(pending)
    counts = _store_counts(run_dir)
    missing = [
        (m.label, t, p.id)
        for m in cfg.models
        for t in cfg.tasks
        for p in prompts[t]
        if counts.get((m.label, t, p.id), 0) < M
    ]
    if missing:
        raise CanopyError(
            f"generation finished but {len(missing)} prompts lack rollouts (e.g. model "
            f"'{missing[0][0]}', prompt '{missing[0][2]}'); re-run to continue"
        )
    for key in display.totals:
        display.done[key] = display.totals[key]
    _record_experiment(run_dir, cfg)
    n_roll = sum(counts.values())
    return f"{generated} prompts sampled, {n_roll} rollouts in store" if generated else ""


def generate_is_done(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Every configured (model, task, prompt) has all its rollouts in the store."""
    prompts = load_prompts(cfg)
    counts = check_store_matches(run_dir, cfg, prompts)
    return all(
        counts.get((m.label, t, p.id), 0) >= cfg.generation.rollouts
        for m in cfg.models
        for t in cfg.tasks
        for p in prompts[t]
    )


def _record_experiment(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Record the resolved experiment config in the run manifest (the provenance authority)."""
    exp = config_dict(cfg)
    if read_manifest(run_dir).experiment != exp:
        update_manifest(run_dir, lambda m: dataclasses.replace(m, experiment=exp))


# ------------------------------------------------------------------------------------------
# the tables stage (built in)


def headline_frame(run_dir: Path) -> Any:
    """Pooled metrics per model x task, with mean diversity when the embed stage ran."""
    import pandas as pd

    pooled = pd.read_parquet(Path(run_dir) / "metrics" / "pooled.parquet")
    div_path = Path(run_dir) / "semantic" / "prompt_diversity.parquet"
    keys = [k for k in KEYS if k in pooled.columns]
    if div_path.exists():
        div = pd.read_parquet(div_path)
        cols = [c for c in ("diversity", "vendi") if c in div.columns]
        dkeys = [k for k in keys if k in div.columns]
        cols = [c for c in cols if c not in pooled.columns]  # metrics merges them when present
        if cols and dkeys:
            pooled = pooled.merge(
                div.groupby(dkeys)[cols].mean().reset_index(), on=dkeys, how="left"
            )
    return pooled.sort_values(keys).reset_index(drop=True)


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if v != v:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def write_tables(run_dir: Path) -> None:
    """RUN/tables/metrics.csv (every pooled column) and metrics.md (the headline columns)."""
    frame = headline_frame(run_dir)
    out = Path(run_dir) / "tables"
    atomic_write_text(out / "metrics.csv", frame.to_csv(index=False))
    cols = [k for k in KEYS if k in frame.columns] + [c for c, _ in HEADLINE if c in frame.columns]
    names = dict(HEADLINE)
    header = [names.get(c, c) for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    note = (
        "\n\nCE* in nats per generation (SE: its standard error over prompts); GenPPL = "
        "exp(CE*/mean N); BF = exp(mean entropy rate); rho_s: pooled Spearman correlation of "
        "length and entropy rate; trunc: share of rollouts cut at max_new_tokens; D: semantic "
        "diversity.\n"
    )
    atomic_write_text(out / "metrics.md", "\n".join(lines) + note)


def headline_table(run_dir: Path) -> Table | None:
    """The rich version of the headline table printed at the end of a run."""
    path = Path(run_dir) / "metrics" / "pooled.parquet"
    if not path.exists():
        return None
    frame = headline_frame(run_dir)
    cols = [k for k in ("model", "variant", "task") if k in frame.columns]
    cols += [c for c, _ in HEADLINE if c in frame.columns]
    names = dict(HEADLINE)
    table = Table(title="Pooled metrics per model x task", title_justify="left")
    for c in cols:
        table.add_column(names.get(c, c), justify="left" if c in KEYS else "right")
    for _, row in frame[cols].iterrows():
        table.add_row(*[_fmt(row[c]) for c in cols])
    return table


# ------------------------------------------------------------------------------------------
# the run


@contextlib.contextmanager
def _lock(run_dir: Path) -> Iterator[None]:
    """One ``canopy run`` per folder at a time (the lock dies with the process)."""
    import fcntl

    path = run_dir / ".canopy" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise CanopyError(
                f"another 'canopy run' is using {run_dir}; wait for it or use another --out"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _parse_stage_list(names: list[str] | None, what: str) -> list[str]:
    if not names:
        return []
    out = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in STAGES:
                import difflib

                close = difflib.get_close_matches(part, STAGES, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"use some of {list(STAGES)}"
                raise ConfigError(f"unknown stage '{part}' in {what}; {hint}")
            out.append(part)
    return out


def _family_note(cfg: ExperimentConfig) -> str | None:
    """Say plainly when base and instruct models are different families (not a clean effect)."""
    by_family: dict[str, set[str]] = {}
    for m in cfg.models:
        by_family.setdefault(m.family, set()).add(m.variant)
    if cfg.variants() >= {"base", "instruct"} and not any(
        v >= {"base", "instruct"} for v in by_family.values()
    ):
        base = ", ".join(sorted({m.family for m in cfg.models if m.variant == "base"}))
        inst = ", ".join(sorted({m.family for m in cfg.models if m.variant == "instruct"}))
        return (
            f"Note: the base model(s) ({base}) and the instruct model(s) ({inst}) are different "
            "families, so base-vs-instruct differences here mix architecture, data and "
            "fine-tuning: they are not a clean fine-tuning effect."
        )
    return None


def _truncation_note(run_dir: Path, cfg: ExperimentConfig, limit: float = 0.1) -> str | None:
    """Say loudly when many rollouts hit the length cap (CE* is then a lower bound)."""
    path = run_dir / "metrics" / "pooled.parquet"
    if not path.exists():
        return None
    import pandas as pd

    pooled = pd.read_parquet(path)
    if "truncation_rate" not in pooled.columns:
        return None
    bad = pooled[pooled["truncation_rate"] > limit]
    if bad.empty:
        return None
    worst = float(bad["truncation_rate"].max())
    return (
        f"Warning: in {len(bad)} of {len(pooled)} model x task groups more than {limit:.0%} of "
        f"rollouts hit max_new_tokens = {cfg.generation.max_new_tokens} (up to {worst:.0%}): "
        "CE* and GenPPL are lower bounds there (see truncation_bias_bound); raise "
        "generation.max_new_tokens for a measurement rather than a demonstration."
    )


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    stages: list[str] | None = None,
    force: list[str] | None = None,
    console: Console | None = None,
) -> list[StageResult]:
    """Run the study ``cfg`` into the folder ``out``; returns one result per stage."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: keep the tables on one line
    run_dir = Path(out)
    selected = _parse_stage_list(stages, "--stages") or list(cfg.stages)
    forced = set(_parse_stage_list(force, "--force"))
    if "generate" in selected:
        load_prompts(cfg)  # bad prompt files fail here, before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    display = RunDisplay(cfg, console)
    results: dict[str, StageResult] = {}
    with _lock(run_dir):
        if "generate" in forced and "generate" in selected:
            for sub in ("rollouts", "prompts"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            (run_dir / "manifest.json").unlink(missing_ok=True)
        _check_config_compatible(run_dir, cfg)
        atomic_write_text(run_dir / "config.toml", resolved_config_toml(cfg))
        with display.running():
            for stage in STAGE_TABLE:
                result = _run_stage(stage, run_dir, cfg, display, selected, forced, results)
                results[stage.name] = result
                display.add_result(result)
    _print_summary(console, run_dir, cfg, list(results.values()))
    return list(results.values())


def _run_stage(
    stage: Stage,
    run_dir: Path,
    cfg: ExperimentConfig,
    display: RunDisplay,
    selected: list[str],
    forced: set[str],
    results: dict[str, StageResult],
) -> StageResult:
    name = stage.name
    if name not in selected:
        return StageResult(name, "not run", "not selected")
    for need in stage.needs:
        prior = results.get(need)
        need_stage = stage_named(need)
        if (prior is None or prior.status not in ("done", "skipped")) and not _outputs_exist(
            run_dir, need_stage
        ):
            return StageResult(name, "skipped", f"needs {need}")
    if stage.needs_pair and not cfg.variants() >= {"base", "instruct"}:
        return StageResult(name, "skipped", "needs both a base and an instruct model")
    try:
        fn = stage_function(stage)
    except StageUnavailable as exc:
        return StageResult(name, "not available", str(exc))
    display.set_stage(name)
    t0 = time.monotonic()
    if name == "generate":
        if name not in forced and generate_is_done(run_dir, cfg):
            _record_experiment(run_dir, cfg)
            return StageResult(name, "skipped", "all rollouts already in the store")
        detail = run_generate(run_dir, cfg, display, name in forced)
        return StageResult(name, "done", detail, time.monotonic() - t0)
    if name not in forced and stage_is_done(run_dir, stage, cfg):
        return StageResult(name, "skipped", "up to date")
    _marker(run_dir, name).unlink(missing_ok=True)
    try:
        _call(fn, run_dir, **stage.kwargs(cfg, run_dir))
    except Exception as exc:
        log = run_dir / "logs" / f"{name}.log"
        atomic_write_text(log, traceback.format_exc())
        msg = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, CanopyError):
            return StageResult(name, "failed", msg)
        return StageResult(name, "failed", f"{type(exc).__name__}: {msg} (traceback in {log})")
    if not _outputs_exist(run_dir, stage):
        missing = [o for o in stage.outputs if not (run_dir / o).exists()]
        return StageResult(name, "failed", f"finished without writing {', '.join(missing)}")
    seconds = time.monotonic() - t0
    atomic_write_json(
        _marker(run_dir, name),
        {
            "stage": name,
            "fingerprint": stage_fingerprint(run_dir, stage, cfg),
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return StageResult(name, "done", "", seconds)


_ARTEFACTS = [
    ("config.toml", "resolved config"),
    ("manifest.json", "run manifest"),
    ("rollouts", "rollouts (Parquet)"),
    ("metrics", "metrics (Parquet + JSON)"),
    ("semantic", "embeddings and diversity"),
    ("tables", "tables (CSV + Markdown)"),
    ("compare", "comparisons"),
    ("regression", "regression"),
    ("figures", "figures (PNG + PDF)"),
    ("report.html", "report"),
]


def _print_summary(
    console: Console, run_dir: Path, cfg: ExperimentConfig, results: list[StageResult]
) -> None:
    status = Table(title="Stages", title_justify="left", show_header=False, box=None)
    colours = {"done": "green", "skipped": "green", "failed": "red", "not available": "yellow"}
    for r in results:
        secs = f"{r.seconds:.1f}s" if r.seconds else ""
        status.add_row(
            r.name, Text(r.status, style=colours.get(r.status, "dim")), secs, Text(r.detail)
        )
    console.print(status)
    table = headline_table(run_dir)
    if table is not None:
        console.print(table)
    for note in (_truncation_note(run_dir, cfg), _family_note(cfg)):
        if note:
            console.print(f"[bold yellow]{escape(note)}[/]", highlight=False)
    console.print(f"[bold]Results in[/] {run_dir.resolve()}", highlight=False)
    for rel, what in _ARTEFACTS:
        p = run_dir / rel
        if p.exists() and (p.is_file() or any(p.iterdir())):
            console.print(f"  {rel:<14} {what}", highlight=False)


def default_out_dir(cfg: ExperimentConfig) -> Path:
    """./canopy-runs/<config name>."""
    return Path("canopy-runs") / cfg.name


def with_prompts_dir(cfg: ExperimentConfig, prompts_dir: str | Path) -> ExperimentConfig:
    """``--prompts-dir``: every task reads ``<dir>/<task>.jsonl`` (paper layout or plain JSONL)."""
    folder = Path(prompts_dir).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--prompts-dir {prompts_dir} is not a folder; check the path")

    def swap(p: Any) -> Any:
        source = p.source if p.source in ("paper", "jsonl") else "jsonl"
        return dataclasses.replace(p, source=source, path=str(folder))

    cfg = dataclasses.replace(cfg)
    cfg.prompts = swap(cfg.prompts)
    cfg.task_prompts = {t: swap(p) for t, p in cfg.task_prompts.items()}
    return cfg
