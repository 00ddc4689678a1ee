"""`canopy regress` on a run folder and on a CSV panel; the run-folder outputs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from canopy_entropy.cli.regress import command
from canopy_entropy.errors import CanopyError
from canopy_entropy.metrics.result import MetricsResult, metrics_inputs
from canopy_entropy.stats.regression import panel_from_frames, regress_panel, zscore
from regress_helpers import DATA, PUBLISHED_MEAN, PUBLISHED_PRECISION, make_panel, stored_glmmtmb


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # a group, as in the full CLI
        """canopy"""

    app.command("regress")(command)
    return app


def invoke(*args: str):
    return CliRunner().invoke(_app(), ["regress", *args])


def make_frames(n_prompts: int = 12, seed: int = 9):
    """Per-prompt metrics and diversity frames with known generating parameters."""
    raw = make_panel(seed=seed, n_prompts=n_prompts, raw=True)
    frame = pd.DataFrame(
        {
            "model": raw.family + "-" + raw.variant,
            "variant": raw.variant,
            "family": raw.family,
            "task": raw.task,
            "prompt_id": raw.prompt.str.split("-").str[1],
            "entropy_rate": 0.8 + 0.25 * raw.R,
            "mean_length": 1.0 / (0.004 + 0.001 * (raw.invN + 5.0)),
        }
    )
    div = frame[["model", "variant", "family", "task", "prompt_id"]].assign(diversity=raw.D)
    return frame, div.iloc[::-1], raw


def make_run(root, with_diversity: bool = True):
    """A run folder whose saved metrics (written by MetricsResult.save, current) carry D."""
    frame, div, _ = make_frames()
    keys = ["model", "variant", "family", "task", "prompt_id"]
    prompts = frame.merge(div, on=keys) if with_diversity else frame
    settings = {"by": ["model", "variant", "task"], "delta": 0.05, "h_max": None}
    pooled = prompts.groupby(settings["by"], as_index=False)[["entropy_rate"]].mean()
    root.mkdir(parents=True, exist_ok=True)
    MetricsResult(
        prompts=prompts,
        pooled=pooled,
        by=tuple(settings["by"]),
        settings=settings,
        inputs=metrics_inputs(root, settings),
    ).save(root)


def test_panel_joins_and_zscores():
    frame, div, raw = make_frames()
    panel = panel_from_frames(frame, div)
    assert len(panel) == len(frame)
    merged = panel.merge(
        frame.assign(D_expected=raw.D.to_numpy()), on=["model", "task", "prompt_id"]
    )
    np.testing.assert_allclose(merged.D, np.clip(merged.D_expected, 1e-6, 1 - 1e-6))
    np.testing.assert_allclose(panel.R_sc, zscore(panel.Rbar))
    np.testing.assert_allclose(panel.R_sc.std(ddof=1), 1.0)
    np.testing.assert_allclose(panel.invN_sc, zscore(1 / panel.Nbar))
    assert panel.prompt.iloc[0] == f"{panel.task.iloc[0]}/{panel.prompt_id.iloc[0]}"


def test_regress_panel_writes_every_output(tmp_path):
    frame, div, _ = make_frames()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = regress_panel(panel_from_frames(frame, div), tmp_path, True, 250, 0)
    out = tmp_path / "regression"
    result = json.loads((out / "result.json").read_text())
    assert result["converged"] is True
    assert result["reference"] == {"task": "T1", "variant": "base"}
    assert set(result["mean"]) == set(stored_glmmtmb()["mean"])
    assert result["slope_ratio"]["interaction"] == "R_sc:variantinstruct"
    assert result["slope_ratio"]["estimate"] == pytest.approx(
        1 + result["mean"]["R_sc:variantinstruct"]["estimate"] / result["mean"]["R_sc"]["estimate"]
    )
    assert payload.summary["loglik"] == pytest.approx(result["loglik"])
    assert payload.fit.loglik == pytest.approx(result["loglik"])
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["nsim"] == 250 and 0 <= diag["unconditional"]["ks"]["p"] <= 1
    assert pq.read_table(out / "diagnostics.parquet").num_rows == result["nobs"]
    assert pq.read_table(out / "panel.parquet").num_rows == result["nobs"]
    curves = pq.read_table(out / "curves.parquet").to_pandas()
    assert list(curves.columns) == ["task", "variant", "R_sc", "invN_sc", "D"]
    assert len(curves) == 4 * 2 * 50 and curves.D.between(0, 1).all()
    # steeper in R_sc for instruct (true interaction +1.2 on the logit scale)
    t1 = curves[curves.task == "T1"]
    slope = {v: np.polyfit(s.R_sc, np.log(s.D / (1 - s.D)), 1)[0] for v, s in t1.groupby("variant")}
    assert slope["instruct"] > slope["base"]
    table = pd.read_csv(tmp_path / "tables" / "regression.csv")
    assert list(table.columns) == ["part", "term", "estimate", "se", "z", "p"]
    assert "`R_sc:variantinstruct`" in (tmp_path / "tables" / "regression.md").read_text()
    assert r"\begin{tabular}" in (tmp_path / "tables" / "regression.tex").read_text()
    for name in ("regression_qq", "regression_resid"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 1000


def test_cli_panel_json_matches_glmmtmb():
    res = invoke(
        "--panel",
        str(DATA / "beta_panel.csv"),
        "--mean",
        PUBLISHED_MEAN,
        "--precision",
        PUBLISHED_PRECISION,
        "--json",
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    ref = stored_glmmtmb()
    assert set(payload) >= {"mean", "precision", "re_sd", "loglik", "aic", "nobs", "converged"}
    for term, row in ref["mean"].items():
        assert payload["mean"][term]["estimate"] == pytest.approx(row["estimate"], abs=1e-4)
        assert payload["mean"][term]["se"] == pytest.approx(row["se"], rel=1e-3)
    assert payload["loglik"] == pytest.approx(ref["loglik"], abs=1e-4)
    assert payload["slope_ratio"]["main"] == "R_sc"


def test_cli_panel_diagnostics_and_reference(tmp_path):
    res = invoke(
        "--panel",
        str(DATA / "beta_panel.csv"),
        "--mean",
        "D ~ R_sc * variant + task + (1 | prompt)",
        "--precision",
        "~ variant",
        "--reference",
        "task=T3",
        "--diagnostics",
        "--nsim",
        "250",
        "--json",
        "--out",
        str(tmp_path),
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert "taskT1" in payload["mean"] and "taskT3" not in payload["mean"]
    assert payload["diagnostics"]["nsim"] == 250
    assert (tmp_path / "regression" / "result.json").exists()
    assert (tmp_path / "figures" / "regression_qq.png").exists()


def test_cli_run_human_output(tmp_path):
    make_run(tmp_path)
    res = invoke(str(tmp_path), "--no-diagnostics")
    assert res.exit_code == 0, res.output
    assert "R_sc:variantinstruct" in res.stdout and "slope ratio" in res.stdout
    assert not (tmp_path / "regression" / "diagnostics.json").exists()
    (tmp_path / "figures").mkdir(exist_ok=True)
    (tmp_path / "figures" / "regression_qq.png").write_bytes(b"stale")
    res = invoke(str(tmp_path), "--no-diagnostics", "--json")
    assert res.exit_code == 0
    assert not (tmp_path / "figures" / "regression_qq.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "either a run folder or --panel"),
        (("--panel", "missing.csv", "--mean", "D ~ x"), "does not exist"),
        (("--panel", str(DATA / "beta_panel.csv")), "needs --mean"),
        (
            ("--panel", str(DATA / "beta_panel.csv"), "--mean", "D ~ R_sc", "--reference", "task"),
            "COLUMN=LEVEL",
        ),
        (("--panel", str(DATA / "beta_panel.csv"), "--mean", "D ~ nope"), "cannot be built"),
    ],
)
def test_cli_user_errors_are_canopy_errors(args, message):
    res = invoke(*args)
    assert isinstance(res.exception, CanopyError), res.output
    assert message in str(res.exception)
    assert "\n" not in str(res.exception)


def test_run_without_metrics_or_diversity_says_what_to_run(tmp_path):
    res = invoke(str(tmp_path))
    assert isinstance(res.exception, CanopyError)
    assert "canopy metrics" in str(res.exception)
    make_run(tmp_path / "nodiv", with_diversity=False)
    res = invoke(str(tmp_path / "nodiv"))
    assert isinstance(res.exception, CanopyError) and "canopy embed" in str(res.exception)
