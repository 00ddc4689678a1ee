"""The streaming pass over the store: per-step lists reduced, batch by batch, to per-rollout
scalars and per-prompt EOS-hazard accumulators (flat arrays + offsets, no per-step Python)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from canopy_entropy.errors import CanopyError
from canopy_entropy.metrics.columns import _KEY_SEPARATOR, _READ_COLUMNS, PROMPT_KEYS
from canopy_entropy.store import ROLLOUT_SCHEMA, SCHEMA_VERSION, RunStore, iter_file_batches
from canopy_entropy.threads import scan_threads


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


# Below this p the series of -(1-p) log(1-p) to p^4 is exact in float64 (the next term is
# p^5/20 < 1e-16 p); it avoids a second logarithm for the usual tiny EOS probabilities and
# the cancellation of forming 1 - p.
_SERIES_BELOW = 1e-4


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """h(p) = -p log p - (1-p) log(1-p) in nats, float64, with h(0) = h(1) = 0.

    One logarithm per value: for small p, -(1-p) log(1-p) = p - p^2/2 - p^3/6 - p^4/12 - ...
    (its series), so h = p (1 - log p - p/2 - p^2/6 - p^3/12); log1p for the others. Exact to
    float64 rounding, also where forming 1 - p would lose p (p below ~1e-16)."""
    x = np.array(p, dtype=np.float64)  # a float64 copy of the float32 values
    np.clip(x, 0.0, 1.0, out=x)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_x = np.log(x)  # -inf at 0
        h = x * (-1.0 / 12.0)  # Horner, in place: few passes over the steps
        h -= 1.0 / 6.0
        h *= x
        h -= 0.5
        h *= x
        h += 1.0
        h -= log_x
        h *= x  # NaN where x = 0 (0 * inf), set below
        big = np.flatnonzero(x >= _SERIES_BELOW)
        if big.size:
            r = x[big]
            exact = -r * log_x[big] - (1.0 - r) * np.log1p(-r)
            h[big] = np.where(r < 1.0, exact, 0.0)
    h[x == 0.0] = 0.0
    return h


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
    hazard: list[np.ndarray]  # per prompt and step: sum of lambda over the rollouts that reach it
    entropy_steps: list[np.ndarray]  # per prompt and step: sum of H_t over those rollouts


def _iter_source_batches(source: Any, batch_size: int):
    if isinstance(source, pd.DataFrame):  # rollouts as a DataFrame of ROLLOUT_SCHEMA columns
        table = pa.Table.from_pandas(source, preserve_index=False)
        types = {f.name: f.type for f in ROLLOUT_SCHEMA}
        source = pa.table(
            {c: table[c].cast(types[c]) if c in types else table[c] for c in table.column_names}
        )
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
        files = source.shard_files()
        if not files:
            source.dataset()  # the store's own "no rollouts" error
        workers = max(1, min(len(files), scan_threads()))

        def one(path: Path) -> _Reduced | None:
            # verified read: content digest and page checksums (a damaged shard raises)
            return _reduce_stream(
                iter_file_batches(
                    path, SCHEMA_VERSION, _READ_COLUMNS, batch_size=batch_size, use_threads=False
                )
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


def _merge_partials(partials: list[_Reduced]) -> _Reduced:
    """Combine per-shard reductions: remap prompt codes, concatenate, add per-step sums."""
    key_to_code: dict[tuple[str, ...], int] = {}
    steps: dict[str, list[np.ndarray]] = {"hazard": [], "entropy_steps": []}
    codes = []
    for part in partials:
        mapping = np.empty(len(part.prompt_keys), dtype=np.int64)
        for j, key in enumerate(part.prompt_keys):  # loop over prompts only
            g = key_to_code.get(key)
            if g is None:
                g = key_to_code[key] = len(key_to_code)
                for name, acc in steps.items():
                    acc.append(getattr(part, name)[j])
            else:
                for name, acc in steps.items():
                    acc[g] = _add_padded(acc[g], getattr(part, name)[j])
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
        **steps,
    )


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` for per-step sums of different lengths (the shorter one padded with zeros)."""
    if a.size < b.size:
        a, b = b, a
    out = a.copy()
    out[: b.size] += b
    return out


def _reduce_stream(batches) -> _Reduced | None:
    """Reduce one stream of record batches (per-step lists never leave their batch)."""
    key_to_code: dict[tuple[str, ...], int] = {}
    hazard: list[np.ndarray] = []
    entropy_steps: list[np.ndarray] = []
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
                entropy_steps.append(np.zeros(0))
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
        every = np.ones(n, dtype=bool)

        lp, lp_off, lp_valid = _list_parts(batch.column("logprob"))
        surprisal = -segment_sums(lp, lp_off)
        lp_ok = lp_valid & (np.diff(lp_off) == length)
        surprisal[~lp_ok] = np.nan

        lam, lam_off, lam_valid = _list_parts(batch.column("eos_prob"))
        lam_ok = lam_valid & (np.diff(lam_off) == length)
        stop = np.full(n, np.nan)
        sums = [(entropy_steps, ent, off)]
        if lam_ok.any():
            lo, hi = int(lam_off[0]), int(lam_off[-1])
            lam_slice = lam[lo:hi]
            stop[lam_ok] = segment_sums(binary_entropy(lam_slice), lam_off - lo)[lam_ok]
            if lam_ok.all():  # the usual case: both sums share one cell index
                sums.append((hazard, lam_slice, lam_off - lo))
            else:
                _accumulate_steps([(hazard, lam_slice, lam_off - lo)], code, lam_ok, length)
        _accumulate_steps(sums, code, every, length)

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
        entropy_steps=entropy_steps,
    )


def _accumulate_steps(
    sums: list[tuple[list[np.ndarray], np.ndarray, np.ndarray]],
    code: np.ndarray,
    ok: np.ndarray,
    length: np.ndarray,
) -> None:
    """Add each step's value into its prompt's per-step accumulator (one bincount per
    ``(accumulators, flat values, row offsets)`` of ``sums``, over the rows ``ok``): for
    ``eos_prob`` the EOS-hazard numerator, for ``entropy`` the running-rate curves."""
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return
    lens = length[rows]
    total = int(lens.sum())
    first_step = np.cumsum(lens) - lens  # where each rollout's steps begin in the flat order
    # cell = local prompt * width + step position, built with one repeat and one add
    uniq, local = np.unique(code[rows], return_inverse=True)
    width = int(lens.max())
    cell = np.repeat(local * width - first_step, lens)
    cell += np.arange(total, dtype=np.int64)
    size = len(uniq) * width
    for accs, values, offsets in sums:
        starts = offsets[rows]
        if rows.size == len(ok) and starts[0] == 0 and offsets[-1] == total:
            flat = values[:total]  # every row and contiguous: no gather needed
        else:
            flat = values[np.repeat(starts - first_step, lens) + np.arange(total)]
        added = np.bincount(cell, weights=flat, minlength=size).reshape(len(uniq), width)
        for j, g in enumerate(uniq):  # loop over prompts only
            accs[g] = _add_padded(accs[g], added[j])


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
