"""SPEC section-3 pooling: the worked example, and hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from canopy_entropy.stats.pooling import (
    FISHER_CLIP,
    pool_covariance,
    pool_fisher,
    pool_kendall,
    weighted_mean_with_fallback,
)

rhos = st.floats(-1.0, 1.0, allow_nan=False)
ns = st.integers(1, 200)
pairs = st.lists(st.tuples(rhos, ns), min_size=1, max_size=12)


def test_spec_worked_example():
    # z = 0.30952, -0.10034; weights 20, 10; tanh(0.17290) = 0.17120
    assert np.arctanh([0.3, -0.1]) == pytest.approx([0.30952, -0.10034], abs=5e-6)
    assert float(pool_fisher(np.array([0.3, -0.1]), np.array([23, 13]))) == pytest.approx(
        math.tanh((20 * math.atanh(0.3) + 10 * math.atanh(-0.1)) / 30), rel=1e-15
    )
    assert round(float(pool_fisher(np.array([0.3, -0.1]), np.array([23, 13]))), 5) == 0.17120


def test_fallback_drop_and_all_nan():
    assert float(pool_fisher(np.array([0.5, -0.5, 0.2]), np.array([3, 2, 3]))) == pytest.approx(
        math.tanh((math.atanh(0.5) - math.atanh(0.5) + math.atanh(0.2)) / 3)
    )
    assert float(pool_fisher(np.array([np.nan, 0.4]), np.array([50, 10]))) == pytest.approx(0.4)
    assert math.isnan(float(pool_kendall(np.array([np.nan, np.nan]), np.array([5, 5]))))
    assert float(pool_kendall(np.array([0.2, 0.6]), np.array([1, 1]))) == pytest.approx(0.4)
    assert float(pool_covariance(np.array([1.0, 4.0]), np.array([2, 3]))) == pytest.approx(3.0)


@given(pairs)
def test_fisher_is_bounded_and_between_extremes(data):
    rho = np.array([r for r, _ in data])
    n = np.array([k for _, k in data])
    pooled = float(pool_fisher(rho, n))
    clipped = np.clip(rho, -FISHER_CLIP, FISHER_CLIP)
    assert -FISHER_CLIP - 1e-12 <= pooled <= FISHER_CLIP + 1e-12
    assert clipped.min() - 1e-12 <= pooled <= clipped.max() + 1e-12


@given(pairs, st.randoms(use_true_random=False))
def test_pooling_is_permutation_invariant(data, rnd):
    rho = np.array([r for r, _ in data])
    n = np.array([k for _, k in data])
    perm = list(range(len(data)))
    rnd.shuffle(perm)
    for fn in (pool_fisher, pool_kendall, pool_covariance):
        assert float(fn(rho[perm], n[perm])) == pytest.approx(float(fn(rho, n)), abs=1e-12)


def test_properties_have_no_deadline():
    # the suite profile (conftest.py): a busy machine must not fail a property for slowness
    assert settings.default.deadline is None


@given(rhos, st.lists(ns, min_size=1, max_size=8))
def test_identical_values_pool_to_themselves(rho, n):
    n = np.array(n)
    values = np.full(len(n), rho)
    expected = float(np.clip(rho, -FISHER_CLIP, FISHER_CLIP))
    assert float(pool_fisher(values, n)) == pytest.approx(expected, abs=1e-9)
    assert float(pool_kendall(values, n)) == pytest.approx(rho, abs=1e-12)
    assert float(pool_covariance(values, n)) == pytest.approx(rho, abs=1e-12)


@given(pairs, st.integers(0, 5))
def test_nan_entries_are_the_same_as_absent(data, n_nan):
    rho = np.array([r for r, _ in data])
    n = np.array([k for _, k in data])
    with_nan = np.concatenate([rho, np.full(n_nan, np.nan)])
    n_nan_w = np.concatenate([n, np.full(n_nan, 100)])
    for fn in (pool_fisher, pool_kendall, pool_covariance):
        assert float(fn(with_nan, n_nan_w)) == pytest.approx(float(fn(rho, n)), abs=1e-12)


@settings(max_examples=50)
@given(
    arrays(np.float64, (4, 6), elements=st.floats(-1, 1)),
    arrays(np.int64, 6, elements=st.integers(1, 60)),
)
def test_replicate_axis_matches_row_by_row(rho, n):
    for fn in (pool_fisher, pool_kendall, pool_covariance):
        whole = fn(rho, n)
        rows = np.array([float(fn(row, n)) for row in rho])
        np.testing.assert_allclose(whole, rows, rtol=1e-13, atol=1e-15)


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=10),
    st.lists(st.floats(0, 1e3), min_size=10, max_size=10),
)
def test_weighted_mean_matches_numpy_average(values, weights):
    v = np.array(values)
    w = np.array(weights[: len(values)])
    got = float(weighted_mean_with_fallback(v, w))
    expected = np.average(v, weights=w) if w.sum() > 0 else v.mean()
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-6)
