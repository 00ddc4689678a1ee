"""Every trajectory metric of SPEC sections 2-5, per prompt and pooled per group.

The rollout store is streamed batch by batch (bounded memory): each batch's per-step lists are
reduced on flat arrays + offsets to per-rollout scalars (length, summed entropy, surprisal,
summed binary stop entropy) plus, per prompt and step, the EOS-hazard accumulator
``sum_i 1{N_i >= n} lambda_in`` of SPEC section 4. Everything after that works on per-rollout
arrays with ``np.bincount`` and padded ``[prompt, rollout]`` matrices; the only Python loops run
over prompts, never over steps or rollouts.

Conventions (see docs/metrics.md):

* a *prompt* is one (model, variant, family, task, prompt_id); groups pool prompts by ``by``;
* pooled values are unweighted means over prompts (SPEC section 2), correlations pooled by the
  SPEC section-3 rules, the rate/length split pooled as
  ``CE*_pool = Nbar_pool * Rbar_pool + between_cov_term + within_cov_term`` exactly;
* ``length_entropy`` is H(min(N, T)) from the EOS-hazard law on ``{1..T}`` plus the outcome
  "cut at T" (the leftover mass); without cut rollouts part of the leftover is spread over the
  unseen lengths up to T (``stats.length_law``); no mass is ever put beyond T;
* ``content_entropy = ce_star - length_entropy`` (the histogram H(N) when no ``eos_prob``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.special import entr
from scipy.stats import rankdata

from canopy_entropy.errors import CanopyError
from canopy_entropy.jsonvalues import decode_fields, json_value
from canopy_entropy.run.manifest import Manifest, read_manifest
from canopy_entropy.semantic.diversity import DIVERSITY_COLUMNS as _SEMANTIC_DIVERSITY_COLUMNS
from canopy_entropy.semantic.diversity import pool_vendi
from canopy_entropy.stats.length_law import eos_length_entropy, hazard_law
from canopy_entropy.stats.pooling import pool_covariance, pool_fisher, pool_kendall
from canopy_entropy.store import KEY_COLUMNS, RunStore, atomic_write_json, atomic_write_table

PROMPT_KEYS = (*KEY_COLUMNS, "prompt_id")
DEFAULT_BY = ("model", "variant", "task")

METRIC_COLUMNS = (
    "ce_star",
    "ce_star_surprisal",
    "mean_length",
    "genppl",
    "entropy_rate",
    "bf",
    "truncation_rate",
    "pearson",
    "spearman",
    "kendall",
    "covariance",
    "rate_length_term",
    "within_cov_term",
    "between_cov_term",
    "stop_entropy",
    "stop_entropy_share",
    "length_entropy",
    "length_entropy_hist",
    "content_entropy",
    "ce_star_se",
    "ce_star_var_between",
    "ce_star_var_within",
    "chebyshev_bound",
    "truncation_bias_bound",
    "n_rollouts",
    "n_prompts",
)
# per-prompt diversity statistics merged from RUN/semantic/ (defined once, in semantic.diversity)
DIVERSITY_COLUMNS = tuple(c for c in _SEMANTIC_DIVERSITY_COLUMNS if c != "n_rollouts")
TRUNCATION_WARN_RATE = 0.05
_KEY_SEPARATOR = "\x1f"
METRICS_SCHEMA_VERSION = "canopy-metrics/1"

_READ_COLUMNS = [
    *PROMPT_KEYS,
    "rollout_index",
    "length",
    "finish_reason",
    "entropy",
    "eos_prob",
    "logprob",
    "entropy_upper",
]


# ----------------------------------------------------------------------------------------
# Flat-array helpers
# ----------------------------------------------------------------------------------------
def segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Float64 sums of ``values[offsets[i]:offsets[i+1]]`` for contiguous segments (empty
    segments give 0): one ``np.add.reduceat`` accumulating in float64, no copy of ``values``."""
    n = len(offsets) - 1
    if n <= 0:
        return np.zeros(0)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return np.zeros(n)
    window = values[lo:hi]
    starts = np.minimum(offsets[:-1] - lo, hi - lo - 1)
    sums = np.add.reduceat(window, starts, dtype=np.float64)
    return np.where(np.diff(offsets) > 0, sums, 0.0)


def _list_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat values, row offsets into them, row validity) of a list column, zero-copy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values
    if values.null_count:
        flat = values.to_numpy(zero_copy_only=False)
    else:
        flat = values.to_numpy()
    valid = (
        np.ones(len(column), dtype=bool)
        if column.null_count == 0
        else column.is_valid().to_numpy(zero_copy_only=False)
    )
    return flat, offsets, valid


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """h(p) = -p log p - (1-p) log(1-p) in nats, float64, with h(0) = h(1) = 0."""
    p = np.array(p, dtype=np.float64)  # a float64 copy of the float32 values
    np.clip(p, 0.0, 1.0, out=p)
    out = entr(p)
    out += entr(np.subtract(1.0, p, out=p))
    return out


# ----------------------------------------------------------------------------------------
# Streaming reduction: store -> per-rollout scalars + hazard accumulators
# ----------------------------------------------------------------------------------------
@dataclass
class _Reduced:
    prompt_keys: list[tuple[str, ...]]
    code: np.ndarray
    rollout_index: np.ndarray
    length: np.ndarray
    finish: np.ndarray  # object array of finish reasons
    H: np.ndarray
    surprisal: np.ndarray
    stop_entropy: np.ndarray
    has_eos_prob: np.ndarray
    approximate: bool
    hazard: list[np.ndarray]


def _iter_source_batches(source: Any, batch_size: int):
    if isinstance(source, pa.Table):
        missing = [c for c in _READ_COLUMNS if c not in source.column_names]
        needed = [c for c in missing if c not in ("eos_prob", "logprob", "entropy_upper")]
        if needed:
            raise CanopyError(
                f"rollout table lacks columns {needed}; build it with store.rollouts_table(...)"
            )
        table = source
        for c in missing:
            table = table.append_column(c, pa.nulls(len(table), type=pa.list_(pa.float32())))
        yield from table.select(_READ_COLUMNS).to_batches(max_chunksize=batch_size)
    else:
        yield from source.iter_batches(columns=_READ_COLUMNS, batch_size=batch_size)


def _as_store(source: Any) -> RunStore | None:
    if isinstance(source, RunStore):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_dir():
            raise CanopyError(f"run folder {path} does not exist; pass the folder given to --run")
        return RunStore(path)
    return None


def _reduce(source: Any, batch_size: int = 1024) -> _Reduced:
    """Stream the rollouts (a RunStore or a Table) into per-rollout scalars + hazard sums.

    Shards are reduced in parallel threads (numpy and Parquet decoding release the GIL), one
    partial result per shard, merged in shard order so results do not depend on threading.
    """
    if isinstance(source, RunStore):
        source.dataset()  # validates every shard (names a corrupt or foreign file)
        files = source.shard_files()
        workers = max(1, min(len(files), _n_threads()))

        def one(path: Path) -> _Reduced | None:
            reader = pq.ParquetFile(path)
            return _reduce_stream(
                reader.iter_batches(batch_size=batch_size, columns=_READ_COLUMNS, use_threads=False)
            )

        if workers == 1:
            partials = [one(p) for p in files]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                partials = list(pool.map(one, files))
    else:
        partials = [_reduce_stream(_iter_source_batches(source, batch_size))]
    partials = [p for p in partials if p is not None]
    if not partials:
        raise CanopyError("no rollouts found; generate some with 'canopy generate' or import them")
    return partials[0] if len(partials) == 1 else _merge_partials(partials)


def _n_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _merge_partials(partials: list[_Reduced]) -> _Reduced:
    """Combine per-shard reductions: remap prompt codes, concatenate, add hazard sums."""
    key_to_code: dict[tuple[str, ...], int] = {}
    hazard: list[np.ndarray] = []
    codes = []
    for part in partials:
        mapping = np.empty(len(part.prompt_keys), dtype=np.int64)
        for j, key in enumerate(part.prompt_keys):  # loop over prompts only
            g = key_to_code.get(key)
            if g is None:
                g = key_to_code[key] = len(key_to_code)
                hazard.append(part.hazard[j])
            else:
                a, b = hazard[g], part.hazard[j]
                if a.size < b.size:
                    a, b = b, a
                merged = a.copy()
                merged[: b.size] += b
                hazard[g] = merged
            mapping[j] = g
        codes.append(mapping[part.code])

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in partials])

    return _Reduced(
        prompt_keys=list(key_to_code),
        code=np.concatenate(codes),
        rollout_index=cat("rollout_index"),
        length=cat("length"),
        finish=cat("finish"),
        H=cat("H"),
        surprisal=cat("surprisal"),
        stop_entropy=cat("stop_entropy"),
        has_eos_prob=cat("has_eos_prob"),
        approximate=any(p.approximate for p in partials),
        hazard=hazard,
    )


def _reduce_stream(batches) -> _Reduced | None:
    """Reduce one stream of record batches (per-step lists never leave their batch)."""
    key_to_code: dict[tuple[str, ...], int] = {}
    hazard: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("code", "rollout_index", "length", "finish", "H", "surprisal", "stop")
    }
    parts["has_eos"] = []
    approximate = False
    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        joined = pc.binary_join_element_wise(
            *[batch.column(k) for k in PROMPT_KEYS], _KEY_SEPARATOR
        ).dictionary_encode()
        local = joined.indices.to_numpy(zero_copy_only=False)
        uniques = [tuple(k.split(_KEY_SEPARATOR)) for k in joined.dictionary.to_pylist()]
        if any(len(k) != len(PROMPT_KEYS) for k in uniques):
            raise CanopyError("a model/variant/family/task/prompt_id contains the byte 0x1f")
        mapping = np.empty(len(uniques), dtype=np.int64)
        for j, key in enumerate(uniques):  # loop over the batch's prompts only
            code = key_to_code.get(key)
            if code is None:
                code = key_to_code[key] = len(key_to_code)
                hazard.append(np.zeros(0))
            mapping[j] = code
        code = mapping[local]

        ent, off, _ = _list_parts(batch.column("entropy"))
        starts, ends = off[:-1], off[1:]
        steps = ends - starts
        length = batch.column("length").to_numpy().astype(np.int64)
        if np.any(steps != length):
            i = int(np.flatnonzero(steps != length)[0])
            raise CanopyError(
                f"rollout {uniques[local[i]][4]!r} #{batch.column('rollout_index')[i]} has length "
                f"{length[i]} but {steps[i]} entropy values; the store is inconsistent, re-import it"
            )
        if np.any(length <= 0):
            i = int(np.flatnonzero(length <= 0)[0])
            raise CanopyError(
                f"rollout of prompt {uniques[local[i]][4]!r} has no steps; every rollout needs at least "
                "one step (the EOS step counts)"
            )
        H = segment_sums(ent, off)

        lp, lp_off, lp_valid = _list_parts(batch.column("logprob"))
        surprisal = -segment_sums(lp, lp_off)
        lp_ok = lp_valid & (np.diff(lp_off) == length)
        surprisal[~lp_ok] = np.nan

        lam, lam_off, lam_valid = _list_parts(batch.column("eos_prob"))
        lam_ok = lam_valid & (np.diff(lam_off) == length)
        stop = np.full(n, np.nan)
        if lam_ok.any():
            lo, hi = int(lam_off[0]), int(lam_off[-1])
            lam_slice = lam[lo:hi]
            stop[lam_ok] = segment_sums(binary_entropy(lam_slice), lam_off - lo)[lam_ok]
            _accumulate_hazard(hazard, code, lam_slice, lam_off - lo, lam_ok, length, mapping)

        up = batch.column("entropy_upper")
        if up.null_count < len(up):
            approximate = True

        parts["code"].append(code)
        parts["rollout_index"].append(batch.column("rollout_index").to_numpy().astype(np.int64))
        parts["length"].append(length)
        parts["finish"].append(batch.column("finish_reason").to_numpy(zero_copy_only=False))
        parts["H"].append(H)
        parts["surprisal"].append(surprisal)
        parts["stop"].append(stop)
        parts["has_eos"].append(lam_ok)

    if not key_to_code:
        return None
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return _Reduced(
        prompt_keys=list(key_to_code),
        code=cat["code"],
        rollout_index=cat["rollout_index"],
        length=cat["length"],
        finish=cat["finish"].astype(object),
        H=cat["H"],
        surprisal=cat["surprisal"],
        stop_entropy=cat["stop"],
        has_eos_prob=cat["has_eos"].astype(bool),
        approximate=approximate,
        hazard=hazard,
    )


def _accumulate_hazard(
    hazard: list[np.ndarray],
    code: np.ndarray,
    lam: np.ndarray,
    offsets: np.ndarray,
    ok: np.ndarray,
    length: np.ndarray,
    mapping: np.ndarray,
) -> None:
    """Add ``lambda_in`` of every step into its prompt's per-step accumulator (bincount)."""
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return
    lens = length[rows]
    starts = offsets[rows]
    total = int(lens.sum())
    first_step = np.cumsum(lens) - lens  # where each rollout's steps begin in the flat order
    if rows.size == len(ok) and starts[0] == 0 and offsets[-1] == total:
        values = lam[:total]  # every row valid and contiguous: no gather needed
    else:
        values = lam[np.repeat(starts - first_step, lens) + np.arange(total)]
    # cell = local prompt * width + step position, built with one repeat and one add
    uniq, local = np.unique(code[rows], return_inverse=True)
    width = int(lens.max())
    cell = np.repeat(local * width - first_step, lens)
    cell += np.arange(total, dtype=np.int64)
    size = len(uniq) * width
    sums = np.bincount(cell, weights=values, minlength=size).reshape(len(uniq), width)
    for j, g in enumerate(uniq):  # loop over prompts only
        acc = hazard[g]
        if acc.size < width:
            acc = np.concatenate([acc, np.zeros(width - acc.size)])
        acc[:width] += sums[j]
        hazard[g] = acc


# ----------------------------------------------------------------------------------------
# Per-prompt statistics
# ----------------------------------------------------------------------------------------
def _padded(values: np.ndarray, code: np.ndarray, pos: np.ndarray, shape, fill) -> np.ndarray:
    out = np.full(shape, fill, dtype=np.float64)
    out[code, pos] = values
    return out


def _kendall_tau_b(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Kendall tau-b per row of NaN-padded matrices, by pair-sign products in prompt chunks."""
    P, M = X.shape
    out = np.full(P, np.nan)
    chunk = max(1, int(4_000_000 // max(M * M, 1)))
    for a in range(0, P, chunk):  # loop over chunks of prompts
        x = X[a : a + chunk]
        y = Y[a : a + chunk]
        sx = np.nan_to_num(np.sign(x[:, :, None] - x[:, None, :])).astype(np.int8)
        sy = np.nan_to_num(np.sign(y[:, :, None] - y[:, None, :])).astype(np.int8)
        s = (sx.astype(np.int32) * sy).sum(axis=(1, 2)) / 2.0
        nx = np.count_nonzero(sx, axis=(1, 2)) / 2.0
        ny = np.count_nonzero(sy, axis=(1, 2)) / 2.0
        with np.errstate(invalid="ignore", divide="ignore"):
            tau = s / np.sqrt(nx * ny)
        out[a : a + chunk] = np.where((nx > 0) & (ny > 0), tau, np.nan)
    return out


def _pearson_by_code(x: np.ndarray, y: np.ndarray, code: np.ndarray, P: int, m: np.ndarray):
    """Per-prompt Pearson r, population covariance and sample covariance (ddof 1), centred."""
    xbar = np.bincount(code, x, P) / m
    ybar = np.bincount(code, y, P) / m
    dx = x - xbar[code]
    dy = y - ybar[code]
    sxy = np.bincount(code, dx * dy, P)
    sxx = np.bincount(code, dx * dx, P)
    syy = np.bincount(code, dy * dy, P)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
        r = np.where((sxx > 0) & (syy > 0), r, np.nan)
        cov_sample = np.where(m > 1, sxy / (m - 1), np.nan)
    return r, sxy / m, cov_sample


def _histogram_entropy(length: np.ndarray, cut: np.ndarray, code: np.ndarray, m: np.ndarray):
    """Plug-in H(N) per prompt; a length reached without EOS is its own outcome."""
    P = len(m)
    key = (code * (2 * (int(length.max()) + 1))) + 2 * length + cut.astype(np.int64)
    uniq, counts = np.unique(key, return_counts=True)
    owner = uniq // (2 * (int(length.max()) + 1))
    p = counts / m[owner]
    return np.bincount(owner, entr(p), P)


@dataclass
class TailFit:
    """Per-prompt geometric fit of the upper length law (above threshold ``u``)."""

    u: np.ndarray
    hazard: np.ndarray  # per-step stopping probability above u
    surv_u: np.ndarray  # empirical P(N > u)
    exposure: np.ndarray  # steps at risk above u
    events: np.ndarray  # stops (not cuts) above u
    n_max: np.ndarray  # longest rollout


def _fit_tail(
    length: np.ndarray,
    truncated: np.ndarray,
    code: np.ndarray,
    m: np.ndarray,
    cap: np.ndarray,
    sorted_len: np.ndarray,
) -> TailFit:
    """Geometric (discrete exponential) fit to the upper survival curve of N, per prompt.

    Threshold u = the 75th-percentile length, kept below the cap T and below the longest
    rollout that stopped (so at least one stop lies above it); above u the per-step
    stopping hazard is fitted by censored maximum likelihood (stops / steps at risk, cut
    rollouts censored), so P(N > t) = P(N > u) (1 - hazard)^(t - u) for t >= u.
    """
    P = len(m)
    idx = np.arange(P)
    u = sorted_len[idx, np.floor(0.75 * (m - 1)).astype(np.int64)]
    longest_stop = np.full(P, -np.inf)  # u stays below the longest rollout that stopped
    np.maximum.at(longest_stop, code[~truncated], length[~truncated])
    u = np.minimum(u, cap - 1)
    u = np.where(np.isfinite(longest_stop), np.minimum(u, longest_stop - 1), u)
    above = length > u[code]
    events = np.bincount(code, above & ~truncated, P)
    exposure = np.bincount(code, np.where(above, length - u[code], 0), P)
    with np.errstate(invalid="ignore", divide="ignore"):
        hazard = events / exposure
    return TailFit(
        u=u,
        hazard=hazard,
        surv_u=np.bincount(code, above, P) / m,
        exposure=exposure,
        events=events,
        n_max=sorted_len[idx, m.astype(np.int64) - 1],
    )


def _tail_sum(fit: TailFit, cap: np.ndarray) -> np.ndarray:
    """sum_{t >= T} P(N > t) = P(N > u) (1 - h)^(T - u) / h under the geometric fit."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        tail = fit.surv_u * np.power(1.0 - fit.hazard, cap - fit.u) / fit.hazard
    tail = np.where(fit.exposure > 0, tail, 0.0)
    return np.where((fit.exposure > 0) & (fit.events == 0), np.inf, tail)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
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


def per_rollout_frame(source: Any) -> pd.DataFrame:
    """One row per rollout: keys, prompt_id, rollout_index, length, finish_reason, H, rate,
    surprisal, stop_entropy (streamed; per-step lists never leave their batch)."""
    store = _as_store(source)
    red = _reduce(store if store is not None else source)
    keys = np.array(red.prompt_keys, dtype=object).reshape(-1, len(PROMPT_KEYS))
    frame = pd.DataFrame({k: keys[red.code, j] for j, k in enumerate(PROMPT_KEYS)})
    frame["rollout_index"] = red.rollout_index
    frame["length"] = red.length
    frame["finish_reason"] = red.finish
    frame["H"] = red.H
    frame["rate"] = red.H / red.length
    frame["surprisal"] = red.surprisal
    frame["stop_entropy"] = red.stop_entropy
    return frame.sort_values([*PROMPT_KEYS, "rollout_index"], kind="stable").reset_index(drop=True)


def _caps_and_hmax(
    models: np.ndarray,
    code: np.ndarray,
    N: np.ndarray,
    truncated: np.ndarray,
    manifest: Manifest,
    h_max: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt: the length cap T, H_max and whether T is known.

    T: the length of the prompt's cut rollouts (the data is authoritative), else the
    manifest's max_new_tokens for the model, else the model's cut length, else (not known)
    the prompt's longest rollout. H_max: --h-max, else log top_k / log vocab_size from the
    manifest, else NaN.
    """
    P = len(models)
    cut_len = np.full(P, -np.inf)
    np.maximum.at(cut_len, code[truncated], N[truncated])
    longest = np.full(P, -np.inf)
    np.maximum.at(longest, code, N)
    cap = np.where(np.isfinite(cut_len), cut_len, np.nan)
    hmax = np.empty(P, dtype=np.float64)
    for model in np.unique(models):  # loop over models only
        sel = models == model
        configured = manifest.max_new_tokens(str(model))
        model_cut = cut_len[sel].max()
        fallback = (
            float(configured) if configured else (model_cut if np.isfinite(model_cut) else np.nan)
        )
        cap[sel] = np.where(np.isnan(cap[sel]), fallback, cap[sel])
        hmax[sel] = _h_max_for(manifest, str(model), h_max)
    known = ~np.isnan(cap)
    return np.where(known, cap, longest), hmax, known


def _h_max_for(manifest: Manifest, model: str, h_max: float | None) -> float:
    if h_max is not None:
        return float(h_max)
    record = manifest.model(model)
    bound = record.h_max if record is not None else None
    return float("nan") if bound is None else bound


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


def _pool(
    prompts: pd.DataFrame,
    by: tuple[str, ...],
    delta: float,
    approximate: bool,
    hmax: np.ndarray,
) -> tuple[pd.DataFrame, dict[tuple, list[str]]]:
    rows = []
    notes: dict[tuple, list[str]] = {}
    grouped = prompts.groupby(list(by), sort=True) if by else [((), prompts)]
    for key, g in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row, group_notes = pool_group(g, delta)
        if approximate:
            group_notes.append(
                "entropies come from top-k logprobs only: CE* and rates are lower bounds"
            )
        if not np.isfinite(hmax[g.index.to_numpy()]).all():
            group_notes.append(
                "truncation_bias_bound unknown: no top_k or vocab_size in the manifest; "
                "pass --h-max"
            )
        rows.append({**dict(zip(by, key, strict=True)), **row})
        notes[key] = group_notes
    pooled = pd.DataFrame(rows, columns=[*by, *METRIC_COLUMNS, *_extra_columns(prompts)])
    return pooled, notes


def _extra_columns(prompts: pd.DataFrame) -> list[str]:
    """Merged per-prompt columns (e.g. diversity) pooled beside the metrics."""
    known = {*PROMPT_KEYS, *METRIC_COLUMNS}
    return [c for c in prompts.columns if c not in known]


def pool_group(g: pd.DataFrame, delta: float = 0.05) -> tuple[dict[str, float], list[str]]:
    """Pool one group's per-prompt rows (SPEC sections 2-5); returns (metrics, notes)."""
    notes: list[str] = []
    n = g["n_rollouts"].to_numpy(dtype=np.float64)
    P = len(g)
    ce = g["ce_star"].to_numpy()
    nbar = g["mean_length"].to_numpy()
    rbar = g["entropy_rate"].to_numpy()
    ce_pool = ce.mean()
    nbar_pool = nbar.mean()
    rbar_pool = rbar.mean()
    rate_length = nbar_pool * rbar_pool
    between = float(np.mean((nbar - nbar_pool) * (rbar - rbar_pool)))
    within = float(g["within_cov_term"].mean())
    stop_pool = float(g["stop_entropy"].mean())
    h_n = float(g["length_entropy"].mean())
    h_hist = float(g["length_entropy_hist"].mean())
    h_content = h_n if math.isfinite(h_n) else h_hist

    # SPEC section 5: Var = s_b^2 / P + E[s_w^2 / M] / P (method of moments, s_b^2 >= 0)
    within_mean = g["ce_star_var_within"].to_numpy()  # s_w^2 / M_p per prompt (NaN for M = 1)
    known = np.isfinite(within_mean)
    # prompts with one rollout have no within variance: estimate E[s_w^2 / M] from the others
    var_within = float(within_mean[known].mean()) / P if known.any() else float("nan")
    if P >= 2:
        var_prompts = float(np.var(ce, ddof=1))
        if math.isfinite(var_within):
            var_between = max(var_prompts - var_within * P, 0.0) / P
            variance = var_between + var_within
            if not known.all():
                notes.append(
                    f"{int((~known).sum())} prompts have one rollout: the within-prompt variance "
                    f"is estimated from the {int(known.sum())} prompts with two or more"
                )
            if variance == 0:
                notes.append("SE is 0: every rollout has the same total entropy (e.g. greedy)")
            elif var_between >= var_within:
                notes.append("SE dominated by between-prompt variance: add more prompts")
            else:
                notes.append("SE dominated by within-prompt variance: add more rollouts per prompt")
        else:
            var_between = float("nan")
            variance = var_prompts / P
    else:
        var_between = float("nan")
        variance = var_within
        notes.append("one prompt: the SE is conditional on this prompt (no between-prompt part)")
    trunc_rate = float(g["truncation_rate"].mean())
    if trunc_rate > TRUNCATION_WARN_RATE:
        notes.append(
            f"{100 * trunc_rate:.1f}% of rollouts hit the length cap: CE* is a lower bound "
            "(see truncation_bias_bound); raise max_new_tokens"
        )
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = {
            "ce_star": ce_pool,
            "ce_star_surprisal": float(g["ce_star_surprisal"].mean()),
            "mean_length": nbar_pool,
            "genppl": math.exp(ce_pool / nbar_pool),
            "entropy_rate": rbar_pool,
            "bf": math.exp(rbar_pool),
            "truncation_rate": trunc_rate,
            "pearson": float(pool_fisher(g["pearson"].to_numpy(), n)),
            "spearman": float(pool_fisher(g["spearman"].to_numpy(), n)),
            "kendall": float(pool_kendall(g["kendall"].to_numpy(), n)),
            "covariance": float(pool_covariance(g["covariance"].to_numpy(), n)),
            "rate_length_term": rate_length,
            "within_cov_term": within,
            "between_cov_term": between,
            "stop_entropy": stop_pool,
            "stop_entropy_share": stop_pool / ce_pool if ce_pool != 0 else float("nan"),
            "length_entropy": h_n,
            "length_entropy_hist": h_hist,
            "content_entropy": ce_pool - h_content,
            "ce_star_se": math.sqrt(variance) if math.isfinite(variance) else float("nan"),
            "ce_star_var_between": var_between,
            "ce_star_var_within": var_within,
            "chebyshev_bound": math.sqrt(variance / delta)
            if math.isfinite(variance)
            else float("nan"),
            "truncation_bias_bound": float(g["truncation_bias_bound"].mean()),
            "n_rollouts": int(n.sum()),
            "n_prompts": P,
        }
    for col in _extra_columns(g):
        values = g[col].to_numpy(dtype=np.float64)
        if col == "corr_length_d":
            out[col] = float(pool_fisher(values, n))
        elif col == "vendi":
            out[col] = pool_vendi(values)  # geometric mean (SPEC section 6)
        else:
            finite = values[np.isfinite(values)]
            out[col] = float(finite.mean()) if finite.size else float("nan")
    return out, notes


def _warn_notes(notes: dict[tuple, list[str]]) -> None:
    loud = {k: [n for n in v if "length cap" in n] for k, v in notes.items()}
    loud = {k: v for k, v in loud.items() if v}
    if not loud:
        return
    from rich.console import Console

    err = Console(stderr=True)
    for key, msgs in loud.items():
        for msg in msgs:
            err.print(f"[bold yellow]warning[/] {'/'.join(map(str, key))}: {msg}", highlight=False)


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
    import pyarrow.parquet as pq

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
