"""Validation helpers of the config parser: errors name the file, the line, the key and the
fix."""

from __future__ import annotations

import difflib
import math
import re
import sys
from typing import Any

from canopy_entropy.errors import ConfigError

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - Python 3.10
    pass


class _Ctx:
    """Where errors point: the file name and its text (to find a key's line)."""

    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source or "config"
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None, index: int | None = None) -> int | None:
        """Line number of ``key = ...`` inside ``[table]`` (the index-th ``[[table]]``)."""
        current, count, header_line = "", -1, None
        header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
        for no, line in enumerate(self.lines, start=1):
            m = header.match(line)
            if m:
                current = m.group(2).replace('"', "").replace(" ", "")
                if current == table:
                    count += 1
                    if key is None and (index is None or index == count):
                        header_line = no
                continue
            if current != table or (index is not None and count != index):
                continue
            if key is not None and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
                return no
        return header_line

    def fail(self, msg: str, table: str = "", key: str | None = None, index: int | None = None):
        line = self.line_of(table, key, index)
        where = f"{self.source} line {line}" if line else self.source
        raise ConfigError(f"{where}: {msg}")


def _name(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(valid))}"


def _check_keys(ctx: _Ctx, data: dict, valid: list[str], table: str, index: int | None = None):
    for key in data:
        if key not in valid:
            where = f"[{table}]" if table else "the top level"
            ctx.fail(f"unknown key '{key}' in {where}; {_suggest(key, valid)}", table, key, index)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _get(ctx: _Ctx, data: dict, key: str, kind: type, default: Any, table: str, index=None):
    """``data[key]`` checked to be of ``kind`` (ints accepted for floats), else ``default``."""
    if key not in data:
        return default
    value = data[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        ctx.fail(f"{_name(table, key)} = {value!r} must be a finite number", table, key, index)
    if kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is dict:
        ok = isinstance(value, dict)
    if not ok:
        want = _TYPE_NAMES.get(kind, "a list of strings" if kind is list else "a table")
        ctx.fail(
            f"{_name(table, key)} must be {want}, got {value!r}; fix the value", table, key, index
        )
    return value


def _check(ctx: _Ctx, ok: bool, table: str, key: str, value: Any, rule: str, index=None):
    if not ok:
        ctx.fail(f"{_name(table, key)} = {value!r} {rule}", table, key, index)
