"""Scoring every rollout of a frame at once: ``correct``, ``score``, ``answer`` columns."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError
from canopy_entropy.scoring.answers import ScoringError
from canopy_entropy.scoring.registry import load_scorer, scorer_name, scorer_version

SCORE_COLUMNS = ("correct", "score", "answer", "scorer_version")


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _as_score(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and 0.0 <= value <= 1.0:
        return float(value)
    raise ScoringError(
        f"scorer {name} returned {value!r}; a scorer returns a bool or a score in [0, 1]"
    )


def _missing(values: np.ndarray) -> np.ndarray:
    return np.fromiter(
        (v is None or (isinstance(v, float) and math.isnan(v)) for v in values), bool, len(values)
    )


def score_frame(
    rollouts: pd.DataFrame | pa.Table,
    scorer: Callable[..., Any] | str,
    reference_col: str = "reference",
    *,
    response_col: str = "text",
    option_cols: Mapping[str, str] | None = None,
    threshold: float = 1.0,
    workers: int = 1,
    **options: Any,
) -> pd.DataFrame:
    """Score each rollout's ``response_col`` against its ``reference_col`` with ``scorer`` (a
    function or a name for ``load_scorer``), returning a copy of the frame with columns:

    * ``correct`` (bool): the scorer said True, or its score is at least ``threshold``;
    * ``score`` (float64 in [0, 1]);
    * ``answer``: the normalised answer the scorer read (None when none, or when the scorer
      has no ``extract``), the key majority voting groups by;
    * ``scorer_version``: ``scorer_version(scorer, **options)``, also in ``.attrs``, so stored
      scores are recomputed exactly when the scorer or its options change.

    ``options`` go to every call; ``option_cols`` maps a scorer keyword to a column giving it per
    rollout (e.g. ``{"options": "choices"}``). Equal (response, reference, options) are scored
    once; ``workers`` > 1 scores in threads (for slow scorers such as ``code_passes``).
    """
    if not 0.0 < threshold <= 1.0:
        raise ScoringError(f"threshold={threshold!r} must lie in (0, 1]")
    if not isinstance(workers, int) or workers < 1:
        raise ScoringError(f"workers={workers!r} must be a positive whole number")
    frame = rollouts.to_pandas() if isinstance(rollouts, pa.Table) else rollouts
    fn = load_scorer(scorer) if isinstance(scorer, str) else scorer
    name = scorer_name(fn)
    version = scorer_version(fn, **options)
    option_cols = dict(option_cols or {})
    needed = [response_col, reference_col, *option_cols.values()]
    missing_cols = [c for c in needed if c not in frame.columns]
    if missing_cols:
        raise ScoringError(
            f"the rollout frame has no columns {missing_cols} (it has {list(frame.columns)}); "
            "join the references onto the rollouts first"
        )
    responses = frame[response_col].to_numpy(dtype=object)
    references = frame[reference_col].to_numpy(dtype=object)
    for col, values in ((response_col, responses), (reference_col, references)):
        empty = _missing(values)
        if empty.any():
            raise ScoringError(
                f"'{col}' is empty for {int(empty.sum())} of {len(frame)} rollouts "
                f"(first at row {int(np.argmax(empty))}); every scored rollout needs its "
                f"{'text' if col == response_col else 'reference answer'}"
            )
    per_row = {kw: frame[col].to_numpy(dtype=object) for kw, col in option_cols.items()}
    keys = [
        (r, _hashable(ref), *(_hashable(per_row[kw][i]) for kw in option_cols))
        for i, (r, ref) in enumerate(zip(responses, references, strict=True))
    ]
    codes, _ = pd.factorize(pd.Series(keys, dtype=object))
    first = np.unique(codes, return_index=True)[1]  # the first row of each distinct key
    extract = getattr(fn, "extract", None)

    def one(row: int) -> tuple[float, str | None]:
        kwargs = {**options, **{kw: per_row[kw][row] for kw in option_cols}}
        try:
            score = _as_score(fn(responses[row], references[row], **kwargs), name)
            answer = extract(responses[row], **kwargs) if extract is not None else None
        except ScoringError as exc:
            raise ScoringError(f"row {row}: {exc}") from None
        except CanopyError:
            raise
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ScoringError(
                f"scorer {name} failed on row {row} ({type(exc).__name__}: {line}); fix the "
                "scorer or that rollout's reference"
            ) from None
        return score, answer

    if workers > 1 and len(first) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, first))
    else:
        results = [one(int(row)) for row in first]
    scores = np.array([s for s, _ in results], dtype=np.float64)[codes]
    answers = np.array([a for _, a in results] + [None], dtype=object)[:-1][codes]
    out = frame.copy()
    out["score"] = scores
    out["correct"] = scores >= threshold
    out["answer"] = answers
    out["scorer_version"] = version
    out.attrs["scorer_version"] = version
    return out
