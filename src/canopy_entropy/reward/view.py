"""The reward-filtered view of a run: keep each prompt's best-scored rollouts and recompute
metrics, diversity, the comparison and the regression on them, beside the raw results.

``select_top`` keeps, per prompt, the ``ceil(keep * M)`` rollouts with the highest reward
(ties: the lower rollout index first). ``KeptRollouts`` streams the run's store through that
selection, so the metrics are computed by the same ``compute_metrics`` as the raw ones; the
kept set's diversity comes from the cached embeddings. The view is written as a run-shaped
folder, ``RUN/reward/`` (metrics/, semantic/, compare/, regression/, tables/), so every reader
of a run folder reads it too; ``raw_vs_kept.parquet`` sets the pooled metrics side by side.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.run.layout import PROMPT_KEYS, ROLLOUT_KEYS, artefact_path, schema_of
from canopy_entropy.store import KEY_COLUMNS, RunStore, atomic_write_json, atomic_write_table, slug

DEFAULT_KEEP = 0.7
_SEP = "\x1f"
# pooled metrics set side by side in raw_vs_kept (those present in both)
COMPARED_METRICS = (
    "ce_star", "genppl", "bf", "entropy_rate", "mean_length", "length_entropy", "pearson",
    "truncation_rate", "diversity", "vendi",
)  # fmt: skip
# what the view folder holds (cleared before a new view is written; the score cache stays)
VIEW_PARTS = ("metrics", "semantic", "compare", "regression", "tables", "figures")


def check_keep(keep: float) -> None:
    """A one-line error unless 0 < keep <= 1."""
    if not (isinstance(keep, (int, float)) and 0.0 < float(keep) <= 1.0):
        raise ConfigError(f"keep must be a fraction in (0, 1] (got {keep!r}); e.g. 0.7")


def kept_count(m: np.ndarray | int, keep: float) -> np.ndarray:
    """``ceil(keep * M)`` rollouts kept of M (rounded to 9 decimals first, so 0.7 * 10 is 7)."""
    return np.ceil(np.round(np.asarray(m, dtype=np.float64) * keep, 9)).astype(np.int64)


def select_top(scores: pd.DataFrame, keep: float = DEFAULT_KEEP) -> pd.DataFrame:
    """``scores`` (ROLLOUT_KEYS + score) with ``rank`` (0 = best within its prompt) and
    ``kept`` (the prompt's ``ceil(keep * M)`` best; ties broken by the lower rollout index)."""
    check_keep(keep)
    frame = scores[[*ROLLOUT_KEYS, "score"]].reset_index(drop=True)
    score = frame["score"].to_numpy(dtype=np.float64)
    if not np.isfinite(score).all():
        raise CanopyError("reward scores contain NaN or inf; re-score the run")
    group = frame.groupby(list(PROMPT_KEYS), sort=True, observed=True).ngroup().to_numpy()
    ridx = frame["rollout_index"].to_numpy(dtype=np.int64)
    order = np.lexsort((ridx, -score, group))
    sizes = np.bincount(group)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(frame), dtype=np.int64)
    rank[order] = np.arange(len(frame)) - starts[group[order]]
    frame["rank"] = rank.astype(np.int32)
    frame["kept"] = rank < kept_count(sizes, keep)[group]
    return frame.sort_values(list(ROLLOUT_KEYS)).reset_index(drop=True)


def _joined(columns: Sequence[pa.Array]) -> pa.Array:
    return pc.binary_join_element_wise(*columns, _SEP)


class KeptRollouts:
    """The run's rollouts restricted to a selection, streamed batch by batch (bounded memory);
    a rollout source for ``compute_metrics`` (it reads ``iter_batches``)."""

    def __init__(self, run_dir: str | os.PathLike[str], kept: pd.DataFrame):
        self.store = RunStore(run_dir)
        cols = [kept[c].astype(str).to_numpy() for c in ROLLOUT_KEYS]
        self.keys = _joined([pa.array(c, pa.string()) for c in cols])
        self.n_rollouts = len(kept)

    def iter_batches(
        self, columns: Sequence[str], batch_size: int = 1024
    ) -> Iterator[pa.RecordBatch]:
        read = list(dict.fromkeys([*columns, *ROLLOUT_KEYS]))
        for batch in self.store.iter_batches(columns=read, batch_size=batch_size):
            parts = [batch.column(c) for c in PROMPT_KEYS]
            parts.append(pc.cast(batch.column("rollout_index"), pa.string()))
            mask = pc.is_in(_joined(parts), value_set=self.keys)
            yield batch.filter(mask).select(list(columns))


def kept_diversity(
    run_dir: str | os.PathLike[str], kept_keys: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Per-prompt and per-rollout diversity of the kept rollouts (``kept_keys``: ROLLOUT_KEYS +
    length) from the run's cached embeddings; None when the embed stage has not run."""
    from canopy_entropy.plots import data
    from canopy_entropy.semantic.diversity import diversity_tables
    from canopy_entropy.semantic.embed import EMBED_SCHEMA_VERSION
    from canopy_entropy.store import read_table

    run = Path(run_dir)
    try:
        info = data.embed_info(run)
    except data.MissingInput:
        return None
    name, prefix = str(info["encoder"]), str(info["prefix"])
    frames, vectors = [], []
    for shard, rows in kept_keys.groupby(list(KEY_COLUMNS), sort=True, observed=True):
        path = run / "semantic" / "embeddings" / f"{slug(*shard, name, prefix)}.parquet"
        if not path.exists():
            raise CanopyError(
                f"no cached embeddings for {'/'.join(shard)} ({path.name}); re-run 'canopy embed "
                f"{run}' first"
            )
        table = read_table(path, EMBED_SCHEMA_VERSION, columns=["prompt_id", "rollout_index",
                                                                "embedding"])  # fmt: skip
        vecs = table.column("embedding").combine_chunks()
        flat = vecs.flatten().to_numpy(zero_copy_only=False).reshape(-1, vecs.type.list_size)
        index = table.select(["prompt_id", "rollout_index"]).to_pandas()
        index["_row"] = np.arange(len(index))
        rows = rows.merge(index, on=["prompt_id", "rollout_index"], how="left")
        if rows["_row"].isna().any():
            raise CanopyError(
                f"the embeddings of {'/'.join(shard)} miss {int(rows['_row'].isna().sum())} kept "
                f"rollouts; re-run 'canopy embed {run}' first"
            )
        frames.append(rows.drop(columns="_row"))
        vectors.append(flat[rows["_row"].to_numpy(np.int64)])
    keys = pd.concat(frames, ignore_index=True)
    return diversity_tables(keys[[*ROLLOUT_KEYS, "length"]], np.concatenate(vectors))


@dataclass
class RewardResult:
    """A reward filtering of a run: the scores and selection, the kept set's metrics (and,
    when they could be computed, comparison and regression), the raw-vs-kept table, notes."""

    reward_model: str
    keep: float
    selection: pd.DataFrame
    metrics: Any  # MetricsResult of the kept rollouts (diversity merged)
    raw_vs_kept: pd.DataFrame
    comparison: Any = None  # CompareResult of the kept set
    regression: Any = None  # RegressionResult of the kept set
    n_scored: int = 0
    n_cached: int = 0
    seconds_scoring: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON summary written to RUN/reward/summary.json."""
        sel = self.selection
        return {
            "reward_model": self.reward_model,
            "keep": self.keep,
            "n_rollouts": len(sel),
            "n_kept": int(sel["kept"].sum()),
            "n_prompts": int(sel.groupby(list(PROMPT_KEYS), observed=True).ngroups),
            "n_scored": self.n_scored,
            "n_cached": self.n_cached,
            "seconds_scoring": self.seconds_scoring,
            "comparison": self.comparison is not None,
            "regression": self.regression is not None,
            "notes": list(self.notes),
        }


def raw_vs_kept(raw: pd.DataFrame, kept: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Long table: per ``by`` group and metric, the raw and the kept pooled value, their
    difference and the % change (kept vs raw)."""
    metrics = [c for c in COMPARED_METRICS if c in raw.columns and c in kept.columns]
    keys = list(by)
    long = []
    for name, frame in (("raw", raw), ("kept", kept)):
        part = frame[[*keys, *metrics]].melt(id_vars=keys, var_name="metric", value_name=name)
        long.append(part)
    out = long[0].merge(long[1], on=[*keys, "metric"], how="outer")
    out["diff"] = out["kept"] - out["raw"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["pct"] = 100.0 * out["diff"] / out["raw"].abs()
    order = {m: i for i, m in enumerate(metrics)}
    out["_o"] = out["metric"].map(order)
    return out.sort_values([*keys, "_o"]).drop(columns="_o").reset_index(drop=True)


def reward_run(
    run_dir: str | os.PathLike[str],
    model: Any,
    keep: float = DEFAULT_KEEP,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int = 4096,
    batch_size: int = 8,
    compare: dict[str, Any] | None = None,
    regress: dict[str, Any] | None = None,
    fit_regression: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> RewardResult:
    """The reward stage: score every rollout (cached), keep the top ``keep`` share per prompt,
    recompute metrics, diversity, comparison (``compare``: a, b, by, n_boot, seed, a_key, as
    the compare stage) and the regression (``regress``: regress_panel's options, e.g. mean,
    precision, reference; default: the specification of the run's own regression, else the
    published one; fitted without diagnostics) on the kept set, and write it all to
    ``RUN/reward/`` beside the raw results in RUN/. The comparison and the regression are left
    out, with a note, when the run lacks the second side or the diversity, or the fit fails."""
    from canopy_entropy.comparison import compare as compare_metrics
    from canopy_entropy.metrics import current_metrics
    from canopy_entropy.metrics.pool import _warn_notes
    from canopy_entropy.metrics.result import merge_diversity, metrics_inputs
    from canopy_entropy.reward.score import score_run
    from canopy_entropy.semantic.embed import (
        PROMPT_DIVERSITY_SCHEMA_VERSION,
        ROLLOUT_DIVERSITY_SCHEMA_VERSION,
    )
    from canopy_entropy.stats.regression import panel_from_metrics, regress_panel

    check_keep(keep)
    run = Path(run_dir)
    raw = current_metrics(run)  # the raw results must exist and be current first
    scored = score_run(run, model, device=device, dtype=dtype, max_length=max_length,
                       batch_size=batch_size, progress=progress)  # fmt: skip
    notes = list(scored.notes)
    selection = select_top(scored.scores, keep)
    view = run / "reward"
    for part in VIEW_PARTS:
        shutil.rmtree(view / part, ignore_errors=True)
    for name in ("reward.selection", "reward.raw_vs_kept", "reward.summary"):
        artefact_path(run, name).unlink(missing_ok=True)

    settings = dict(raw.settings)
    by = tuple(settings.get("by") or raw.by)
    delta = float(settings.get("delta", 0.05))
    result = filtered_metrics(run, selection, by=by, delta=delta, h_max=settings.get("h_max"),
                              warn=False)  # fmt: skip
    div = kept_diversity(run, result.rollouts[[*ROLLOUT_KEYS, "length"]])
    if div is not None:
        for frame, path, tag in (
            (div[0], view / "semantic" / "prompt_diversity.parquet", PROMPT_DIVERSITY_SCHEMA_VERSION),
            (div[1], view / "semantic" / "rollout_diversity.parquet", ROLLOUT_DIVERSITY_SCHEMA_VERSION),
        ):  # fmt: skip
            atomic_write_table(path, pa.Table.from_pandas(frame, preserve_index=False), tag)
        result = merge_diversity(result, view, delta)
    else:
        notes.append("no semantic diversity (the embed stage has not run): D and Vendi of the "
                     "kept set are not computed")  # fmt: skip
    if "rse" in raw.prompts.columns:
        notes.append("relaxed semantic entropy is not recomputed on the kept set (it needs new "
                     "judge verdicts); the raw RSE is in the raw results")  # fmt: skip
    result.settings, result.inputs = settings, metrics_inputs(view, settings)
    _warn_notes(result.notes)
    result.save(view)

    comparison = regression = None
    opts = dict(compare or {})
    a_key = opts.pop("a_key", "variant")
    a, b = opts.get("a", "base"), opts.get("b", "instruct")
    sides = set(result.prompts[a_key].astype(str))
    if {a, b} <= sides:
        comparison = compare_metrics(result, on=a_key, **opts)
        comparison.save(view)
    else:
        notes.append(f"no comparison of the kept set: the run lacks {a_key} "
                     f"{sorted({a, b} - sides)}")  # fmt: skip
    both = {"base", "instruct"} <= set(result.prompts["variant"])
    if fit_regression and div is not None and both:
        spec = _regression_spec(run) if regress is None else dict(regress)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            panel = panel_from_metrics(result)
        try:
            regression = regress_panel(panel, view, **{"diagnostics": False, **spec})
        except CanopyError as exc:
            notes.append(f"the regression of the kept set failed: {exc}")
    elif fit_regression:
        notes.append("no regression of the kept set: it needs diversity and both a base and "
                     "an instruct model")  # fmt: skip

    table = raw_vs_kept(raw.pooled, result.pooled, by)
    out = RewardResult(
        reward_model=scored.reward_model, keep=float(keep), selection=selection, metrics=result,
        raw_vs_kept=table, comparison=comparison, regression=regression,
        n_scored=scored.n_scored, n_cached=scored.n_cached,
        seconds_scoring=scored.seconds, notes=notes,
    )  # fmt: skip
    atomic_write_table(artefact_path(run, "reward.selection"),
                       pa.Table.from_pandas(selection, preserve_index=False),
                       schema_of("reward.selection"))  # fmt: skip
    atomic_write_table(artefact_path(run, "reward.raw_vs_kept"),
                       pa.Table.from_pandas(table, preserve_index=False),
                       schema_of("reward.raw_vs_kept"))  # fmt: skip
    atomic_write_json(artefact_path(run, "reward.summary"), out.summary())
    return out


def _regression_spec(run: Path) -> dict[str, Any]:
    """The mean and precision formulas and reference levels of the run's own regression
    (RUN/regression/result.json), or {} (the published specification) when it has none."""
    import json

    path = artefact_path(run, "regression.result")
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    formula = doc.get("formula") or {}
    spec = {k: formula[k] for k in ("mean", "precision") if k in formula}
    if doc.get("reference"):
        spec["reference"] = dict(doc["reference"])
    return spec


def filtered_metrics(
    run_dir: str | os.PathLike[str], selection: pd.DataFrame, **kwargs: Any
) -> Any:
    """``compute_metrics`` of the rows of ``selection`` with ``kept`` true (keyword arguments
    pass through), with the run's manifest: the kept set's metrics in memory, nothing written."""
    from canopy_entropy.metrics import compute_metrics
    from canopy_entropy.run.manifest import read_manifest

    kept = selection[selection["kept"]] if "kept" in selection.columns else selection
    return compute_metrics(KeptRollouts(run_dir, kept),
                           manifest=read_manifest(run_dir, missing_ok=True), **kwargs)  # fmt: skip
