"""ns() basis against R's splines::ns (stored outputs, and live R when installed)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from canopy_entropy.errors import CanopyError
from canopy_entropy.stats.splines import NaturalSplineBasis, ns, quantile_type7
from regress_helpers import DATA, r_with_glmmtmb

CASES = json.loads((DATA / "ns_reference.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[f"df{c['df'][0]}-n{len(c['x'])}" for c in CASES])
def test_ns_matches_r_including_extrapolation(case):
    x = np.array(case["x"], dtype=float)
    df = int(case["df"][0])
    basis = NaturalSplineBasis.fit(x, df=df)
    np.testing.assert_allclose(basis.knots, np.atleast_1d(case["knots"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(basis.boundary_knots, case["boundary"], atol=1e-12)
    expected = np.array(case["basis"], dtype=float).reshape(len(x), df)
    np.testing.assert_allclose(basis(x), expected, rtol=0, atol=1e-12)
    new = np.array(case["new"], dtype=float)
    expected_new = np.array(case["new_basis"], dtype=float).reshape(len(new), df)
    np.testing.assert_allclose(basis(new), expected_new, rtol=0, atol=1e-11)


def test_quantile_type7_matches_hand_computation():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    # type 7: h = (n - 1) p; 0.25 -> 1 + 0.75 * (2 - 1) = 1.75; 0.5 -> 3
    np.testing.assert_allclose(quantile_type7(x, np.array([0.25, 0.5])), [1.75, 3.0])


def test_natural_constraint_linear_beyond_boundary_and_zero_curvature():
    x = np.linspace(-2, 3, 41)
    basis = NaturalSplineBasis.fit(x, df=5)
    outside = np.array([3.0, 3.5, 4.0, 5.0])
    values = basis(outside)
    # linear continuation: equal second differences are zero
    np.testing.assert_allclose(values[2] - values[1], values[1] - values[0], atol=1e-12)
    np.testing.assert_allclose(
        (values[3] - values[2]) / 1.0, 2 * (values[2] - values[1]), atol=1e-12
    )
    # second derivative at the boundary vanishes (finite differences inside)
    h = 1e-4
    inner = basis(np.array([3 - 2 * h, 3 - h, 3.0]))
    np.testing.assert_allclose((inner[0] - 2 * inner[1] + inner[2]) / h**2, 0, atol=1e-3)


def test_ns_edge_cases():
    x = np.array([0.0, 1.0, np.nan, 2.0, 3.0])
    out = ns(x, df=2)
    assert np.isnan(out[2]).all() and np.isfinite(out[[0, 1, 3, 4]]).all()
    with pytest.raises(CanopyError, match="df"):
        NaturalSplineBasis.fit(np.arange(5.0), df=0)
    with pytest.raises(CanopyError, match="give df"):
        NaturalSplineBasis.fit(np.arange(5.0))


@pytest.mark.r_oracle
def test_ns_live_r(tmp_path):
    reason = r_with_glmmtmb()
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(3)
    x = np.round(rng.gamma(2.0, size=60), 6)
    new = np.array([-1.0, 0.0, 2.5, x.max(), 40.0])
    script = (
        "library(splines); library(jsonlite);"
        f"x <- c({','.join(map(repr, x.tolist()))}); b <- ns(x, df = 5);"
        f"cat(toJSON(list(b = unclass(b)[,], p = predict(b, c({','.join(map(repr, new.tolist()))}))), "
        "digits = NA, matrix = 'rowmajor'))"
    )
    res = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True)
    ref = json.loads(res.stdout)
    basis = NaturalSplineBasis.fit(x, df=5)
    np.testing.assert_allclose(basis(x), np.array(ref["b"]), atol=1e-12)
    np.testing.assert_allclose(basis(new), np.array(ref["p"]), atol=1e-11)
