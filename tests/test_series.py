"""Checkpoint series: config fields, the manifest, series_table, compare --on step, the trend
figure and the report section, on a real tiny-model run whose three base models are the
checkpoints (steps recorded by the runner's own ``record_experiment``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from canopy_entropy.comparison import compare
from canopy_entropy.config import load_config, parse_config
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.metrics import MetricsResult, write_metrics
from canopy_entropy.run.manifest import Manifest, ModelRecord, read_manifest
from canopy_entropy.runner.generation import _model_extras, record_experiment
from canopy_entropy.series import checkpoints, compare_steps, series_table, step_label
from cli_helpers import run_cli
from conftest import EVIL

STEPS = {"fam-a": 100, "fam-b": 200, "fam-c": 300}  # family -> step of its base model
LABELS = {100: "fam-a-base", 200: "fam-b-base", 300: f"fam-c{EVIL}-base"}


@pytest.fixture(scope="module")
def series_run(run_three_families, tmp_path_factory) -> Path:
    """A copy of the three-family run; its base models are steps 100/200/300 of 'sft'."""
    run = Path(shutil.copytree(run_three_families, tmp_path_factory.mktemp("series") / "run"))
    cfg = load_config(run / "config.toml")
    for m in cfg.models:
        if m.variant == "base":
            m.series, m.step = "sft", STEPS[m.family]
    record_experiment(run, cfg)  # what `canopy run` does after generating
    write_metrics(run, warn=False)  # the manifest changed: the metrics stage runs again
    return run


def _label(step: int) -> str:
    return LABELS[step]


def test_config_fields_parse_and_are_validated():
    head = 'name = "s"\n'
    ok = parse_config(
        head + '[[models]]\nmodel = "gemma3-270m"\nvariant = "instruct"\nseries = "sft-run"\n'
        "step = 1000\nenable_thinking = true\n",
        check_models=False,
    )
    m = ok.models[0]
    assert (m.series, m.step, m.enable_thinking) == ("sft-run", 1000, True)
    assert _model_extras(ok, m) == {"enable_thinking": True, "series": "sft-run", "step": 1000}
    bad = {
        'series = "s"': "sets series but not step",
        "step = 3": "sets step but not series",
        'series = "s"\nstep = -1': "must be >= 0",
        'series = "a b"\nstep = 1': "letters, digits",
        'series = "s"\nstep = "x"': "must be an integer",
    }
    for body, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            parse_config(head + f'[[models]]\nmodel = "gemma3-270m"\n{body}\n', check_models=False)
    twice = "".join(
        f'[[models]]\nmodel = "gemma3-270m"\nlabel = "{x}"\nseries = "s"\nstep = 5\n' for x in "ab"
    )
    with pytest.raises(ConfigError, match="both step 5 of series 's'"):
        parse_config(head + twice, check_models=False)


def test_manifest_records_steps_and_old_manifests_read(series_run):
    manifest = read_manifest(series_run)
    got = {k: (r.series, r.step) for k, r in manifest.models.items()}
    assert got == {
        **{label: ("sft", step) for step, label in LABELS.items()},
        **{label.replace("-base", "-instruct"): (None, None) for label in LABELS.values()},
    }
    doc = json.loads((series_run / "manifest.json").read_text())
    assert doc["models"]["fam-b-base"]["step"] == 200
    old = dict(doc["models"]["fam-b-base"])
    for key in ("series", "step", "enable_thinking"):
        del old[key]  # a manifest written before the fields
    record = ModelRecord.from_dict("m", old)
    assert (record.series, record.step, record.enable_thinking) == (None, None, False)
    again = Manifest.from_dict(manifest.to_dict())
    assert again.models["fam-a-base"].step == 100
    assert checkpoints(manifest)["model"].tolist() == [_label(100), _label(200), _label(300)]


def test_series_table_rows_are_the_models_metrics_rows(series_run):
    metrics = MetricsResult.load(series_run)
    table = series_table(metrics, series_run)
    assert table[["series", "step"]].values.tolist() == [["sft", 100], ["sft", 200], ["sft", 300]]
    for _, row in table.iterrows():
        own = metrics.pooled[metrics.pooled["model"] == _label(row["step"])]
        assert len(own) == 1
        for col in metrics.pooled.columns:
            a, b = row[col], own[col].iloc[0]
            assert (a == b) or (pd.isna(a) and pd.isna(b)), col
    # the run view gives the same table (its metrics, manifest and diagnostics)
    import canopy_entropy as ce

    pd.testing.assert_frame_equal(ce.series_table(ce.open_run(series_run)), table)
    with pytest.raises(CanopyError, match="per model"):
        series_table(MetricsResult(table, table, by=("task",)), series_run)


def test_accuracy_column_when_rollouts_are_scored(series_run):
    metrics = MetricsResult.load(series_run)
    rollouts = metrics.rollouts.copy()
    rollouts["correct"] = (rollouts["length"] % 3 == 0).to_numpy()
    metrics.rollouts = rollouts
    table = series_table(metrics, series_run)
    for _, row in table.iterrows():  # brute force: mean over prompts of the share correct
        rows = rollouts[rollouts["model"] == row["model"]]
        shares = [float(np.mean(g["correct"])) for _, g in rows.groupby("prompt_id")]
        assert row["accuracy"] == pytest.approx(np.mean(shares), abs=1e-12)


def test_step_bootstrap_is_compare_of_the_two_models(series_run, capsys, monkeypatch):
    metrics = MetricsResult.load(series_run)
    by_steps = compare_steps(metrics, series_run, 100, 300, n_boot=200, seed=3)
    direct = compare(metrics, a=_label(100), b=_label(300), by=("task",), n_boot=200, seed=3,
                     on="model")  # fmt: skip
    pd.testing.assert_frame_equal(by_steps.table, direct.table)
    ce_row = by_steps.table[by_steps.table["metric"] == "ce_star"].iloc[0]
    pooled = metrics.pooled.set_index("model")["ce_star"]
    assert ce_row["a"] == pytest.approx(pooled[_label(100)], rel=1e-12)
    assert ce_row["b"] == pytest.approx(pooled[_label(300)], rel=1e-12)
    code, out, err = run_cli(
        ["compare", str(series_run), "--on", "step", "--a", "100", "--b", "300",
         "--bootstrap", "200", "--seed", "3", "--json"], capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, err
    cli = pd.DataFrame(json.loads(out)["comparison"])
    np.testing.assert_allclose(cli["diff"], direct.table["diff"], rtol=0, atol=0)
    np.testing.assert_allclose(cli["diff_lo"], direct.table["diff_lo"], rtol=0, atol=0)
    assert set(cli["b_label"]) == {_label(300)}
    code, _, err = run_cli(["compare", str(series_run), "--on", "step", "--a", "100", "--b",
                            "150"], capsys, monkeypatch)  # fmt: skip
    assert code == 2 and "has no step 150; its steps are [100, 200, 300]" in err
    with pytest.raises(ConfigError, match="no checkpoint series"):
        step_label(Manifest(), 1)


def test_trend_figure_draws_the_table_and_the_report_shows_it(series_run, capsys, monkeypatch):
    from canopy_entropy.plots import make as P
    from canopy_entropy.report import build_report

    table = series_table(MetricsResult.load(series_run), series_run)
    fig = P.build_figure("fig8_series_trend", P.RunInputs(series_run))
    ce_axis = fig.axes[0]
    assert ce_axis.get_title() == "CE* (nats)"
    np.testing.assert_array_equal(ce_axis.lines[0].get_xdata(), [100, 200, 300])
    np.testing.assert_array_equal(ce_axis.lines[0].get_ydata(), table["ce_star"])
    made = P.make_figures(series_run, formats=("png",), names=["fig8_series_trend"])
    assert [p.name for p in made] == ["fig8_series_trend.png"] and not made.notes
    page = build_report(series_run, figures=False).read_text()
    section = page.split('<section id="series">')[1].split("</section>")[0]
    for value in table["genppl"]:
        assert f'data-sort="{float(value)!r}"' in section
    code, out, _ = run_cli(["series", str(series_run), "--json"], capsys, monkeypatch)
    assert code == 0
    assert [r["step"] for r in json.loads(out)] == [100, 200, 300]
    assert (series_run / "tables" / "series.csv").exists()
