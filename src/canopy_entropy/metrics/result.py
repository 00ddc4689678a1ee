"""The metrics result: compute it from any rollout source, write it to and read it from a
run folder."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import rankdata

from canopy_entropy.errors import CanopyError
from canopy_entropy.jsonvalues import decode_fields, json_value
from canopy_entropy.metrics.columns import (
    DEFAULT_BY,
    METRIC_COLUMNS,
    METRICS_SCHEMA_VERSION,
    PROMPT_KEYS,
)
from canopy_entropy.metrics.pool import _extra_columns, _pool, _warn_notes, pool_group
from canopy_entropy.metrics.prompt_stats import (
    _caps_and_hmax,
    _fit_tail,
    _histogram_entropy,
    _kendall_tau_b,
    _padded,
    _pearson_by_code,
    _tail_sum,
)
from canopy_entropy.metrics.scan import _as_store, _reduce, _Reduced
from canopy_entropy.run.manifest import Manifest, read_manifest
from canopy_entropy.stats.length_law import eos_length_entropy, hazard_law
from canopy_entropy.store import KEY_COLUMNS, atomic_write_json, atomic_write_table


@dataclass
class MetricsResult:
    """Per-prompt and pooled metrics of one run, as pandas DataFrames (+ JSON export)."""

    prompts: pd.DataFrame
    pooled: pd.DataFrame
    by: tuple[str, ...]
    notes: dict[tuple, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"groups": [{"key", "pooled", "prompts", "notes"}]}``; NaN -> null, +-inf ->
        "inf" / "-inf" (``canopy_entropy.jsonvalues``)."""
        groups = []
        by = list(self.by)
        prompt_groups = (
            dict(iter(self.prompts.groupby(by, sort=False, dropna=False)))
            if by
            else {(): self.prompts}
        )
        for _, row in self.pooled.iterrows():
            key = tuple(row[c] for c in by)
            prows = prompt_groups.get(key, self.prompts.iloc[:0])
            pcols = ["prompt_id", *[c for c in PROMPT_KEYS if c != "prompt_id"]]
            pcols += [c for c in prows.columns if c not in pcols]
            groups.append(
                {
                    "key": {c: row[c] for c in by},
                    "pooled": {c: json_value(row[c]) for c in self.pooled.columns if c not in by},
                    "prompts": [
                        {c: json_value(v) for c, v in zip(pcols, rec, strict=True)}
                        for rec in prows[pcols].itertuples(index=False, name=None)
                    ],
                    "notes": list(self.notes.get(key, [])),
                }
            )
        return {"groups": groups}


def compute_metrics(
    source: Any,
    by: Sequence[str] = DEFAULT_BY,
    delta: float = 0.05,
    h_max: float | None = None,
    *,
    warn: bool = True,
    batch_size: int = 1024,
) -> MetricsResult:
    """All SPEC section 2-5 metrics per prompt and pooled per ``by`` group.

    ``source``: a RunStore, a run-folder path, or a pyarrow Table of ROLLOUT_SCHEMA rows.
    ``delta``: Chebyshev level; ``h_max``: per-step entropy bound overriding the manifest.
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
    manifest = read_manifest(store.root, missing_ok=True) if store is not None else Manifest()
    red = _reduce(store if store is not None else source, batch_size=batch_size)
    red.approximate = red.approximate or manifest.approximate
    return _assemble(red, by, delta, h_max, manifest, warn)


def write_metrics(
    run_dir: str | os.PathLike[str],
    by: Sequence[str] = DEFAULT_BY,
    **kw: Any,
) -> MetricsResult:
    """Compute metrics for a run folder and write RUN/metrics/{prompts,pooled}.parquet and
    metrics.json atomically; merge RUN/semantic/prompt_diversity.parquet when present."""
    run = Path(run_dir)
    store = _as_store(run)
    warn = kw.pop("warn", True)
    result = compute_metrics(store, by=by, warn=False, **kw)
    div_path = run / "semantic" / "prompt_diversity.parquet"
    if div_path.exists():
        result = _merge_diversity(result, div_path, kw.get("delta", 0.05))
    if warn:
        _warn_notes(result.notes)
    out = run / "metrics"
    atomic_write_table(
        out / "prompts.parquet",
        pa.Table.from_pandas(result.prompts, preserve_index=False),
        METRICS_SCHEMA_VERSION,
    )
    atomic_write_table(
        out / "pooled.parquet",
        pa.Table.from_pandas(result.pooled, preserve_index=False),
        METRICS_SCHEMA_VERSION,
    )
    atomic_write_json(out / "metrics.json", result.to_json())
    return result


def _merge_diversity(result: MetricsResult, path: Path, delta: float) -> MetricsResult:

    try:
        div = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise CanopyError(
            f"cannot read {path} ({exc}); delete it and re-run 'canopy embed'"
        ) from exc
    missing = [c for c in PROMPT_KEYS if c not in div.columns]
    if missing:
        raise CanopyError(f"{path} lacks key columns {missing}; re-run 'canopy embed'")
    numeric = [
        c
        for c in div.columns
        if c not in PROMPT_KEYS
        and pd.api.types.is_numeric_dtype(div[c])
        and c not in result.prompts.columns
    ]
    if div.duplicated(list(PROMPT_KEYS)).any():
        raise CanopyError(f"{path} has duplicate prompt rows; re-run 'canopy embed'")
    prompts = result.prompts.merge(
        div[[*PROMPT_KEYS, *numeric]], on=list(PROMPT_KEYS), how="left", validate="one_to_one"
    )
    by = list(result.by)
    grouped = prompts.groupby(by, sort=True) if by else [((), prompts)]
    rows = []
    for key, g in grouped:
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), **pool_group(g, delta)[0]})
    pooled = pd.DataFrame(rows, columns=[*by, *METRIC_COLUMNS, *_extra_columns(prompts)])
    return MetricsResult(prompts=prompts, pooled=pooled, by=result.by, notes=result.notes)


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
    rank_n = rankdata(n_pad, axis=1)[code, pos]
    rank_r = rankdata(r_pad, axis=1)[code, pos]
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
    return MetricsResult(prompts=prompts, pooled=pooled, by=by, notes=notes)
