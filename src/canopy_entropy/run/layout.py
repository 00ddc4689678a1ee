"""The run folder's contract: every artefact's path, schema tag and key columns, in one place.

Writers and readers name artefacts (``ARTEFACTS["metrics.pooled"]``), never spell paths; a
Parquet artefact carries its schema tag in the file's key-value metadata (``canopy.schema``) and
is checked against it on read. Keys are defined once here: a *group* is (model, variant, family,
task), a *prompt* adds ``prompt_id``, a *rollout* adds ``rollout_index``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GROUP_KEYS = ("model", "variant", "family", "task")
PROMPT_KEYS = (*GROUP_KEYS, "prompt_id")
ROLLOUT_KEYS = (*PROMPT_KEYS, "rollout_index")
VARIANTS = ("base", "instruct")


@dataclass(frozen=True)
class Artefact:
    """One file or folder of a run: where it lives, what it holds, which stage writes it."""

    name: str
    path: str  # relative to the run folder
    schema: str | None  # Parquet schema tag (None: JSON/HTML/folder)
    keys: tuple[str, ...]  # the columns that identify a row
    stage: str  # the stage (or command) that writes it

    def at(self, run_dir: str | os.PathLike[str]) -> Path:
        return Path(run_dir) / self.path


_ALL = (
    Artefact("config", "config.toml", None, (), "run"),
    Artefact("manifest", "manifest.json", None, (), "generate"),
    Artefact("rollouts", "rollouts", "canopy-rollouts/1", ROLLOUT_KEYS, "generate"),
    Artefact("prompts", "prompts", "canopy-prompts/1", PROMPT_KEYS, "generate"),
    Artefact("metrics.rollouts", "metrics/rollouts.parquet", "canopy-rollout-metrics/1", ROLLOUT_KEYS, "metrics"),
    Artefact("metrics.running_rate", "metrics/running_rate.parquet", "canopy-running-rate/1", (*GROUP_KEYS, "position"), "metrics"),
    Artefact("metrics.prompts", "metrics/prompts.parquet", "canopy-metrics/1", PROMPT_KEYS, "metrics"),
    Artefact("metrics.pooled", "metrics/pooled.parquet", "canopy-metrics/1", (), "metrics"),
    Artefact("metrics.json", "metrics/metrics.json", None, (), "metrics"),
    Artefact("scores.rollouts", "scores/rollouts.parquet", "canopy-scores/1", ROLLOUT_KEYS, "score"),
    Artefact("scores.prompts", "scores/prompts.parquet", "canopy-accuracy/1", PROMPT_KEYS, "score"),
    Artefact("scores.pooled", "scores/pooled.parquet", "canopy-accuracy/1", (), "score"),
    Artefact("scores.link", "scores/uncertainty_link.parquet", "canopy-accuracy/1", (), "score"),
    Artefact("scores.bins", "scores/accuracy_by_rate.parquet", "canopy-accuracy/1", (), "score"),
    Artefact("semantic.embeddings", "semantic/embeddings", "canopy-embeddings/1", ROLLOUT_KEYS, "embed"),
    Artefact("semantic.prompts", "semantic/prompt_diversity.parquet", "canopy-prompt-diversity/1", PROMPT_KEYS, "embed"),
    Artefact("semantic.rollouts", "semantic/rollout_diversity.parquet", "canopy-rollout-diversity/1", ROLLOUT_KEYS, "embed"),
    Artefact("semantic.info", "semantic/embed.json", None, (), "embed"),
    Artefact("semantic.rse", "semantic/rse.parquet", "canopy-rse/1", PROMPT_KEYS, "semantic-entropy"),
    Artefact("semantic.rse_verdicts", "semantic/rse_verdicts.parquet", "canopy-rse-verdicts/1", (), "semantic-entropy"),
    Artefact("compare.table", "compare/comparison.parquet", "canopy-comparison/1", (), "compare"),
    Artefact("compare.length_matched", "compare/length_matched.parquet", "canopy-length-matched/1", (), "compare"),
    Artefact("regression.result", "regression/result.json", None, (), "regress"),
    Artefact("regression.panel", "regression/panel.parquet", "canopy-regression-panel/1", PROMPT_KEYS, "regress"),
    Artefact("regression.curves", "regression/curves.parquet", "canopy-regression-panel/1", (), "regress"),
    Artefact("regression.diagnostics", "regression/diagnostics.json", None, (), "regress"),
    Artefact("regression.residuals", "regression/diagnostics.parquet", "canopy-regression-panel/1", PROMPT_KEYS, "regress"),
    Artefact("reward.scores", "reward/scores.parquet", "canopy-reward-scores/1", (), "reward"),
    Artefact("reward.selection", "reward/selection.parquet", "canopy-reward-selection/1", ROLLOUT_KEYS, "reward"),
    Artefact("reward.raw_vs_kept", "reward/raw_vs_kept.parquet", "canopy-reward-raw-vs-kept/1", (), "reward"),
    Artefact("reward.summary", "reward/summary.json", None, (), "reward"),
    Artefact("tables", "tables", None, (), "tables"),
    Artefact("figures", "figures", None, (), "plots"),
    Artefact("report", "report.html", None, (), "report"),
    Artefact("logs", "logs", None, (), "run"),
    Artefact("state", ".canopy", None, (), "run"),
)  # fmt: skip
ARTEFACTS: dict[str, Artefact] = {a.name: a for a in _ALL}


def artefact_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """The path of artefact ``name`` inside ``run_dir``."""
    return ARTEFACTS[name].at(run_dir)


def schema_of(name: str) -> str:
    """The Parquet schema tag of artefact ``name``."""
    tag = ARTEFACTS[name].schema
    if tag is None:
        raise KeyError(f"artefact {name!r} is not a Parquet table")
    return tag
