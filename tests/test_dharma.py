"""DHARMa-like diagnostics: exact residual/test formulas, calibration and power."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from canopy_entropy.stats.beta_glmm import fit_beta_glmm
from canopy_entropy.stats.dharma import (
    dispersion_test,
    outlier_test,
    plot_diagnostics,
    run_diagnostics,
    scaled_residuals,
    simulate_responses,
)


def _panel(seed: int, extra_sd: float = 0.0, n_groups: int = 60, per_group: int = 10):
    """Beta GLMM data; ``extra_sd`` adds row-level logit noise the model does not know."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    eta = -0.3 + 0.9 * x + rng.normal(0, 0.5, n_groups)[g] + rng.normal(0, extra_sd, n)
    mu = special.expit(eta)
    phi = 30.0
    y = rng.beta(mu * phi, (1 - mu) * phi)
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})


def test_scaled_residual_formula_with_ties():
    rng = np.random.default_rng(0)
    sims = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.9]])
    obs = np.array([0.25, 0.5])
    u = np.random.default_rng(0).uniform(size=2)
    res = scaled_residuals(obs, sims, rng)
    # row 0: 2 below, no ties -> (2 + u) / 5; row 1: 0 below, 3 ties -> (0 + 4u) / 5
    np.testing.assert_allclose(res, [(2 + u[0]) / 5, 4 * u[1] / 5])


def test_scaled_residuals_exactly_uniform_under_exchangeability():
    rng = np.random.default_rng(1)
    draws = rng.beta(2, 5, size=(4000, 40))
    res = scaled_residuals(draws[:, 0], draws[:, 1:], rng)
    assert stats.kstest(res, "uniform").pvalue > 0.01


def test_dispersion_and_outlier_tests_by_hand():
    fitted = np.array([0.5, 0.5, 0.5])
    sims = np.array([[0.4, 0.5, 0.6], [0.5, 0.5, 0.5], [0.6, 0.5, 0.4]])
    obs = np.array([0.2, 0.5, 0.8])
    out = dispersion_test(obs, sims, fitted)
    sim_stats = np.var(sims - fitted[:, None], axis=0, ddof=1)
    obs_stat = np.var(obs - fitted, ddof=1)
    assert out["ratio"] == pytest.approx(obs_stat / sim_stats.mean())
    assert out["p"] == pytest.approx(min(1.0, 2 * np.mean(sim_stats >= obs_stat)))
    res = outlier_test(obs, sims)
    assert res["outliers"] == 2  # 0.2 and 0.8 lie outside their rows' simulations
    assert res["expected_rate"] == pytest.approx(2 / 4)
    assert res["p"] == pytest.approx(stats.binomtest(2, 3, 0.5).pvalue)


@pytest.fixture(scope="module")
def calibrated_fit():
    return fit_beta_glmm(_panel(3), "y ~ x + (1 | g)", "~ 1")


def test_correct_model_gives_uniform_residuals(calibrated_fit, tmp_path):
    diag = run_diagnostics(calibrated_fit, nsim=250, seed=1)
    t = diag.tests["unconditional"]
    assert t["ks"]["p"] > 0.05
    assert t["dispersion"]["p"] > 0.05
    assert 0.9 < t["dispersion"]["ratio"] < 1.1
    assert t["outliers"]["p"] > 0.05
    assert diag.residuals.shape[0] == calibrated_fit.nobs
    paths = plot_diagnostics(diag, tmp_path)
    assert sorted(p.name for p in paths) == [
        "regression_qq.pdf",
        "regression_qq.png",
        "regression_resid.pdf",
        "regression_resid.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_simulations_follow_fitted_beta(calibrated_fit):
    rng = np.random.default_rng(5)
    sims = simulate_responses(calibrated_fit, 2000, rng, conditional=True)
    mu = calibrated_fit.predict(type="response")
    phi = calibrated_fit.fitted_phi
    np.testing.assert_allclose(sims.mean(axis=1)[:50], mu[:50], atol=5 * 0.1 / np.sqrt(2000))
    var = mu * (1 - mu) / (1 + phi)
    ratio = sims.var(axis=1) / var
    assert abs(ratio.mean() - 1) < 0.02
    # unconditional draws add the random-intercept variance: more spread around mu
    uncond = simulate_responses(calibrated_fit, 2000, rng, conditional=False)
    assert uncond.var(axis=1).mean() > sims.var(axis=1).mean() * 1.2


def test_overdispersed_data_rejected():
    """Observations with extra row-level noise against a model whose precision ignores it.

    A free Beta precision would absorb the extra noise, so the model's precision is the one
    fitted on the same design without the noise (a precision model that is wrong).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_beta_glmm(_panel(4, extra_sd=1.0), "y ~ x + (1 | g)", "~ 1")
    res_clean = fit_beta_glmm(_panel(4), "y ~ x + (1 | g)", "~ 1")
    res.fitted_phi = res_clean.fitted_phi
    diag = run_diagnostics(res, nsim=250, seed=2)
    t = diag.tests["unconditional"]
    assert t["dispersion"]["ratio"] > 1.2
    assert t["dispersion"]["p"] < 0.01
    assert t["ks"]["p"] < 0.01
