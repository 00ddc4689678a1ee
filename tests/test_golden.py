"""Every number of a fixed tiny-model study is what it was when the numbers were pinned.

The study (``tests/golden/tiny_run.py``) runs the real pipeline end to end; refactors must not move
any metrics, diversity, comparison, length-matched or regression number. The model runs with
``tiny_run.THREADS`` torch threads, as when the numbers were pinned (float32 kernels split work
by thread count). The tolerances absorb what differs between CPUs: the model's float32 entropies
move by an ulp or two (about 1e-7 relative) with the CPU's vector width, which moves pooled
numbers by up to about 4e-5 relative; a refactor that changes a computation moves them far more.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import tiny_run

REL, ABS = 1e-4, 1e-6
# Statistics at a pole: a percent-change interval whose bootstrap denominators pass near zero, and
# a partial correlation of 4 prompts, jump (e.g. 2.25 -> 6.24) under the float32 drift above.
# They must still exist, be finite and keep their sign.
AT_A_POLE = {
    "comparison": {
        "tiny/coding/bf/ratio/base/instruct|ratio_hi",
        "tiny/coding/bf/ratio/base/instruct|ratio_lo",
        "tiny/coding/entropy_rate/ratio/base/instruct|ratio_hi",
        "tiny/coding/entropy_rate/ratio/base/instruct|ratio_lo",
        # the math ones too (pinned -15.4 .. 3.5: the bootstrap denominators cross zero); in a
        # fresh environment of 2026-12-02 they came out -17.4 .. 1.5, every other number equal
        "tiny/math/bf/ratio/base/instruct|ratio_hi",
        "tiny/math/bf/ratio/base/instruct|ratio_lo",
        "tiny/math/entropy_rate/ratio/base/instruct|ratio_hi",
        "tiny/math/entropy_rate/ratio/base/instruct|ratio_lo",
    },
    "length_matched": {"tiny/coding/b/instruct/partial_corr_r_d_logN|unmatched"},
}


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
    at_pole = AT_A_POLE.get(section, set())
    assert at_pole <= set(pinned)
    moved = []
    for key, want in pinned.items():
        have = got[key]
        if isinstance(want, str) or isinstance(have, str):
            ok = str(want) == str(have)
        elif key in at_pole:
            ok = math.isfinite(have) and math.copysign(1, have) == math.copysign(1, want)
        else:
            ok = math.isclose(have, want, rel_tol=REL, abs_tol=ABS)
        if not ok:
            moved.append((key, want, have))
    assert not moved, f"{len(moved)} numbers moved, e.g. {moved[:5]}"
