"""A damaged, stale or failed stage never passes for current: damaged outputs are recomputed
(with a note), a failed stage takes its dependants' old outputs with it, and provenance comes
from the manifest even when config.toml is garbled."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest

from canopy_entropy import runner
from canopy_entropy.config import load_config
from canopy_entropy.errors import ConfigError


@pytest.fixture()
def run_copy(golden_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(golden_run, out)
    return out, load_config(golden_run / "config.toml")


def test_damaged_outputs_are_recomputed_with_a_note(run_copy):
    out, cfg = run_copy
    want = pd.read_parquet(out / "metrics" / "pooled.parquet")
    (out / "metrics" / "pooled.parquet").write_bytes(b"PAR1 garbage PAR1")
    (out / "semantic" / "prompt_diversity.parquet").write_bytes(b"not parquet")
    results = {r.name: r for r in runner.run_experiment(cfg, out, stages=["embed,metrics"])}
    assert results["embed"].status == "done" and "recomputed" in results["embed"].detail
    assert results["metrics"].status == "done"
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics" / "pooled.parquet"), want)
    # garbage JSON is not "up to date" either
    (out / "metrics" / "metrics.json").write_text("{garbage")
    results = {r.name: r for r in runner.run_experiment(cfg, out, stages=["metrics"])}
    assert results["metrics"].status == "done" and "recomputed" in results["metrics"].detail
    assert json.loads((out / "metrics" / "metrics.json").read_text())["groups"]


def test_a_failed_stage_leaves_no_stale_results_behind(run_copy, monkeypatch):
    out, cfg = run_copy
    table = tuple(
        dataclasses.replace(s, target="canopy_entropy.runner.summary:no_such_function")
        if s.name == "metrics"
        else s
        for s in runner.STAGE_TABLE
    )
    monkeypatch.setattr("canopy_entropy.runner.core.STAGE_TABLE", table)
    results = {r.name: r for r in runner.run_experiment(cfg, out, force=["metrics"])}
    assert results["metrics"].status == "failed"
    for name in ("tables", "compare", "regress", "plots", "report"):
        assert results[name].status == "skipped", results[name]
        assert "needs metrics, which failed" in results[name].detail or (
            "which failed" in results[name].detail
        )
    assert not (out / "metrics" / "pooled.parquet").exists()
    assert not (out / "report.html").exists()  # no report showing the old numbers
    assert not (out / "compare" / "comparison.parquet").exists()
    marker = json.loads((out / ".canopy" / "stages" / "metrics.json").read_text())
    assert marker["status"] == "failed" and "no_such_function" in marker["detail"]


def test_garbled_config_toml_does_not_hide_a_changed_policy(run_copy):
    out, cfg = run_copy
    (out / "config.toml").write_text("this is [not toml")
    hotter = dataclasses.replace(
        cfg, generation=dataclasses.replace(cfg.generation, temperature=0.5)
    )
    with pytest.raises(ConfigError, match=r"generation.temperature = 1.0, this config has 0.5"):
        runner.run_experiment(hotter, out, stages=["generate"])
    (out / "config.toml").unlink()
    with pytest.raises(ConfigError, match=r"generation\.temperature"):
        runner.plan_run(hotter, out)
