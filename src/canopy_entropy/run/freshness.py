"""One staleness mechanism for stages and figures: what an output was computed from.

A stage (or the figures) records, when it finishes, a fingerprint of the run-folder paths it read
(each file's name, size and modification time) and of the settings that change its results, in
``RUN/.canopy/stages/<stage>.json``. Its outputs are up to date only while that fingerprint still
matches and every output is intact: Parquet outputs pass their content check, JSON outputs parse.
A failed stage records its failure there too, so the report can say which results are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from canopy_entropy.errors import StoreError
from canopy_entropy.run.layout import ARTEFACTS

_TAGS = {a.path: a.schema for a in ARTEFACTS.values() if a.schema}


def _path_state(root: Path, rel: str) -> list[tuple[str, int, int]]:
    path = root / rel
    if path.is_file():
        st = path.stat()
        return [(rel, st.st_size, st.st_mtime_ns)]
    if not path.is_dir():
        return []
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            st = p.stat()
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def input_fingerprint(run_dir: str | os.PathLike[str], inputs: Sequence[str], settings: Any) -> str:
    """Hash of the input paths' state (names, sizes, mtimes), the settings and the version."""
    from canopy_entropy import __version__

    root = Path(run_dir)
    state: list[Any] = [__version__, settings]
    for rel in inputs:
        state.append(_path_state(root, rel))
    return hashlib.sha256(json.dumps(state, default=str, sort_keys=True).encode()).hexdigest()


def marker_path(run_dir: str | os.PathLike[str], stage: str) -> Path:
    return Path(run_dir) / ".canopy" / "stages" / f"{stage}.json"


def read_marker(run_dir: str | os.PathLike[str], stage: str) -> dict[str, Any] | None:
    """The stage's record (status, fingerprint, when, how long), None when absent or damaged."""
    try:
        doc = json.loads(marker_path(run_dir, stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def write_marker(
    run_dir: str | os.PathLike[str],
    stage: str,
    *,
    status: str,
    fingerprint: str = "",
    seconds: float = 0.0,
    detail: str = "",
) -> None:
    """Record how a stage ended ('done' with its input fingerprint, or 'failed' with why)."""
    from canopy_entropy.store import atomic_write_json

    atomic_write_json(
        marker_path(run_dir, stage),
        {
            "stage": stage,
            "status": status,
            "fingerprint": fingerprint,
            "detail": detail,
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def output_problem(run_dir: str | os.PathLike[str], rel: str) -> str | None:
    """Why output ``rel`` cannot be trusted (missing, empty, damaged), or None when intact."""
    from canopy_entropy.store import verify_file

    path = Path(run_dir) / rel
    if not path.exists():
        return f"{rel} is missing"
    if path.is_dir():  # folders of shards are checked by the readers, file by file
        if not any(p.is_file() and not p.name.startswith(".") for p in path.rglob("*")):
            return f"{rel} is empty"
        return None
    if path.suffix == ".parquet":
        tag = _TAGS.get(rel)
        if tag is not None:
            try:
                verify_file(path, tag)
            except StoreError as exc:
                return str(exc)
        return None
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{rel} is damaged ({exc})"
    return None


def outputs_problem(run_dir: str | os.PathLike[str], outputs: Sequence[str]) -> str | None:
    """The first problem among ``outputs``, or None when all are intact."""
    for rel in outputs:
        problem = output_problem(run_dir, rel)
        if problem:
            return problem
    return None


def is_fresh(
    run_dir: str | os.PathLike[str],
    stage: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    settings: Any,
) -> bool:
    """The stage's recorded fingerprint matches its inputs now and its outputs are intact."""
    marker = read_marker(run_dir, stage)
    if marker is None or marker.get("status") != "done":
        return False
    if marker.get("fingerprint") != input_fingerprint(run_dir, inputs, settings):
        return False
    return outputs_problem(run_dir, outputs) is None
