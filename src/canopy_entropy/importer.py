"""Bring your own rollouts: validate a JSONL file and write it into a run folder.

Each line is one rollout: ``prompt_id`` and ``entropy`` (per-step entropies, nats) are
required; ``eos_prob``, ``logprob``, ``kept_mass``, ``token_ids``, ``text``,
``finish_reason``, ``rollout_index``, ``seed`` and per-line ``model``/``variant``/``family``/
``task`` are optional. Every line is validated first; on any error nothing is written and the
error lists the bad lines by number. Shard names derive from the file's hash, so importing the
same file again rewrites identical shards (idempotent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from canopy_entropy.errors import CanopyError
from canopy_entropy.run.layout import VARIANTS
from canopy_entropy.run.manifest import (
    ImportRecord,
    Manifest,
    ModelRecord,
    PolicyRecord,
    SeedScheme,
    read_manifest,
    update_manifest,
)
from canopy_entropy.store import FINISH_REASONS, RunStore, rollouts_table, slug

MAX_LISTED_ERRORS = 20
SHARD_ROLLOUTS = 20_000
_PER_STEP = ("eos_prob", "logprob", "kept_mass", "token_ids")
_KNOWN = {
    "prompt_id",
    "entropy",
    *_PER_STEP,
    "text",
    "finish_reason",
    "rollout_index",
    "seed",
    "model",
    "variant",
    "family",
    "task",
}


@dataclass
class ImportSummary:
    """What an import wrote."""

    n_rollouts: int
    n_prompts: int
    groups: list[dict[str, str]]
    shards: list[str]
    sha256: str


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:10]))
    extra = f" (+{len(numbers) - 10} more)" if len(numbers) > 10 else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{extra}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_steps(name: str, value: Any, lo: float, hi: float, integer: bool = False):
    """Return (array, error) for a per-step list whose values must lie in [lo, hi]."""
    if not isinstance(value, list):
        return None, f"'{name}' must be a list of numbers"
    try:
        arr = np.asarray(value, dtype=np.int64 if integer else np.float64)
    except (TypeError, ValueError, OverflowError):
        return None, f"'{name}' must contain only numbers"
    if arr.ndim != 1:
        return None, f"'{name}' must be a flat list of numbers"
    if integer:
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            return None, f"'{name}' must hold non-negative int32 token ids"
        return arr.astype(np.int32), None
    bad = ~np.isfinite(arr) | (arr < lo) | (arr > hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = (
            "NaN/infinite"
            if not np.isfinite(arr[i])
            else f"{float(arr[i]):g}, outside [{lo:g}, {hi:g}]"
        )
        return None, f"'{name}' step {i + 1} is {what}"
    return arr, None


def _validate_line(
    obj: Any, defaults: dict[str, str | None], max_new_tokens: int | None
) -> tuple[dict[str, Any] | None, str | None]:
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    rec: dict[str, Any] = {}
    pid = obj.get("prompt_id")
    if pid is None or isinstance(pid, (bool, list, dict)) or pid == "":
        return None, "missing 'prompt_id' (a string or integer)"
    rec["prompt_id"] = str(pid)
    for key in ("model", "variant", "family", "task"):
        value = obj.get(key, defaults[key])
        if key == "family" and value is None:
            value = obj.get("model", defaults["model"])
        if key == "task" and value is None:
            value = "default"
        if value is None or not isinstance(value, str) or not value:
            hint = " (base or instruct)" if key == "variant" else ""
            return None, f"no '{key}'{hint}: give it on the line or with --{key}"
        rec[key] = value
    if rec["variant"] not in VARIANTS:
        return None, f"variant {rec['variant']!r} is not one of {list(VARIANTS)}"
    if "entropy" not in obj:
        return None, "missing 'entropy' (list of per-step entropies in nats)"
    ent, err = _check_steps("entropy", obj["entropy"], 0.0, math.inf)
    if err:
        return None, err
    if ent.size == 0:
        return None, "'entropy' is empty; a rollout has at least one step (the EOS step)"
    n = ent.size
    rec["entropy"] = ent
    bounds = {
        "eos_prob": (0.0, 1.0),
        "logprob": (-math.inf, 0.0),
        "kept_mass": (0.0, 1.0),
        "token_ids": (0, 0),
    }
    for name in _PER_STEP:
        value = obj.get(name)
        if value is None:
            rec[name] = None
            continue
        lo, hi = bounds[name]
        arr, err = _check_steps(name, value, lo, hi, integer=name == "token_ids")
        if err:
            return None, err
        if arr.size != n:
            return None, f"'{name}' has {arr.size} steps but 'entropy' has {n}"
        rec[name] = arr
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        return None, "'text' must be a string"
    rec["text"] = text
    if max_new_tokens is not None and n > max_new_tokens:
        return None, f"{n} steps exceed --max-new-tokens {max_new_tokens}"
    reason = obj.get("finish_reason")
    if reason is None:
        reason = "length" if max_new_tokens is not None and n == max_new_tokens else "eos"
    if reason not in FINISH_REASONS:
        return None, f"finish_reason {reason!r} is not one of {list(FINISH_REASONS)}"
    if reason == "length" and max_new_tokens is not None and n != max_new_tokens:
        return None, f"finish_reason 'length' but {n} steps != --max-new-tokens {max_new_tokens}"
    rec["finish_reason"] = reason
    for name in ("rollout_index", "seed"):
        value = obj.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return None, f"'{name}' must be an integer"
        if name == "rollout_index" and value is not None and not 0 <= value < 2**31:
            return None, "'rollout_index' must be a non-negative int32"
        rec[name] = value
    return rec, None


def import_jsonl(
    path: str | Path,
    run_dir: str | Path,
    *,
    model: str | None = None,
    variant: str | None = None,
    family: str | None = None,
    task: str | None = None,
    max_new_tokens: int | None = None,
    run_name: str | None = None,
) -> ImportSummary:
    """Validate every line of ``path`` and write its rollouts into ``run_dir`` (atomic shards,
    manifest entry with the file's hash and the flags). Raises CanopyError listing bad lines."""
    path = Path(path)
    if not path.is_file():
        raise CanopyError(f"{path} does not exist; pass a JSONL file with one rollout per line")
    if variant is not None and variant not in VARIANTS:
        raise CanopyError(f"--variant {variant!r} is not one of {list(VARIANTS)}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise CanopyError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    defaults = {"model": model, "variant": variant, "family": family, "task": task}
    errors: dict[str, list[int]] = {}  # message -> line numbers (identical errors grouped)
    n_errors = 0
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rec, err = None, f"invalid JSON ({exc.msg})"
            else:
                rec, err = _validate_line(obj, defaults, max_new_tokens)
            if err:
                n_errors += 1
                if err in errors or len(errors) < MAX_LISTED_ERRORS:
                    errors.setdefault(err, []).append(lineno)
                continue
            rec["line"] = lineno
            groups[(rec["model"], rec["variant"], rec["family"], rec["task"])].append(rec)
    if n_errors:
        listed = sum(len(v) for v in errors.values())
        more = f"; and {n_errors - listed} more bad lines" if n_errors > listed else ""
        raise CanopyError(
            f"{path}: {n_errors} bad line(s), nothing imported: "
            + "; ".join(f"{_lines(v)}: {msg}" for msg, v in errors.items())
            + more
        )
    if not groups:
        raise CanopyError(f"{path} has no rollouts (empty file); one JSON object per line")

    # rollout indices: given ones must be unique per prompt; missing ones continue in file order
    dup_errors: list[str] = []
    for recs in groups.values():
        seen: dict[tuple[str, int], int] = {}
        next_index: dict[str, int] = defaultdict(int)
        for rec in recs:
            if rec["rollout_index"] is not None:
                next_index[rec["prompt_id"]] = max(
                    next_index[rec["prompt_id"]], rec["rollout_index"] + 1
                )
        for rec in recs:
            if rec["rollout_index"] is None:
                rec["rollout_index"] = next_index[rec["prompt_id"]]
                next_index[rec["prompt_id"]] += 1
            k = (rec["prompt_id"], rec["rollout_index"])
            if k in seen:
                dup_errors.append(
                    f"line {rec['line']}: rollout {k[1]} of prompt {k[0]!r} repeats line {seen[k]}"
                )
            seen[k] = rec["line"]
    if dup_errors:
        raise CanopyError(
            f"{path}: {len(dup_errors)} duplicate rollout(s), nothing imported: "
            + "; ".join(dup_errors[:MAX_LISTED_ERRORS])
        )

    store = RunStore(run_dir)
    digest = _file_sha256(path)
    run = run_name or Path(run_dir).resolve().name
    _check_no_overlap(store, groups, digest)
    tables: list[tuple[str, pa.Table]] = []
    for (g_model, g_variant, g_family, g_task), recs in sorted(groups.items()):
        for part, a in enumerate(range(0, len(recs), SHARD_ROLLOUTS)):
            chunk = recs[a : a + SHARD_ROLLOUTS]

            def col(name: str, chunk=chunk):
                values = [r[name] for r in chunk]
                return None if all(v is None for v in values) else values

            table = rollouts_table(
                run=run,
                model=g_model,
                variant=g_variant,
                family=g_family,
                task=g_task,
                prompt_id=[r["prompt_id"] for r in chunk],
                rollout_index=[r["rollout_index"] for r in chunk],
                seed=[-1 if r["seed"] is None else r["seed"] for r in chunk],
                finish_reason=[r["finish_reason"] for r in chunk],
                entropy=[r["entropy"] for r in chunk],
                token_ids=col("token_ids"),
                eos_prob=col("eos_prob"),
                logprob=col("logprob"),
                kept_mass=col("kept_mass"),
                text=[r["text"] for r in chunk],
            )
            name = "import-" + slug(digest[:16], g_model, g_variant, g_family, g_task, str(part))
            tables.append((name, table))
    # everything validated and built: check the manifest accepts it, write (each shard
    # atomically), then record the import
    _check_labels(read_manifest(store.root), groups, path)
    shards = [store.write_rollouts(name, table).name for name, table in tables]
    own = f"import-{digest[:16]}__"
    for stale in store.shard_files():  # an earlier import of this file under other flags
        if stale.name.startswith(own) and stale.name not in shards:
            stale.unlink()
    flags = {
        "model": model,
        "variant": variant,
        "family": family,
        "task": task,
        "max_new_tokens": max_new_tokens,
        "run_name": run_name,
    }
    entry = ImportRecord(
        source=str(path.resolve()),
        sha256=digest,
        flags=flags,
        n_rollouts=sum(len(r) for r in groups.values()),
        shards=tuple(shards),
    )
    update_manifest(store.root, lambda m: _record_import(m, run, entry, groups, max_new_tokens))
    return ImportSummary(
        n_rollouts=entry.n_rollouts,
        n_prompts=len({(k, r["prompt_id"]) for k, recs in groups.items() for r in recs}),
        groups=[dict(zip(("model", "variant", "family", "task"), k, strict=True)) for k in groups],
        shards=shards,
        sha256=digest,
    )


def _check_labels(manifest: Manifest, groups: dict, source: Path | str) -> None:
    """Refuse to import under a model label that generate or the reference model wrote."""
    for g_model, *_ in groups:
        prior = manifest.model(g_model)
        if prior is not None and prior.source != "import":
            raise CanopyError(
                f"model '{g_model}' in {source} is already in this run folder, made by "
                f"'{prior.source}'; import it under another --model label or into a new --run"
            )


def _record_import(
    manifest: Manifest, run: str, entry: ImportRecord, groups: dict, max_new_tokens: int | None
) -> Manifest:
    """The manifest with this import and a record for each imported model label."""
    _check_labels(manifest, groups, entry.source)
    manifest = dataclasses.replace(manifest, run=manifest.run or run).with_import(entry)
    for g_model, g_variant, g_family, _ in groups:
        prior = manifest.model(g_model)
        cap = (
            max_new_tokens
            if max_new_tokens is not None
            else (prior.policy.max_new_tokens if prior is not None else None)
        )
        manifest = manifest.with_model(
            ModelRecord(
                label=g_model,
                model=g_model,
                variant=g_variant,
                family=g_family,
                source="import",
                policy=PolicyRecord(max_new_tokens=cap),
                seed_scheme=SeedScheme(
                    kind="imported", description="seeds as given per line (-1: unknown)"
                ),
            )
        )
    return manifest


def _check_no_overlap(store: RunStore, groups: dict, digest: str) -> None:
    """Refuse rollouts that another source already put into this run (would double count)."""
    own = f"import-{digest[:16]}__"  # shards of this very file (re-import is idempotent)
    files = [p for p in store.shard_files() if not p.name.startswith(own)]
    if not files:
        return
    import pyarrow.dataset as ds

    for p in files:
        store.has_shard(p.stem)  # validates (names the file when corrupt or foreign)
    existing = ds.dataset([str(p) for p in files], format="parquet").to_table(
        columns=["model", "variant", "family", "task", "prompt_id", "rollout_index"]
    )
    have = set(zip(*(existing.column(c).to_pylist() for c in existing.column_names), strict=True))
    for key, recs in groups.items():
        for rec in recs:
            if (*key, rec["prompt_id"], rec["rollout_index"]) in have:
                raise CanopyError(
                    f"line {rec['line']}: rollout {rec['rollout_index']} of prompt "
                    f"{rec['prompt_id']!r} ({'/'.join(key)}) is already in {store.root} from "
                    "another source; import into a fresh --run folder or give distinct "
                    "rollout_index values"
                )
