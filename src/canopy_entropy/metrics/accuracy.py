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
    if "rate" not in rollouts.columns and "r" in rollouts.columns:  # the saved table's name
        rollouts = rollouts.rename(columns={"r": "rate"})
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
    # a prompt none of whose rollouts gave an answer the scorer could read has no vote at all
    voted = frame.assign(_a=frame["answer"].notna()).groupby(list(PROMPT_KEYS), sort=True)["_a"]
    prompts.loc[~voted.any().to_numpy(), "majority"] = np.nan
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
    frame = scored_frame(run_dir)
    if frame is None:
        raise CanopyError(
            f"{run_dir} has no scores or no per-rollout metrics; run the metrics and score "
            "stages first (a task needs a scorer)"
        )
    return compute_accuracy(frame, by=by)


def compare_auroc(
    frame: pd.DataFrame,
    a: str,
    b: str,
    by: Sequence[str] = ("family", "task"),
    n_boot: int = 2000,
    seed: int = 0,
    a_key: str = "variant",
) -> pd.DataFrame:
    """Paired prompt bootstrap of each uncertainty's AUROC (side ``b`` minus side ``a``), on a
    ``scored_rollouts`` frame: the prompts present on both sides are resampled with the same
    draws as the metric comparison (``comparison.bootstrap.bootstrap_indices``), each draw
    weighting every rollout by how often its prompt was drawn. Rows in the comparison's tidy
    layout, ``metric`` = ``auroc_<measure>``, ``kind`` = ``auroc`` (a difference, not a ratio)."""
    from canopy_entropy.comparison.bootstrap import bootstrap_indices
    from canopy_entropy.comparison.columns import CI_LEVEL, TIDY_COLUMNS, pairing_columns
    from canopy_entropy.scoring.estimators import auroc
    from canopy_entropy.stats.pooling import resample_counts

    by = list(by)
    pair_cols = pairing_columns(by, a_key)
    measures = [m for m in MEASURES if m in frame.columns]
    alpha = (1 - CI_LEVEL) / 2
    rows = []
    sides = frame[frame[a_key].astype(str).isin([a, b])]
    for key, sel in sides.groupby(by, sort=True) if by else [((), sides)]:
        key = key if isinstance(key, tuple) else (key,)
        parts = {s: sel[sel[a_key].astype(str) == s] for s in (a, b)}
        shared = parts[a][pair_cols].drop_duplicates().merge(parts[b][pair_cols].drop_duplicates())
        shared = shared.sort_values(pair_cols, kind="stable").reset_index(drop=True)
        if len(shared) < 2:
            continue
        shared["_p"] = np.arange(len(shared))
        idx = bootstrap_indices(len(shared), n_boot, seed, tuple(str(k) for k in key))
        counts = resample_counts(idx, len(shared))
        for m in measures:
            stats = {}
            for side, part in parts.items():
                g = part.merge(shared, on=pair_cols).dropna(subset=[m])
                u, y = g[m].to_numpy(np.float64), ~g["correct"].to_numpy(bool)
                stats[side] = (auroc(u, y), np.atleast_1d(auroc(u, y, counts[:, g["_p"]])))
            (va, ra), (vb, rb) = stats[a], stats[b]
            row = {**dict(zip(by, key, strict=True)), "metric": f"auroc_{m}", "kind": "auroc",
                   "a": va, "b": vb, "diff": vb - va}  # fmt: skip
            for name, reps in (("a", ra), ("b", rb), ("diff", rb - ra)):
                ok = reps[np.isfinite(reps)]
                row[f"{name}_se"] = float(ok.std(ddof=1)) if len(ok) > 1 else np.nan
                lo, hi = np.quantile(ok, [alpha, 1 - alpha]) if len(ok) else (np.nan, np.nan)
                row[f"{name}_lo"], row[f"{name}_hi"] = float(lo), float(hi)
            row.update(pct=np.nan, pct_se=np.nan, pct_lo=np.nan, pct_hi=np.nan,
                       ratio_lo=np.nan, ratio_hi=np.nan, n_prompts=len(shared),
                       a_label=a, b_label=b)  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *TIDY_COLUMNS])


def scored_frame(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The run's ``scored_rollouts`` frame, or None when the run was not scored."""
    from canopy_entropy.store import read_table

    names = ("scores.rollouts", "metrics.rollouts", "metrics.prompts")
    if not all(artefact_path(run_dir, n).exists() for n in names):
        return None
    scores, rollouts, prompts = (
        read_table(artefact_path(run_dir, n), schema_of(n)).to_pandas() for n in names
    )
    return scored_rollouts(scores, rollouts, prompts)
