"""Figures: numbers against a brute-force loop, matplotlib objects, non-blank images, notes."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from canopy_entropy.errors import CanopyError
from canopy_entropy.plots import FIGURE_NAMES, make_figures
from canopy_entropy.plots import data as pdata
from canopy_entropy.plots import figures as F
from canopy_entropy.plots.style import Palette
from canopy_entropy.store import RunStore, rollouts_table
from cli_helpers import run_cli
from plot_fixtures import EVIL, FAMILIES, TASKS, build_run, model_name, rendered_run

N_MODELS = len(FAMILIES) * 2


@pytest.fixture(scope="module")
def run() -> Path:
    return rendered_run()


@pytest.fixture(scope="module")
def scan(run):
    return pdata.scan_rollouts(run)


@pytest.fixture(scope="module")
def palette():
    return Palette(FAMILIES)


def brute_force_running_rate(run: Path) -> tuple[dict, dict]:
    """Independent reference: a plain Python loop over rollouts and positions."""
    table = RunStore(run).read_rollouts(columns=["model", "task", "entropy"]).to_pylist()
    sums: dict = {}
    counts: dict = {}
    for row in table:
        total = 0.0
        for t, h in enumerate(row["entropy"], start=1):
            total += float(h)
            key = (row["model"], row["task"], t)
            sums[key] = sums.get(key, 0.0) + total / t
            counts[key] = counts.get(key, 0) + 1
    return sums, counts


def test_running_rate_matches_brute_force_loop(run, scan):
    sums, counts = brute_force_running_rate(run)
    rr = scan[1]
    assert len(rr) == len(counts)
    for row in rr.itertuples(index=False):
        key = (row.model, row.task, row.position)
        assert row.n_active == counts[key]
        assert row.mean_rate == pytest.approx(sums[key] / counts[key], rel=1e-12, abs=1e-12)


def test_scan_is_independent_of_batch_size(run, scan):
    """Groups split across record batches must accumulate to the same curves."""
    frame, rr = pdata.scan_rollouts(run, batch_size=7)
    pd.testing.assert_frame_equal(rr, scan[1], check_exact=False, rtol=1e-12)
    cols = ["model", "prompt_id", "length", "H"]
    pd.testing.assert_frame_equal(
        frame[cols].reset_index(drop=True), scan[0][cols].reset_index(drop=True), rtol=1e-12
    )


def test_rollout_frame_sums_and_rates(run, scan):
    table = RunStore(run).read_rollouts(columns=["entropy", "length"]).to_pylist()
    h = np.array([sum(float(x) for x in r["entropy"]) for r in table])
    n = np.array([r["length"] for r in table])
    frame = scan[0]
    np.testing.assert_allclose(frame["H"], h, rtol=1e-12)
    np.testing.assert_array_equal(frame["length"], n)
    np.testing.assert_allclose(frame["rate"], h / n, rtol=1e-12)


def test_fig1_structure_and_trimming(scan, palette):
    rr = scan[1]
    min_active = 5
    fig = F.fig_running_rate(rr, palette, min_active=min_active)
    axes = fig.axes
    assert len(axes) == 2 * len(TASKS)
    tops = [ax for ax in axes if ax.get_title() in TASKS]
    assert [ax.get_title() for ax in tops] == list(TASKS)
    assert tops[0].get_ylabel() == "running entropy rate (nats/token)"
    for ax in tops:
        lines = ax.get_lines()
        assert len(lines) == N_MODELS
        for line in lines:
            model = line.get_label()
            variant = "base" if "base" in model else "instruct"
            family = model.split("-")[0] + "-" + model.split("-")[1]
            assert line.get_linestyle() == ("--" if variant == "base" else "-")
            assert line.get_color() == palette.color(family)
            sub = rr[(rr["model"] == model) & (rr["task"] == ax.get_title())]
            kept = sub[sub["n_active"] >= min_active]
            np.testing.assert_array_equal(line.get_xdata(), kept["position"])
            np.testing.assert_allclose(line.get_ydata(), kept["mean_rate"])
        last = rr[(rr["task"] == ax.get_title()) & (rr["n_active"] >= min_active)]
        assert ax.get_xlim()[1] == pytest.approx(last["position"].max())
    lowers = [ax for ax in axes if ax.get_ylabel() == "active rollouts"]
    assert len(lowers) == 1
    for ax in axes:
        if ax not in tops:
            assert all(min(line.get_ydata()) >= min_active for line in ax.get_lines())


def test_fig1_min_active_too_large_gives_panel_note(scan, palette):
    fig = F.fig_running_rate(scan[1], palette, min_active=10_000)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("fewer than 10000 rollouts" in t for t in texts)
    assert all(len(ax.get_lines()) == 0 for ax in fig.axes)


def test_fig2_length_distribution(scan, palette):
    fig = F.fig_length_distribution(scan[0], palette)
    assert len(fig.axes) == len(TASKS)
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        models = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert len(models) == N_MODELS
        for line in models:
            # a density of log10 N integrates to about 1 over the drawn range
            x, y = np.log10(line.get_xdata()), line.get_ydata()
            assert 0.5 < np.trapezoid(y, x) <= 1.0001
    # truncated rollouts exist in the fixture: the cap is marked with its share
    text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "cap 60:" in text and "% truncated" in text


def test_fig3_within_prompt_variance(scan, palette):
    frame = scan[0]
    var = F.within_prompt_variance(frame)
    g = frame[(frame["model"] == "fam-a-base") & (frame["task"] == "math")]
    first = g[g["prompt_id"] == g["prompt_id"].iloc[0]]
    row = var[
        (var["model"] == "fam-a-base")
        & (var["task"] == "math")
        & (var["prompt_id"] == first["prompt_id"].iloc[0])
    ].iloc[0]
    assert row["var_rate"] == pytest.approx(np.var(first["rate"].to_numpy(), ddof=1))
    assert row["var_length"] == pytest.approx(np.var(first["length"].to_numpy(), ddof=1))
    fig = F.fig_within_prompt_variance(frame, palette)
    assert len(fig.axes) == 2 * len(TASKS)
    xlabels = sorted({ax.get_xlabel() for ax in fig.axes})
    assert xlabels == ["Var within prompt of N", "Var within prompt of r"]
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == N_MODELS
        assert {ln.get_linestyle() for ln in lines} == {"--", "-"}
        assert all(ln.get_ydata()[-1] == pytest.approx(1.0) for ln in lines)


def test_fig4_decomposition_bars(run, palette):
    pooled = pdata.metrics_pooled(run)
    fig = F.fig_ce_decomposition(pooled, palette)
    assert len(fig.axes) == 2 * len(TASKS)
    top = fig.axes[0]
    assert top.get_title() == TASKS[0]
    assert len(top.containers) == 3  # rate x length, within cov, between cov
    labels = [t.get_text() for t in top.get_xticklabels()]
    assert labels == [model_name(f, v) for f in FAMILIES for v in ("base", "instruct")]
    rows = pooled[pooled["task"] == TASKS[0]].set_index("model").loc[labels]
    heights = [p.get_height() for p in top.containers[0].patches]
    np.testing.assert_allclose(heights, rows["rate_length_term"])
    styles = [p.get_linestyle() for p in top.containers[0].patches]
    assert styles == ["--", "-", "--", "-"]
    # stacked total of the three terms equals CE* (the fixture's terms add up exactly)
    total = sum(np.array([p.get_height() for p in c.patches]) for c in top.containers)
    np.testing.assert_allclose(total, rows["ce_star"], rtol=1e-9)
    cov_share = 100 * (rows["within_cov_term"] + rows["between_cov_term"]) / rows["ce_star"]
    assert [t.get_text() for t in top.texts] == [f"cov {v:+.1f}%" for v in cov_share]


def test_fig5_comparison(run, palette):
    comp = pdata.comparison(run)
    fig = F.fig_comparison(comp, palette)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [t for _, t in F.COMPARISON_METRICS]
    for ax, (metric, _) in zip(fig.axes, F.COMPARISON_METRICS, strict=True):
        assert len(ax.containers) == len(FAMILIES)
        ys = np.concatenate([np.asarray(c.lines[0].get_ydata(), float) for c in ax.containers])
        col = "diff" if metric == "pearson" else "pct"
        expected = comp[comp["metric"] == metric].sort_values(["family", "task"])[col]
        np.testing.assert_allclose(ys, expected)
        assert ax.get_ylabel() == ("difference" if metric == "pearson" else "% change")


def test_fig6_scatter_curves_forest_qq(run, palette):
    points, curves, xlabel = F.rate_diversity_points(run)
    fig = F.fig_rate_vs_diversity(points, curves, palette, xlabel)
    assert len(fig.axes) == len(TASKS)
    for ax in fig.axes:
        assert len(ax.collections) == N_MODELS
        assert sorted(ln.get_linestyle() for ln in ax.get_lines()) == ["-", "--"]
        assert ax.get_xlabel() == "entropy rate (z-score, R_sc)"
    result = pdata.regression_result(run)
    fig = F.fig_coefficients(result)
    terms = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert sorted(terms) == sorted(t for t in result["mean"] if t != "(Intercept)")
    assert "slope ratio 2.66" in fig.axes[0].get_title()
    doc, resid = pdata.regression_diagnostics(run)
    fig = F.fig_qq(doc, resid)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines[:2]] == [
        "residual_conditional",
        "residual_unconditional",
    ]
    np.testing.assert_allclose(lines[1].get_ydata(), np.sort(resid["residual_unconditional"]))
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    for line in (
        "conditional ks: p=0.41",
        "unconditional dispersion: p=0.6",
        "conditional outliers: p=1",
    ):
        assert line in text
    assert "statistic" not in text and "expected" not in text


def test_fig6_without_regression_uses_metrics_and_diversity(tmp_path, palette):
    run = build_run(
        tmp_path / "r", prompts=3, rollouts=4, stages=("rollouts", "metrics", "semantic")
    )
    points, curves, xlabel = F.rate_diversity_points(run)
    assert curves is None and "nats/token" in xlabel
    assert len(points) == 3 * len(TASKS) * N_MODELS
    fig = F.fig_rate_vs_diversity(points, curves, palette, xlabel)
    assert all(len(ax.get_lines()) == 0 for ax in fig.axes)


def test_written_files_are_real_images(run):
    made = {p.name for p in (run / "figures").iterdir()}
    for name in FIGURE_NAMES:
        assert f"{name}.png" in made and f"{name}.pdf" in made
        img = mpimg.imread(run / "figures" / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert float(img[..., :3].std()) > 0.05, f"{name}.png looks blank"
        assert (run / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert json.loads((run / "figures" / "index.json").read_text())["notes"] == {}


def test_missing_stages_give_notes_not_crashes(tmp_path):
    run = build_run(tmp_path / "r", prompts=3, rollouts=4, stages=("rollouts",))
    made = make_figures(run, formats=("png",))
    drawn = sorted(p.stem for p in made)
    assert drawn == ["fig1_running_rate", "fig2_length_distribution", "fig3_within_prompt_variance"]
    assert set(made.notes) == set(FIGURE_NAMES) - set(drawn)
    assert "canopy metrics" in made.notes["fig4_ce_decomposition"]
    assert "canopy compare" in made.notes["fig5_comparison"]
    assert "canopy regress" in made.notes["fig6_coefficients"]
    index = json.loads((run / "figures" / "index.json").read_text())
    assert index["notes"] == made.notes and index["min_active"] == 5


def test_no_rollouts_only_later_stages(tmp_path):
    run = build_run(tmp_path / "r", prompts=3, rollouts=4, stages=("compare",))
    made = make_figures(run, formats=("png",), names=["fig1_running_rate", "fig5_comparison"])
    assert [p.name for p in made] == ["fig5_comparison.png"]
    assert "no rollouts" in made.notes["fig1_running_rate"]


def test_stale_figure_removed_when_input_disappears(tmp_path):
    run = build_run(tmp_path / "r", prompts=3, rollouts=4, stages=("rollouts", "compare"))
    make_figures(run, formats=("png",), names=["fig5_comparison"])
    assert (run / "figures" / "fig5_comparison.png").exists()
    (run / "compare" / "comparison.parquet").unlink()
    made = make_figures(run, formats=("png",), names=["fig5_comparison"])
    assert not (run / "figures" / "fig5_comparison.png").exists()
    assert "fig5_comparison" in made.notes


def test_edge_cases_greedy_and_single_rollouts(tmp_path, palette):
    """Zero entropies, one rollout per prompt, a one-step rollout: notes, no crash."""
    store = RunStore(tmp_path / "edge")
    table = rollouts_table(
        run="e",
        model="m",
        variant="instruct",
        family="f",
        task="t",
        prompt_id=["a", "b", "c"],
        rollout_index=[0, 0, 0],
        seed=[1, 2, 3],
        finish_reason=["eos", "eos", "length"],
        entropy=[np.zeros(1, np.float32), np.zeros(4, np.float32), np.zeros(9, np.float32)],
    )
    store.write_rollouts("s", table)
    frame, rr = pdata.scan_rollouts(store.root)
    assert (rr["mean_rate"] == 0).all()
    np.testing.assert_array_equal(rr["n_active"], [3, 2, 2, 2, 1, 1, 1, 1, 1])
    fig = F.fig_within_prompt_variance(frame, palette)
    assert any("needs >= 2 rollouts" in t.get_text() for ax in fig.axes for t in ax.texts)
    made = make_figures(store.root, formats=("png",), min_active=1)
    assert len(made) == 3


def test_bad_arguments_are_one_line_errors(tmp_path, run):
    with pytest.raises(CanopyError, match="does not exist"):
        make_figures(tmp_path / "nope")
    with pytest.raises(CanopyError, match="not a canopy run folder"):
        make_figures(tmp_path)
    with pytest.raises(CanopyError, match="unknown figure"):
        make_figures(run, names=["fig9"])
    with pytest.raises(CanopyError, match="min-active"):
        make_figures(run, min_active=0)


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real ``canopy`` entry point in-process; returns (exit code, stdout, stderr)."""
    return run_cli(list(args), capsys, monkeypatch)


def test_cli_plot(run, tmp_path, monkeypatch, capsys):
    code, out, err = _cli(
        monkeypatch, capsys, "plot", str(run), "--only", "fig6_qq", "--format", "png"
    )
    assert code == 0, err
    assert out.strip() == str(run / "figures" / "fig6_qq.png")
    code, out, err = _cli(monkeypatch, capsys, "plot", str(tmp_path / "missing"))
    assert code == 2
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    code, out, err = _cli(monkeypatch, capsys, "plot", str(run), "--format", "gif")
    assert code == 2 and "unknown --format" in err


def test_model_names_are_drawn_verbatim(scan, palette):
    """Data strings are shown as text (no mathtext/markup interpretation)."""
    fig = F.fig_running_rate(scan[1], palette)
    labels = {ln.get_label() for ax in fig.axes for ln in ax.get_lines()}
    assert model_name("fam-b", "instruct") in labels
    assert EVIL in model_name("fam-b", "instruct")


def test_rerun_gives_byte_identical_files(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    names = ["fig6_qq", "fig5_comparison"]
    first = make_figures(copy, names=names, formats=("png", "pdf", "svg"))
    data1 = {p.name: p.read_bytes() for p in first}
    second = make_figures(copy, names=names, formats=("png", "pdf", "svg"))
    assert {p.name: p.read_bytes() for p in second} == data1
    # a partial redraw keeps the other figures' entries in the index
    index = json.loads((copy / "figures" / "index.json").read_text())
    assert "fig1_running_rate.png" in index["files"] and "fig6_qq.svg" in index["files"]
