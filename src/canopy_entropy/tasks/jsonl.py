"""Reading prompt files: JSON Lines with a ``prompt`` field (and optional ``id``).

Every problem is reported with the file and line number and nothing is returned half-read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from canopy_entropy.errors import CanopyError


class PromptFileError(CanopyError):
    """A prompt file that cannot be used (missing, bad JSON, missing field, duplicate id)."""


def content_id(task: str, text: str) -> str:
    """A stable id from the prompt's content: same text -> same id in every run."""
    return f"{task}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def read_jsonl_records(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSONL file into ``(line_number, object)`` pairs; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist; check the path")
    records: list[tuple[int, dict]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(
                f"{path} line {lineno}: not valid JSON ({exc.msg}); each line must be one JSON "
                'object like {"prompt": "..."}'
            ) from exc
        if not isinstance(obj, dict):
            raise PromptFileError(
                f'{path} line {lineno}: expected a JSON object like {{"prompt": "..."}}, '
                f"got {type(obj).__name__}"
            )
        records.append((lineno, obj))
    if not records:
        raise PromptFileError(f'{path} holds no prompts; add lines like {{"prompt": "..."}}')
    return records


def read_prompt_file(path: Path, task: str, id_prefix: str | None = None) -> list[tuple[str, str]]:
    """Read ``(id, text)`` pairs from a JSONL prompt file, validating every line.

    ``id`` is the line's ``id`` field when present, else a content hash of the prompt text, so
    ids stay the same across runs; duplicates are refused by line number.
    """
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl_records(path):
        text = obj.get("prompt")
        if text is None:
            raise PromptFileError(
                f"{path} line {lineno}: no 'prompt' field (keys: {sorted(obj)}); "
                'each line needs {"prompt": "..."}'
            )
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(
                f"{path} line {lineno}: 'prompt' must be a non-empty string; fix or drop the line"
            )
        raw_id = obj.get("id")
        if raw_id is None:
            pid = content_id(id_prefix or task, text)
        elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id):
            pid = str(raw_id)
        else:
            raise PromptFileError(
                f"{path} line {lineno}: 'id' must be a non-empty string or integer; fix or drop it"
            )
        if pid in seen:
            what = "id" if raw_id is not None else "prompt text"
            raise PromptFileError(
                f"{path} line {lineno}: duplicate {what} (same as line {seen[pid]}); "
                "remove the duplicate or give each line a unique 'id'"
            )
        seen[pid] = lineno
        out.append((pid, text))
    return out


def read_exemplar_file(path: Path) -> list[tuple[str, str]]:
    """Read few-shot exemplars: lines with ``question`` and ``answer`` fields."""
    out: list[tuple[str, str]] = []
    for lineno, obj in read_jsonl_records(path):
        q, a = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            raise PromptFileError(
                f"{path} line {lineno}: a few-shot exemplar needs string fields 'question' "
                "and 'answer'"
            )
        out.append((q, a))
    return out
