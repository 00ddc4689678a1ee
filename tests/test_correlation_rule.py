"""One constant-side rule for correlations: metrics, diversity and the length-matched analysis
give the same Pearson r on the same data (and NaN for a side constant up to rounding)."""

from __future__ import annotations

import numpy as np
import pytest

from canopy_entropy.comparison import grouped_pearson
from canopy_entropy.metrics.prompt_stats import _pearson_by_code
from canopy_entropy.stats.correlation import CONSTANT_TOLERANCE, pearson


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0], 0.6),  # closed form: cov 1, var 1.25
        ([3.0, 3.0, 3.0], [1.0, 2.0, 3.0], float("nan")),  # exactly constant
        # constant in exact arithmetic, rounding noise in float: NaN, not noise's correlation
        ([0.1 + 0.2, 0.3, 0.30000000000000004], [1.0, 2.0, 3.0], float("nan")),
    ],
)
def test_every_implementation_follows_the_same_rule(x, y, expected):
    x, y = np.array(x), np.array(y)
    code = np.zeros(len(x), dtype=np.int64)
    got = [
        pearson(x, y),
        float(_pearson_by_code(x, y, code, 1, np.array([float(len(x))]))[0][0]),
        float(grouped_pearson(code, x, y)[0][0]),
    ]
    if np.isnan(expected):
        assert all(np.isnan(g) for g in got), got
    else:
        assert got == pytest.approx([expected] * 3, rel=1e-12)
    assert CONSTANT_TOLERANCE == 1e-12
