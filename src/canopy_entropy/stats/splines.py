"""Natural cubic spline basis identical to R's ``splines::ns`` (knots stored for new data).

R builds the basis from a cubic B-spline basis with the boundary knots repeated four times,
drops the first column (no intercept) and projects out the two second-derivative constraints
at the boundary knots with a Householder QR, keeping the last ``df`` columns of ``Q' B``.
Outside the boundary knots the basis is extended linearly, as R does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import BSpline

from canopy_entropy.errors import CanopyError


def quantile_type7(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """R's default ``quantile(x, probs)`` (type 7: linear interpolation of order statistics)."""
    return np.quantile(np.asarray(x, dtype=np.float64), probs, method="linear")


def _spline_design(all_knots: np.ndarray, x: np.ndarray, derivs: int = 0) -> np.ndarray:
    """Cubic B-spline design matrix (or its ``derivs``-th derivative) like R's splineDesign."""
    n_basis = len(all_knots) - 4
    x = np.asarray(x, dtype=np.float64)
    out = np.empty((len(x), n_basis))
    for j in range(n_basis):
        coef = np.zeros(n_basis)
        coef[j] = 1.0
        spline = BSpline(all_knots, coef, 3, extrapolate=True)
        out[:, j] = spline(x, nu=derivs) if derivs else spline(x)
    return out


@dataclass(frozen=True)
class NaturalSplineBasis:
    """A fitted ``ns`` basis: interior and boundary knots, reusable on new data."""

    knots: tuple[float, ...]
    boundary_knots: tuple[float, float]
    intercept: bool = False

    @property
    def df(self) -> int:
        """Number of basis columns."""
        return len(self.knots) + 1 + int(self.intercept)

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        df: int | None = None,
        knots: np.ndarray | None = None,
        intercept: bool = False,
        boundary_knots: tuple[float, float] | None = None,
    ) -> NaturalSplineBasis:
        """Choose knots as R does: boundary knots at the range, interior knots at quantiles."""
        x = np.asarray(x, dtype=np.float64)
        x = x[~np.isnan(x)]
        if len(x) == 0:
            raise CanopyError("ns(): no non-missing values to place the spline knots on")
        if boundary_knots is None:
            boundary_knots = (float(x.min()), float(x.max()))
        lo, hi = boundary_knots
        if knots is None:
            if df is None:
                raise CanopyError("ns(): give df= or knots=")
            n_interior = int(df) - 1 - int(intercept)
            if n_interior < 0:
                raise CanopyError(f"ns(): df = {df} is too small; use df >= {1 + int(intercept)}")
            inside = x[(x >= lo) & (x <= hi)]
            probs = np.linspace(0.0, 1.0, n_interior + 2)[1:-1]
            knots = quantile_type7(inside, probs) if n_interior > 0 else np.empty(0)
        return cls(tuple(float(k) for k in np.sort(knots)), (float(lo), float(hi)), intercept)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Evaluate the basis at ``x`` (n x df); NaN rows stay NaN."""
        x = np.asarray(x, dtype=np.float64)
        lo, hi = self.boundary_knots
        all_knots = np.sort(np.concatenate([[lo] * 4, self.knots, [hi] * 4]))
        n_full = len(all_knots) - 4
        basis = np.full((len(x), n_full), np.nan)
        ok = ~np.isnan(x)
        left, right = ok & (x < lo), ok & (x > hi)
        inside = ok & ~left & ~right
        if inside.any():
            basis[inside] = _spline_design(all_knots, x[inside])
        for mask, pivot in ((left, lo), (right, hi)):
            if mask.any():
                value = _spline_design(all_knots, np.array([pivot]))[0]
                slope = _spline_design(all_knots, np.array([pivot]), derivs=1)[0]
                basis[mask] = value[None, :] + (x[mask] - pivot)[:, None] * slope[None, :]
        const = _spline_design(all_knots, np.array([lo, hi]), derivs=2)
        if not self.intercept:
            const, basis = const[:, 1:], basis[:, 1:]
        q, _ = np.linalg.qr(const.T, mode="complete")
        projected = basis @ q  # rows of (Q' B')'
        return projected[:, 2:]


def ns(x: np.ndarray, df: int | None = None, knots: np.ndarray | None = None) -> np.ndarray:
    """One-shot ``splines::ns(x, df)`` basis (knots chosen from ``x``)."""
    return NaturalSplineBasis.fit(x, df=df, knots=knots)(x)
