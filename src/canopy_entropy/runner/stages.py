"""The stage table of ``canopy run``: what each stage calls, reads, writes and is given.

Stages run in order: generate -> embed -> semantic-entropy -> metrics -> score -> tables ->
compare -> regress -> reward -> plots -> report (semantic-entropy and reward only when the config
enables them). Each names its function as ``"module:function"``, imported when the stage runs; an import
failure is a failed stage (with the reason), never a silently skipped one. Each stage gets
explicit keyword arguments built from the typed config (``options``): the config parser has
already refused any option a stage does not declare (``config.STAGE_OPTIONS``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canopy_entropy.config import STAGES, ExperimentConfig, config_dict
from canopy_entropy.errors import CanopyError


@dataclass(frozen=True)
class Stage:
    """One stage: what it calls, what it reads and writes, which stages it needs."""

    name: str
    target: str  # "module:function", imported when the stage runs
    inputs: tuple[str, ...]  # run-folder paths whose state the outputs depend on
    outputs: tuple[str, ...]  # paths that exist (intact) when the stage is done
    needs: tuple[str, ...] = ()  # stages whose outputs must be there first
    needs_pair: bool = False  # only meaningful with both compared sides present
    options: Callable[[ExperimentConfig], dict[str, Any]] = lambda cfg: {}
    config_key: str = ""  # config section that changes the results (part of the fingerprint)
    what: str = ""
    settings_of: Callable[[ExperimentConfig], Any] | None = None  # instead of config_key
    idle: Callable[[ExperimentConfig], str | None] = lambda cfg: None  # why nothing to do

    def settings(self, cfg: ExperimentConfig) -> Any:
        """The config part that changes this stage's results (fingerprinted)."""
        if self.settings_of is not None:
            return self.settings_of(cfg)
        return config_dict(cfg).get(self.config_key) if self.config_key else None


class StageImportError(CanopyError):
    """A stage's module or function cannot be imported (a broken or partial installation)."""


def _embed_options(cfg: ExperimentConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"encoder": cfg.embed.encoder or None, "batch_size": cfg.embed.batch_size}
    if cfg.embed.prefix is not None:
        kw["prefix"] = cfg.embed.prefix
    return {**kw, **cfg.embed.options}


def _compare_options(cfg: ExperimentConfig) -> dict[str, Any]:
    c = cfg.compare
    return {"a": c.a, "b": c.b, "by": tuple(c.by), "n_boot": c.bootstrap, "seed": c.seed,
            "a_key": c.on, **c.options}  # fmt: skip


def _scored_tasks(cfg: ExperimentConfig) -> dict[str, Any]:
    return {t: cfg.task_spec(t) for t in cfg.tasks if cfg.task_spec(t).scorer}


def _score_options(cfg: ExperimentConfig) -> dict[str, Any]:
    prompts = {t: {"fewshot": cfg.prompts_for(t).fewshot} for t in _scored_tasks(cfg)}
    return {"tasks": _scored_tasks(cfg), "prompts": prompts,
            "execute_code": cfg.scoring.execute_code, "workers": cfg.scoring.workers}  # fmt: skip


def _score_settings(cfg: ExperimentConfig) -> Any:
    from canopy_entropy.scoring.run import scoring_settings

    return scoring_settings(_scored_tasks(cfg), cfg.scoring.execute_code)


def _regress_options(cfg: ExperimentConfig) -> dict[str, Any]:
    ref = {"reference": dict(cfg.regress.reference)} if cfg.regress.reference else {}
    return {"diagnostics": cfg.regress.diagnostics, **cfg.regress.options, **ref}


def _rse_options(cfg: ExperimentConfig) -> dict[str, Any]:
    se = cfg.semantic_entropy
    return {"judge": se.judge, "engine": se.engine, "m": se.m, "seed": se.seed,
            "max_new_tokens": se.max_new_tokens, "judge_prompts": dict(se.judge_prompts),
            "engine_options": dict(se.engine_options)}  # fmt: skip


def _reward_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """The reward stage: its section, plus the compare and regression settings of the run so
    the kept set is analysed the way the raw set is (regression without diagnostics)."""
    r = cfg.reward
    regress = {k: v for k, v in cfg.regress.options.items() if k in ("mean", "precision")}
    if cfg.regress.reference:
        regress["reference"] = dict(cfg.regress.reference)
    return {"model": r.model, "keep": r.keep, "device": r.device, "dtype": r.dtype,
            "max_length": r.max_length, "batch_size": r.batch_size,
            "compare": _compare_options(cfg), "regress": regress}  # fmt: skip


def _plots_options(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"formats": tuple(cfg.plots.formats), "min_active": cfg.plots.min_active}


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
        outputs=("semantic/prompt_diversity.parquet", "semantic/rollout_diversity.parquet"),
        needs=("generate",),
        options=_embed_options,
        config_key="embed",
        what="semantic diversity and Vendi score",
    ),
    Stage(
        "semantic-entropy",
        "canopy_entropy.semantic.rse:rse_run",
        inputs=("rollouts", "prompts"),
        # the verdict cache (semantic/rse_verdicts.parquet) is not an output: a rerun reuses it
        outputs=("semantic/rse.parquet", "semantic/rse.json"),
        needs=("generate",),
        options=_rse_options,
        config_key="semantic_entropy",
        what="relaxed semantic entropy (LLM judge, cached verdicts)",
    ),
    Stage(
        "metrics",
        "canopy_entropy.metrics.phases:write_metrics_and_phases",
        inputs=(
            "manifest.json",
            "rollouts",
            "semantic/prompt_diversity.parquet",
            "semantic/rollout_diversity.parquet",
            "semantic/rse.parquet",
        ),
        outputs=(
            "metrics/prompts.parquet",
            "metrics/pooled.parquet",
            "metrics/rollouts.parquet",
            "metrics/running_rate.parquet",
            "metrics/metrics.json",
        ),
        needs=("generate",),
        options=lambda cfg: {"phase_markers": tuple(cfg.analysis.phase_markers)},
        config_key="analysis",  # the phase split of [analysis] phase_markers
        what="CE*, GenPPL, BF, correlations, decompositions, error bounds",
    ),
    Stage(
        "score",
        "canopy_entropy.scoring.run:score_run",
        inputs=("rollouts", "metrics/rollouts.parquet", "metrics/prompts.parquet"),
        # scores/rollouts.parquet is the per-rollout cache: kept across re-runs, never removed
        outputs=(
            "scores/prompts.parquet",
            "scores/pooled.parquet",
            "scores/uncertainty_link.parquet",
            "scores/accuracy_by_rate.parquet",
        ),
        needs=("generate", "metrics"),
        options=_score_options,
        settings_of=_score_settings,
        idle=lambda cfg: None if _scored_tasks(cfg) else "no task names a scorer",
        what="per-rollout correctness, accuracy, pass@k, AUROC of the uncertainties",
    ),
    Stage(
        "tables",
        "canopy_entropy.runner.summary:write_tables",
        inputs=("metrics/pooled.parquet",),
        outputs=("tables/metrics.csv", "tables/metrics.md"),
        needs=("metrics",),
        what="pooled metrics per model x task (CSV, Markdown)",
    ),
    Stage(
        "compare",
        "canopy_entropy.comparison:compare_run",
        inputs=("metrics", "scores/prompts.parquet"),
        outputs=("compare/comparison.parquet", "compare/length_matched.parquet"),
        needs=("metrics",),
        needs_pair=True,
        options=_compare_options,
        config_key="compare",
        what="paired bootstrap comparison of the two sides",
    ),
    Stage(
        "regress",
        "canopy_entropy.stats.regression:regress_run",
        inputs=("metrics", "scores/prompts.parquet"),
        outputs=("regression/result.json", "regression/panel.parquet"),
        needs=("metrics", "embed"),
        needs_pair=True,
        options=_regress_options,
        config_key="regress",
        what="Beta mixed-effects regression of diversity on entropy rate",
    ),
    Stage(
        "reward",
        "canopy_entropy.reward:reward_run",
        inputs=(
            "rollouts",
            "prompts",
            "metrics",
            "semantic/prompt_diversity.parquet",
            "semantic/rollout_diversity.parquet",
        ),
        # the score cache (reward/scores.parquet) is not an output: a rerun reuses it
        outputs=("reward/selection.parquet", "reward/raw_vs_kept.parquet", "reward/summary.json"),
        needs=("metrics",),
        options=_reward_options,
        config_key="reward",
        what="reward-model filtering: the analyses on each prompt's best-scored rollouts",
    ),
    Stage(
        "plots",
        "canopy_entropy.plots:make_figures",
        inputs=(
            "manifest.json",
            "rollouts",
            "metrics",
            "semantic",
            "compare",
            "regression",
            "scores",
            "diagnostics/answers.parquet",
        ),
        outputs=("figures",),
        needs=("metrics",),
        options=_plots_options,
        config_key="plots",
        what="figures",
    ),
    Stage(
        "report",
        "canopy_entropy.report:build_report",
        inputs=(
            "manifest.json",
            "metrics",
            "semantic",
            "compare",
            "regression",
            "reward",
            "figures",
            "scores",
            "diagnostics/answers.parquet",
        ),
        outputs=("report.html",),
        needs=("metrics",),
        # embed the figures of the plots stage as they are; draw them only when there are none
        options=lambda cfg: {"figures": None, **_plots_options(cfg)},
        config_key="plots",
        what="self-contained HTML report",
    ),
)
assert tuple(s.name for s in STAGE_TABLE) == STAGES


def stage_named(name: str) -> Stage:
    """The STAGE_TABLE entry called ``name``."""
    return next(s for s in STAGE_TABLE if s.name == name)


def stage_function(stage: Stage) -> Callable[..., Any]:
    """Import the function a stage calls; StageImportError (with the reason) when it cannot."""
    module_name, func_name = stage.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise StageImportError(
            f"stage '{stage.name}' cannot import {module_name} ({missing}: {exc}); reinstall "
            "canopy-entropy with the extras this stage needs (pip install -e '.[all]')"
        ) from exc
    fn = getattr(module, func_name, None)
    if fn is None:
        raise StageImportError(
            f"stage '{stage.name}': {module_name} has no {func_name}(); the installation is "
            "inconsistent, reinstall canopy-entropy"
        )
    return fn


def stage_outputs(run_dir: Path, stage: Stage) -> list[Path]:
    return [run_dir / rel for rel in stage.outputs]
