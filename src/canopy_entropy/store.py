"""Rollout store: a run folder of Parquet shards, written atomically, read by streaming.

Layout of a run folder::

    RUN/manifest.json            run manifest (config, versions, tokenizer hashes, seed scheme)
    RUN/rollouts/<shard>.parquet one row per rollout (ROLLOUT_SCHEMA)
    RUN/prompts/<shard>.parquet  one row per (model, task, prompt) (PROMPT_SCHEMA)

Every file is written to a temporary file, fsync'ed and renamed into place, so a reader never
sees a partial file; a killed writer leaves at most a hidden ``.tmp`` file, named after its host
and process so that ``clean_stale_temps`` can remove it once that process is gone. Each Parquet
file carries ``canopy.schema`` in its key-value metadata; a file without it (foreign) or one that
cannot be parsed (corrupt) is reported by path with the fix.

Content integrity: every Parquet file written by ``atomic_write_table`` carries CRC32 page
checksums, verified on every read, and a SHA-256 digest of the whole file (the digest's own 64
hex characters read as zeros) in the key-value entry ``canopy.digest``, checked before the file
is trusted. A damaged file raises a one-line StoreError naming it and the fix; it never yields
changed numbers. Files written before digests existed (no ``canopy.digest``) are still read, but
*unverified*: the readers emit one warning naming how many such files a folder holds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from canopy_entropy.errors import StoreError
from canopy_entropy.run.layout import GROUP_KEYS, PROMPT_KEYS

SCHEMA_VERSION = "canopy-rollouts/1"
PROMPT_SCHEMA_VERSION = "canopy-prompts/1"
FINISH_REASONS = ("eos", "length", "stop")
META_KEY = b"canopy.schema"
DIGEST_KEY = b"canopy.digest"
# A second entry saying the file has a digest, so no single damaged byte makes it look older.
INTEGRITY_KEY = b"canopy.integrity"
_INTEGRITY = b"sha256 of the whole file, with the recorded hex read as zeros"
_DIGEST_PREFIX = b"sha256:"
_DIGEST_LEN = 64  # hex characters of a SHA-256
_DIGEST_PLACEHOLDER = b"0" * _DIGEST_LEN
# The digest is the last key-value entry of the footer; only created_by and the column orders
# follow it, so it lies within this many bytes of the end of the file.
_DIGEST_WINDOW = 1 << 16
_CHUNK = 1 << 20
# Files up to this size are read once into memory, hashed and decoded from that buffer; larger
# ones are hashed in _CHUNK pieces and then decoded from the file (bounded memory).
_IN_MEMORY = 64 << 20

# The fix named when a file of a schema family is damaged: the stage that rewrites it.
_REWRITTEN_BY = {
    "canopy-rollouts": "re-run the generation or the import that wrote it",
    "canopy-prompts": "re-run the generation or the import that wrote it",
    "canopy-metrics": "re-run 'canopy metrics'",
    "canopy-rollout-metrics": "re-run 'canopy metrics'",
    "canopy-running-rate": "re-run 'canopy metrics'",
    "canopy-embeddings": "re-run 'canopy embed'",
    "canopy-prompt-diversity": "re-run 'canopy embed'",
    "canopy-rollout-diversity": "re-run 'canopy embed'",
    "canopy-comparison": "re-run 'canopy compare'",
    "canopy-length-matched": "re-run 'canopy compare'",
    "canopy-regression-panel": "re-run 'canopy regress'",
}

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

# Parquet writer options of every canopy file (files written before ROLLOUT_OPTIONS used these).
_DEFAULT_OPTIONS: dict[str, Any] = {"compression": "zstd"}
# Rollout shards: the per-step lists byte-stream-split (a float's exponent and mantissa bytes
# compressed apart), zstd level 17, no dictionaries (model floats rarely repeat, and a shard's
# few scalar rows compress as well plain), min/max statistics only for the prompt keys (what
# scans filter on: a filtered read skips the shards of other groups) and no serialized Arrow
# schema in the footer (ROLLOUT_SCHEMA's types all map back from the Parquet schema
# unchanged). On the 240k synthetic study 11.98 bytes/step against 19.63 with zstd 3 and
# dictionaries, at about 1.1 µs of write CPU per step; the options tried are in
# benchmarks/bench_store_encodings.py. Lossless and recorded per column by Parquet, so old and
# new shards read the same.
ROLLOUT_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 17,
    "use_dictionary": False,
    "write_statistics": list(PROMPT_KEYS),
    "store_schema": False,
    "use_byte_stream_split": [
        f"{f.name}.list.element" for f in ROLLOUT_SCHEMA if pa.types.is_list(f.type)
    ],
}

KEY_COLUMNS = GROUP_KEYS  # the group keys of run.layout (one definition)


def slug(*parts: str) -> str:
    """A file-system-safe, collision-free shard name for a tuple of identifiers."""
    raw = "\x1f".join(parts)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(parts)).strip("-")[:80]
    return f"{readable}-{hashlib.sha1(raw.encode()).hexdigest()[:10]}"


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
_TEMP_NAME = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)@(?P<pid>\d+)(?:\+(?P<start>\d+))?"
    r"\.[A-Za-z0-9_]+\.tmp$"
)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of process ``pid`` from /proc; None if not there."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], fields[19]


@functools.cache  # keyed by pid, so a forked child computes its own
def _writer_tag(pid: int) -> str:
    """``host@pid+start``: who writes a temp file, so a later run can tell if it still lives."""
    stat = _proc_stat(pid)
    return f"{_HOST}@{pid}" + (f"+{stat[1]}" if stat else "")


def _writer_alive(pid: int, start: str | None) -> bool:
    """Whether the process that wrote a temp file on this host may still be writing it."""
    if start is not None:  # /proc known: same pid and start time, and not a zombie
        stat = _proc_stat(pid)
        return stat is not None and stat[1] == start and stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_file(path: Path) -> tuple[int, str]:
    """A temp file beside ``path``, named after its writer, with the permissions a plain
    ``open`` would give (umask)."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{_writer_tag(os.getpid())}.", suffix=".tmp"
    )
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def clean_stale_temps(root: str | os.PathLike[str], stale_after: float = 86400.0) -> list[Path]:
    """Delete the temp files that dead writers left under ``root``; return what was removed.

    A temp file written on this host is removed once its writer process is gone (a live
    concurrent writer's file is never touched). One from another host, or with a name from
    before writers were recorded, cannot be checked and is removed only when it has not been
    modified for ``stale_after`` seconds.
    """
    removed: list[Path] = []
    now = time.time()
    for path in sorted(Path(root).rglob(".*.tmp")):
        match = _TEMP_NAME.match(path.name)
        try:
            if not path.is_file():
                continue
            if match and match["host"] == _HOST:
                if _writer_alive(int(match["pid"]), match["start"]):
                    continue
            elif now - path.stat().st_mtime < stale_after:
                continue
            path.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        removed.append(path)
    return removed


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


def atomic_write_table(
    path: Path, table: pa.Table, schema_version: str, options: dict[str, Any] | None = None
) -> None:
    """Write a Parquet file atomically, tagged with ``schema_version``, with page checksums
    and a whole-file content digest (checked by ``verify_file`` before the file is trusted).

    ``options`` are ``pq.ParquetWriter`` encoding options (default: zstd for every column)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = schema_version.encode()
    table = table.replace_schema_metadata(meta)
    options = options or _DEFAULT_OPTIONS
    # without the serialized Arrow schema the schema's metadata is not written: tag explicitly
    tag = {} if options.get("store_schema", True) else {META_KEY: meta[META_KEY]}
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, table.schema, **options, write_page_checksum=True) as writer:
            writer.write_table(table)
            writer.add_key_value_metadata(
                {**tag, INTEGRITY_KEY: _INTEGRITY, DIGEST_KEY: _DIGEST_PREFIX + _DIGEST_PLACEHOLDER}
            )
        with open(tmp, "rb+") as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = _digest_offset(fh, size)
            assert offset is not None, "pyarrow dropped the digest entry"
            digest = _content_digest(fh, size, offset)
            fh.seek(offset)
            fh.write(digest)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Damaged(Exception):
    """Internal: a file's bytes are not what its writer wrote."""


class CorruptFileError(StoreError):
    """A canopy file that is damaged or cannot be parsed; ``reason`` says how, without the fix."""

    def __init__(self, path: Path, reason: str, schema_tag: str):
        self.path, self.reason = path, reason
        super().__init__(f"corrupt file {path} ({reason}); {_fix(schema_tag)}")


def _digest_offset(fh: Any, size: int) -> int | None:
    """Offset of the recorded digest's hex characters, or None for a file without a digest."""
    if size < 12:
        raise _Damaged("too short to be a Parquet file")
    start = max(0, size - _DIGEST_WINDOW)
    fh.seek(start)
    tail = fh.read(size - start)
    if tail[-4:] != b"PAR1":
        raise _Damaged("no Parquet end marker")
    key = tail.rfind(DIGEST_KEY)
    if key < 0:
        if INTEGRITY_KEY in tail:
            raise _Damaged("its digest entry is missing")
        return None
    # after the key: a Thrift field header and length byte, then the value
    value = tail.find(_DIGEST_PREFIX, key + len(DIGEST_KEY), key + len(DIGEST_KEY) + 12)
    end = value + len(_DIGEST_PREFIX) + _DIGEST_LEN
    if value < 0 or end > len(tail) - 8:
        raise _Damaged("malformed digest entry")
    return start + value + len(_DIGEST_PREFIX)


def _content_digest(fh: Any, size: int, offset: int) -> bytes:
    """SHA-256 (hex) of the file with the digest's own characters read as the placeholder."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(_CHUNK))

    def feed(start: int, stop: int) -> None:
        fh.seek(start)
        while start < stop:
            n = fh.readinto(view[: min(stop - start, _CHUNK)])
            if not n:
                raise _Damaged("the file shrank while it was read")
            digest.update(view[:n])
            start += n

    feed(0, offset)
    digest.update(_DIGEST_PLACEHOLDER)
    feed(offset + _DIGEST_LEN, size)
    return digest.hexdigest().encode()


def _fix(schema_tag: str) -> str:
    return "delete it and " + _REWRITTEN_BY.get(
        schema_tag.split("/", 1)[0], "re-run the stage that wrote it"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _open_checked(path: Path, schema_tag: str) -> tuple[pq.ParquetFile, bool]:
    """Open a canopy Parquet file once and check it from that open: content digest, footer,
    schema tag. Returns the open reader (page checksums verified while decoding) and whether
    the content matched its digest (False: written before digests, unverified)."""
    try:
        fh = pa.OSFile(str(path), "rb")
    except OSError as exc:
        reason = exc.strerror or _first_line(exc)
        raise StoreError(
            f"cannot read {path} ({reason}); check that it exists and is readable"
        ) from exc
    try:
        size = fh.size()
        offset = _digest_offset(fh, size)
        source: Any = fh
        if offset is not None and size <= _IN_MEMORY:
            # one read: the bytes hashed are the bytes decoded (no second read of the file)
            fh.seek(0)
            data = fh.read_buffer(size)
            if data.size != size:
                raise _Damaged("the file shrank while it was read")
            view = memoryview(data)
            digest = hashlib.sha256(view[:offset])
            digest.update(_DIGEST_PLACEHOLDER)
            digest.update(view[offset + _DIGEST_LEN :])
            if bytes(view[offset : offset + _DIGEST_LEN]) != digest.hexdigest().encode():
                raise _Damaged("its bytes differ from those recorded when it was written")
            fh.close()
            source = pa.BufferReader(data)
        elif offset is not None:
            fh.seek(offset)
            if fh.read(_DIGEST_LEN) != _content_digest(fh, size, offset):
                raise _Damaged("its bytes differ from those recorded when it was written")
        source.seek(0)
        reader = pq.ParquetFile(source, page_checksum_verification=True)
    except (_Damaged, pa.ArrowException, OSError) as exc:
        fh.close()
        raise CorruptFileError(path, _first_line(exc), schema_tag) from exc
    tag = (reader.metadata.metadata or {}).get(META_KEY)
    if tag is None or tag.decode(errors="replace") != schema_tag:
        fh.close()
        if tag is None:
            raise StoreError(
                f"foreign file {path}: not written by canopy-entropy; move it out of the run folder"
            )
        raise StoreError(
            f"file {path} has schema '{tag.decode(errors='replace')}' but '{schema_tag}' was "
            "expected; it belongs to another store version or folder"
        )
    return reader, offset is not None


def verify_file(path: str | os.PathLike[str], schema_tag: str) -> bool:
    """Check a canopy Parquet file before it is trusted: content digest, footer, schema tag.

    Returns True when the content matched its digest, False for a file written before digests
    were recorded (readable, unverified). Raises StoreError naming the file and the fix when it
    is damaged, unreadable, foreign or of another schema.
    """
    reader, verified = _open_checked(Path(path), schema_tag)
    reader.close(force=True)
    return verified


def _warn_unverified(paths: Sequence[Path], n_files: int) -> None:
    if paths:
        where = (
            paths[0] if n_files == 1 else f"{len(paths)} of {n_files} files in {paths[0].parent}"
        )
        warnings.warn(
            f"{where}: no content digest (written by an older canopy-entropy), read unverified; "
            "write it again (re-run its stage, regenerate or re-import) to protect it",
            stacklevel=3,
        )


def _verified_format() -> ds.ParquetFileFormat:
    """Parquet format for datasets that checks every page's CRC while decoding."""
    return ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
    )


def verified_dataset(
    paths: Sequence[str | os.PathLike[str]], schema: pa.Schema, schema_tag: str
) -> ds.Dataset:
    """A pyarrow dataset over canopy Parquet files, each checked by ``verify_file`` first and
    page checksums verified while scanning (wrap scans with ``scan_errors``)."""
    paths = [Path(p) for p in paths]
    _warn_unverified([p for p in paths if not verify_file(p, schema_tag)], len(paths))
    return ds.dataset([str(p) for p in paths], schema=schema, format=_verified_format())


@contextlib.contextmanager
def scan_errors(paths: Sequence[str | os.PathLike[str]], schema_tag: str) -> Iterator[None]:
    """Turn a failure while scanning a verified dataset into a StoreError naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        paths = [Path(p) for p in paths]
        for path in paths:
            verify_file(path, schema_tag)  # raises for the file that changed since it was opened
        where = paths[0].parent if paths else "the dataset"
        raise StoreError(
            f"could not read the files in {where} ({_first_line(exc)}); {_fix(schema_tag)}"
        ) from exc


def read_table(
    path: str | os.PathLike[str], schema_tag: str, columns: Sequence[str] | None = None
) -> pa.Table:
    """Read (columns of) one canopy Parquet file, verified; the reader every stage uses."""
    path = Path(path)
    reader, verified = _open_checked(path, schema_tag)
    if not verified:
        _warn_unverified([path], 1)
    try:
        return reader.read(columns=list(columns) if columns else None)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(path, _first_line(exc), schema_tag) from exc
    finally:
        reader.close(force=True)  # the file _open_checked opened


def iter_file_batches(
    path: str | os.PathLike[str],
    schema_tag: str,
    columns: Sequence[str] | None = None,
    batch_size: int = 4096,
    use_threads: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of one canopy Parquet file, verified (bounded memory); the file
    is opened once, its digest and footer checked from that open."""
    path = Path(path)
    reader, verified = _open_checked(path, schema_tag)
    if not verified:
        _warn_unverified([path], 1)
    try:
        yield from reader.iter_batches(
            batch_size=batch_size,
            columns=list(columns) if columns else None,
            use_threads=use_threads,
        )
    except (pa.ArrowException, OSError) as exc:
        raise CorruptFileError(path, _first_line(exc), schema_tag) from exc
    finally:
        reader.close(force=True)  # the file _open_checked opened


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
        """True when a complete, intact shard ``name`` exists (a damaged one raises)."""
        path = self.shard_path(name)
        if not path.exists():
            return False
        verify_file(path, SCHEMA_VERSION)
        return True

    def write_rollouts(self, name: str, table: pa.Table) -> Path:
        """Atomically write one rollout shard (replacing any earlier shard of that name)."""
        table = table.select(ROLLOUT_SCHEMA.names).cast(ROLLOUT_SCHEMA)
        path = self.shard_path(name)
        atomic_write_table(path, table, SCHEMA_VERSION, ROLLOUT_OPTIONS)
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
        """Verify every shard (digest, footer, schema tag); raise StoreError naming a bad file."""
        files = self.shard_files()
        _warn_unverified([p for p in files if not verify_file(p, SCHEMA_VERSION)], len(files))
        files = self.prompt_files()
        unverified = [p for p in files if not verify_file(p, PROMPT_SCHEMA_VERSION)]
        _warn_unverified(unverified, len(files))

    def dataset(self, files: Sequence[Path] | None = None) -> ds.Dataset:
        """A pyarrow dataset over the rollout shards ``files`` (default: all), verified, for
        streaming scans; page checksums are checked while scanning (``iter_batches`` names a
        file that fails)."""
        files = self.shard_files() if files is None else list(files)
        if not files:
            raise StoreError(
                f"no rollouts in {self.root}; generate some with 'canopy generate' or "
                "'canopy import'"
            )
        return verified_dataset(files, ROLLOUT_SCHEMA, SCHEMA_VERSION)

    def iter_batches(
        self, columns: Sequence[str] | None = None, filter: Any = None, batch_size: int = 4096
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches (bounded memory) over all shards."""
        dataset = self.dataset()
        with scan_errors(self.shard_files(), SCHEMA_VERSION):
            yield from dataset.to_batches(
                columns=list(columns) if columns else None, filter=filter, batch_size=batch_size
            )

    def read_rollouts(
        self,
        columns: Sequence[str] | None = None,
        filter: Any = None,
        files: Sequence[Path] | None = None,
    ) -> pa.Table:
        """Read (a projection of) the rollouts of ``files`` (default: every shard) into one
        table."""
        files = self.shard_files() if files is None else list(files)
        dataset = self.dataset(files)
        with scan_errors(files, SCHEMA_VERSION):
            return dataset.to_table(columns=list(columns) if columns else None, filter=filter)

    def read_keys(
        self, columns: Sequence[str]
    ) -> tuple[pa.Table, dict[tuple[str, ...], list[Path]]]:
        """Scalar ``columns`` of every rollout and, per group (``KEY_COLUMNS``), the shards
        holding its rollouts, from one verified read: a stage that works group by group then
        reads (``read_rollouts(files=...)``) only that group's shards, not the whole store."""
        files = self.shard_files()
        names = list(dict.fromkeys([*KEY_COLUMNS, *columns]))
        table = self.read_rollouts(columns=[*names, "__filename"], files=files)
        pairs = table.group_by([*KEY_COLUMNS, "__filename"]).aggregate([])  # group x shard
        by_name = {str(p): p for p in files}
        index: dict[tuple[str, ...], list[Path]] = {}
        for *key, name in zip(*(pairs[c].to_pylist() for c in pairs.column_names), strict=True):
            index.setdefault(tuple(key), []).append(by_name[name])
        index = {key: sorted(index[key]) for key in sorted(index)}
        return table.select(list(columns)), index

    def read_prompts(self) -> pa.Table:
        files = self.prompt_files()
        if not files:
            return PROMPT_SCHEMA.empty_table()
        dataset = verified_dataset(files, PROMPT_SCHEMA, PROMPT_SCHEMA_VERSION)
        with scan_errors(files, PROMPT_SCHEMA_VERSION):
            return dataset.to_table()


def iter_tables(tables: Iterable[pa.Table]) -> pa.Table:
    """Concatenate tables (helper for tests and small runs)."""
    return pa.concat_tables(list(tables))
