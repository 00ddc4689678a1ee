"""``canopy run``: every stage of a study from one config, resumable, into one results folder.

Resumability: generation is resumable inside the engine loop (one atomic shard per prompt,
seeds that depend only on (run seed, prompt id, rollout index)); the generate stage is done when
the store holds every configured rollout. Every later stage records how it ended in
``RUN/.canopy/stages/<stage>.json`` (``run.freshness``) and is skipped only while its inputs and
settings are unchanged and its outputs intact. A stage that runs first removes its old outputs,
so a failure never leaves stale results that look current; stages that need a failed stage are
skipped and say so. ``force`` redoes a stage (for generate: deletes the rollouts first).

Sharded jobs (``shard``): N jobs fill one folder concurrently, each sampling its fixed share of
the (model, prompt chunk) units; they share the folder lock (an unsharded run holds it
exclusively), record how they stand in ``RUN/.canopy/shards/I-of-N.json`` (one file per job, so
no job rewrites another's record) and never run the analysis stages: a final unsharded run
does, generating nothing when every unit is in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import shutil
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from canopy_entropy.config import STAGES, ExperimentConfig, resolved_config_toml
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.generate import Shard
from canopy_entropy.run import freshness
from canopy_entropy.runner import ray_pool
from canopy_entropy.runner.display import RunDisplay, StageResult
from canopy_entropy.runner.generation import (
    check_run_folder,
    generate_is_done,
    load_prompts,
    record_experiment,
    run_generate,
)
from canopy_entropy.runner.stages import STAGE_TABLE, Stage, stage_function, stage_named
from canopy_entropy.runner.summary import print_summary
from canopy_entropy.store import atomic_write_json, atomic_write_text, clean_stale_temps
from canopy_entropy.threads import configure_threads


@contextlib.contextmanager
def run_lock(run_dir: Path, shared: bool = False) -> Iterator[None]:
    """The folder lock (it dies with the process): an unsharded run holds it alone; shard
    jobs (and ``canopy generate``) share it, since their writes never collide."""
    import fcntl

    path = run_dir / ".canopy" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            who = "an unsharded 'canopy run'" if shared else "another run or shard job"
            raise CanopyError(
                f"{who} is using {run_dir}; wait for it to finish or use another folder"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def shard_record_path(run_dir: Path, shard: Shard) -> Path:
    return run_dir / ".canopy" / "shards" / f"{shard.index}-of-{shard.count}.json"


def _record_shard(run_dir: Path, shard: Shard, state: str, detail: str = "") -> None:
    """How shard job ``shard`` stands (its own file: concurrent jobs never share one)."""
    atomic_write_json(
        shard_record_path(run_dir, shard),
        {
            "shard": str(shard),
            "state": state,
            "detail": detail,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def parse_stage_list(names: list[str] | None, what: str) -> list[str]:
    """Stage names from comma-separated strings, each checked (with a suggestion)."""
    out = []
    for name in names or ():
        for part in str(name).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in STAGES:
                close = difflib.get_close_matches(part, STAGES, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"use some of {list(STAGES)}"
                raise ConfigError(f"unknown stage '{part}' in {what}; {hint}")
            out.append(part)
    return out


def _pair_problem(stage: Stage, cfg: ExperimentConfig) -> str | None:
    """Why a stage has nothing to do (a two-sided one nothing to compare) here, or None."""
    idle = stage.idle(cfg)
    if idle:
        return idle
    if not stage.needs_pair:
        return None
    if stage.name == "compare" and cfg.compare.on == "model":
        return None  # both labels were checked against the models by the config parser
    if stage.name == "compare":
        missing = {cfg.compare.a, cfg.compare.b} - cfg.variants()
        return f"needs models of variant {sorted(missing)}" if missing else None
    if not cfg.variants() >= {"base", "instruct"}:
        return "needs both a base and an instruct model"
    return None


@dataclass(frozen=True)
class Plan:
    """What ``canopy run`` would do: models, tasks, prompts, rollouts and stages."""

    out: Path
    models: tuple[tuple[str, str, str], ...]  # (label, variant, family)
    prompts: dict[str, int]  # task -> prompts
    rollouts: int
    stages: tuple[tuple[str, str], ...]  # (stage, what it will do)
    backend: str | None = None  # where the Ray workers would run ([engine] backend = 'ray')

    def lines(self) -> list[str]:
        total = sum(self.prompts.values()) * len(self.models)
        out = [f"run folder: {self.out}"]
        if self.backend is not None:
            out.append(f"backend: {self.backend}")
        out += [
            f"model {label} ({variant}, family {family})" for label, variant, family in self.models
        ]
        out += [f"task {t}: {n} prompts" for t, n in self.prompts.items()]
        out.append(
            f"{self.rollouts} rollouts per prompt: {total * self.rollouts:,} rollouts in all"
        )
        out += [f"stage {name}: {what}" for name, what in self.stages]
        return out


def plan_run(
    cfg: ExperimentConfig,
    out: str | Path,
    stages: list[str] | None = None,
    force: list[str] | None = None,
) -> Plan:
    """Validate everything a run needs (config, stage lists, ray for the Ray backend, prompt
    files, the run folder's provenance) without writing anything; returns what the run would
    do."""
    run_dir = Path(out)
    selected = parse_stage_list(stages, "--stages") or list(cfg.stages)
    forced = set(parse_stage_list(force, "--force"))
    backend = None
    if cfg.engine.backend == "ray":  # ray importable; the cluster named, not contacted
        backend = ray_pool.check(cfg.engine.ray, cfg.engine.workers)
    prompts = load_prompts(cfg)
    if "generate" not in forced and (run_dir / "rollouts").is_dir():
        check_run_folder(run_dir, cfg, prompts)
    rows = []
    for stage in STAGE_TABLE:
        if stage.name not in selected:
            continue
        problem = _pair_problem(stage, cfg)
        what = f"skipped ({problem})" if problem else stage.what
        rows.append((stage.name, what + (" (forced)" if stage.name in forced else "")))
    return Plan(
        out=run_dir,
        models=tuple((m.label, m.variant, m.family) for m in cfg.models),
        prompts={t: len(p) for t, p in prompts.items()},
        rollouts=cfg.generation.rollouts,
        stages=tuple(rows),
        backend=backend,
    )


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    stages: list[str] | None = None,
    force: list[str] | None = None,
    console: Console | None = None,
    shard: Shard | None = None,
) -> list[StageResult]:
    """Run the study ``cfg`` into the folder ``out``; returns one result per stage.
    ``shard``: only that job's share of the generation, no analysis stage."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: keep the tables on one line
    run_dir = Path(out)
    selected = parse_stage_list(stages, "--stages") or list(cfg.stages)
    forced = set(parse_stage_list(force, "--force"))
    if shard is not None and "generate" not in selected:
        raise ConfigError("a shard job only generates; select the generate stage")
    if shard is not None and "generate" in forced:
        raise ConfigError(
            "forcing generate deletes every shard's rollouts; do it in an unsharded run first"
        )
    if "generate" in selected:
        load_prompts(cfg)  # bad prompt files fail here, before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    display = RunDisplay(cfg, console)
    results: dict[str, StageResult] = {}
    with run_lock(run_dir, shared=shard is not None):
        configure_threads()  # deliberate thread counts (the summary prints them)
        clean_stale_temps(run_dir)
        if "generate" in forced and "generate" in selected:
            for sub in ("rollouts", "prompts"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            (run_dir / "manifest.json").unlink(missing_ok=True)
        if (run_dir / "rollouts").is_dir():
            check_run_folder(run_dir, cfg, load_prompts(cfg))
        atomic_write_text(run_dir / "config.toml", resolved_config_toml(cfg))
        if shard is not None:
            _record_shard(run_dir, shard, "started")
        with display.running():
            for stage in STAGE_TABLE:
                if shard is not None and stage.name != "generate":
                    result = StageResult(stage.name, "not run", "shard job: generate only")
                else:
                    result = _run_stage(
                        stage, run_dir, cfg, display, selected, forced, results, shard
                    )
                results[stage.name] = result
                display.add_result(result)
        if shard is not None:
            gen = results["generate"]
            _record_shard(
                run_dir, shard, "done" if gen.status != "failed" else "failed", gen.detail
            )
    print_summary(console, run_dir, cfg, list(results.values()))
    return list(results.values())


def _needs_problem(stage: Stage, run_dir: Path, results: dict[str, StageResult]) -> str | None:
    """Why a stage cannot run on what the stages it needs left (failed, missing, damaged)."""
    for need in stage.needs:
        prior = results.get(need)
        if prior is not None and prior.status == "failed":
            return f"needs {need}, which failed"
        if prior is not None and prior.status == "done":
            continue
        problem = freshness.outputs_problem(run_dir, stage_named(need).outputs)
        if problem:
            return f"needs {need} ({problem})"
    return None


def _run_stage(
    stage: Stage,
    run_dir: Path,
    cfg: ExperimentConfig,
    display: RunDisplay,
    selected: list[str],
    forced: set[str],
    results: dict[str, StageResult],
    shard: Shard | None = None,
) -> StageResult:
    name = stage.name
    if name not in selected:
        return StageResult(name, "not run", "not selected")
    problem = _needs_problem(stage, run_dir, results) or _pair_problem(stage, cfg)
    if problem:
        if "which failed" in problem or stage.idle(cfg):  # earlier outputs are stale now
            _remove_outputs(run_dir, stage)
        return StageResult(name, "skipped", problem)
    display.set_stage(name)
    t0 = time.monotonic()
    try:
        if name == "generate":
            if name not in forced and generate_is_done(run_dir, cfg, shard):
                record_experiment(run_dir, cfg)
                return StageResult(name, "skipped", "all rollouts already in the store")
            detail = run_generate(run_dir, cfg, display, stage_function(stage), shard)
            return StageResult(name, "done", detail, time.monotonic() - t0)
        settings = stage.settings(cfg)
        if name not in forced and freshness.is_fresh(
            run_dir, name, stage.inputs, stage.outputs, settings
        ):
            return StageResult(name, "skipped", "up to date")
        damaged = freshness.outputs_problem(run_dir, stage.outputs)
        _remove_outputs(run_dir, stage)
        stage_function(stage)(run_dir, **stage.options(cfg))
    except Exception as exc:
        return _failed(run_dir, name, exc)
    missing = freshness.outputs_problem(run_dir, stage.outputs)
    if missing:
        freshness.write_marker(run_dir, name, status="failed", detail=missing)
        return StageResult(name, "failed", f"finished without its outputs: {missing}")
    seconds = time.monotonic() - t0
    fingerprint = freshness.input_fingerprint(run_dir, stage.inputs, settings)
    freshness.write_marker(run_dir, name, status="done", fingerprint=fingerprint, seconds=seconds)
    note = f"recomputed: {damaged}" if damaged and "missing" not in damaged else ""
    return StageResult(name, "done", note, seconds)


def _remove_outputs(run_dir: Path, stage: Stage) -> None:
    """Old outputs go before a stage re-runs: a failure must not leave them looking current."""
    freshness.marker_path(run_dir, stage.name).unlink(missing_ok=True)
    for rel in stage.outputs:
        path = run_dir / rel
        if path.is_file():
            path.unlink()


def _failed(run_dir: Path, name: str, exc: BaseException) -> StageResult:
    log = run_dir / "logs" / f"{name}.log"
    msg = str(exc).splitlines()[0] if str(exc) else ""
    detail = msg if isinstance(exc, CanopyError) else f"{type(exc).__name__}: {msg}"
    with contextlib.suppress(OSError):  # a read-only or full disk must not hide the failure
        atomic_write_text(log, traceback.format_exc())
        detail += f" (details in {log})"
    with contextlib.suppress(OSError):
        freshness.write_marker(run_dir, name, status="failed", detail=detail)
    return StageResult(name, "failed", detail)


def default_out_dir(cfg: ExperimentConfig) -> Path:
    """./canopy-runs/<config name>."""
    return Path("canopy-runs") / cfg.name


def with_prompts_dir(cfg: ExperimentConfig, prompts_dir: str | Path) -> ExperimentConfig:
    """``--prompts-dir``: every task reads ``<dir>/<task>.jsonl`` (paper layout or plain JSONL)."""
    folder = Path(prompts_dir).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"prompts folder {prompts_dir} is not a folder; check the path")

    def swap(p: Any) -> Any:
        source = p.source if p.source in ("paper", "jsonl") else "jsonl"
        return dataclasses.replace(p, source=source, path=str(folder))

    cfg = dataclasses.replace(cfg)
    cfg.prompts = swap(cfg.prompts)
    cfg.task_prompts = {t: swap(p) for t, p in cfg.task_prompts.items()}
    return cfg
