"""``canopy regress --model`` (lmm, quadratic, vendi, rse) and RSE carried through metrics and
compare: on small real runs of the reference model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from canopy_entropy.comparison import compare_run
from canopy_entropy.metrics import current_metrics, write_metrics
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.semantic.rse import RSE_SCHEMA_VERSION
from canopy_entropy.store import RunStore, atomic_write_table
from cli_helpers import run_cli

KEYS = list(PROMPT_KEYS)


def _two_variant_run(run, n_prompts=12, m=8):
    """A run with a base and an instruct model of one family on the same prompts."""
    for variant, seed, eos in (("base", 1, 0.15), ("instruct", 2, 0.3)):
        lm = FiniteStateLM.random(3, 5, seed=seed, mean_eos=eos)
        lm.sample_store(
            run,
            n_prompts,
            m,
            seed=seed,
            model=f"fsm-{variant}",
            variant=variant,
            prompt_seed=7,
            max_new_tokens=40,
        )
    return run


def _write_rse(run, seed=0, drop=0):
    """A semantic/rse.parquet for every prompt of the run (random cluster counts)."""
    prompts = current_metrics(run).prompts if (run / "metrics").exists() else None
    if prompts is None:
        prompts = write_metrics(run, warn=False).prompts
    rng = np.random.default_rng(seed)
    table = prompts[KEYS].iloc[drop:].reset_index(drop=True).copy()
    m = 6
    clusters = rng.integers(1, m + 1, len(table))
    table["rse"] = np.log(clusters)  # equal-size clusters: RSE = log k
    table["rse_normalized"] = np.log(clusters) / np.log(m)
    table["rse_clusters"] = clusters.astype(np.int32)
    table["rse_m"] = np.int32(m)
    table["rse_failures"] = np.int32(0)
    atomic_write_table(
        run / "semantic" / "rse.parquet",
        pa.Table.from_pandas(table, preserve_index=False),
        RSE_SCHEMA_VERSION,
    )
    return table


def test_rse_flows_through_metrics_and_compare(tmp_path):
    run = _two_variant_run(tmp_path / "run")
    before = write_metrics(run, warn=False)
    assert "rse" not in before.prompts.columns
    rse = _write_rse(run, drop=1)  # one prompt without RSE
    assert not before.is_fresh(run)  # rse.parquet is an input of the metrics
    metrics = write_metrics(run, warn=False)
    merged = metrics.prompts.merge(rse, on=KEYS, how="left", suffixes=("", "_file"))
    for col in ("rse", "rse_normalized", "rse_clusters"):
        np.testing.assert_array_equal(
            merged[col].to_numpy(float), merged[f"{col}_file"].to_numpy(float)
        )
    assert merged["rse"].isna().sum() == 1
    for _, row in metrics.pooled.iterrows():
        sel = metrics.prompts[metrics.prompts["model"] == row["model"]]
        assert row["rse"] == pytest.approx(np.nanmean(sel["rse"]), rel=1e-12)
        assert row["rse_normalized"] == pytest.approx(np.nanmean(sel["rse_normalized"]), rel=1e-12)
    comp = compare_run(run, n_boot=200, seed=0).table
    for metric in ("rse", "rse_normalized"):
        r = comp[comp["metric"] == metric].iloc[0]
        pairs = metrics.prompts.pivot_table(index="prompt_id", columns="variant", values=metric)
        # each side pools its finite per-prompt values (SPEC section 3: a NaN has weight 0)
        assert r["kind"] == "ratio"
        assert r["a"] == pytest.approx(pairs["base"].mean(), rel=1e-12)
        assert r["b"] == pytest.approx(pairs["instruct"].mean(), rel=1e-12)
        assert r["pct"] == pytest.approx(100 * (r["b"] - r["a"]) / r["a"], rel=1e-9)


def test_rse_judged_on_more_rollouts_than_the_prompt_has_is_left_out(tmp_path):
    run = _two_variant_run(tmp_path / "run", m=5)
    write_metrics(run, warn=False)
    _write_rse(run)  # rse_m = 6 > 5 rollouts per prompt: computed from other rollouts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = write_metrics(run, warn=False)
    assert metrics.prompts["rse"].isna().all()
    assert any("relaxed semantic entropy" in str(w.message) for w in caught)


# --------------------------------------------------------------- canopy regress --model
def _diversity_run(tmp_path, n_prompts=24, m=6, with_rse=False):
    """A two-variant reference run with real diversity tables (random unit embeddings)."""
    from canopy_entropy.semantic.diversity import diversity_tables

    run = _two_variant_run(tmp_path / "run", n_prompts=n_prompts, m=m)
    keys = (
        RunStore(run)
        .read_rollouts(columns=[*KEYS, "rollout_index", "length"])
        .to_pandas()
        .sort_values([*KEYS, "rollout_index"])
    )
    rng = np.random.default_rng(4)
    # a prompt's rollouts share a direction of prompt-specific strength: D varies by prompt
    codes, uniques = pd.factorize(keys["prompt_id"])
    strength = rng.uniform(0.5, 3.0, len(uniques))[codes, None]
    emb = rng.normal(size=(len(keys), 8)) + strength * rng.normal(size=(len(uniques), 8))[codes]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    prompt_div, _ = diversity_tables(keys, emb)
    atomic_write_table(
        run / "semantic" / "prompt_diversity.parquet",
        pa.Table.from_pandas(prompt_div, preserve_index=False),
        "canopy-prompt-diversity/1",
    )
    if with_rse:
        write_metrics(run, warn=False)
        _write_rse(run)
    write_metrics(run, warn=False)
    return run


def _marginal_loglik(panel, fit_json, design):
    """ML log-likelihood of a random-intercept model from its closed form, per prompt group:
    y_g ~ N(X_g b, s2 I + sb2 11')."""
    y = panel["D"].to_numpy(float)
    b = np.array([fit_json["coefficients"][t]["estimate"] for t in design.columns])
    resid = y - design.to_numpy(float) @ b
    total = 0.0
    for _, idx in panel.groupby("prompt").indices.items():
        n = len(idx)
        cov = fit_json["resid_var"] * np.eye(n) + fit_json["re_var"] * np.ones((n, n))
        total += stats.multivariate_normal(np.zeros(n), cov).logpdf(resid[idx])
    return total


def _gls(panel, fit_json, design):
    """GLS fixed effects at the fitted variances: (X' V^-1 X)^-1 X' V^-1 y."""
    X, y = design.to_numpy(float), panel["D"].to_numpy(float)
    A, c = np.zeros((X.shape[1],) * 2), np.zeros(X.shape[1])
    for _, idx in panel.groupby("prompt").indices.items():
        n = len(idx)
        vinv = np.linalg.inv(
            fit_json["resid_var"] * np.eye(n) + fit_json["re_var"] * np.ones((n, n))
        )
        A += X[idx].T @ vinv @ X[idx]
        c += X[idx].T @ vinv @ y[idx]
    return np.linalg.solve(A, c)


def _design(panel, quadratic=False):
    """The R-named fixed-effect design of the interaction (or quadratic) model, by hand."""
    rc = panel["Rbar"].to_numpy(float) - panel["Rbar"].mean()
    inst = (panel["variant"] == "instruct").to_numpy(float)
    cols = {"(Intercept)": np.ones(len(panel)), "R_c": rc, "variantinstruct": inst}
    if quadratic:
        cols["R_c2"] = rc**2
    cols["Nbar"] = panel["Nbar"].to_numpy(float)
    cols["R_c:variantinstruct"] = rc * inst
    if quadratic:
        cols["variantinstruct:R_c2"] = rc**2 * inst
    return pd.DataFrame(cols)


def test_regress_quadratic_writes_lrt_matching_closed_forms(tmp_path, capsys, monkeypatch):
    from canopy_entropy.stats.regression import build_panel

    run = _diversity_run(tmp_path)
    code, out, err = run_cli(["regress", str(run), "--model", "quadratic"], capsys, monkeypatch)
    assert code == 0, err
    assert "likelihood-ratio test" in out
    doc = json.loads((run / "regression" / "quadratic" / "result.json").read_text())
    assert not (run / "regression" / "result.json").exists()  # the beta fit is untouched
    panel = build_panel(run)
    lls = {}
    for name, quad in (("interaction", False), ("quadratic", True)):
        fit = doc["fits"][name]
        assert fit["re_var"] > 0.1 * fit["resid_var"]  # a real random intercept, not OLS
        design = _design(panel, quad)
        assert set(fit["coefficients"]) == set(design.columns)
        design = design[list(fit["coefficients"])]
        est = np.array([fit["coefficients"][t]["estimate"] for t in design.columns])
        np.testing.assert_allclose(est, _gls(panel, fit, design), rtol=1e-6, atol=1e-9)
        lls[name] = _marginal_loglik(panel, fit, design)
        assert fit["loglik"] == pytest.approx(lls[name], rel=1e-9)
        assert fit["aic"] == pytest.approx(-2 * lls[name] + 2 * (len(est) + 2), rel=1e-9)
        assert fit["nobs"] == len(panel) and fit["ngroups"] == panel["prompt"].nunique()
    stat = 2 * (lls["quadratic"] - lls["interaction"])
    assert doc["lrt"]["df"] == 2
    assert doc["lrt"]["statistic"] == pytest.approx(max(stat, 0.0), rel=1e-6, abs=1e-9)
    assert doc["lrt"]["p_value"] == pytest.approx(stats.chi2.sf(max(stat, 0.0), 2), rel=1e-6)


def test_regress_lmm_and_vendi_on_a_run(tmp_path, capsys, monkeypatch):
    from canopy_entropy.stats.lmm import vendi_panel

    run = _diversity_run(tmp_path)
    code, out, err = run_cli(["regress", str(run), "--model", "lmm", "--json"], capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc["fits"]) == {"main", "interaction"}
    assert doc == json.loads((run / "regression" / "lmm" / "result.json").read_text())
    main = doc["fits"]["main"]
    assert main["formula"] == "D ~ Rbar + Nbar + variant + (1 | prompt)"
    for row in main["coefficients"].values():  # Wald intervals and z from estimate and SE
        assert row["z"] == pytest.approx(row["estimate"] / row["se"], rel=1e-12)
        assert row["lo"] == pytest.approx(row["estimate"] - stats.norm.ppf(0.975) * row["se"])
    panel = vendi_panel(run)  # the Vendi response V = (VS - 1) / (M - 1)
    div = pd.read_parquet(run / "semantic" / "prompt_diversity.parquet")
    both = panel.merge(div[[*KEYS, "vendi"]], on=KEYS, suffixes=("", "_file"))
    assert len(both) == len(div)
    np.testing.assert_allclose(both["V"], (both["vendi_file"] - 1) / (both["n_rollouts"] - 1))


@pytest.mark.parametrize(("model", "response"), [("vendi", "V"), ("rse", "RSE")])
def test_vendi_and_rse_fits_match_glmmtmb(tmp_path, capsys, monkeypatch, model, response):
    """The published Beta fit with the response renamed: glmmTMB's fit of D on the test panel."""
    from regress_helpers import DATA, stored_glmmtmb

    panel = pd.read_csv(DATA / "beta_panel.csv").rename(columns={"D": response})
    path = tmp_path / "panel.csv"
    panel.to_csv(path, index=False)
    args = ["regress", "--panel", str(path), "--model", model, "--json", "--out", str(tmp_path)]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert doc == json.loads((tmp_path / model / "result.json").read_text())
    ref = stored_glmmtmb()
    assert doc["response"] == response
    for term, row in ref["mean"].items():
        assert doc["mean"][term]["estimate"] == pytest.approx(row["estimate"], abs=1e-4)
        assert doc["mean"][term]["se"] == pytest.approx(row["se"], rel=1e-3)
    assert doc["loglik"] == pytest.approx(ref["loglik"], abs=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "rse"], "canopy semantic-entropy"),
        (["--model", "probit"], "unknown regression model 'probit'"),
        (["--model", "lmm", "--mean", "D ~ R_sc"], "--mean only apply to --model beta"),
        (["--model", "quadratic", "--diagnostics"], "--diagnostics only apply"),
    ],
)
def test_regress_model_user_errors(tmp_path, capsys, monkeypatch, args, message):
    run = _diversity_run(tmp_path, n_prompts=6, m=4)
    code, _, err = run_cli(["regress", str(run), *args], capsys, monkeypatch)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_regress_rse_fits_the_rse_panel(tmp_path, capsys, monkeypatch):
    run = _diversity_run(tmp_path, with_rse=True)
    code, out, err = run_cli(["regress", str(run), "--model", "rse", "--json"], capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["response"] == "RSE" and doc["formula"]["mean"].startswith("RSE ~ R_sc")
    rse = pd.read_parquet(run / "semantic" / "rse.parquet")
    assert doc["nobs"] == len(rse)
