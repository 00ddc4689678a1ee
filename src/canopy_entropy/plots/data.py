"""Inputs of the figures and the report, read from a run folder.

Each loader returns a pandas DataFrame (or dict) or raises :class:`MissingInput` whose message
is the note shown in place of a figure ("run 'canopy compare' first"). Per-step data are only
touched by :func:`running_rate` and :func:`rollout_frame`, both vectorised over the flat
entropy arrays of each streamed record batch (no per-token Python loops).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from canopy_entropy.errors import CanopyError
from canopy_entropy.run.manifest import Manifest
from canopy_entropy.run.manifest import read_manifest as read_run_manifest
from canopy_entropy.store import KEY_COLUMNS, RunStore

GROUP_KEYS = list(KEY_COLUMNS)  # model, variant, family, task


class MissingInput(Exception):
    """An input of a figure/report section is absent; the message is the note to show."""


def _read_parquet(path: Path, stage: str) -> pd.DataFrame:
    if not path.exists():
        raise MissingInput(f"{path.relative_to(path.parents[1])} not found: run '{stage}' first")
    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:
        raise CanopyError(
            f"cannot read {path} ({exc}); delete it and re-run '{stage}' to rebuild it"
        ) from exc


def _read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.exists():
        raise MissingInput(f"{path.relative_to(path.parents[1])} not found: run '{stage}' first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CanopyError(
            f"{path} is not valid JSON ({exc.msg}); delete it and re-run '{stage}'"
        ) from exc


def _require_columns(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MissingInput(f"{what} lacks columns {missing}")


def check_run_dir(run_dir: str | Path) -> Path:
    """The run folder as a Path, or a one-line error when it is not a run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    markers = ("manifest.json", "rollouts", "metrics", "compare", "regression", "semantic")
    if not any((run / m).exists() for m in markers):
        raise CanopyError(
            f"{run} is not a canopy run folder (no manifest.json, rollouts/ or metrics/); "
            "pass the folder written by 'canopy run' or 'canopy import --run'"
        )
    return run


def has_rollouts(run: Path) -> bool:
    return bool(RunStore(run).shard_files())


def _flat(entropy: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and flat float64 values of a list<float32> column (slice-safe)."""
    if isinstance(entropy, pa.ChunkedArray):
        entropy = entropy.combine_chunks()
    lengths = pc.list_value_length(entropy).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(entropy).to_numpy(zero_copy_only=False).astype(np.float64)
    return lengths.astype(np.int64), flat


class _RunningRate:
    """Accumulates, per group, the sum of prefix rates and the active count per position."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, ...], np.ndarray] = {}
        self.counts: dict[tuple[str, ...], np.ndarray] = {}

    def add(self, key: tuple[str, ...], s: np.ndarray, c: np.ndarray) -> None:
        old_s = self.sums.get(key, np.zeros(0))
        old_c = self.counts.get(key, np.zeros(0, dtype=np.int64))
        n = max(old_s.size, s.size)
        new_s, new_c = np.zeros(n), np.zeros(n, dtype=np.int64)
        new_s[: old_s.size] += old_s
        new_c[: old_c.size] += old_c
        new_s[: s.size] += s
        new_c[: c.size] += c
        self.sums[key], self.counts[key] = new_s, new_c

    def frame(self) -> pd.DataFrame:
        frames = []
        for key in sorted(self.sums):
            s, c = self.sums[key], self.counts[key]
            keep = c > 0
            frame = pd.DataFrame(
                {
                    "position": np.nonzero(keep)[0] + 1,
                    "mean_rate": s[keep] / c[keep],
                    "n_active": c[keep],
                }
            )
            for name, value in zip(GROUP_KEYS, key, strict=True):
                frame[name] = value
            frames.append(frame)
        if not frames:
            raise MissingInput("every rollout in rollouts/ is empty (zero steps)")
        return pd.concat(frames, ignore_index=True)[
            [*GROUP_KEYS, "position", "mean_rate", "n_active"]
        ]


def scan_rollouts(run: Path, batch_size: int = 1024) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One streaming pass over the rollouts: (per-rollout frame, running-rate frame).

    Per-rollout frame: keys, prompt_id, length N, finish_reason, H = sum_t H_t, rate = H / N.
    Running rate: at position t (1-based) every rollout with N >= t contributes its prefix rate
    ``sum_{s<=t} H_s / t``; one row per (model, variant, family, task, position) with
    ``mean_rate`` over those rollouts and ``n_active`` (how many have N >= t). Vectorised: one
    cumsum and one bincount per record batch, never a loop over steps or rollouts.
    """
    store = RunStore(run)
    if not store.shard_files():
        raise MissingInput("no rollouts in rollouts/: run 'canopy generate' or 'canopy import'")
    cols = [*GROUP_KEYS, "prompt_id", "finish_reason", "entropy"]
    frames = []
    acc = _RunningRate()
    for batch in store.iter_batches(columns=cols, batch_size=batch_size):
        lengths, flat = _flat(batch.column("entropy"))
        df = batch.select([*GROUP_KEYS, "prompt_id", "finish_reason"]).to_pandas()
        ends = np.cumsum(lengths)
        starts = ends - lengths
        cs = np.concatenate([[0.0], np.cumsum(flat)])  # cs[k] = sum of the first k steps
        df["length"] = lengths
        df["H"] = cs[ends] - cs[starts]
        with np.errstate(invalid="ignore", divide="ignore"):
            df["rate"] = df["H"].to_numpy() / lengths
        frames.append(df)
        if flat.size == 0:
            continue
        grouped = df.groupby(GROUP_KEYS, sort=False)
        local = grouped.ngroup().to_numpy()
        local_keys = list(grouped.size().index)
        step_row = np.repeat(np.arange(lengths.size), lengths)
        pos = np.arange(flat.size) - starts[step_row]  # 0-based position within its rollout
        prefix_rate = (cs[1:] - cs[starts][step_row]) / (pos + 1)
        width = int(lengths.max())
        index = local[step_row] * width + pos
        size = len(local_keys) * width
        s = np.bincount(index, weights=prefix_rate, minlength=size).reshape(-1, width)
        c = np.bincount(index, minlength=size).reshape(-1, width)
        for k, key in enumerate(local_keys):
            acc.add(tuple(str(v) for v in key), s[k], c[k])
    return pd.concat(frames, ignore_index=True), acc.frame()


def rollout_frame(run: Path, batch_size: int = 1024) -> pd.DataFrame:
    """One row per rollout: keys, prompt_id, length, finish_reason, H (sum of H_t), rate H/N."""
    return scan_rollouts(run, batch_size)[0]


def running_rate(run: Path, batch_size: int = 1024) -> pd.DataFrame:
    """Mean running entropy rate of still-active rollouts per position (see scan_rollouts)."""
    return scan_rollouts(run, batch_size)[1]


def rollout_counts(run: Path) -> pd.DataFrame:
    """Per rollout keys, prompt_id, length and finish_reason only (no per-step columns read)."""
    store = RunStore(run)
    if not store.shard_files():
        raise MissingInput("no rollouts in rollouts/: run 'canopy generate' or 'canopy import'")
    cols = [*GROUP_KEYS, "prompt_id", "length", "finish_reason"]
    return store.read_rollouts(columns=cols).to_pandas()


def metrics_pooled(run: Path) -> pd.DataFrame:
    """Pooled metrics per group (metrics/pooled.parquet, else metrics/metrics.json).

    Groups pooled without some key column (``canopy metrics --by model,variant,task`` has no
    family) get it back from the model's rows elsewhere in the run; a missing task is 'all'.
    """
    path = run / "metrics" / "pooled.parquet"
    if path.exists():
        pooled = _read_parquet(path, "canopy metrics")
    else:
        doc = _read_json(run / "metrics" / "metrics.json", "canopy metrics")
        rows = [{**g.get("key", {}), **g.get("pooled", {})} for g in doc.get("groups", [])]
        if not rows:
            raise MissingInput("metrics/metrics.json has no groups")
        pooled = pd.DataFrame(rows)
    return attach_model_keys(run, pooled)


def _model_key_map(run: Path) -> pd.DataFrame | None:
    """model -> (family, variant) from per-prompt metrics or the rollouts (None if neither)."""
    for loader in (metrics_prompts, rollout_counts):
        try:
            frame = loader(run)
        except MissingInput:
            continue
        if {"model", "family", "variant"} <= set(frame.columns):
            return frame[["model", "family", "variant"]].drop_duplicates("model")
    return None


def attach_model_keys(run: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Fill missing family/variant (by model) and task ('all') columns of a grouped frame."""
    df = df.copy()
    if "task" not in df.columns:
        df["task"] = "all"
    if "model" not in df.columns:
        return df
    missing = [c for c in ("family", "variant") if c not in df.columns]
    if missing:
        mapping = _model_key_map(run)
        if mapping is not None:
            df = df.merge(mapping[["model", *missing]], on="model", how="left")
        for c in missing:
            if c not in df.columns:
                df[c] = df["model"] if c == "family" else ""
            df[c] = df[c].fillna(df["model"] if c == "family" else "")
    return df


def metrics_prompts(run: Path) -> pd.DataFrame:
    """Per-prompt metrics (metrics/prompts.parquet)."""
    return _read_parquet(run / "metrics" / "prompts.parquet", "canopy metrics")


def prompt_diversity(run: Path) -> pd.DataFrame:
    """Per-prompt semantic diversity (semantic/prompt_diversity.parquet)."""
    return _read_parquet(run / "semantic" / "prompt_diversity.parquet", "canopy embed")


def comparison(run: Path) -> pd.DataFrame:
    """Tidy base-vs-instruct comparison table (compare/comparison.parquet)."""
    df = _read_parquet(run / "compare" / "comparison.parquet", "canopy compare")
    _require_columns(df, ["metric", "kind"], "compare/comparison.parquet")
    return df


def comparison_by_columns(df: pd.DataFrame) -> list[str]:
    """The by-columns of a comparison table (the columns before ``metric``)."""
    cols = list(df.columns)
    return cols[: cols.index("metric")] if "metric" in cols else []


def regression_result(run: Path) -> dict[str, Any]:
    return _read_json(run / "regression" / "result.json", "canopy regress")


def regression_panel(run: Path) -> pd.DataFrame:
    return _read_parquet(run / "regression" / "panel.parquet", "canopy regress")


def regression_curves(run: Path) -> pd.DataFrame:
    return _read_parquet(run / "regression" / "curves.parquet", "canopy regress")


def regression_diagnostics(run: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """DHARMa-like p-values (diagnostics.json) and scaled residuals (diagnostics.parquet)."""
    doc = _read_json(run / "regression" / "diagnostics.json", "canopy regress --diagnostics")
    df = _read_parquet(run / "regression" / "diagnostics.parquet", "canopy regress --diagnostics")
    return doc, df


def pick_column(df: pd.DataFrame, candidates: tuple[str, ...], what: str) -> str:
    """The first of ``candidates`` present in ``df`` (inputs written by other stages)."""
    for name in candidates:
        if name in df.columns:
            return name
    raise MissingInput(f"{what} has none of the columns {list(candidates)}")


def residual_columns(df: pd.DataFrame) -> list[str]:
    """Scaled-residual columns of diagnostics.parquet (numeric columns named like 'resid')."""
    cols = [
        c for c in df.columns if "resid" in str(c).lower() and pd.api.types.is_numeric_dtype(df[c])
    ]
    if not cols:
        raise MissingInput("regression/diagnostics.parquet has no scaled-residual column")
    return cols


def read_manifest(run: Path) -> Manifest:
    """The run's typed manifest (empty when the folder has none)."""
    return read_run_manifest(run, missing_ok=True)
