"""The metrics result: compute it from any rollout source, write it to and read it from a
run folder."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError, StoreError
from canopy_entropy.jsonvalues import decode_fields, json_value
from canopy_entropy.metrics.columns import (
    DEFAULT_BY,
    METRIC_COLUMNS,
    PROMPT_KEYS,
)
from canopy_entropy.metrics.curves import running_rate
from canopy_entropy.metrics.pool import _extra_columns, _pool, _warn_notes, pool_group
from canopy_entropy.metrics.prompt_stats import (
    _caps_and_hmax,
    _fit_tail,
    _histogram_entropy,
    _kendall_tau_b,
    _padded,
    _pearson_by_code,
    _row_midranks,
    _tail_sum,
)
from canopy_entropy.metrics.scan import _as_store, _reduce, _Reduced
from canopy_entropy.run.freshness import input_fingerprint
from canopy_entropy.run.layout import GROUP_KEYS, artefact_path, schema_of
from canopy_entropy.run.manifest import Manifest, read_manifest
from canopy_entropy.stats.length_law import eos_length_entropy, hazard_law
from canopy_entropy.store import KEY_COLUMNS, atomic_write_json, atomic_write_table, read_table


@dataclass
class MetricsResult:
    """Per-prompt and pooled metrics of one run, as pandas DataFrames (+ JSON export)."""

    prompts: pd.DataFrame
    pooled: pd.DataFrame
    by: tuple[str, ...]
    notes: dict[tuple, list[str]] = field(default_factory=dict)
    # one row per rollout: keys, rollout_index, length, finish_reason, H, r, surprisal,
    # stop_entropy (and d, the rollout's semantic distance, when diversity was merged)
    rollouts: pd.DataFrame | None = None
    # per (model, variant, family, task, position): the running entropy rate of the rollouts
    # still active there (metrics.curves.running_rate), from the same scan
    running_rate: pd.DataFrame | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # by, delta, h_max
    inputs: str = ""  # fingerprint of the run-folder inputs it was computed from

    def save(self, run_dir: str | os.PathLike[str]) -> list[Path]:
        """Write RUN/metrics/ (prompts, pooled, rollouts, running-rate Parquet; metrics.json)
        atomically."""
        paths = []
        for name, frame in (
            ("metrics.prompts", self.prompts),
            ("metrics.pooled", self.pooled),
            ("metrics.rollouts", self.rollouts),
            ("metrics.running_rate", self.running_rate),
        ):
            if frame is None:
                continue
            path = artefact_path(run_dir, name)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            atomic_write_table(path, table, schema_of(name))
            paths.append(path)
        doc = {"by": list(self.by), "settings": self.settings, "inputs": self.inputs}
        path = artefact_path(run_dir, "metrics.json")
        atomic_write_json(path, {**doc, **self.to_json()})
        return [*paths, path]

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> MetricsResult:
        """Read a saved result (verified); StoreError naming the file when damaged."""
        json_path = artefact_path(run_dir, "metrics.json")
        if not json_path.exists():
            raise CanopyError(
                f"{run_dir} has no saved metrics; run 'canopy metrics {run_dir}' (or the metrics "
                "stage) first"
            )
        try:
            doc = json.loads(json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"{json_path} is damaged ({exc}); re-run 'canopy metrics {run_dir}'"
            ) from exc
        frames = {}
        optional = ("metrics.rollouts", "metrics.running_rate")
        for name in ("metrics.prompts", "metrics.pooled", *optional):
            path = artefact_path(run_dir, name)
            if name in optional and not path.exists():
                frames[name] = None  # written by versions before these tables
                continue
            frames[name] = read_table(path, schema_of(name)).to_pandas()
        by = tuple(doc.get("by") or [c for c in GROUP_KEYS if c in frames["metrics.pooled"]])
        notes = {
            tuple(g["key"][c] for c in by): list(g.get("notes", [])) for g in doc.get("groups", [])
        }
        return cls(
            prompts=frames["metrics.prompts"],
            pooled=frames["metrics.pooled"],
            by=by,
            notes=notes,
            rollouts=frames["metrics.rollouts"],
            running_rate=frames["metrics.running_rate"],
            settings=dict(doc.get("settings") or {}),
            inputs=str(doc.get("inputs") or ""),
        )

    def is_fresh(self, run_dir: str | os.PathLike[str]) -> bool:
        """True when the run folder's inputs are what this result was computed from."""
        return bool(self.inputs) and self.inputs == metrics_inputs(run_dir, self.settings)

    def to_json(self) -> dict[str, Any]:
        """``{"groups": [{"key", "pooled", "prompts", "notes"}]}``; NaN -> null, +-inf ->
        "inf" / "-inf" (``canopy_entropy.jsonvalues``)."""
        groups = []
        by = list(self.by)
        pcols = ["prompt_id", *[c for c in PROMPT_KEYS if c != "prompt_id"]]
        pcols += [c for c in self.prompts.columns if c not in pcols]
        # every prompt row made JSON-safe once, column by column, then split by group
        columns = [_json_column(self.prompts[c]) for c in pcols]
        records = [dict(zip(pcols, rec, strict=True)) for rec in zip(*columns, strict=True)]
        indices = (
            self.prompts.groupby(by, sort=False, dropna=False).indices
            if by
            else {(): np.arange(len(self.prompts))}
        )
        rows_of = {(k if isinstance(k, tuple) else (k,)): v for k, v in indices.items()}
        for _, row in self.pooled.iterrows():
            key = tuple(row[c] for c in by)
            rows = rows_of.get(key, ())
            groups.append(
                {
                    "key": {c: row[c] for c in by},
                    "pooled": {c: json_value(row[c]) for c in self.pooled.columns if c not in by},
                    "prompts": [records[i] for i in rows],
                    "notes": list(self.notes.get(key, [])),
                }
            )
        return {"groups": groups}


def _json_column(column: pd.Series) -> list[Any]:
    """A column's values made JSON-safe (``jsonvalues.json_value``) without a per-cell type
    test: floats keep full precision, NaN -> None, +-inf -> "inf" / "-inf"."""
    if not pd.api.types.is_float_dtype(column.dtype):
        return [json_value(v) for v in column.tolist()]
    values = column.to_numpy(np.float64)
    out: list[Any] = values.tolist()
    for i in np.flatnonzero(~np.isfinite(values)):  # only the few non-finite cells
        out[i] = json_value(values[i])
    return out


def compute_metrics(
    source: Any,
    by: Sequence[str] = DEFAULT_BY,
    delta: float = 0.05,
    h_max: float | None = None,
    *,
    warn: bool = True,
    batch_size: int = 1024,
    manifest: Manifest | None = None,
) -> MetricsResult:
    """All docs/metrics.md sections 2-6 metrics per prompt and pooled per ``by`` group.

    ``source``: a RunStore, a run-folder path, a pyarrow Table of ROLLOUT_SCHEMA rows, or any
    object with ``iter_batches(columns, batch_size)`` (e.g. ``reward.KeptRollouts``).
    ``delta``: Chebyshev level; ``h_max``: per-step entropy bound overriding the manifest;
    ``manifest``: the run's manifest for a source that is not a run folder (length caps).
    """
    by = tuple(by)
    bad = [c for c in by if c not in KEY_COLUMNS]
    if bad:
        raise CanopyError(f"cannot group by {bad}; choose from {list(KEY_COLUMNS)}")
    if not 0.0 < delta < 1.0:
        raise CanopyError(f"delta must be in (0, 1) (got {delta}); 0.05 gives a 95% bound")
    if h_max is not None and not h_max > 0:
        raise CanopyError(f"--h-max must be positive (got {h_max}); e.g. log(top_k)")
    store = _as_store(source)
    if manifest is None:
        manifest = read_manifest(store.root, missing_ok=True) if store is not None else Manifest()
    red = _reduce(store if store is not None else source, batch_size=batch_size)
    red.approximate = red.approximate or manifest.approximate
    return _assemble(red, by, delta, h_max, manifest, warn)


METRICS_INPUTS = (
    "manifest.json",
    "rollouts",
    "semantic/prompt_diversity.parquet",
    "semantic/rollout_diversity.parquet",
    "semantic/rse.parquet",
)


def metrics_inputs(run_dir: str | os.PathLike[str], settings: dict[str, Any]) -> str:
    """Fingerprint of what the metrics of ``run_dir`` are computed from (files and settings)."""
    return input_fingerprint(run_dir, METRICS_INPUTS, settings)


def run_metrics(
    run_dir: str | os.PathLike[str],
    by: Sequence[str] = DEFAULT_BY,
    delta: float = 0.05,
    h_max: float | None = None,
    *,
    warn: bool = True,
) -> MetricsResult:
    """The metrics of a run folder with its semantic diversity merged in (when the embed stage
    ran), computed in memory: nothing is written."""
    run = Path(run_dir)
    settings = {"by": list(by), "delta": delta, "h_max": h_max}
    inputs = metrics_inputs(run, settings)
    result = compute_metrics(run, by=by, delta=delta, h_max=h_max, warn=False)
    result = merge_diversity(result, run, delta)
    result.settings, result.inputs = settings, inputs
    if warn:
        _warn_notes(result.notes)
    return result


def write_metrics(
    run_dir: str | os.PathLike[str],
    by: Sequence[str] = DEFAULT_BY,
    delta: float = 0.05,
    h_max: float | None = None,
    *,
    warn: bool = True,
) -> MetricsResult:
    """Compute a run folder's metrics (diversity merged) and save them to RUN/metrics/."""
    result = run_metrics(run_dir, by=by, delta=delta, h_max=h_max, warn=warn)
    result.save(run_dir)
    return result


def merge_diversity(
    result: MetricsResult, run_dir: str | os.PathLike[str], delta: float
) -> MetricsResult:
    """Merge RUN/semantic/'s per-prompt diversity and relaxed semantic entropy (rse.parquet)
    into the prompts (and re-pool) and each rollout's distance d into the rollouts; a prompt
    whose diversity was computed from another set of rollouts (its count differs), or whose RSE
    judged more rollouts than it now has, gets none, with a note."""
    keys = list(PROMPT_KEYS)
    notes = dict(result.notes)
    prompts = result.prompts
    div_path = artefact_path(run_dir, "semantic.prompts")
    div = _read_semantic(div_path, schema_of("semantic.prompts"), "n_rollouts", "canopy embed")
    if div is not None:
        div = _drop_stale(div, prompts, "n_rollouts", "semantic diversity", "canopy embed", notes)
        numeric = [
            c
            for c in div.columns
            if c not in keys
            and c != "n_rollouts"
            and pd.api.types.is_numeric_dtype(div[c])
            and c not in prompts.columns
        ]
        prompts = prompts.merge(div[[*keys, *numeric]], on=keys, how="left", validate="one_to_one")
    rse_path = artefact_path(run_dir, "semantic.rse")
    rse = _read_semantic(rse_path, schema_of("semantic.rse"), "rse_m", "canopy semantic-entropy")
    if rse is not None:
        rse = _drop_stale(rse, prompts, "rse_m", "relaxed semantic entropy",
                          "canopy semantic-entropy", notes)  # fmt: skip
        cols = [c for c in RSE_MERGED if c not in prompts.columns]
        prompts = prompts.merge(rse[[*keys, *cols]], on=keys, how="left", validate="one_to_one")
    if div is None and rse is None:
        return result
    by = list(result.by)
    grouped = prompts.groupby(by, sort=True) if by else [((), prompts)]
    rows = []
    for key, g in grouped:
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), **pool_group(g, delta)[0]})
    pooled = pd.DataFrame(rows, columns=[*by, *METRIC_COLUMNS, *_extra_columns(prompts)])
    rollouts = result.rollouts
    rollout_path = artefact_path(run_dir, "semantic.rollouts")
    if div is not None and rollouts is not None and rollout_path.exists():
        cols = [*keys, "rollout_index", "d"]
        d = read_table(rollout_path, schema_of("semantic.rollouts"), cols).to_pandas()
        d = d.merge(div[keys], on=keys, how="inner")  # stale prompts left out
        rollouts = rollouts.merge(d, on=[*keys, "rollout_index"], how="left")
    return dataclasses.replace(
        result, prompts=prompts, pooled=pooled, notes=notes, rollouts=rollouts
    )


# relaxed semantic entropy columns merged from semantic/rse.parquet (docs/semantic-compare.md)
RSE_MERGED = ("rse", "rse_normalized", "rse_clusters")


def _read_semantic(path: Path, tag: str, count: str, command: str) -> pd.DataFrame | None:
    """A per-prompt table of RUN/semantic/ (None when absent), checked for keys and repeats."""
    if not path.exists():
        return None
    table = read_table(path, tag).to_pandas()
    keys = list(PROMPT_KEYS)
    missing = [c for c in (*keys, count) if c not in table.columns]
    if missing or table.duplicated(keys).any():
        raise StoreError(
            f"{path} lacks key columns {missing} or repeats a prompt; re-run '{command}'"
        )
    return table


def _drop_stale(
    table: pd.DataFrame,
    prompts: pd.DataFrame,
    count: str,
    what: str,
    command: str,
    notes: dict[tuple, list[str]],
) -> pd.DataFrame:
    """``table`` without the prompts computed from other rollouts: diversity whose rollout
    count differs from the metrics', RSE that judged more rollouts than the prompt has."""
    keys = list(PROMPT_KEYS)
    counts = prompts[[*keys, "n_rollouts"]].merge(
        table[[*keys, count]].rename(columns={count: "_count"}), on=keys, how="inner"
    )
    if count == "n_rollouts":
        bad = counts["n_rollouts"] != counts["_count"]
    else:
        bad = counts["_count"] > counts["n_rollouts"]
    stale = counts[bad][keys]
    if not len(stale):
        return table
    table = table.merge(stale.assign(_stale=True), on=keys, how="left")
    table = table[table["_stale"].isna()].drop(columns="_stale")
    msg = (
        f"{what} of {len(stale)} prompts was computed from other rollouts (their count changed "
        f"since): left out; re-run '{command}'"
    )
    warnings.warn(msg, stacklevel=3)
    for k, v in list(notes.items()):
        notes[k] = [*v, msg]
    return table


def current_metrics(run_dir: str | os.PathLike[str]) -> MetricsResult:
    """The run's saved metrics when they are current (later stages read these, never
    recompute them); a one-line error naming the command when they are missing or stale."""
    metrics = MetricsResult.load(run_dir)
    if not metrics.is_fresh(run_dir):
        raise CanopyError(
            f"the saved metrics of {run_dir} are older than the rollouts or diversity they come "
            f"from; run 'canopy metrics {run_dir}' first"
        )
    from canopy_entropy.metrics.accuracy import merge_accuracy

    metrics.prompts = merge_accuracy(metrics.prompts, run_dir)  # correctness, when scored
    return metrics


def load_metrics_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a metrics.json document (helper for other stages): in the metric fields null
    becomes NaN and "inf" / "-inf" become infinities again."""
    doc = json.loads(Path(path).read_text())
    for group in doc.get("groups", []):
        group["pooled"] = decode_fields(group.get("pooled", {}))
        group["prompts"] = [decode_fields(p, PROMPT_KEYS) for p in group.get("prompts", [])]
    return doc


def _assemble(
    red: _Reduced, by: tuple[str, ...], delta: float, h_max, manifest: Manifest, warn: bool
) -> MetricsResult:
    # order prompts by their keys and rollouts by (prompt, rollout_index)
    key_frame = pd.DataFrame(red.prompt_keys, columns=list(PROMPT_KEYS))
    order_prompts = np.lexsort([key_frame[c].to_numpy() for c in reversed(PROMPT_KEYS)])
    rank = np.empty_like(order_prompts)
    rank[order_prompts] = np.arange(len(order_prompts))
    key_frame = key_frame.iloc[order_prompts].reset_index(drop=True)
    code = rank[red.code]
    order = np.lexsort([red.rollout_index, code])
    code = code[order]
    ridx = red.rollout_index[order]
    dup = (np.diff(code) == 0) & (np.diff(ridx) == 0)
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        k = key_frame.iloc[code[i]]
        raise CanopyError(
            f"rollout {ridx[i]} of prompt {k['prompt_id']!r} ({k['model']}/{k['variant']}/"
            f"{k['task']}) appears twice; the same rollouts were imported twice into this run"
        )
    N = red.length[order].astype(np.float64)
    H = red.H[order]
    surprisal = red.surprisal[order]
    stop = red.stop_entropy[order]
    finish = red.finish[order]
    truncated = finish == "length"
    not_eos = finish != "eos"
    has_eos = red.has_eos_prob[order]
    hazard = [red.hazard[g] for g in order_prompts]
    P = len(key_frame)
    m = np.bincount(code, minlength=P).astype(np.float64)
    r = H / N

    def mean_by(x):
        return np.bincount(code, x, P) / m

    ce = mean_by(H)
    nbar = mean_by(N)
    rbar = mean_by(r)
    ce_surprisal = mean_by(surprisal)
    stop_p = mean_by(stop)
    trunc_rate = mean_by(truncated.astype(np.float64))
    pearson, cov_pop, cov_sample = _pearson_by_code(N, r, code, P, m)

    # ranks and Kendall on padded [prompt, rollout] matrices (padding sorts last)
    start = np.concatenate([[0], np.cumsum(m)[:-1]]).astype(np.int64)
    pos = np.arange(len(code)) - start[code]
    mmax = int(m.max())
    n_pad = _padded(N, code, pos, (P, mmax), np.inf)
    r_pad = _padded(r, code, pos, (P, mmax), np.inf)
    rank_n = _row_midranks(n_pad)[code, pos]
    rank_r = _row_midranks(r_pad)[code, pos]
    spearman, _, _ = _pearson_by_code(rank_n, rank_r, code, P, m)
    n_pad[~np.isfinite(n_pad)] = np.nan
    r_pad[~np.isfinite(r_pad)] = np.nan
    kendall = _kendall_tau_b(n_pad, r_pad)

    # length law: EOS-hazard and histogram plug-in
    all_eos = np.bincount(code, has_eos, P) == m
    ended_by_eos_all = np.bincount(code, not_eos, P) == 0
    models = key_frame["model"].to_numpy()
    cap, hmax, cap_known = _caps_and_hmax(models, code, N, truncated, manifest, h_max)
    sorted_len = np.sort(_padded(N, code, pos, (P, mmax), np.inf), axis=1)
    tail_fit = _fit_tail(N, truncated, code, m, cap, sorted_len)
    h_hazard = eos_length_entropy(
        hazard_law(hazard, m),
        m,
        tail_fit.n_max,
        np.where(cap_known, cap, np.inf),  # T unknown: no cap, the tail may run on
        tail_fit.u,
        tail_fit.surv_u,
        tail_fit.exposure,
        ended_by_eos_all,
    )
    h_hazard = np.where(all_eos, h_hazard, np.nan)
    h_hist = _histogram_entropy(red.length[order], not_eos, code, m)
    h_for_content = np.where(np.isfinite(h_hazard), h_hazard, h_hist)

    # uncertainty: within-prompt variance of H_i
    dH = H - ce[code]
    with np.errstate(invalid="ignore", divide="ignore"):
        s2_within = np.where(m > 1, np.bincount(code, dH * dH, P) / (m - 1), np.nan)
    var_within_p = s2_within / m

    bias_bound = hmax * _tail_sum(tail_fit, cap)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        per_prompt = pd.DataFrame(
            {
                "ce_star": ce,
                "ce_star_surprisal": ce_surprisal,
                "mean_length": nbar,
                "genppl": np.exp(ce / nbar),
                "entropy_rate": rbar,
                "bf": np.exp(rbar),
                "truncation_rate": trunc_rate,
                "pearson": pearson,
                "spearman": spearman,
                "kendall": kendall,
                "covariance": cov_sample,
                "rate_length_term": nbar * rbar,
                "within_cov_term": cov_pop,
                "between_cov_term": np.zeros(P),
                "stop_entropy": stop_p,
                "stop_entropy_share": stop_p / ce,
                "length_entropy": h_hazard,
                "length_entropy_hist": h_hist,
                "content_entropy": ce - h_for_content,
                "ce_star_se": np.sqrt(var_within_p),
                "ce_star_var_between": np.full(P, np.nan),
                "ce_star_var_within": var_within_p,
                "chebyshev_bound": np.sqrt(var_within_p / delta),
                "truncation_bias_bound": bias_bound,
                "n_rollouts": m.astype(np.int64),
                "n_prompts": np.ones(P, dtype=np.int64),
            }
        )
    prompts = pd.concat([key_frame, per_prompt], axis=1)
    pooled, notes = _pool(prompts, by, delta, red.approximate, hmax)
    if warn:
        _warn_notes(notes)
    rollouts = key_frame.iloc[code].reset_index(drop=True)
    rollouts["rollout_index"] = ridx
    rollouts["length"] = red.length[order]
    rollouts["finish_reason"] = finish
    rollouts["H"] = H
    rollouts["r"] = r
    rollouts["surprisal"] = surprisal
    rollouts["stop_entropy"] = stop
    steps = [red.entropy_steps[g] for g in order_prompts]
    curve = running_rate(key_frame, code, red.length[order], H, steps)
    return MetricsResult(
        prompts=prompts, pooled=pooled, by=by, notes=notes, rollouts=rollouts, running_rate=curve
    )
