"""Every number of a fixed tiny-model study is what it was when the numbers were pinned.

The study (``tests/golden/tiny_run.py``) runs the real pipeline end to end; refactors must not move
any metrics, diversity, comparison, length-matched or regression number. The model runs with
``tiny_run.THREADS`` torch threads, as when the numbers were pinned (float32 kernels split work
by thread count); the tolerances absorb float64 summation order only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import tiny_run

REL = {"regression": 1e-5}


@pytest.fixture(scope="module")
def golden_numbers(golden_run):
    return tiny_run.collect_numbers(golden_run)


@pytest.mark.parametrize(
    "section",
    [
        "metrics_prompts",
        "metrics_pooled",
        "diversity",
        "comparison",
        "length_matched",
        "regression",
    ],
)
def test_numbers_unchanged(golden_numbers, section):
    pinned = json.loads(tiny_run.NUMBERS.read_text())[section]
    got = golden_numbers[section]
    assert sorted(got) == sorted(pinned), set(got) ^ set(pinned)
    rel = REL.get(section, 1e-7)
    moved = []
    for key, want in pinned.items():
        have = got[key]
        if isinstance(want, str) or isinstance(have, str):
            ok = str(want) == str(have)
        else:
            ok = math.isclose(have, want, rel_tol=rel, abs_tol=1e-9)
        if not ok:
            moved.append((key, want, have))
    assert not moved, f"{len(moved)} numbers moved, e.g. {moved[:5]}"
