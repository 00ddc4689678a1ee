"""Correctness joined with the trajectory metrics: accuracy, pass@k and majority vote per
prompt and pooled, how well each per-rollout uncertainty predicts an incorrect rollout (AUROC,
AUPRC, pooled over prompts) and accuracy by entropy-rate decile.

Inputs are the per-rollout scores (``RUN/scores/rollouts.parquet``, written by the score stage)
and the per-rollout metrics (``RUN/metrics/rollouts.parquet``), joined on the rollout keys; the
relaxed semantic entropy of a prompt (when computed) is every one of its rollouts' RSE value.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError
from canopy_entropy.run.layout import PROMPT_KEYS, ROLLOUT_KEYS, artefact_path, schema_of
from canopy_entropy.scoring.estimators import (
    accuracy_by_bin,
    pool_correctness,
    prompt_correctness,
    uncertainty_link,
)

BY = ("model", "variant", "family", "task")
PASS_KS = (1, 5, 10)
# per-rollout uncertainties, as the metrics name them -> what the tables call them
MEASURES = {"rate": "entropy rate", "H": "CE* (rollout entropy)", "surprisal": "surprisal",
            "rse": "RSE"}  # fmt: skip
# per-prompt correctness columns merged into the metrics (compare, regression panel)
PROMPT_COLUMNS = ("accuracy", "majority", *(f"pass_at_{k}" for k in PASS_KS[1:]))
_ARTEFACTS = {"prompts": "scores.prompts", "pooled": "scores.pooled", "link": "scores.link",
              "bins": "scores.bins"}  # fmt: skip


@dataclass
class AccuracyResult:
    """Correctness tables of a run (typed frames; ``save`` writes them to RUN/scores/)."""

    prompts: pd.DataFrame  # one row per prompt: n_rollouts, n_correct, accuracy, pass_at_k, ...
    pooled: pd.DataFrame  # per group: unweighted means over prompts
    link: pd.DataFrame  # per group x measure: auroc, auprc, incorrect_rate, ...
    bins: pd.DataFrame  # per group x entropy-rate decile: lo, hi, n_rollouts, accuracy, CI

    def save(self, run_dir: str | os.PathLike[str]) -> list[Path]:
        from canopy_entropy.store import atomic_write_table

        paths = []
        for attr, name in _ARTEFACTS.items():
            path = artefact_path(run_dir, name)
            table = pa.Table.from_pandas(getattr(self, attr), preserve_index=False)
            atomic_write_table(path, table, schema_of(name))
            paths.append(path)
        return paths

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> AccuracyResult:
        """The saved tables (verified); CanopyError naming the command when absent."""
        from canopy_entropy.store import read_table

        frames = {}
        for attr, name in _ARTEFACTS.items():
            path = artefact_path(run_dir, name)
            if not path.exists():
                raise CanopyError(
                    f"{run_dir} has no correctness scores ({path.name} is missing); run "
                    f"'canopy run' with a task that names a scorer"
                )
            frames[attr] = read_table(path, schema_of(name)).to_pandas()
        return cls(**frames)


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, ...]:
    """The Wilson score interval of a binomial share k/n (stays inside [0, 1], sane at 0 and n)."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def scored_rollouts(
    scores: pd.DataFrame, rollouts: pd.DataFrame, prompts: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Scores joined with the per-rollout metrics (and the prompt's RSE when present)."""
    keys = list(ROLLOUT_KEYS)
    measures = [m for m in MEASURES if m in rollouts.columns]
    frame = scores[[*keys, "correct", "score", "answer"]].merge(
        rollouts[[*keys, *measures]], on=keys, how="inner", validate="one_to_one"
    )
    if len(frame) < len(scores):
        warnings.warn(
            f"{len(scores) - len(frame)} scored rollouts have no metrics row; recompute the "
            "metrics (canopy metrics RUN)",
            stacklevel=2,
        )
    if prompts is not None and "rse" in prompts.columns:
        rse = prompts[[*PROMPT_KEYS, "rse"]]
        frame = frame.merge(rse, on=list(PROMPT_KEYS), how="left", validate="many_to_one")
        if frame["rse"].isna().all():
            frame = frame.drop(columns="rse")
    return frame


def compute_accuracy(
    frame: pd.DataFrame, by: Sequence[str] = BY, n_bins: int = 10
) -> AccuracyResult:
    """The correctness tables of a ``scored_rollouts`` frame, grouped by ``by``."""
    by = list(by)
    n_max = int(frame.groupby(list(PROMPT_KEYS)).size().max())
    ks = [k for k in PASS_KS if k <= n_max]
    with warnings.catch_warnings():  # prompts with fewer rollouts than k: NaN, by design
        warnings.simplefilter("ignore")
        prompts = prompt_correctness(frame, ks=ks)
    pooled = pool_correctness(prompts, by=by)
    measures = [m for m in MEASURES if m in frame.columns]
    link = uncertainty_link(frame, measures, by=by)
    link.insert(len(by) + 1, "label", link["measure"].map(MEASURES))
    bins = accuracy_by_bin(frame, "rate", n_bins=n_bins, by=by)
    correct = (bins["accuracy"] * bins["n_rollouts"]).round().to_numpy()
    bins["ci_lo"], bins["ci_hi"] = wilson_interval(correct, bins["n_rollouts"].to_numpy())
    return AccuracyResult(prompts=prompts, pooled=pooled, link=link, bins=bins)


def merge_accuracy(prompts: pd.DataFrame, run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``prompts`` (metrics per prompt) with the per-prompt correctness columns added, when the
    run has scores for the same rollouts (a prompt scored on another rollout count gets none)."""
    path = artefact_path(run_dir, "scores.prompts")
    if not path.exists():
        return prompts
    from canopy_entropy.store import read_table

    acc = read_table(path, schema_of("scores.prompts")).to_pandas()
    cols = [c for c in PROMPT_COLUMNS if c in acc.columns and c not in prompts.columns]
    if not cols or "n_rollouts" not in prompts.columns:
        return prompts
    keys = list(PROMPT_KEYS)
    acc = acc.rename(columns={"n_rollouts": "_scored"})
    merged = prompts.merge(acc[[*keys, "_scored", *cols]], on=keys, how="left",
                           validate="one_to_one")  # fmt: skip
    stale = merged["_scored"].notna() & (merged["_scored"] != merged["n_rollouts"])
    merged.loc[stale, cols] = np.nan
    return merged.drop(columns="_scored")


def accuracy_run(run_dir: str | os.PathLike[str], by: Sequence[str] = BY) -> AccuracyResult:
    """The correctness tables of a run folder from its saved scores and metrics (in memory)."""
    from canopy_entropy.store import read_table

    scores_path = artefact_path(run_dir, "scores.rollouts")
    metrics_path = artefact_path(run_dir, "metrics.rollouts")
    for path, what in ((scores_path, "scores (the score stage)"),
                       (metrics_path, "per-rollout metrics (canopy metrics)")):  # fmt: skip
        if not path.exists():
            raise CanopyError(f"{run_dir} has no {what}: {path} is missing; run that stage first")
    scores = read_table(scores_path, schema_of("scores.rollouts")).to_pandas()
    rollouts = read_table(metrics_path, schema_of("metrics.rollouts")).to_pandas()
    prompts_path = artefact_path(run_dir, "metrics.prompts")
    prompts = read_table(prompts_path, schema_of("metrics.prompts")).to_pandas()
    return compute_accuracy(scored_rollouts(scores, rollouts, prompts), by=by)
