"""Linear-mixed and quadratic robustness fits against closed forms and a dense second
implementation of the Gaussian marginal likelihood; the Vendi and RSE Beta fits' panels."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import linalg, optimize, stats

from canopy_entropy.errors import CanopyError
from canopy_entropy.stats import lmm
from canopy_entropy.stats.beta_glmm import fit_beta_glmm
from canopy_entropy.stats.regression import PUBLISHED_MEAN, PUBLISHED_PRECISION
from regress_helpers import make_panel

pytest.importorskip("statsmodels")


# --------------------------------------------------------------------- closed form
def one_way(a: int = 8, n: int = 5, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    b = rng.normal(0, 2.0, a)
    y = 3.0 + np.repeat(b, n) + rng.normal(0, 1.0, a * n)
    return pd.DataFrame({"y": y, "g": np.repeat([f"g{i}" for i in range(a)], n)})


def test_balanced_one_way_matches_closed_form_ml_and_reml():
    a, n = 8, 5
    df = one_way(a, n)
    y = df["y"].to_numpy().reshape(a, n)
    grand, means = y.mean(), y.mean(axis=1)
    ssw = ((y - means[:, None]) ** 2).sum()
    ssb = n * ((means - grand) ** 2).sum()
    # ML: sigma^2 = SSW / (a (n - 1)), sigma_b^2 = (SSB / a - sigma^2) / n
    s2 = ssw / (a * (n - 1))
    sb2 = (ssb / a - s2) / n
    assert sb2 > 0
    ml = lmm.fit_mixed(df, "y ~ 1 + (1 | g)", reml=False)
    assert ml.params[0] == pytest.approx(grand, rel=1e-8)
    assert ml.resid_var == pytest.approx(s2, rel=1e-5)
    assert ml.re_var == pytest.approx(sb2, rel=1e-5)
    assert ml.bse[0] == pytest.approx(math.sqrt((s2 + n * sb2) / (a * n)), rel=1e-5)
    lam = s2 + n * sb2
    loglik = -0.5 * (
        a * n * math.log(2 * math.pi)
        + a * (n - 1) * math.log(s2)
        + a * math.log(lam)
        + ssw / s2
        + ssb / lam
    )
    assert ml.loglik == pytest.approx(loglik, rel=1e-9)
    assert ml.aic == pytest.approx(-2 * loglik + 2 * 3, rel=1e-9)
    # REML: the ANOVA estimators MSW and (MSB - MSW) / n
    msw, msb = ssw / (a * (n - 1)), ssb / (a - 1)
    reml = lmm.fit_mixed(df, "y ~ 1 + (1 | g)", reml=True)
    assert reml.resid_var == pytest.approx(msw, rel=1e-5)
    assert reml.re_var == pytest.approx((msb - msw) / n, rel=1e-5)
    assert reml.bse[0] == pytest.approx(math.sqrt(msb / (a * n)), rel=1e-5)


def test_summary_and_conf_int_follow_from_estimates():
    res = lmm.fit_mixed(one_way(), "y ~ 1 + (1 | g)", reml=False)
    s = res.summary()
    est, se = float(s.loc["(Intercept)", "estimate"]), float(s.loc["(Intercept)", "se"])
    assert s.loc["(Intercept)", "z"] == pytest.approx(est / se)
    assert s.loc["(Intercept)", "p"] == pytest.approx(2 * stats.norm.sf(abs(est / se)))
    ci = res.conf_int(0.9)
    assert ci.loc["(Intercept)", "lo"] == pytest.approx(est - 1.6448536269514722 * se)
    assert ci.loc["(Intercept)", "hi"] == pytest.approx(est + 1.6448536269514722 * se)
    with pytest.raises(CanopyError, match="confidence level"):
        res.conf_int(95)


# --------------------------------------------------------------------- dense second fit
def lmm_test_panel(n_prompts: int = 8) -> pd.DataFrame:
    raw = make_panel(seed=7, n_prompts=n_prompts, raw=True)
    rng = np.random.default_rng(3)
    panel = raw.rename(columns={"R": "Rbar"})
    panel["Rbar"] = panel["Rbar"] + 2.0
    panel["Nbar"] = np.exp(4 + 0.3 * raw["invN"].to_numpy())
    # a quadratic bend for the instruct rows so the LRT has something to find
    inst = (panel["variant"] == "instruct").to_numpy()
    rc = panel["Rbar"] - panel["Rbar"].mean()
    panel["D"] = panel["D"] + 0.03 * inst * rc**2 + rng.normal(0, 0.01, len(panel))
    return panel


def hand_design(panel: pd.DataFrame, model: str) -> dict[str, np.ndarray]:
    """Columns by R name, built directly with numpy (no formula machinery)."""
    inst = (panel["variant"] == "instruct").to_numpy(float)
    rbar = panel["Rbar"].to_numpy(float)
    rc = rbar - rbar.mean()
    cols = {"(Intercept)": np.ones(len(panel))}
    task = {f"task{t}": (panel["task"] == t).to_numpy(float) for t in ("T2", "T3", "T4")}
    fam = {f"family{f}": (panel["family"] == f).to_numpy(float) for f in ("fb", "fc")}
    nbar = panel["Nbar"].to_numpy(float)
    if model == "main":
        cols |= {"Rbar": rbar, "Nbar": nbar, **task, **fam, "variantinstruct": inst}
        cols |= {f"{k}:variantinstruct": v * inst for k, v in fam.items()}
    else:
        cols |= {"R_c": rc, "variantinstruct": inst, "Nbar": nbar, **task, **fam}
        cols["R_c:variantinstruct"] = rc * inst
        if model == "quadratic":
            cols |= {"R_c2": rc**2, "variantinstruct:R_c2": rc**2 * inst}  # R's term order
    return cols


def dense_ml(y: np.ndarray, X: np.ndarray, groups: np.ndarray, reml: bool = False):
    """ML (or REML) of y ~ N(X b, s2 I + sb2 Z Z') by profiling b out, with dense matrices."""
    _, codes = np.unique(groups, return_inverse=True)
    Z = np.eye(codes.max() + 1)[codes]
    ZZ = Z @ Z.T
    n, p = X.shape

    def pieces(log_s2, log_sb2):
        V = np.exp(log_s2) * np.eye(n) + np.exp(log_sb2) * ZZ
        c = linalg.cho_factor(V)
        Vi_X = linalg.cho_solve(c, X)
        A = X.T @ Vi_X
        b = np.linalg.solve(A, Vi_X.T @ y)
        r = y - X @ b
        logdet = 2 * np.log(np.diag(c[0])).sum()
        quad = r @ linalg.cho_solve(c, r)
        if reml:
            ll = -0.5 * ((n - p) * math.log(2 * math.pi) + logdet + np.linalg.slogdet(A)[1] + quad)
        else:
            ll = -0.5 * (n * math.log(2 * math.pi) + logdet + quad)
        return ll, b, np.linalg.inv(A)

    best = optimize.minimize(
        lambda t: -pieces(*t)[0], x0=np.log([np.var(y) / 2] * 2), method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 4000},
    )  # fmt: skip
    ll, b, cov = pieces(*best.x)
    return ll, b, cov, np.exp(best.x)


@pytest.fixture(scope="module")
def panel():
    return lmm_test_panel()


@pytest.mark.parametrize("model", ["main", "interaction", "quadratic"])
def test_published_models_match_dense_ml(panel, model):
    res = lmm.fit_lmm(panel, model)
    cols = hand_design(panel, model)
    assert set(res.names) == set(cols)
    X = np.column_stack([cols[name] for name in res.names])
    ll, b, cov, (s2, sb2) = dense_ml(panel["D"].to_numpy(), X, panel["prompt"].to_numpy())
    assert res.loglik == pytest.approx(ll, abs=1e-6)
    np.testing.assert_allclose(res.params, b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res.bse, np.sqrt(np.diag(cov)), rtol=1e-3)
    assert res.resid_var == pytest.approx(s2, rel=1e-3)
    assert res.re_var == pytest.approx(sb2, rel=1e-3)
    assert res.nobs == len(panel) and res.ngroups == panel["prompt"].nunique()
    assert not res.reml and res.converged


def test_reml_main_matches_dense_reml(panel):
    res = lmm.fit_lmm(panel, "main", reml=True)
    X = np.column_stack([hand_design(panel, "main")[n] for n in res.names])
    ll, b, cov, _ = dense_ml(panel["D"].to_numpy(), X, panel["prompt"].to_numpy(), reml=True)
    np.testing.assert_allclose(res.params, b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res.bse, np.sqrt(np.diag(cov)), rtol=1e-3)
    assert res.loglik == pytest.approx(ll, abs=1e-5)


def test_quadratic_lrt_against_direct_chi_square(panel):
    lrt = lmm.quadratic_test(panel)
    assert lrt.df == 2
    assert lrt.statistic == pytest.approx(2 * (lrt.quadratic.loglik - lrt.interaction.loglik))
    assert lrt.p_value == pytest.approx(stats.chi2.sf(lrt.statistic, 2), rel=1e-12)
    # and against the dense log-likelihoods of the two hand-built designs
    lls = []
    for model in ("interaction", "quadratic"):
        cols = hand_design(panel, model)
        X = np.column_stack(list(cols.values()))
        lls.append(dense_ml(panel["D"].to_numpy(), X, panel["prompt"].to_numpy())[0])
    stat = 2 * (lls[1] - lls[0])
    assert lrt.statistic == pytest.approx(stat, abs=1e-5)
    assert lrt.p_value == pytest.approx(stats.chi2.sf(stat, 2), rel=1e-3)
    assert lrt.p_value < 0.01  # the bend put into the data is found
    assert not lrt.interaction.reml and not lrt.quadratic.reml


def test_single_level_factors_are_left_out_of_the_formula(panel):
    one = panel[(panel["family"] == "fa") & (panel["task"] == "T1")]
    assert lmm.lmm_formula(one, "main") == "D ~ Rbar + Nbar + variant + (1 | prompt)"
    assert lmm.lmm_formula(one, "quadratic") == (
        "D ~ R_c * variant + R_c2 * variant + Nbar + (1 | prompt)"
    )
    assert lmm.lmm_formula(panel, "main") == (
        "D ~ Rbar + Nbar + task + family * variant + (1 | prompt)"
    )
    with pytest.warns(UserWarning, match="estimated at 0"):
        res = lmm.fit_lmm(one, "main")
    assert res.names == ("(Intercept)", "Rbar", "Nbar", "variantinstruct")


def test_zero_variance_limit_equals_ols(panel):
    """On this subset the prompt variance's MLE is 0: the fit is ordinary least squares (ML)."""
    one = panel[(panel["family"] == "fa") & (panel["task"] == "T1")]
    with pytest.warns(UserWarning, match="boundary fit"):
        res = lmm.fit_lmm(one, "main")
    X = np.column_stack([hand_design(one, "main")[n] for n in res.names])
    y = one["D"].to_numpy()
    beta, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
    n = len(y)
    s2 = float(rss[0]) / n
    assert res.re_var < 1e-8 * res.resid_var and res.converged
    np.testing.assert_allclose(res.params, beta, rtol=1e-5)
    assert res.resid_var == pytest.approx(s2, rel=1e-5)
    assert res.loglik == pytest.approx(-0.5 * n * (math.log(2 * math.pi * s2) + 1), abs=1e-7)
    np.testing.assert_allclose(res.bse, np.sqrt(np.diag(s2 * np.linalg.inv(X.T @ X))), rtol=1e-4)


def test_bad_inputs(panel):
    with pytest.raises(CanopyError, match="unknown mixed model 'cubic'"):
        lmm.fit_lmm(panel, "cubic")
    with pytest.raises(CanopyError, match="lacks column\\(s\\) Nbar"):
        lmm.fit_lmm(panel.drop(columns=["Nbar"]))
    with pytest.raises(CanopyError, match="exactly one random intercept"):
        lmm.fit_mixed(panel, "D ~ Rbar")
    with pytest.raises(CanopyError, match="reference level 'T9'"):
        lmm.fit_lmm(panel, reference={"task": "T9"})


def test_reference_level_for_task(panel):
    res = lmm.fit_lmm(panel, "interaction", reference={"task": "T3"})
    assert "taskT1" in res.names and "taskT3" not in res.names


def r_with_lme4() -> str | None:
    if shutil.which("Rscript") is None:
        return "Rscript is not installed"
    probe = subprocess.run(
        ["Rscript", "-e", "library(lme4); library(jsonlite)"], capture_output=True, text=True
    )
    return None if probe.returncode == 0 else "R lacks lme4 or jsonlite"


@pytest.mark.skipif(r_with_lme4() is not None, reason=str(r_with_lme4()))
def test_matches_lme4(panel, tmp_path):
    data = lmm.lmm_panel(panel)
    data.to_csv(tmp_path / "panel.csv", index=False, float_format="%.17g")
    script = f"""
library(lme4); library(jsonlite)
d <- read.csv("{tmp_path / "panel.csv"}")
d$variant <- relevel(factor(d$variant), "base")
out <- list()
for (f in list(main = D ~ Rbar + Nbar + task + family * variant + (1 | prompt),
               quadratic = D ~ R_c * variant + R_c2 * variant + Nbar + task + family + (1 | prompt))) {{
  fit <- lmer(f, data = d, REML = FALSE)
  out[[length(out) + 1]] <- list(coef = as.list(fixef(fit)),
    se = as.list(sqrt(diag(as.matrix(vcov(fit))))), loglik = as.numeric(logLik(fit)))
}}
cat(toJSON(out, digits = 15, auto_unbox = TRUE))
"""
    proc = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True)
    r_out = json.loads(proc.stdout)
    for model, ref in zip(("main", "quadratic"), r_out, strict=True):
        res = lmm.fit_lmm(panel, model).summary()
        for name, est in ref["coef"].items():
            assert res.loc[name, "estimate"] == pytest.approx(est, rel=1e-4, abs=1e-7)
            assert res.loc[name, "se"] == pytest.approx(ref["se"][name], rel=1e-3)
        assert lmm.fit_lmm(panel, model).loglik == pytest.approx(ref["loglik"], abs=1e-5)


# --------------------------------------------------------------------- Vendi and RSE
def beta_panel_keys(n_prompts: int = 6) -> pd.DataFrame:
    raw = make_panel(seed=11, n_prompts=n_prompts, raw=True)
    panel = raw.rename(columns={"R": "Rbar"})
    panel["prompt_id"] = panel["prompt"]
    panel["model"] = panel["family"] + "-" + panel["variant"]
    panel["Nbar"] = np.exp(4 + 0.3 * raw["invN"].to_numpy())
    return panel


def test_vendi_panel_rescales_to_unit_interval():
    panel = beta_panel_keys()
    keys = ["model", "variant", "family", "task", "prompt_id"]
    div = panel[keys].copy()
    m = 10
    div["n_rollouts"] = m
    div["vendi"] = 1 + (m - 1) * panel["D"].to_numpy()  # V then equals D exactly
    div.loc[0, "vendi"] = 1 - 1e-9  # numerical noise under 1 is clipped to 0
    out = lmm.vendi_panel_from_frames(panel, div)
    assert out.loc[0, "V"] == 0.0
    np.testing.assert_allclose(out["V"].to_numpy()[1:], panel["D"].to_numpy()[1:], rtol=1e-12)
    div.loc[1, "vendi"] = m + 1.0
    with pytest.raises(CanopyError, match="outside \\[1, M\\]"):
        lmm.vendi_panel_from_frames(panel, div)
    div.loc[1, "vendi"] = np.nan
    with pytest.warns(UserWarning, match="1 panel row\\(s\\) without a Vendi score"):
        assert len(lmm.vendi_panel_from_frames(panel, div)) == len(panel) - 1


def test_vendi_fit_is_the_published_spec_on_v():
    panel = beta_panel_keys()
    panel["V"] = panel["D"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lmm.fit_vendi(panel, reference={"task": "T1"})
        direct = fit_beta_glmm(
            panel.rename(columns={"D": "Dorig", "V": "D"}),
            PUBLISHED_MEAN, PUBLISHED_PRECISION,
            reference={"variant": "base", "task": "T1"},
        )  # fmt: skip
    assert res.response == "V"
    assert "R_sc:variantinstruct" in res.mean_names and "ns(invN_sc, df = 4)1" in res.mean_names
    np.testing.assert_allclose(res.theta, direct.theta, rtol=1e-6, atol=1e-8)
    assert res.loglik == pytest.approx(direct.loglik)


def test_rse_panel_and_fit():
    panel = beta_panel_keys()
    keys = ["model", "variant", "family", "task", "prompt_id"]
    metrics = panel[keys].copy()
    metrics["entropy_rate"] = panel["Rbar"]
    metrics["mean_length"] = panel["Nbar"]
    rse = panel[keys].copy()
    rse["rse_normalized"] = panel["D"].to_numpy()
    rse.loc[0, "rse_normalized"] = 0.0  # one cluster: clipped by the Beta fit, with a warning
    out = lmm.rse_panel_from_frames(metrics, rse)
    assert len(out) == len(panel)
    rbar = out["Rbar"].to_numpy()
    np.testing.assert_allclose(out["R_sc"], (rbar - rbar.mean()) / rbar.std(ddof=1))
    inv = 1 / out["Nbar"].to_numpy()
    np.testing.assert_allclose(out["invN_sc"], (inv - inv.mean()) / inv.std(ddof=1))
    assert (out["prompt"] == out["task"] + "/" + out["prompt_id"]).all()
    with pytest.warns(UserWarning, match="1 response value\\(s\\) at 0 or 1 clipped"):
        res = lmm.fit_rse(out, reference={"task": "T1"})
    assert res.response == "RSE" and res.nobs == len(panel)
    with pytest.warns(UserWarning, match="2 RSE row\\(s\\) without metrics"):
        assert len(lmm.rse_panel_from_frames(metrics.iloc[2:], rse)) == len(panel) - 2
    with pytest.raises(CanopyError, match="lacks column\\(s\\) rse_normalized"):
        lmm.rse_panel_from_frames(metrics, rse.drop(columns=["rse_normalized"]))
