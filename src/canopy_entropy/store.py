"""Rollout store: a run folder of Parquet shards, written atomically, read by streaming.

Layout of a run folder::

    RUN/manifest.json            run manifest (config, versions, tokenizer hashes, seed scheme)
    RUN/rollouts/<shard>.parquet one row per rollout (ROLLOUT_SCHEMA)
    RUN/prompts/<shard>.parquet  one row per (model, task, prompt) (PROMPT_SCHEMA)

Every shard is written to a temporary file, fsync'ed and renamed into place, so a reader never
sees a partial shard and a killed writer leaves at most a ``.tmp`` file that is ignored. Each
shard carries ``canopy.schema`` in its Parquet key-value metadata; a shard without it (foreign)
or one that cannot be parsed (corrupt) is reported by path with the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from canopy_entropy.errors import StoreError

SCHEMA_VERSION = "canopy-rollouts/1"
PROMPT_SCHEMA_VERSION = "canopy-prompts/1"
FINISH_REASONS = ("eos", "length", "stop")
META_KEY = b"canopy.schema"

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("rollout_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=True),
        pa.field("entropy", pa.list_(pa.float32()), nullable=False),
        pa.field("eos_prob", pa.list_(pa.float32()), nullable=True),
        pa.field("logprob", pa.list_(pa.float32()), nullable=True),
        pa.field("kept_mass", pa.list_(pa.float32()), nullable=True),
        # Upper bound of each step's entropy when the engine saw only the top tokens
        # (OpenAI-compatible servers returning top-20); then `entropy` holds the lower bound.
        pa.field("entropy_upper", pa.list_(pa.float32()), nullable=True),
        pa.field("text", pa.string(), nullable=True),
    ]
)

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("rendered", pa.string(), nullable=True),
        pa.field("token_count", pa.int32(), nullable=True),
    ]
)

KEY_COLUMNS = ("model", "variant", "family", "task")


def slug(*parts: str) -> str:
    """A file-system-safe, collision-free shard name for a tuple of identifiers."""
    raw = "\x1f".join(parts)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(parts)).strip("-")[:80]
    return f"{readable}-{hashlib.sha1(raw.encode()).hexdigest()[:10]}"


def _temp_file(path: Path) -> tuple[int, str]:
    """A temp file beside ``path`` with the permissions a plain ``open`` would give (umask)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (all-or-nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_table(path: Path, table: pa.Table, schema_version: str) -> None:
    """Write a Parquet file atomically, tagging it with ``schema_version``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = schema_version.encode()
    table = table.replace_schema_metadata(meta)
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_array(values: Sequence[np.ndarray] | None, dtype: pa.DataType, n: int) -> pa.Array:
    """Build a list<dtype> array from per-row numpy arrays (None -> all-null column)."""
    if values is None:
        return pa.nulls(n, type=pa.list_(dtype))
    lengths = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    parts = [np.asarray(v) for v in values if v is not None]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    flat_arr = pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False), type=dtype)
    mask = np.fromiter((v is None for v in values), dtype=bool, count=n)
    return pa.ListArray.from_arrays(
        pa.array(offsets), flat_arr, mask=pa.array(mask) if mask.any() else None
    )


def rollouts_table(
    *,
    run: str,
    model: str,
    variant: str,
    family: str,
    task: str,
    prompt_id: Sequence[str] | str,
    rollout_index: Sequence[int],
    seed: Sequence[int],
    finish_reason: Sequence[str],
    entropy: Sequence[np.ndarray],
    token_ids: Sequence[np.ndarray] | None = None,
    eos_prob: Sequence[np.ndarray] | None = None,
    logprob: Sequence[np.ndarray] | None = None,
    kept_mass: Sequence[np.ndarray] | None = None,
    entropy_upper: Sequence[np.ndarray] | None = None,
    text: Sequence[str | None] | None = None,
) -> pa.Table:
    """Assemble rollout rows (one per rollout) into a table with ROLLOUT_SCHEMA.

    Per-step arrays are given per rollout as numpy arrays; ``length`` is ``len(entropy[i])``.
    Validates finish reasons and that all per-step fields agree in length.
    """
    n = len(rollout_index)
    lengths = np.fromiter((len(e) for e in entropy), dtype=np.int32, count=n)
    for name, col in (
        ("token_ids", token_ids),
        ("eos_prob", eos_prob),
        ("logprob", logprob),
        ("kept_mass", kept_mass),
        ("entropy_upper", entropy_upper),
    ):
        if col is None:
            continue
        for i, v in enumerate(col):
            if v is not None and len(v) != lengths[i]:
                raise StoreError(
                    f"rollout {i}: '{name}' has {len(v)} steps but 'entropy' has {lengths[i]}; "
                    "every per-step field must have one value per step"
                )
    bad = sorted(set(finish_reason) - set(FINISH_REASONS))
    if bad:
        raise StoreError(f"unknown finish_reason {bad}; use one of {list(FINISH_REASONS)}")
    pid = [prompt_id] * n if isinstance(prompt_id, str) else list(prompt_id)
    cols = {
        "run": pa.array([run] * n, pa.string()),
        "model": pa.array([model] * n, pa.string()),
        "variant": pa.array([variant] * n, pa.string()),
        "family": pa.array([family] * n, pa.string()),
        "task": pa.array([task] * n, pa.string()),
        "prompt_id": pa.array(pid, pa.string()),
        "rollout_index": pa.array(np.asarray(rollout_index, dtype=np.int32)),
        "seed": pa.array(np.asarray(seed, dtype=np.int64)),
        "length": pa.array(lengths),
        "finish_reason": pa.array(list(finish_reason), pa.string()),
        "token_ids": _list_array(token_ids, pa.int32(), n),
        "entropy": _list_array(entropy, pa.float32(), n),
        "eos_prob": _list_array(eos_prob, pa.float32(), n),
        "logprob": _list_array(logprob, pa.float32(), n),
        "kept_mass": _list_array(kept_mass, pa.float32(), n),
        "entropy_upper": _list_array(entropy_upper, pa.float32(), n),
        "text": pa.array(list(text) if text is not None else [None] * n, pa.string()),
    }
    return pa.Table.from_pydict(cols, schema=ROLLOUT_SCHEMA)


class RunStore:
    """A run folder: atomic shard writes, resumability checks, streaming reads."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.rollouts_dir = self.root / "rollouts"
        self.prompts_dir = self.root / "prompts"

    # -- writing -------------------------------------------------------------------------
    def shard_path(self, name: str) -> Path:
        return self.rollouts_dir / f"{name}.parquet"

    def has_shard(self, name: str) -> bool:
        """True when a complete, valid shard ``name`` exists (a corrupt one raises)."""
        path = self.shard_path(name)
        if not path.exists():
            return False
        _check_shard(path, SCHEMA_VERSION)
        return True

    def write_rollouts(self, name: str, table: pa.Table) -> Path:
        """Atomically write one rollout shard (replacing any earlier shard of that name)."""
        table = table.select(ROLLOUT_SCHEMA.names).cast(ROLLOUT_SCHEMA)
        path = self.shard_path(name)
        atomic_write_table(path, table, SCHEMA_VERSION)
        return path

    def write_prompts(self, name: str, table: pa.Table) -> Path:
        table = table.select(PROMPT_SCHEMA.names).cast(PROMPT_SCHEMA)
        path = self.prompts_dir / f"{name}.parquet"
        atomic_write_table(path, table, PROMPT_SCHEMA_VERSION)
        return path

    # -- reading -------------------------------------------------------------------------
    def shard_files(self) -> list[Path]:
        if not self.rollouts_dir.is_dir():
            return []
        return sorted(p for p in self.rollouts_dir.glob("*.parquet") if not p.name.startswith("."))

    def prompt_files(self) -> list[Path]:
        if not self.prompts_dir.is_dir():
            return []
        return sorted(p for p in self.prompts_dir.glob("*.parquet") if not p.name.startswith("."))

    def validate(self) -> None:
        """Check every shard's footer and schema tag; raise StoreError naming a bad file."""
        for path in self.shard_files():
            _check_shard(path, SCHEMA_VERSION)
        for path in self.prompt_files():
            _check_shard(path, PROMPT_SCHEMA_VERSION)

    def dataset(self) -> ds.Dataset:
        """A pyarrow dataset over all rollout shards (validated), for streaming scans."""
        files = self.shard_files()
        if not files:
            raise StoreError(
                f"no rollouts in {self.root}; generate some with 'canopy generate' or "
                "'canopy import'"
            )
        for path in files:
            _check_shard(path, SCHEMA_VERSION)
        return ds.dataset([str(p) for p in files], schema=ROLLOUT_SCHEMA, format="parquet")

    def iter_batches(
        self, columns: Sequence[str] | None = None, filter: Any = None, batch_size: int = 4096
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches (bounded memory) over all shards."""
        yield from self.dataset().to_batches(
            columns=list(columns) if columns else None, filter=filter, batch_size=batch_size
        )

    def read_rollouts(self, columns: Sequence[str] | None = None, filter: Any = None) -> pa.Table:
        """Read (a projection of) all rollouts into one table."""
        return self.dataset().to_table(columns=list(columns) if columns else None, filter=filter)

    def read_prompts(self) -> pa.Table:
        files = self.prompt_files()
        if not files:
            return PROMPT_SCHEMA.empty_table()
        for path in files:
            _check_shard(path, PROMPT_SCHEMA_VERSION)
        return ds.dataset(
            [str(p) for p in files], schema=PROMPT_SCHEMA, format="parquet"
        ).to_table()


def _check_shard(path: Path, expected: str) -> None:
    try:
        meta = pq.read_metadata(path)
    except Exception as exc:
        raise StoreError(
            f"corrupt shard {path}: {exc}; delete this file and re-run to regenerate it"
        ) from exc
    kv = meta.metadata or {}
    tag = kv.get(META_KEY)
    if tag is None:
        raise StoreError(
            f"foreign file {path}: not written by canopy-entropy; move it out of the run folder"
        )
    if tag.decode() != expected:
        raise StoreError(
            f"shard {path} has schema '{tag.decode()}' but '{expected}' was expected; "
            "it belongs to another store version or folder"
        )


def iter_tables(tables: Iterable[pa.Table]) -> pa.Table:
    """Concatenate tables (helper for tests and small runs)."""
    return pa.concat_tables(list(tables))
