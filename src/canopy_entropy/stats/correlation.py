"""One rule for when a correlation is undefined, shared by metrics, diversity and compare.

A side is *constant* when its sum of squared deviations is at rounding level of its magnitude:
``sum (x - xbar)^2 <= CONSTANT_TOLERANCE * sum x^2`` (exactly 0 for identical values; for values
equal in exact arithmetic, float rounding leaves ~1e-16 relative noise). A correlation with a
constant side is NaN, never the correlation of rounding noise.
"""

from __future__ import annotations

import numpy as np

CONSTANT_TOLERANCE = 1e-12


def pearson_from_sums(
    sxy: np.ndarray, sxx: np.ndarray, syy: np.ndarray, sqx: np.ndarray, sqy: np.ndarray
) -> np.ndarray:
    """Pearson r from centred sums (``sxy``, ``sxx``, ``syy``) and raw sums of squares
    (``sqx``, ``sqy``, for the constant-side rule); NaN where a side is constant."""
    sxy, sxx, syy = np.asarray(sxy), np.asarray(sxx), np.asarray(syy)
    constant = (sxx <= CONSTANT_TOLERANCE * np.asarray(sqx)) | (
        syy <= CONSTANT_TOLERANCE * np.asarray(sqy)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
    return np.where(constant, np.nan, r)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two samples; NaN with fewer than two values or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    sums = [(xc * yc).sum(), (xc * xc).sum(), (yc * yc).sum(), (x * x).sum(), (y * y).sum()]
    return float(pearson_from_sums(*sums))
