"""Bring your own rollouts: validate a JSONL file and write it into a run folder.

Each line is one rollout: ``prompt_id`` and ``entropy`` (per-step entropies, nats) are
required; ``eos_prob``, ``logprob``, ``kept_mass``, ``token_ids``, ``text``,
``finish_reason``, ``rollout_index``, ``seed`` and per-line ``model``/``variant``/``family``/
``task`` are optional; any other key is an error (a misspelt field would otherwise be lost).
Two streaming passes keep memory bounded by a chunk, not by the file: the first validates every
line, against the float32/int32 values the store will hold and the definitions of docs/metrics.md
section 1 (e.g. no EOS probability of 1 before the last step, no entropy below the binary entropy of its
EOS mass), keeping a few numbers per line; on any error nothing is written and the error lists
the bad lines by number. The second converts the lines again and writes shards of at most
``SHARD_ROLLOUTS`` rollouts / ``STEP_BUDGET`` buffered steps into a staging folder; only when
every shard is written (and the file is unchanged) are they renamed into ``rollouts/``. Shard
names derive from the file's hash, so importing the same file again (also after a killed
import) rewrites identical shards (idempotent).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import difflib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from canopy_entropy.errors import CanopyError
from canopy_entropy.metrics import binary_entropy
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
from canopy_entropy.store import FINISH_REASONS, RunStore, _fsync_dir, rollouts_table, slug

MAX_LISTED_ERRORS = 20
SHARD_ROLLOUTS = 20_000
# Per-step values held before the largest buffer is written as a shard (~20 bytes per step for
# the five per-step fields in float32/int32): bounds the memory of the writing pass.
STEP_BUDGET = 2_000_000
_PER_STEP = ("eos_prob", "logprob", "kept_mass", "token_ids")
_KNOWN = (
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
)
_F32_MAX = float(np.finfo(np.float32).max)
_INT32_MAX = int(np.iinfo(np.int32).max)
# Slack for H_t >= h(lambda_t): the check only bites where H_t <= h <= log 2, where an engine's
# float32 entropy is off by about log2(|V|) * 6e-8 relative (pairwise sums; ~1e-6 for a 150k
# vocabulary), i.e. < 1e-6 nats. Measured: the HF engine on the tiny model gives H_t - h down to
# -4.9e-7 where content entropy is exactly 0 (top-k 2 keeping EOS). 1e-5 is 10-20x that.
H_TOLERANCE = 1e-5
# Probabilities computed in float32 overshoot 1 (and log-probabilities 0) by rounding: the tiny
# model's engine records eos_prob up to 1 + 1.1e-6 (renormalised sums over the kept set).
PROB_SLACK = 1e-5
# Leading bytes of files that are certainly not UTF-8 JSONL, and how to fix them.
_MAGIC = {
    b"\x1f\x8b": "gzip-compressed; decompress it first (gunzip)",
    b"\x28\xb5\x2f\xfd": "zstd-compressed; decompress it first (zstd -d)",
    b"PK\x03\x04": "a zip archive; extract the JSONL file from it",
    b"PAR1": "a Parquet file; import JSONL (one JSON object per line)",
    b"\xff\xfe": "UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)",
    b"\xfe\xff": "UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)",
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


def _raw_lines(path: Path, digest: Any) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line, every byte fed to ``digest`` (a hashlib object); a
    binary, compressed or unreadable file is refused."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
            for magic, what in _MAGIC.items():
                if head.startswith(magic):
                    raise CanopyError(f"{path} is {what}")
            if b"\x00" in head:
                at = head.index(b"\x00")
                raise CanopyError(
                    f"{path} is a binary file (NUL byte at offset {at}), not JSONL text; "
                    "pass a UTF-8 file with one JSON object (rollout) per line"
                )
            fh.seek(0)
            for lineno, raw in enumerate(fh, start=1):
                digest.update(raw)
                yield lineno, raw
    except OSError as exc:
        raise CanopyError(f"cannot read {path}: {exc.strerror or exc}; check the file") from exc


class _DuplicateKey(ValueError):
    """A JSON object names the same key twice (json.loads would keep only the last value)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey(next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1))
    return obj


def _parse(raw: bytes, first: bool) -> tuple[Any, str | None]:
    """One line as a JSON value, or the reason it is not valid JSON."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text; save the file as UTF-8"
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg})"
    except _DuplicateKey as exc:
        return None, f"key {exc.args[0]!r} appears twice; keep one"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    except ValueError:  # int() refuses numbers of more than 4300 digits
        return None, "invalid JSON (a number with thousands of digits)"


# The end of an object key: a quote, optional JSON whitespace, a colon. Every key written in a
# line ends so (and text holding an escaped quote before a colon adds a match), so a line with
# exactly as many matches as its parsed object has keys names no key twice.
_KEY_END = re.compile(rb'"[ \t\n\r]*:')


def _parse_fast(raw: bytes) -> Any:
    """One line parsed by orjson, or None where only the exact stdlib parse can tell: orjson
    failed (invalid JSON, NaN, a BOM, an unpaired surrogate, a huge number) or a key may repeat
    (orjson keeps the last value silently)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and len(_KEY_END.findall(raw)) != len(obj):
        return None
    return obj


def _record(
    raw: bytes, first: bool, defaults: dict[str, str | None], max_new_tokens: int | None
) -> tuple[dict[str, Any] | None, str | None]:
    """One line as a store-ready record, or its first problem. Fast path: orjson; a line it
    cannot decide, or that fails validation, is parsed again with ``json`` (exact duplicate-key
    and number handling), so errors and records are those of the stdlib parse."""
    obj = _parse_fast(raw)
    if obj is not None:
        rec, err = _validate_line(obj, defaults, max_new_tokens)
        if err is None:
            return rec, None
    obj, err = _parse(raw, first)
    if err is not None:
        return None, err
    return _validate_line(obj, defaults, max_new_tokens)


def _kind(value: Any) -> str:
    """How a JSON value of the wrong type reads to the user."""
    if type(value) is float:
        return f"the number {value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value[:20]!r}"
    return "a list" if isinstance(value, list) else "an object"


def _numbers(name: str, value: Any) -> tuple[np.ndarray | None, str | None]:
    """A per-step JSON list as float64; strings, booleans and nulls are refused, not coerced."""
    if not isinstance(value, list):
        return None, f"'{name}' must be a list of numbers"
    if not set(map(type, value)) <= {int, float}:  # type(), not isinstance: bool is an int
        i, v = next((i, v) for i, v in enumerate(value) if type(v) not in (int, float))
        return None, f"'{name}' step {i + 1} is {_kind(v)}, not a number"
    try:
        return np.asarray(value, dtype=np.float64), None
    except OverflowError:  # an integer beyond float64
        return None, f"'{name}' holds a number beyond the float32 range (+-{_F32_MAX:.3g})"


def _check_floats(
    name: str, value: Any, lo: float, hi: float, open_lo: bool = False, slack: float = 0.0
) -> tuple[np.ndarray | None, str | None]:
    """Return (float32 array, error): every value, as float32 storage holds it, in [lo, hi]
    (or (lo, hi] with ``open_lo``), up to ``slack`` above ``hi`` (float32 rounding)."""
    arr, err = _numbers(name, value)
    if err:
        return None, err
    with np.errstate(over="ignore"):
        stored = arr.astype(np.float32)
    top = hi + slack
    bad = ~np.isfinite(stored) | (stored <= lo if open_lo else stored < lo) | (stored > top)
    if not bad.any():
        return stored, None
    i = int(np.flatnonzero(bad)[0])
    v, given = float(arr[i]), value[i]  # the number as the line wrote it
    interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
    if not math.isfinite(v):
        what = "NaN/infinite"
    elif not np.isfinite(stored[i]):
        what = f"{given!r}, beyond the float32 range (+-{_F32_MAX:.3g}) of the store"
    elif (lo < v if open_lo else lo <= v) and v <= top:
        what = (
            f"{given!r}, which float32 storage rounds to {float(stored[i])!r}, outside {interval}"
        )
    else:
        what = f"{given!r}, outside {interval}"
    return None, f"'{name}' step {i + 1} is {what}"


def _check_token_ids(value: Any) -> tuple[np.ndarray | None, str | None]:
    """Return (int32 array, error): token ids are integers in [0, 2**31 - 1], never truncated."""
    arr, err = _numbers("token_ids", value)
    if err:
        return None, err
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(arr) | (arr != np.trunc(arr)) | (arr < 0) | (arr > _INT32_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        v = float(arr[i])
        shown = int(v) if v.is_integer() else v
        return (
            None,
            f"'token_ids' step {i + 1} is {shown!r}; token ids are integers in [0, 2**31 - 1]",
        )
    return arr.astype(np.int32), None


def _bad_string(value: str) -> bool:
    """True for a string Arrow cannot store: an unpaired UTF-16 surrogate from a \\uXXXX escape."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unknown_keys(obj: dict[str, Any]) -> str | None:
    """Name the keys that are no rollout field, with the field meant where one is close."""
    unknown = [k for k in obj if k not in _KNOWN]
    if not unknown:
        return None
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, _KNOWN, n=1)
        parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    listing = "" if all("did you mean" in p for p in parts) else f"; valid: {', '.join(_KNOWN)}"
    return f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(parts)}{listing}"


def _check_consistency(rec: dict[str, Any]) -> str | None:
    """Cross-field checks docs/metrics.md section 1 implies, on the stored float32 values."""
    lam, ent = rec["eos_prob"], rec["entropy"]
    if lam is not None:
        stopped = rec["finish_reason"] == "eos"
        sure = np.flatnonzero(lam[:-1] >= 1.0 if stopped else lam >= 1.0)
        if sure.size:
            i = int(sure[0])
            after = (
                "the rollout went on"
                if i < lam.size - 1
                else f"it ended with finish_reason {rec['finish_reason']!r}, not 'eos'"
            )
            return (
                f"'eos_prob' step {i + 1} is {float(lam[i]):.9g} (as float32) but {after}: EOS "
                "would have been sampled for sure; check the eos_prob values and finish_reason"
            )
        if stopped and lam[-1] <= 0.0:
            return (
                "'eos_prob' of the last step is 0 but the rollout ended with EOS "
                "(finish_reason 'eos'); give finish_reason 'stop' or 'length' if it did not"
            )
        short = np.flatnonzero(ent < binary_entropy(lam) - H_TOLERANCE)
        if short.size:
            i = int(short[0])
            return (
                f"'entropy' step {i + 1} is {float(ent[i]):.7g}, below the binary entropy "
                f"{float(binary_entropy(lam[i : i + 1])[0]):.7g} of its eos_prob "
                f"{float(lam[i]):.7g} (content entropy would be negative); entropy and "
                "eos_prob must come from the same next-step distribution"
            )
    return None


def _validate_line(
    obj: Any, defaults: dict[str, str | None], max_new_tokens: int | None
) -> tuple[dict[str, Any] | None, str | None]:
    """One parsed line as a record of store-ready arrays, or the first problem found."""
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    err = _unknown_keys(obj)
    if err:
        return None, err
    rec: dict[str, Any] = {}
    pid = obj.get("prompt_id")
    if pid is None or pid == "":
        return None, "missing 'prompt_id' (a string or integer)"
    if type(pid) not in (str, int):  # 7.0 and 7 would become two prompts; true would be 'True'
        return None, f"'prompt_id' is {_kind(pid)}; give a string or integer"
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
    ent, err = _check_floats("entropy", obj["entropy"], 0.0, math.inf)
    if err:
        return None, err
    if ent.size == 0:
        return None, "'entropy' is empty; a rollout has at least one step (the EOS step)"
    n = ent.size
    rec["entropy"] = ent
    for name in _PER_STEP:
        value = obj.get(name)
        if value is None:
            rec[name] = None
            continue
        if name == "token_ids":
            arr, err = _check_token_ids(value)
        elif name == "logprob":
            arr, err = _check_floats(name, value, -math.inf, 0.0, slack=PROB_SLACK)
        else:  # eos_prob in [0, 1]; kept_mass in (0, 1]: the kept set has positive mass
            kept = name == "kept_mass"
            arr, err = _check_floats(name, value, 0.0, 1.0, open_lo=kept, slack=PROB_SLACK)
        if err:
            return None, err
        if arr.size != n:
            return None, f"'{name}' has {arr.size} steps but 'entropy' has {n}"
        rec[name] = arr
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        return None, "'text' must be a string"
    rec["text"] = text
    for key in ("prompt_id", "model", "variant", "family", "task", "text"):
        if rec[key] is not None and _bad_string(rec[key]):
            return None, f"'{key}' holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)"
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
    for name, hi, label in (("rollout_index", _INT32_MAX, "2**31"), ("seed", 2**63 - 1, "2**63")):
        value = obj.get(name)
        if value is not None and (type(value) is not int or not 0 <= value <= hi):
            omit = "; omit it when unknown" if name == "seed" else ""
            return None, f"'{name}' must be an integer in [0, {label} - 1]{omit}"
        rec[name] = value
    err = _check_consistency(rec)
    return (None, err) if err else (rec, None)


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
    manifest entry with the file's hash and the flags). Raises CanopyError listing bad lines;
    an OSError while writing (read-only folder, disk full) removes the shards this call added
    and becomes a CanopyError naming the path. Warns about lines repeated byte for byte."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CanopyError(f"{run_dir} is a file, not a run folder; give a folder (made if missing)")
    store = RunStore(run_dir)
    before = set(store.shard_files())
    try:
        return _import_jsonl(
            path,
            run_dir,
            model=model,
            variant=variant,
            family=family,
            task=task,
            max_new_tokens=max_new_tokens,
            run_name=run_name,
        )
    except OSError as exc:
        for shard in set(store.shard_files()) - before:
            if shard.name.startswith("import-"):
                with contextlib.suppress(OSError):
                    shard.unlink()
        raise CanopyError(_os_error_message(exc, run_dir)) from exc


def _os_error_message(exc: OSError, run_dir: Path) -> str:
    """One line for a failed write: what, where and the fix."""
    where = exc.filename or run_dir
    why = " ".join((exc.strerror or str(exc) or type(exc).__name__).split())
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {run_dir} writable or import into another run folder"
    else:
        fix = "fix that"
    return f"cannot import into {run_dir}: {why} ({where}); {fix}, then import again (nothing imported)"


@dataclass
class _Lines:
    """What the validating pass keeps: a few numbers per rollout (file order), no arrays."""

    sha256: str
    line: np.ndarray  # line number of each rollout
    group: np.ndarray  # code into ``groups`` (first-seen order)
    prompt: np.ndarray  # code into ``prompts``
    rollout_index: np.ndarray  # as given, -1 where missing (then assigned by _assign_indices)
    groups: list[tuple[str, str, str, str]]
    prompts: list[str]  # prompt_id of each prompt code
    repeats: list[tuple[int, int]]  # (line, the earlier line it repeats byte for byte)


def _validate_file(
    path: Path, defaults: dict[str, str | None], max_new_tokens: int | None
) -> _Lines:
    """Pass 1: validate every line; raise CanopyError listing the bad lines (nothing kept)."""
    digest = hashlib.sha256()
    errors: dict[str, list[int]] = {}  # message -> line numbers (identical errors grouped)
    n_errors = 0
    group_code: dict[tuple[str, str, str, str], int] = {}
    prompt_code: dict[tuple[int, str], int] = {}
    cols = {k: array.array("q") for k in ("line", "group", "prompt", "rollout_index")}
    hashed = bytearray()  # blake2b digests of lines that may repeat, 16 bytes each
    hashed_lines = array.array("q")
    for lineno, raw in _raw_lines(path, digest):
        if not raw.strip():
            continue
        rec, err = _record(raw, lineno == 1, defaults, max_new_tokens)
        if err:
            n_errors += 1
            if err in errors or len(errors) < MAX_LISTED_ERRORS:
                errors.setdefault(err, []).append(lineno)
            continue
        if n_errors:
            continue  # nothing will be imported: only the errors matter now
        key = (rec["model"], rec["variant"], rec["family"], rec["task"])
        g = group_code.setdefault(key, len(group_code))
        cols["line"].append(lineno)
        cols["group"].append(g)
        cols["prompt"].append(prompt_code.setdefault((g, rec["prompt_id"]), len(prompt_code)))
        ri = rec["rollout_index"]
        cols["rollout_index"].append(-1 if ri is None else ri)
        if ri is None and rec["entropy"].any():  # greedy repeats are expected
            hashed += hashlib.blake2b(raw.strip(), digest_size=16).digest()
            hashed_lines.append(lineno)
    if n_errors:
        listed = sum(len(v) for v in errors.values())
        more = f"; and {n_errors - listed} more bad lines" if n_errors > listed else ""
        raise CanopyError(
            f"{path}: {n_errors} bad line(s), nothing imported: "
            + "; ".join(f"{_lines(v)}: {msg}" for msg, v in errors.items())
            + more
        )
    if not group_code:
        raise CanopyError(f"{path} has no rollouts (empty file); one JSON object per line")
    lines = np.frombuffer(hashed_lines, dtype=np.int64)
    _, first, inverse = np.unique(
        np.frombuffer(bytes(hashed), dtype="S16"), return_index=True, return_inverse=True
    )
    again = np.flatnonzero(first[inverse] != np.arange(lines.size))
    return _Lines(
        sha256=digest.hexdigest(),
        **{k: np.frombuffer(v, dtype=np.int64).copy() for k, v in cols.items()},
        groups=list(group_code),
        prompts=[pid for _, pid in prompt_code],
        repeats=[(int(lines[i]), int(lines[first[inverse[i]]])) for i in again],
    )


def _assign_indices(path: Path, v: _Lines) -> None:
    """Missing rollout indices continue, in file order, after the largest given one of their
    prompt; raise CanopyError when an index of a prompt repeats (nothing imported)."""
    ri, code = v.rollout_index, v.prompt
    given = ri >= 0
    next_index = np.zeros(len(v.prompts), dtype=np.int64)
    np.maximum.at(next_index, code[given], ri[given] + 1)
    missing = np.flatnonzero(~given)
    order = np.argsort(code[missing], kind="stable")
    sorted_code = code[missing][order]
    rank = np.empty(missing.size, dtype=np.int64)
    rank[order] = np.arange(missing.size) - np.searchsorted(sorted_code, sorted_code)
    ri[missing] = next_index[code[missing]] + rank
    o = np.lexsort((v.line, ri, code))
    same = np.flatnonzero((np.diff(code[o]) == 0) & (np.diff(ri[o]) == 0))
    if same.size:
        later, earlier = o[same + 1], o[same]
        shown = np.lexsort((v.line[later], v.group[later]))  # by group, then file order
        dup_errors = [
            f"line {v.line[later[k]]}: rollout {ri[later[k]]} of prompt "
            f"{v.prompts[code[later[k]]]!r} repeats line {v.line[earlier[k]]}"
            for k in shown[:MAX_LISTED_ERRORS]
        ]
        raise CanopyError(
            f"{path}: {same.size} duplicate rollout(s), nothing imported: " + "; ".join(dup_errors)
        )
    if ri.size and ri.max() > _INT32_MAX:
        k = int(np.argmax(ri))
        raise CanopyError(
            f"line {v.line[k]}: no rollout_index left for prompt {v.prompts[code[k]]!r} after "
            "2**31 - 1; give this line its 'rollout_index'"
        )


def _import_jsonl(
    path: str | Path,
    run_dir: str | Path,
    *,
    model: str | None,
    variant: str | None,
    family: str | None,
    task: str | None,
    max_new_tokens: int | None,
    run_name: str | None,
) -> ImportSummary:
    """import_jsonl without the OSError handling: validate everything, then write."""
    path = Path(path)
    if not path.is_file():
        raise CanopyError(f"{path} does not exist; pass a JSONL file with one rollout per line")
    if variant is not None and variant not in VARIANTS:
        raise CanopyError(f"--variant {variant!r} is not one of {list(VARIANTS)}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise CanopyError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    defaults = {"model": model, "variant": variant, "family": family, "task": task}
    v = _validate_file(path, defaults, max_new_tokens)
    _assign_indices(path, v)
    if v.repeats:
        shown = ", ".join(f"line {line} = line {earlier}" for line, earlier in v.repeats[:10])
        more = f" (+{len(v.repeats) - 10} more)" if len(v.repeats) > 10 else ""
        warnings.warn(
            f"{path}: {len(v.repeats)} line(s) repeat an earlier line byte for byte ({shown}"
            f"{more}) and count as further rollouts; if the file was concatenated twice this "
            "doubles M and shrinks the standard error: remove the repeats (or give each line "
            "its 'rollout_index' if the model really sampled the same rollout again)",
            stacklevel=3,
        )

    store = RunStore(run_dir)
    run = run_name or Path(run_dir).resolve().name
    _check_no_overlap(store, v)
    # shards of this file without a manifest are what a killed import of it left: redo it
    own = f"import-{v.sha256[:16]}__"
    leftovers = all(p.name.startswith(own) for p in store.shard_files())
    _check_labels(read_manifest(store.root, missing_ok=leftovers), v.groups, path)
    # write every shard into a staging folder, then rename them all into rollouts/
    staging = RunStore(store.root / f".import-{v.sha256[:16]}.staging")
    shutil.rmtree(staging.root, ignore_errors=True)  # left by a killed import of this file
    try:
        shards = _write_shards(path, v, staging, run, defaults, max_new_tokens)
        store.rollouts_dir.mkdir(parents=True, exist_ok=True)
        for name in shards:
            os.replace(staging.shard_path(name), store.shard_path(name))
        _fsync_dir(store.rollouts_dir)
    finally:
        shutil.rmtree(staging.root, ignore_errors=True)
    files = [store.shard_path(name).name for name in shards]
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
        sha256=v.sha256,
        flags=flags,
        n_rollouts=int(v.line.size),
        shards=tuple(files),
    )
    update_manifest(store.root, lambda m: _record_import(m, run, entry, v.groups, max_new_tokens))
    for stale in store.shard_files():  # an earlier import of this file under other flags
        if stale.name.startswith(own) and stale.name not in files:
            stale.unlink()
    return ImportSummary(
        n_rollouts=entry.n_rollouts,
        n_prompts=len(v.prompts),
        groups=[
            dict(zip(("model", "variant", "family", "task"), k, strict=True)) for k in v.groups
        ],
        shards=files,
        sha256=v.sha256,
    )


def _write_shards(
    path: Path,
    v: _Lines,
    staging: RunStore,
    run: str,
    defaults: dict[str, str | None],
    max_new_tokens: int | None,
) -> list[str]:
    """Pass 2: convert the lines again and write them, per group in file order, as shards of
    at most SHARD_ROLLOUTS rollouts; when the buffers hold more than STEP_BUDGET steps the
    largest is written early. Returns the shard names, sorted by group and part."""
    digest = hashlib.sha256()
    buffers: dict[int, list[dict[str, Any]]] = {g: [] for g in range(len(v.groups))}
    steps = np.zeros(len(v.groups), dtype=np.int64)
    parts = [0] * len(v.groups)
    written: list[tuple[tuple[str, ...], int, str]] = []

    def flush(g: int) -> None:
        recs, key = buffers[g], v.groups[g]
        name = "import-" + slug(v.sha256[:16], *key, str(parts[g]))
        staging.write_rollouts(name, _shard_table(run, key, recs, v.rollout_index))
        written.append((key, parts[g], name))
        buffers[g], steps[g] = [], 0
        parts[g] += 1

    k = 0  # ordinal of the rollout (valid line) in file order
    changed = CanopyError(f"{path} changed while it was imported; import it again")
    for lineno, raw in _raw_lines(path, digest):
        if not raw.strip():
            continue
        rec, err = _record(raw, lineno == 1, defaults, max_new_tokens)
        if err or k >= v.line.size or v.line[k] != lineno:
            raise changed
        g = int(v.group[k])
        rec["row"] = k
        buffers[g].append(rec)
        steps[g] += rec["entropy"].size
        k += 1
        if len(buffers[g]) >= SHARD_ROLLOUTS:
            flush(g)
        elif steps.sum() > STEP_BUDGET:
            flush(int(np.argmax(steps)))
    if k != v.line.size or digest.hexdigest() != v.sha256:
        raise changed
    for g in range(len(v.groups)):
        if buffers[g]:
            flush(g)
    return [name for _, _, name in sorted(written)]


def _shard_table(
    run: str, key: tuple[str, ...], recs: list[dict[str, Any]], rollout_index: np.ndarray
) -> Any:
    """The rollout table of one shard (records of one group)."""

    def col(name: str) -> list[Any] | None:
        values = [r[name] for r in recs]
        return None if all(x is None for x in values) else values

    g_model, g_variant, g_family, g_task = key
    return rollouts_table(
        run=run,
        model=g_model,
        variant=g_variant,
        family=g_family,
        task=g_task,
        prompt_id=[r["prompt_id"] for r in recs],
        rollout_index=rollout_index[[r["row"] for r in recs]],
        seed=[-1 if r["seed"] is None else r["seed"] for r in recs],
        finish_reason=[r["finish_reason"] for r in recs],
        entropy=[r["entropy"] for r in recs],
        token_ids=col("token_ids"),
        eos_prob=col("eos_prob"),
        logprob=col("logprob"),
        kept_mass=col("kept_mass"),
        text=[r["text"] for r in recs],
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


def _check_no_overlap(store: RunStore, v: _Lines) -> None:
    """Refuse rollouts that another source already put into this run (would double count)."""
    own = f"import-{v.sha256[:16]}__"  # shards of this very file (re-import is idempotent)
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
    for k in np.lexsort((v.line, v.group)):  # by group (first seen), then file order
        key, pid, ri = v.groups[v.group[k]], v.prompts[v.prompt[k]], int(v.rollout_index[k])
        if (*key, pid, ri) in have:
            raise CanopyError(
                f"line {v.line[k]}: rollout {ri} of prompt {pid!r} ({'/'.join(key)}) is "
                f"already in {store.root} from another source; import into a fresh --run "
                "folder or give distinct rollout_index values"
            )
