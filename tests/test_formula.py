"""Formula interface: R's model.matrix names, order and values (stored R output)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from canopy_entropy.errors import CanopyError
from canopy_entropy.stats.formula import (
    FixedDesign,
    parse_model_formula,
    prepare_factors,
    r_deparse,
)
from canopy_entropy.stats.splines import NaturalSplineBasis
from regress_helpers import DATA, load_panel

CASES = json.loads((DATA / "model_matrix_reference.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["formula"][0] for c in CASES])
def test_design_matches_r_model_matrix(case):
    panel = load_panel()
    panel = panel[panel.prompt.str[-2:].astype(int) < 4].reset_index(drop=True)
    data = prepare_factors(panel, [], {"variant": "base"})
    rhs = case["formula"][0].lstrip("~ ").strip()
    design, X = FixedDesign.fit(rhs, data)
    assert design.names == case["names"]
    np.testing.assert_allclose(X, np.array(case["values"], dtype=float), atol=1e-12)
    np.testing.assert_allclose(design.transform(data), X, atol=1e-12)


def test_parse_random_intercepts():
    f = parse_model_formula("D ~ x * g + ns(z, df=3) + (1 | a) + (1|b)")
    assert f.response == "D"
    assert f.groups == ("a", "b")
    assert f.fixed == "x * g + ns(z, df=3)"
    assert parse_model_formula("~ 1").fixed == "1"
    with pytest.raises(CanopyError, match="no '~'"):
        parse_model_formula("D + x")


def test_r_deparse():
    assert r_deparse("ns(invN_sc, df=4)") == "ns(invN_sc, df = 4)"
    assert r_deparse("log(x)") == "log(x)"


def test_stored_knots_are_reused_for_new_data():
    panel = prepare_factors(load_panel(), [])
    design, _ = FixedDesign.fit("ns(invN_sc, df = 3)", panel)
    new = pd.DataFrame({"invN_sc": [panel.invN_sc.max() + 1.0, 0.0]})
    out = design.transform(new)
    basis = NaturalSplineBasis.fit(panel.invN_sc.to_numpy(), df=3)
    np.testing.assert_allclose(out[:, 1:], basis(new.invN_sc.to_numpy()), atol=1e-12)
    refit = NaturalSplineBasis.fit(new.invN_sc.to_numpy(), df=3)
    assert not np.allclose(out[:, 1:], refit(new.invN_sc.to_numpy()))
