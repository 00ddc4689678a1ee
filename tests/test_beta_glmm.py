"""Beta GLMM (Laplace ML) against glmmTMB, against independent computations, and edge cases."""

from __future__ import annotations

import json
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special, stats

from canopy_entropy.errors import CanopyError
from canopy_entropy.stats.beta_glmm import ConvergenceWarning, fit_beta_glmm
from regress_helpers import (
    DATA,
    PUBLISHED_MEAN,
    PUBLISHED_PRECISION,
    load_panel,
    make_panel,
    r_with_glmmtmb,
    stored_glmmtmb,
)


@pytest.fixture(scope="module")
def published_fit():
    return fit_beta_glmm(
        load_panel(), PUBLISHED_MEAN, PUBLISHED_PRECISION, reference={"variant": "base"}
    )


def assert_matches_glmmtmb(result, ref):
    got = result.to_json()
    for part in ("mean", "precision"):
        assert list(got[part]) == list(ref[part]), f"{part} term names/order differ from R"
        for term, row in ref[part].items():
            assert got[part][term]["estimate"] == pytest.approx(row["estimate"], abs=1e-4), term
            assert got[part][term]["se"] == pytest.approx(row["se"], rel=1e-3), term
    assert got["loglik"] == pytest.approx(ref["loglik"], abs=1e-4)
    assert got["aic"] == pytest.approx(ref["aic"], abs=2e-4)
    assert got["nobs"] == ref["nobs"]
    assert got["ngroups"] == ref["ngroups"]
    for group, sd in ref["re_sd"].items():
        assert got["re_sd"][group] == pytest.approx(sd, rel=1e-3, abs=1e-4)


def test_published_spec_matches_stored_glmmtmb(published_fit):
    assert published_fit.converged
    assert published_fit.max_abs_gradient < 1e-6
    assert_matches_glmmtmb(published_fit, stored_glmmtmb())


@pytest.mark.r_oracle
def test_published_spec_matches_live_glmmtmb(tmp_path, published_fit):
    reason = r_with_glmmtmb()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "glmmtmb_result.json"
    subprocess.run(
        ["Rscript", str(DATA / "glmmtmb_fit.R"), str(DATA / "beta_panel.csv"), str(out)],
        check=True,
        capture_output=True,
    )
    assert_matches_glmmtmb(published_fit, json.loads(out.read_text()))


def test_p_values_and_z_follow_from_estimates(published_fit):
    table = published_fit.mean_table()
    np.testing.assert_allclose(table.z, table.estimate / table.se)
    np.testing.assert_allclose(table.p, 2 * stats.norm.sf(np.abs(table.z)))
    assert published_fit.aic == pytest.approx(-2 * published_fit.loglik + 2 * 32)


def test_slope_ratio_delta_method(published_fit):
    ratio = published_fit.slope_ratio()
    i = published_fit.mean_names.index("R_sc")
    j = published_fit.mean_names.index("R_sc:variantinstruct")
    a, c = published_fit.theta[i], published_fit.theta[j]
    assert ratio["estimate"] == pytest.approx((a + c) / a)
    # delta method by a numerical gradient of the ratio
    cov = published_fit.cov[np.ix_([i, j], [i, j])]
    eps = 1e-6
    grad = np.array([((a + eps + c) / (a + eps) - (a - eps + c) / (a - eps)) / (2 * eps), 1 / a])
    assert ratio["se"] == pytest.approx(float(np.sqrt(grad @ cov @ grad)), rel=1e-6)
    assert ratio["lo"] < ratio["estimate"] < ratio["hi"]


def test_predictions(published_fit):
    panel = load_panel()
    fitted = published_fit.predict(type="response")
    np.testing.assert_allclose(published_fit.predict(panel, type="response"), fitted, atol=1e-10)
    link0 = published_fit.predict(panel, type="link", re=False)
    X = published_fit.mean_design.transform(published_fit._frame(panel))
    np.testing.assert_allclose(link0, X @ published_fit.beta.to_numpy())
    re_sum = published_fit.re_modes["prompt"][panel.prompt].to_numpy()
    re_sum = re_sum + published_fit.re_modes["family"][panel.family].to_numpy()
    np.testing.assert_allclose(
        published_fit.predict(panel, type="link"), link0 + re_sum, atol=1e-10
    )
    new = panel.head(3).assign(prompt="unseen")
    np.testing.assert_allclose(
        published_fit.predict(new, type="link"),
        link0[:3] + published_fit.re_modes["family"][panel.family[:3]].to_numpy(),
        atol=1e-10,
    )
    with pytest.raises(CanopyError, match="type"):
        published_fit.predict(panel, type="probability")


def _small_panel(seed=5, n_groups=25, per_group=8, sd=0.5, two_factors=False):
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    h = rng.integers(0, 4, size=n)
    eta = -0.2 + 0.8 * x + rng.normal(0, sd, n_groups)[g]
    if two_factors:
        eta = eta + rng.normal(0, 0.4, 4)[h]
    mu = special.expit(eta)
    phi = np.exp(2.5 + 0.3 * (x > 0))
    y = rng.beta(mu * phi, (1 - mu) * phi)
    return pd.DataFrame(
        {"y": y, "x": x, "pos": np.where(x > 0, "yes", "no"), "g": g.astype(str), "h": h}
    )


def test_laplace_loglik_equals_independent_per_group_laplace():
    data = _small_panel()
    res = fit_beta_glmm(data, "y ~ x + (1 | g)", "~ pos")
    beta, gamma = res.beta.to_numpy(), res.gamma.to_numpy()
    sd = res.re_sd["g"]
    eta_fixed = beta[0] + beta[1] * data.x.to_numpy()
    phi = np.exp(gamma[0] + gamma[1] * (data.pos == "yes").to_numpy())
    y = data.y.to_numpy()
    total = 0.0
    for level in data.g.unique():
        idx = (data.g == level).to_numpy()

        def h(b, idx=idx):
            mu = special.expit(eta_fixed[idx] + b)
            dens = stats.beta.logpdf(y[idx], mu * phi[idx], (1 - mu) * phi[idx]).sum()
            return dens + stats.norm.logpdf(b, 0, sd)

        b_hat = optimize.minimize_scalar(lambda b, h=h: -h(b), bracket=(-1, 1), tol=1e-12).x
        step = 1e-4
        curvature = (h(b_hat + step) - 2 * h(b_hat) + h(b_hat - step)) / step**2
        total += h(b_hat) + 0.5 * np.log(2 * np.pi) - 0.5 * np.log(-curvature)
        assert res.re_modes["g"][str(level)] == pytest.approx(b_hat, abs=1e-5)
    assert res.loglik == pytest.approx(total, abs=1e-5)


def test_gradient_matches_finite_differences_with_crossed_effects():
    from canopy_entropy.stats import beta_glmm as bg
    from canopy_entropy.stats.formula import FixedDesign, prepare_factors

    data = _small_panel(two_factors=True)
    frame = prepare_factors(data, [])
    _, X = FixedDesign.fit("x", frame)
    _, W = FixedDesign.fit("pos", frame)
    codes = [pd.Categorical(data[c]).codes.astype(np.int64) for c in ("g", "h")]
    lap = bg._Laplace(bg._Problem(data.y.to_numpy(), X, W, codes, [25, 4]))
    theta = np.array([0.1, 0.5, 2.0, 0.2, np.log(0.7), np.log(0.2)])
    _, grad = lap.value_and_grad(theta)
    fd = np.empty_like(theta)
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = 1e-5
        fd[i] = (lap.value_and_grad(theta + e)[0] - lap.value_and_grad(theta - e)[0]) / 2e-5
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)


def test_no_random_effects_equals_plain_beta_regression_ml():
    data = _small_panel(seed=11)
    res = fit_beta_glmm(data, "y ~ x", "~ pos")
    X = np.column_stack([np.ones(len(data)), data.x])
    W = np.column_stack([np.ones(len(data)), (data.pos == "yes").astype(float)])
    y = data.y.to_numpy()

    def nll(t):
        mu = special.expit(X @ t[:2])
        phi = np.exp(W @ t[2:])
        return -stats.beta.logpdf(y, mu * phi, (1 - mu) * phi).sum()

    ref = optimize.minimize(
        nll,
        np.zeros(4),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 40000},
    )
    ref = optimize.minimize(nll, ref.x, method="BFGS", options={"gtol": 1e-9})
    np.testing.assert_allclose(res.theta, ref.x, atol=2e-5)
    assert res.loglik == pytest.approx(-ref.fun, abs=1e-7)
    # SEs from an independent finite-difference Hessian of the closed-form likelihood
    k, h = len(ref.x), 1e-4
    hess = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            ei, ej = np.eye(k)[i] * h, np.eye(k)[j] * h
            hess[i, j] = (
                nll(ref.x + ei + ej)
                - nll(ref.x + ei - ej)
                - nll(ref.x - ei + ej)
                + nll(ref.x - ei - ej)
            ) / (4 * h * h)
    se = np.sqrt(np.diag(np.linalg.inv(hess)))
    np.testing.assert_allclose(np.sqrt(np.diag(res.cov)), se, rtol=1e-3)


def test_single_level_group_is_dropped_with_warning():
    data = _small_panel(seed=2).assign(one="only")
    with pytest.warns(UserWarning, match="single level"):
        res = fit_beta_glmm(data, "y ~ x + (1 | g) + (1 | one)", "~ 1")
    assert res.groups == ["g"]
    ref = fit_beta_glmm(data, "y ~ x + (1 | g)", "~ 1")
    np.testing.assert_allclose(res.theta, ref.theta)


def test_collinear_columns_error_names_them():
    data = _small_panel(seed=3)
    data["x2"] = 2.0 * data["x"] + 1.0
    with pytest.raises(CanopyError, match=r"rank deficient.*'x2'.*'x'"):
        fit_beta_glmm(data, "y ~ x + x2 + (1 | g)", "~ 1")
    with pytest.raises(CanopyError, match="precision design is rank deficient"):
        fit_beta_glmm(data, "y ~ x", "~ x + x2")


def test_responses_at_zero_or_one_are_clipped_with_warning():
    data = _small_panel(seed=4)
    data.loc[0, "y"] = 0.0
    data.loc[1, "y"] = 1.0
    with pytest.warns(UserWarning, match="2 response value"):
        res = fit_beta_glmm(data, "y ~ x + (1 | g)", "~ 1")
    assert res.clipped == 2
    assert res.y[0] == 1e-6 and res.y[1] == 1 - 1e-6
    bad = data.assign(y=data.y + 1.0)
    with pytest.raises(CanopyError, match=r"must lie in \[0, 1\]"):
        fit_beta_glmm(bad, "y ~ x", "~ 1")


def test_non_convergence_is_reported_loudly():
    # every 'yes' row equals 0.5: its precision runs off to infinity (no finite optimum)
    data = _small_panel(seed=6)
    data.loc[data.pos == "yes", "y"] = 0.5
    with pytest.warns(ConvergenceWarning, match="DID NOT CONVERGE"):
        res = fit_beta_glmm(data, "y ~ pos", "~ pos", max_iter=15)
    assert not res.converged
    payload = res.to_json()
    assert payload["converged"] is False
    assert payload["convergence"]["max_abs_gradient"] > 1e-3


def test_zero_variance_group_is_flagged_as_boundary_fit():
    data = _small_panel(seed=6)
    with pytest.warns(UserWarning, match="essentially zero"):
        res = fit_beta_glmm(data, "y ~ x + pos + (1 | pos) + (1 | g)", "~ 1")
    assert res.singular == ["pos"]
    assert res.to_json()["convergence"]["singular_groups"] == ["pos"]


def test_formula_errors_are_one_line():
    data = _small_panel(seed=7)
    with pytest.raises(CanopyError, match="response column 'D'"):
        fit_beta_glmm(data, "D ~ x", "~ 1")
    with pytest.raises(CanopyError, match="only random intercepts"):
        fit_beta_glmm(data, "y ~ x + (x | g)", "~ 1")
    with pytest.raises(CanopyError, match="grouping column 'nope'"):
        fit_beta_glmm(data, "y ~ x + (1 | nope)", "~ 1")
    with pytest.raises(CanopyError, match="'g' has 1 missing"):
        fit_beta_glmm(data.assign(g=data.g.where(data.index != 3)), "y ~ x + (1 | g)", "~ 1")
    with pytest.raises(CanopyError, match="reference level 'maybe'"):
        fit_beta_glmm(data, "y ~ x + pos", "~ 1", reference={"pos": "maybe"})


def test_reference_level_changes_names_and_sign():
    data = _small_panel(seed=8)
    a = fit_beta_glmm(data, "y ~ x + pos + (1 | g)", "~ 1")
    b = fit_beta_glmm(data, "y ~ x + pos + (1 | g)", "~ 1", reference={"pos": "yes"})
    assert "posyes" in a.mean_names and "posno" in b.mean_names
    assert b.beta["posno"] == pytest.approx(-a.beta["posyes"], abs=1e-5)
    assert b.loglik == pytest.approx(a.loglik, abs=1e-7)


@pytest.mark.slow
def test_parameter_recovery_coverage(request):
    """95% Wald intervals cover the generating slopes close to 95% of the time (correct model)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow statistical check: run with -m slow")
    truth = {"R": 0.7, "R:variantinstruct": 1.2, "variantinstruct": 0.4, "invN": 0.3}
    hits, n_fits = dict.fromkeys(truth, 0), 0
    for seed in range(100):
        panel = make_panel(seed=1000 + seed, n_prompts=15, raw=True)
        panel["invN2"] = panel["invN"] ** 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit_beta_glmm(
                panel,
                "D ~ R * variant + invN + invN2 + task + (1 | prompt) + (1 | family)",
                "~ variant + task + R",
            )
        if not res.converged:
            continue
        n_fits += 1
        table = res.mean_table()
        for term, value in truth.items():
            lo = table.estimate[term] - 1.959964 * table.se[term]
            hi = table.estimate[term] + 1.959964 * table.se[term]
            hits[term] += int(lo <= value <= hi)
    print(f"coverage over {n_fits} fits:", {t: k / n_fits for t, k in hits.items()})
    assert n_fits >= 95
    for term, k in hits.items():
        # binomial(100, 0.95): 95% of runs fall in [0.90, 0.99]
        assert 0.88 <= k / n_fits <= 1.0, (term, k, n_fits)
