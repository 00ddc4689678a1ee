"""Numbers in JSON documents: full float64 precision, and NaN distinct from infinity.

JSON has no NaN or infinity. Written values: a finite float as Python's shortest repr (it
parses back to the same float64 bit for bit), NaN ("unknown / undefined") as ``null``, and
``+inf`` / ``-inf`` (e.g. an unbounded truncation bias) as the strings ``"inf"`` / ``"-inf"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

INF_TOKENS = {"inf": math.inf, "-inf": -math.inf}


def json_value(v: Any) -> Any:
    """A JSON-safe copy of one scalar (numpy scalars become Python numbers)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    return v


def json_records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame as a list of row dicts with every value passed through ``json_value``."""
    cols = list(frame.columns)
    return [
        {c: json_value(v) for c, v in zip(cols, row, strict=True)}
        for row in frame.itertuples(index=False, name=None)
    ]


def decode_value(v: Any) -> Any:
    """Inverse of ``json_value`` for a numeric field: ``null`` -> NaN, ``"inf"`` -> inf."""
    if v is None:
        return math.nan
    if isinstance(v, str) and v in INF_TOKENS:
        return INF_TOKENS[v]
    return v


def decode_fields(record: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """``decode_value`` on every field of ``record`` except the ``skip`` (label) fields."""
    skip = set(skip)
    return {k: (v if k in skip else decode_value(v)) for k, v in record.items()}
