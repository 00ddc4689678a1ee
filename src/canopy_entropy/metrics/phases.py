"""Reasoning / answer phase splits of stored rollouts (``[analysis] phase_markers``).

Every rollout is split once, right after the first occurrence of any phase marker (e.g.
``</think>``): its steps up to and including the marker's tokens are the *reasoning* phase,
the rest the *answer* phase. A rollout without a marker is all reasoning (its answer phase is
empty: length 0, entropy 0). CE*, mean length, the entropy rate and rho(N, r) are then computed
per phase exactly as for whole rollouts (``phase = "whole"`` reproduces the metrics stage), a
re-analysis of the stored per-step arrays: nothing is sampled again.

Matching works on token ids, not text. Each marker is encoded with the run's tokenizer alone
and after a space, a newline and a letter (BPE tokenizers often merge a marker with the
character before it), and the earliest end of any of these id sequences splits the rollout
(one vectorised comparison per marker token over the batch's flat id array). A rollout whose
decoded text holds the marker although none of the id sequences occurs (the marker tokenised
some other way in context) is split at the first step whose decoded prefix contains the
marker, found by bisection over prefixes; ``matched_by`` records which rule split it
('tokens', 'text' or 'none').
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError
from canopy_entropy.metrics.columns import DEFAULT_BY, PROMPT_KEYS
from canopy_entropy.metrics.prompt_stats import _pearson_by_code
from canopy_entropy.metrics.scan import _list_parts, segment_sums
from canopy_entropy.stats.pooling import pooled_statistics

PHASES = ("whole", "reasoning", "answer")
PHASE_COLUMNS = ("ce_star", "mean_length", "entropy_rate", "genppl", "bf", "pearson")
PHASES_SCHEMA_VERSION = "canopy-phases/1"
_CONTEXTS = ("", " ", "\n", "a")  # what may precede a marker when it is tokenised in context
_READ = [*PROMPT_KEYS, "rollout_index", "length", "token_ids", "entropy"]


def marker_sequences(tokenizer: Any, markers: Sequence[str]) -> list[np.ndarray]:
    """The token id sequences that spell any of ``markers``: each alone and as it tokenises
    after a space, a newline or a letter (distinct sequences, longest first)."""
    seqs: set[tuple[int, ...]] = set()
    for marker in markers:
        for prefix in _CONTEXTS:
            head = list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []
            ids = list(tokenizer(prefix + marker, add_special_tokens=False)["input_ids"])
            if ids[: len(head)] == head and len(ids) > len(head):
                seqs.add(tuple(ids[len(head) :]))
    if not seqs:
        raise CanopyError(f"the phase markers {list(markers)} encode to no tokens; fix them")
    return [np.asarray(s, dtype=np.int64) for s in sorted(seqs, key=lambda s: (-len(s), s))]


def first_match_end(
    tokens: np.ndarray, offsets: np.ndarray, sequences: Sequence[np.ndarray]
) -> np.ndarray:
    """Per row (``offsets`` into the flat ``tokens``): the step count up to and including the
    end of the earliest occurrence of any of ``sequences`` (-1 where none occurs)."""
    n_rows = len(offsets) - 1
    best = np.full(n_rows, np.iinfo(np.int64).max)
    total = len(tokens)
    if total == 0:
        return np.full(n_rows, -1)
    row = np.repeat(np.arange(n_rows), np.diff(offsets))
    pos = np.arange(total) - offsets[:-1][row]  # step index inside its rollout
    room = offsets[1:][row] - np.arange(total)  # steps left in the rollout from here
    for seq in sequences:
        k = len(seq)
        hit = (room >= k) & (tokens == seq[0])
        for j in range(1, k):  # loop over the marker's tokens only
            nxt = np.zeros(total, dtype=bool)
            nxt[: total - j] = tokens[j:] == seq[j]
            hit &= nxt
        where = np.flatnonzero(hit)
        if where.size:
            rows, first = np.unique(row[where], return_index=True)  # earliest per row
            np.minimum.at(best, rows, pos[where[first]] + k)
    return np.where(best == np.iinfo(np.int64).max, -1, best)


def _text_split(tokenizer: Any, ids: list[int], markers: Sequence[str]) -> int:
    """Smallest k whose decoded prefix ``ids[:k]`` holds a marker (bisection; -1 if none)."""

    def holds(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        return any(m in text for m in markers)

    if not holds(len(ids)):
        return -1
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo


@dataclass
class PhaseResult:
    """Per-phase metrics of a run: ``rollouts`` (one row per rollout: keys, split, matched_by,
    length, H of each phase), ``prompts`` and ``pooled`` (one row per prompt / group and
    phase, phase in ``PHASES``)."""

    rollouts: pd.DataFrame
    prompts: pd.DataFrame
    pooled: pd.DataFrame
    markers: tuple[str, ...]
    by: tuple[str, ...] = DEFAULT_BY
    notes: list[str] = field(default_factory=list)

    def save(self, run_dir: str | os.PathLike[str]) -> list[Path]:
        """Write RUN/metrics/phases.parquet (pooled) and phase_prompts.parquet, atomically."""
        from canopy_entropy.store import atomic_write_table

        paths = []
        meta = {b"markers": "\x1f".join(self.markers).encode(),
                b"inputs": phases_inputs(run_dir, self.markers).encode()}  # fmt: skip
        for path, frame in zip(phases_paths(run_dir), (self.pooled, self.prompts), strict=True):
            table = pa.Table.from_pandas(frame, preserve_index=False)
            atomic_write_table(path, table.replace_schema_metadata(meta), PHASES_SCHEMA_VERSION)
            paths.append(path)
        return paths


def phases_inputs(run_dir: str | os.PathLike[str], markers: Sequence[str]) -> str:
    """Fingerprint of what a phase split is computed from (rollouts, manifest, markers)."""
    from canopy_entropy.run.freshness import input_fingerprint

    return input_fingerprint(run_dir, ("manifest.json", "rollouts"), {"markers": list(markers)})


def phases_paths(run_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``RUN/metrics/phases.parquet`` (pooled per group and phase) and
    ``RUN/metrics/phase_prompts.parquet`` (per prompt and phase)."""
    folder = Path(run_dir) / "metrics"
    return folder / "phases.parquet", folder / "phase_prompts.parquet"


def _tokenizer_for(label: str, manifest: Any) -> Any:
    from transformers import AutoTokenizer

    from canopy_entropy.models import resolve_model

    record = manifest.model(label)
    if record is None:
        raise CanopyError(f"model '{label}' is not in the run's manifest; its tokenizer is unknown")
    try:
        return AutoTokenizer.from_pretrained(resolve_model(record.model))
    except (OSError, ValueError) as exc:
        raise CanopyError(
            f"cannot load the tokenizer of '{label}' ({record.model}) to find the phase markers "
            f"({exc}); make it available offline or pass tokenizers={{'{label}': ...}}"
        ) from exc


def _split_batch(batch: pa.RecordBatch, tokenizer: Any, seqs, markers) -> dict[str, np.ndarray]:
    """Per-rollout split and phase sums of one batch of one model's rollouts."""
    col = batch.column("token_ids")
    if col.null_count:
        raise CanopyError(
            "phase splits need each rollout's token ids, and some rollouts were stored without "
            "them (imported as text); re-import them with token ids or drop [analysis] "
            "phase_markers"
        )
    tokens, off, _ = _list_parts(col)
    ent, ent_off, _ = _list_parts(batch.column("entropy"))
    tokens = tokens.astype(np.int64)
    length = np.diff(ent_off)
    split = first_match_end(tokens[off[0] : off[-1]], off - off[0], seqs)
    matched = np.where(split >= 0, "tokens", "none").astype(object)
    for i in np.flatnonzero(split < 0):  # loop over unmatched rollouts only (text fallback)
        ids = tokens[off[i] : off[i + 1]].tolist()
        k = _text_split(tokenizer, ids, markers)
        if k > 0:
            split[i], matched[i] = k, "text"
    split = np.minimum(np.where(split < 0, length, split), length)
    starts = ent_off[:-1] - ent_off[0]
    bounds = np.empty(2 * len(length) + 1, dtype=np.int64)
    bounds[0:-1:2], bounds[1:-1:2], bounds[-1] = starts, starts + split, ent_off[-1] - ent_off[0]
    # alternating reasoning / answer sums (float64); a trailing zero keeps an empty last answer
    # segment from clipping the reasoning segment before it
    padded = np.append(ent[ent_off[0] : ent_off[-1]], np.float32(0))
    parts = segment_sums(padded, np.append(bounds, bounds[-1] + 1))[:-1]
    keys = {k: batch.column(k).to_numpy(zero_copy_only=False) for k in PROMPT_KEYS}
    return {
        **keys,
        "rollout_index": batch.column("rollout_index").to_numpy().astype(np.int64),
        "split": split,
        "matched_by": matched,
        "length": length,
        "H": segment_sums(ent, ent_off),
        "H_reasoning": parts[0::2],
        "H_answer": parts[1::2],
    }


def phase_rollouts(
    source: Any,
    markers: Sequence[str],
    tokenizers: Mapping[str, Any] | None = None,
    batch_size: int = 1024,
) -> pd.DataFrame:
    """One row per rollout of a run folder: where it splits (``split`` = reasoning length),
    how (``matched_by``) and the summed entropy of the whole rollout and of each phase.
    ``tokenizers`` (label -> tokenizer) overrides the ones loaded from the manifest."""
    from canopy_entropy.run.manifest import read_manifest
    from canopy_entropy.store import SCHEMA_VERSION, RunStore, iter_file_batches

    markers = tuple(markers)
    if not markers:
        raise CanopyError("no phase markers given; pass e.g. markers=['</think>']")
    store = source if isinstance(source, RunStore) else RunStore(Path(source))
    manifest = read_manifest(store.root)
    tokenizers = dict(tokenizers or {})
    seqs: dict[str, list[np.ndarray]] = {}
    parts: list[dict[str, np.ndarray]] = []
    for path in store.shard_files():
        for batch in iter_file_batches(path, SCHEMA_VERSION, _READ, batch_size=batch_size):
            if batch.num_rows == 0:
                continue
            models = batch.column("model").to_numpy(zero_copy_only=False)
            for label in np.unique(models):  # loop over the batch's models only
                label = str(label)
                if label not in tokenizers:
                    tokenizers[label] = _tokenizer_for(label, manifest)
                if label not in seqs:
                    seqs[label] = marker_sequences(tokenizers[label], markers)
                sub = batch.filter(pa.array(models == label))
                parts.append(_split_batch(sub, tokenizers[label], seqs[label], markers))
    if not parts:
        raise CanopyError("no rollouts found; generate some with 'canopy generate' or import them")
    frame = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    frame["length_reasoning"] = frame["split"]
    frame["length_answer"] = frame["length"] - frame["split"]
    return frame.sort_values([*PROMPT_KEYS, "rollout_index"], ignore_index=True)


def _prompt_stats(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per prompt and phase: CE*, mean length, entropy rate (over rollouts with steps in the
    phase), rho(N, r) and counts; vectorised over prompts with bincount."""
    keys = list(PROMPT_KEYS)
    grouped = rollouts.groupby(keys, sort=True)
    code = grouped.ngroup().to_numpy()
    uniq = grouped.size().reset_index()[keys]
    P = len(uniq)
    m = np.bincount(code, minlength=P).astype(np.float64)
    found = (rollouts["matched_by"] != "none").to_numpy(np.float64)
    frames = []
    for phase in PHASES:  # loop over the three phases only
        suffix = "" if phase == "whole" else f"_{phase}"
        H = rollouts[f"H{suffix}"].to_numpy(np.float64)
        N = rollouts[f"length{suffix}" if suffix else "length"].to_numpy(np.float64)
        has = N > 0
        n_has = np.bincount(code[has], minlength=P).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = H[has] / N[has]
            rbar = np.bincount(code[has], r, P) / n_has
            pearson = np.full(P, np.nan)
            ok = n_has > 0
            if has.any():
                rho, _, _ = _pearson_by_code(N[has], r, code[has], P, np.where(ok, n_has, 1.0))
                pearson = np.where(ok, rho, np.nan)
            ce = np.bincount(code, H, P) / m
            nbar = np.bincount(code, N, P) / m
            stats = pd.DataFrame({
                "phase": phase,
                "ce_star": ce,
                "mean_length": nbar,
                "entropy_rate": rbar,
                "genppl": np.exp(ce / nbar),
                "bf": np.exp(rbar),
                "pearson": pearson,
                "n_rollouts": m.astype(np.int64),
                "n_with_phase": n_has.astype(np.int64),
                "marker_share": np.bincount(code, found, P) / m,
            })  # fmt: skip
        frames.append(pd.concat([uniq, stats], axis=1))
    return pd.concat(frames, ignore_index=True)


def _pool(prompts: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group and phase, with the metrics' pooling rules (means over prompts, GenPPL and BF
    from the pooled means, rho Fisher-pooled with weights from the rollouts in the phase)."""
    rows = []
    for key, g in prompts.groupby([*by, "phase"], sort=True):
        key = key if isinstance(key, tuple) else (key,)
        stats = {c: g[c].to_numpy(np.float64) for c in ("ce_star", "mean_length", "entropy_rate")}
        stats["pearson"] = g["pearson"].to_numpy(np.float64)
        stats["n_rollouts"] = g["n_with_phase"].to_numpy(np.float64)
        pooled = pooled_statistics(stats)
        rows.append({
            **dict(zip([*by, "phase"], key, strict=True)),
            **{c: float(pooled[c]) for c in PHASE_COLUMNS},
            "n_prompts": len(g),
            "n_rollouts": int(g["n_rollouts"].sum()),
            "n_with_phase": int(g["n_with_phase"].sum()),
            "marker_share": float(np.average(g["marker_share"], weights=g["n_rollouts"])),
        })  # fmt: skip
    order = {p: i for i, p in enumerate(PHASES)}
    out = pd.DataFrame(rows)
    return out.sort_values([*by, "phase"], key=lambda s: s.map(order) if s.name == "phase" else s,
                           ignore_index=True)  # fmt: skip


def compute_phases(
    source: Any,
    markers: Sequence[str],
    by: Sequence[str] = DEFAULT_BY,
    tokenizers: Mapping[str, Any] | None = None,
) -> PhaseResult:
    """CE*, mean length, entropy rate, GenPPL, BF and rho(N, r) per phase ('whole',
    'reasoning', 'answer') per prompt and pooled per ``by`` group, from a run folder's stored
    rollouts split at the first of ``markers`` (nothing is written)."""
    by = tuple(by)
    bad = [c for c in by if c not in PROMPT_KEYS or c == "prompt_id"]
    if bad:
        raise CanopyError(f"cannot group phases by {bad}; choose from {list(PROMPT_KEYS[:-1])}")
    rollouts = phase_rollouts(source, markers, tokenizers)
    prompts = _prompt_stats(rollouts)
    notes = []
    by_text = int((rollouts["matched_by"] == "text").sum())
    if by_text:
        notes.append(
            f"{by_text} rollouts hold a marker only in their text (it tokenised differently in "
            "context): split at the first step whose decoded prefix contains it"
        )
    none = int((rollouts["matched_by"] == "none").sum())
    if none:
        notes.append(f"{none} of {len(rollouts)} rollouts have no marker: all reasoning")
    return PhaseResult(rollouts, prompts, _pool(prompts, by), tuple(markers), by, notes)


def write_metrics_and_phases(
    run_dir: str | os.PathLike[str], phase_markers: Sequence[str] = (), **kwargs: Any
) -> Any:
    """The metrics stage: ``write_metrics``, then the phase split of the same rollouts when
    ``[analysis] phase_markers`` are set (an old phases file is removed when they are not)."""
    from canopy_entropy.metrics.result import write_metrics

    result = write_metrics(run_dir, **kwargs)
    if phase_markers:
        compute_phases(run_dir, phase_markers).save(run_dir)
    else:
        for path in phases_paths(run_dir):
            path.unlink(missing_ok=True)
    return result


def read_phases(run_dir: str | os.PathLike[str]) -> tuple[pd.DataFrame, tuple[str, ...]] | None:
    """The saved pooled phase table of a run and its markers (None when there is none); a
    CanopyError naming the command when it is older than the rollouts it was split from."""
    from canopy_entropy.store import read_table

    path = phases_paths(run_dir)[0]
    if not path.exists():
        return None
    table = read_table(path, PHASES_SCHEMA_VERSION)
    meta = table.schema.metadata or {}
    raw = meta.get(b"markers", b"")
    markers = tuple(raw.decode().split("\x1f")) if raw else ()
    if meta.get(b"inputs", b"").decode() != phases_inputs(run_dir, markers):
        raise CanopyError(
            f"the phase split of {run_dir} is older than its rollouts; run 'canopy phases "
            f"{run_dir}' (or the metrics stage) again"
        )
    return table.to_pandas(), markers
