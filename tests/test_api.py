"""The library API as a notebook uses it, on a run the real pipeline made: every call returns
typed results, nothing is written unless asked, and the numbers are the stages' numbers."""

from __future__ import annotations

import hashlib
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest


def _folder_state(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_notebook_session_reads_and_writes_nothing(golden_run):
    before = _folder_state(golden_run)
    import canopy_entropy as ce

    run = ce.open_run(golden_run)
    assert run.manifest.policy.top_k == 50 and run.manifest.models["tiny-base"].source == "generate"
    rollouts = run.rollouts()
    assert {"H", "r", "length", "surprisal", "d"} <= set(rollouts.columns)
    m = run.metrics
    saved = pd.read_parquet(golden_run / "metrics" / "pooled.parquet")
    pd.testing.assert_frame_equal(m.pooled, saved)
    cmp = ce.compare(m, a="base", b="instruct", by=["family", "task"], n_boot=200, seed=0)
    stage = pd.read_parquet(golden_run / "compare" / "comparison.parquet")
    pd.testing.assert_frame_equal(cmp.table.reset_index(drop=True), stage)
    panel = ce.regression_panel(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ce.fit_beta_glmm(panel, mean="D ~ R_sc * variant + task", precision="~ 1")
    assert fit.loglik == pytest.approx(run.regression.summary["loglik"], rel=1e-9)
    summary, ci = fit.summary(), fit.conf_int()
    row = summary.set_index(["part", "term"]).loc[("mean", "R_sc")]
    lo, hi = ci.set_index(["part", "term"]).loc[("mean", "R_sc"), ["lo", "hi"]]
    assert lo == pytest.approx(row["estimate"] - 1.959963984540054 * row["se"], rel=1e-9)
    assert hi == pytest.approx(row["estimate"] + 1.959963984540054 * row["se"], rel=1e-9)
    fig = ce.figures.ce_decomposition(m)
    assert fig.axes and type(fig).__name__ == "Figure"
    assert _folder_state(golden_run) == before  # reading, comparing, fitting, drawing: no writes


def test_compute_metrics_takes_a_dataframe_of_rollouts(golden_run):
    import canopy_entropy as ce
    from canopy_entropy.store import RunStore

    table = RunStore(golden_run).read_rollouts()
    from_frame = ce.compute_metrics(table.to_pandas(), warn=False).prompts
    from_run = ce.compute_metrics(golden_run, warn=False).prompts
    cols = ["ce_star", "mean_length", "genppl", "pearson", "length_entropy"]
    np.testing.assert_allclose(from_frame[cols], from_run[cols], rtol=1e-12)


def test_saving_is_explicit_and_round_trips(golden_run, tmp_path):
    import canopy_entropy as ce

    copy = tmp_path / "run"
    shutil.copytree(golden_run, copy)
    shutil.rmtree(copy / "compare")
    run = ce.open_run(copy)
    cmp = ce.compare(run.metrics, by=["task"], n_boot=50, seed=3)
    assert not (copy / "compare").exists()
    run.save(cmp)
    again = ce.open_run(copy).comparison
    pd.testing.assert_frame_equal(again.table, cmp.table.reset_index(drop=True))
    pd.testing.assert_frame_equal(again.length_matched, cmp.length_matched)
    loaded = ce.MetricsResult.load(copy)
    pd.testing.assert_frame_equal(loaded.rollouts, run.metrics.rollouts)
    assert loaded.is_fresh(copy) and loaded.by == run.metrics.by


def test_api_errors_are_exceptions_without_cli_flags(tmp_path):
    import canopy_entropy as ce

    with pytest.raises(ce.CanopyError, match="does not exist"):
        ce.open_run(tmp_path / "nope")
    with pytest.raises(AttributeError):
        ce.no_such_name  # noqa: B018
