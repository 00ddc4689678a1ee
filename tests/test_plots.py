"""Figures, on run folders the real pipeline wrote (conftest): numbers against independent
computations, matplotlib objects, titles inside the figure, non-blank files, notes, freshness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import canopy_entropy.plots as P
from canopy_entropy.errors import CanopyError
from canopy_entropy.labels import label, term_label
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.plots import data
from canopy_entropy.run.freshness import input_fingerprint
from canopy_entropy.runner.stages import stage_named
from canopy_entropy.store import RunStore
from cli_helpers import run_cli
from conftest import EVIL


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of a fixture run (mtimes kept, so stage markers stay valid)."""
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture(scope="module")
def scan(run_two_tasks):
    """(per-rollout frame, running rate) as the plots stage reads them from metrics/."""
    return data.rollouts_frame(run_two_tasks), data.running_rate(run_two_tasks)


@pytest.fixture(scope="module")
def drawn(run_two_tasks, tmp_path_factory) -> tuple[Path, P.FigureFiles]:
    run = copy_run(run_two_tasks, tmp_path_factory.mktemp("drawn"))
    return run, P.make_figures(run, formats=("png",))


def test_running_rate_matches_brute_force_loop(run_two_tasks, scan):
    rows = RunStore(run_two_tasks).read_rollouts(columns=["model", "task", "entropy"]).to_pylist()
    sums: dict = {}
    counts: dict = {}
    for row in rows:
        total = 0.0
        for t, h in enumerate(row["entropy"], start=1):
            total += float(h)
            key = (row["model"], row["task"], t)
            sums[key] = sums.get(key, 0.0) + total / t
            counts[key] = counts.get(key, 0) + 1
    rr = scan[1]
    assert len(rr) == len(counts)
    for row in rr.itertuples(index=False):
        key = (row.model, row.task, row.position)
        assert row.n_active == counts[key]
        assert row.mean_rate == pytest.approx(sums[key] / counts[key], rel=1e-12, abs=1e-12)


def test_saved_curves_are_independent_of_batch_size(run_two_tasks, scan):
    fresh = compute_metrics(run_two_tasks, warn=False, batch_size=7)
    pd.testing.assert_frame_equal(fresh.running_rate, scan[1], check_exact=False, rtol=1e-12)
    frame = scan[0]
    rows = (
        RunStore(run_two_tasks)
        .read_rollouts(columns=["model", "task", "prompt_id", "rollout_index", "entropy"])
        .to_pylist()
    )
    brute = {(r["model"], r["task"], r["prompt_id"], r["rollout_index"]):
             (len(r["entropy"]), sum(float(x) for x in r["entropy"])) for r in rows}  # fmt: skip
    saved = RunStore(run_two_tasks).read_rollouts(columns=["rollout_index"]).num_rows
    assert len(frame) == saved
    for row in frame.assign(ridx=data.read_frame(run_two_tasks, "metrics.rollouts")[
            "rollout_index"]).itertuples(index=False):  # fmt: skip
        n, h = brute[(row.model, row.task, row.prompt_id, row.ridx)]
        assert row.length == n
        assert row.H == pytest.approx(h, rel=1e-12)
        assert row.rate == pytest.approx(h / n, rel=1e-12)


def test_plots_never_scan_the_store(run_two_tasks, tmp_path, monkeypatch):
    import canopy_entropy.plots.fig_eos as fig_eos

    def no_scan(*args, **kwargs):
        raise AssertionError("the plots stage scanned the rollout store")

    run = copy_run(run_two_tasks, tmp_path)
    monkeypatch.setattr(fig_eos, "eos_matrices", lambda run: {})  # the heatmaps read eos_prob
    monkeypatch.setattr(RunStore, "iter_batches", no_scan)
    monkeypatch.setattr(RunStore, "read_rollouts", no_scan)
    made = P.make_figures(run, formats=("png",), names=["fig1_running_rate",
                          "fig2_length_distribution", "fig3_within_prompt_variance"])  # fmt: skip
    assert len(made) == 3 and not made.notes


def test_old_metrics_without_curves_get_a_note(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    (run / "metrics" / "running_rate.parquet").unlink()
    made = P.make_figures(run, formats=("png",), names=["fig1_running_rate"])
    assert "older version" in made.notes["fig1_running_rate"]
    assert "canopy metrics" in made.notes["fig1_running_rate"]


def test_fig1_lines_are_the_running_rate_trimmed(scan):
    rr, palette = scan[1], P.Palette(["tiny"])
    fig = P.running_rate(rr, palette, min_active=5)
    tops = [ax for ax in fig.axes if ax.get_title() in ("coding", "math")]
    assert [ax.get_title() for ax in tops] == ["coding", "math"]
    for ax in tops:
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["tiny-base", "tiny-instruct"]
        for line in lines:
            assert line.get_linestyle() == ("--" if line.get_label().endswith("base") else "-")
            assert line.get_color() == palette.color("tiny")
            sub = rr[(rr["model"] == line.get_label()) & (rr["task"] == ax.get_title())]
            kept = sub[sub["n_active"] >= 5]
            np.testing.assert_array_equal(line.get_xdata(), kept["position"])
            np.testing.assert_allclose(line.get_ydata(), kept["mean_rate"])
    fig = P.running_rate(rr, min_active=10_000)
    assert any("fewer than 10000" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_fig2_ecdf_stays_inside_the_support_and_marks_the_cap(run_two_tasks, scan):
    frame = scan[0]
    fig = P.length_distribution(frame, data.length_caps(run_two_tasks))
    for ax in fig.axes:
        task = ax.get_title()
        sub = frame[frame["task"] == task]
        assert ax.get_xscale() == "log"
        caps = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert [c.get_xdata()[0] for c in caps] == [24]  # max_new_tokens of the manifest
        for line in (ln for ln in ax.get_lines() if ln.get_linestyle() != ":"):
            lengths = np.sort(sub.loc[sub["model"] == line.get_label(), "length"].to_numpy())
            x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
            assert y[0] == 0 and y[-1] == pytest.approx(1.0)
            assert x.max() == lengths.max() <= 24  # never past the longest rollout / the cap
            np.testing.assert_allclose(y[1:], np.arange(1, lengths.size + 1) / lengths.size)
        text = ax.texts[0].get_text()
        for model in ("tiny-base", "tiny-instruct"):
            share = (sub.loc[sub["model"] == model, "finish_reason"] == "length").mean()
            assert f"{model}: {100 * share:.0f}%" in text  # per model, not pooled


def test_fig3_ecdf_starts_at_zero(scan):
    frame = scan[0]
    var = P.figures.within_prompt_frame(frame)
    one = frame[(frame["model"] == "tiny-base") & (frame["task"] == "math")]
    first = one[one["prompt_id"] == one["prompt_id"].iloc[0]]
    row = var[
        (var["model"] == "tiny-base")
        & (var["task"] == "math")
        & (var["prompt_id"] == first["prompt_id"].iloc[0])
    ].iloc[0]
    assert row["var_rate"] == pytest.approx(np.var(first["rate"].to_numpy(), ddof=1))
    assert row["var_length"] == pytest.approx(np.var(first["length"].to_numpy(), ddof=1))
    fig = P.within_prompt_variance(frame)
    for ax in fig.axes:
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata())
            assert y[0] == 0 and y[-1] == pytest.approx(1.0) and np.all(np.diff(y) >= 0)


def test_fig4_bars_are_the_pooled_decomposition(run_two_tasks):
    pooled = data.metrics_pooled(run_two_tasks)
    assert "family" not in pd.read_parquet(run_two_tasks / "metrics" / "pooled.parquet")
    assert set(pooled["family"]) == {"tiny"}  # from the typed manifest
    fig = P.ce_decomposition(pooled)
    top, mid = fig.axes[0], fig.axes[2]  # sharey rows: axes in row-major order
    rows = pooled[pooled["task"] == "coding"].set_index("model").loc[["tiny-base", "tiny-instruct"]]
    heights = [np.array([p.get_height() for p in c.patches]) for c in top.containers]
    np.testing.assert_allclose(heights[0], rows["rate_length_term"])
    # N̄·R̄ + within + between = CE* for the real pooled values
    np.testing.assert_allclose(sum(heights), rows["ce_star"], rtol=1e-9)
    shares = [np.array([p.get_height() for p in c.patches]) for c in mid.containers]
    np.testing.assert_allclose(shares[0], 100 * rows["within_cov_term"] / rows["ce_star"])
    assert [p.get_linestyle() for p in top.containers[0].patches] == ["--", "-"]
    assert not any(ax.xaxis._major_tick_kw.get("gridOn") for ax in fig.axes)


def test_fig4_says_when_there_is_nothing_to_show(run_two_tasks):
    pooled = data.metrics_pooled(run_two_tasks).assign(stop_entropy_share=0.0)
    texts = [t.get_text() for ax in P.ce_decomposition(pooled).axes for t in ax.texts]
    assert any(t.startswith("nothing to show") for t in texts)
    pooled["stop_entropy_share"] = np.nan
    texts = [t.get_text() for ax in P.ce_decomposition(pooled).axes for t in ax.texts]
    assert any("no stop/content split" in t for t in texts)


def test_fig5_points_are_the_comparison(run_two_tasks):
    comp = data.comparison(run_two_tasks)
    fig = P.comparison(comp)
    assert [ax.get_title() for ax in fig.axes] == [label(m) for m in P.figures.COMPARISON_METRICS]
    for ax, metric in zip(fig.axes, P.figures.COMPARISON_METRICS, strict=True):
        ys = [float(c.lines[0].get_ydata()[0]) for c in ax.containers]
        col = "diff" if metric == "pearson" else "pct"
        np.testing.assert_allclose(ys, comp[comp["metric"] == metric].sort_values("task")[col])
    assert "instruct vs base" in fig._suptitle.get_text()
    assert "fewer than 10" in fig._supxlabel.get_text()  # 4 prompts per group
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["tiny"]  # no "all" entry


def test_fig5_empty_slot_reads_na(run_two_tasks):
    comp = data.comparison(run_two_tasks)
    comp.loc[(comp["metric"] == "bf") & (comp["task"] == "math"), ["pct", "diff"]] = np.nan
    fig = P.comparison(comp)
    ax = fig.axes[[label(m) for m in P.figures.COMPARISON_METRICS].index("BF")]
    assert [t.get_text() for t in ax.texts] == ["n/a"] and len(ax.containers) == 1


def test_fig6_scatter_curves_and_coefficients(run_two_tasks, run_three_families):
    points, curves, xlabel = data.rate_diversity_points(run_two_tasks)
    panel = pd.read_parquet(run_two_tasks / "regression" / "panel.parquet")
    fig = P.rate_vs_diversity(points, curves, xlabel)
    for ax in fig.axes:
        sub = panel[panel["task"] == ax.get_title()]
        assert sum(len(c.get_offsets()) for c in ax.collections) == len(sub)
        assert sorted(ln.get_linestyle() for ln in ax.get_lines()) == ["-", "--"]
    result = data.regression_result(run_two_tasks)
    fig = P.coefficients(result)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    ref = result["reference"]
    assert ticks == [term_label(t, ref) for t in result["mean"] if t != "(Intercept)"]
    assert "task = math (vs coding)" in ticks and "taskmath" not in ticks
    assert "fixed effects" in fig._suptitle.get_text()
    mixed = P.coefficients(data.regression_result(run_three_families))
    assert "Beta mixed model" in mixed._suptitle.get_text()


@pytest.mark.parametrize("fixture", ["run_one_task", "run_two_tasks", "run_three_families"])
def test_titles_and_labels_stay_inside_the_figure(fixture, request):
    """Issue 19: no title or tick label is wider than the figure (1 and 2 tasks, 1 and 3
    families, the long model label included)."""
    run = request.getfixturevalue(fixture)
    inputs = P.RunInputs(run)
    for name in P.FIGURE_NAMES:
        try:
            fig = P.build_figure(name, inputs)
        except data.MissingInput:
            continue
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        width = fig.bbox.width
        texts = [fig._suptitle] if fig._suptitle else []
        texts += [ax.title for ax in fig.axes if ax.get_title()]
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= -1 and box.x1 <= width + 1, (name, text.get_text())


def test_make_figures_writes_real_images_and_the_index(drawn, run_two_tasks):
    run, made = drawn
    from canopy_entropy.plots.fig_series import NO_SERIES

    scored = {"fig8_accuracy_vs_rate", "fig8_auroc"}  # this run has no task with a scorer
    assert made.notes.pop("fig8_series_trend") == NO_SERIES  # the run has no checkpoint series
    assert set(made.notes) == scored and all("scorer" in made.notes[n] for n in scored)
    assert sorted(p.stem for p in made) == sorted(
        set(P.FIGURE_NAMES) - scored - {"fig8_series_trend"}
    )
    for path in made:
        img = mpimg.imread(path)
        assert img.ndim == 3 and min(img.shape[:2]) > 200
        assert float(img[..., :3].std()) > 0.05, f"{path.name} looks blank"
    index = json.loads((run / "figures" / "index.json").read_text())
    inputs = stage_named("plots").inputs
    assert index["fingerprint"] == input_fingerprint(run, inputs, {"min_active": 5})
    assert index["figures"]["regression_qq"]["stage"] == "regress"
    assert P.figures_are_fresh(run) and not P.figures_are_fresh(run, min_active=3)


def test_pdf_output_and_regress_figures_undated(drawn):
    run, _ = drawn
    made = P.make_figures(run, formats=("pdf",), names=["fig4_ce_decomposition"])
    pdf = made[0].read_bytes()
    assert pdf[:5] == b"%PDF-" and b"CreationDate" not in pdf
    assert b"CreationDate" not in (run / "figures" / "regression_qq.pdf").read_bytes()


def test_freshness_follows_the_declared_inputs(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    P.make_figures(run, formats=("png",), names=["fig4_ce_decomposition"])
    assert P.figures_are_fresh(run)
    (run / "tables" / "extra.csv").write_text("not an input of the figures\n")
    assert P.figures_are_fresh(run)
    pooled = run / "metrics" / "pooled.parquet"
    stat = pooled.stat()
    import os

    os.utime(pooled, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not P.figures_are_fresh(run)


def test_missing_stages_give_notes_naming_the_command(run_one_task, tmp_path):
    run = copy_run(run_one_task, tmp_path)
    made = P.make_figures(run, formats=("png",))
    assert sorted(made.notes) == [
        "fig6_coefficients", "fig6_rate_vs_diversity", "fig8_accuracy_vs_rate", "fig8_auroc",
        "fig8_series_trend",
    ]  # fmt: skip
    assert made.notes["fig6_coefficients"] == (
        f"no regression: run `canopy regress {run}` or the regress stage of `canopy run`"
    )
    assert f"`canopy embed {run}`" in made.notes["fig6_rate_vs_diversity"]
    index = json.loads((run / "figures" / "index.json").read_text())
    assert index["figures"]["fig6_coefficients"]["note"] == made.notes["fig6_coefficients"]


def test_stale_figure_removed_when_its_input_disappears(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    P.make_figures(run, formats=("png", "svg"), names=["fig5_comparison"])
    (run / "compare" / "comparison.parquet").unlink()
    made = P.make_figures(run, formats=("png",), names=["fig5_comparison"])
    assert not list((run / "figures").glob("fig5_comparison.*"))
    assert made.notes["fig5_comparison"].startswith("no comparison: run `canopy compare")


def test_damaged_artefact_is_a_one_line_error(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    path = run / "compare" / "comparison.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CanopyError, match=r"corrupt file .*comparison\.parquet") as err:
        P.make_figures(run, formats=("png",), names=["fig5_comparison"])
    assert "\n" not in str(err.value)
    (run / "regression" / "result.json").write_text("{not json")
    with pytest.raises(CanopyError, match=r"result\.json is damaged"):
        P.make_figures(run, formats=("png",), names=["fig6_coefficients"])


def test_bad_arguments_are_one_line_errors(tmp_path, run_two_tasks):
    with pytest.raises(CanopyError, match="does not exist"):
        P.make_figures(tmp_path / "nope")
    with pytest.raises(CanopyError, match="not a canopy run folder"):
        P.make_figures(tmp_path)
    with pytest.raises(CanopyError, match="unknown figure"):
        P.make_figures(run_two_tasks, names=["fig9"])
    with pytest.raises(CanopyError, match="min_active"):
        P.make_figures(run_two_tasks, min_active=0)


def test_figure_functions_write_nothing(run_two_tasks):
    """A notebook call: frames in, a Figure out, the run folder untouched."""
    before = {p: p.stat().st_mtime_ns for p in run_two_tasks.rglob("*")}
    fig = P.ce_decomposition(data.metrics_pooled(run_two_tasks))
    assert isinstance(fig, Figure)
    assert {p: p.stat().st_mtime_ns for p in run_two_tasks.rglob("*")} == before


def test_registry_entries_name_real_inputs():
    for name, spec in P.REGISTRY.items():
        assert spec.title and callable(spec.function), name
        assert all(callable(getattr(P.RunInputs, n, None)) for n in spec.inputs), name


def test_model_names_are_drawn_verbatim(run_three_families):
    fig = P.build_figure("fig1_running_rate", P.RunInputs(run_three_families))
    labels = {ln.get_label() for ax in fig.axes for ln in ax.get_lines()}
    assert f"fam-c{EVIL}-instruct" in labels


def test_cli_plot(run_two_tasks, tmp_path, monkeypatch, capsys):
    run = copy_run(run_two_tasks, tmp_path)
    code, out, err = run_cli(
        ["plot", str(run), "--only", "fig5_comparison", "--format", "png"], capsys, monkeypatch
    )
    assert code == 0, err
    assert out.strip() == str(run / "figures" / "fig5_comparison.png")
    code, out, err = run_cli(["plot", str(tmp_path / "missing")], capsys, monkeypatch)
    assert code == 2 and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["plot", str(run), "--format", "gif"], capsys, monkeypatch)
    assert code == 2 and "unknown --format" in err


def test_rerun_gives_byte_identical_files(run_two_tasks, tmp_path):
    run = copy_run(run_two_tasks, tmp_path)
    names = ["fig5_comparison"]
    first = P.make_figures(run, names=names, formats=("png", "pdf", "svg"))
    data1 = {p.name: p.read_bytes() for p in first}
    second = P.make_figures(run, names=names, formats=("png", "pdf", "svg"))
    assert {p.name: p.read_bytes() for p in second} == data1


def test_figure_formats_lay_out_once_and_match_separate_saves() -> None:
    """PNG and PDF from one layout: the PNG is byte-identical to a lone save of the same
    figure, and the PDF is drawn at the positions that layout computed."""
    from canopy_entropy.plots.figures import figure_bytes, figure_formats
    from canopy_entropy.plots.style import new_figure, style

    def draw() -> Figure:
        with style():
            fig = new_figure(6, 3)
            for i, ax in enumerate(fig.subplots(1, 3)):
                ax.plot(np.arange(10) * (i + 1), label=f"line {i}")
                ax.set_title(f"panel {i} with a long title")
                ax.set_ylabel("a y label")
            fig.suptitle("one layout")
        return fig

    fig = draw()
    blobs = figure_formats(fig, ("png", "pdf"))
    assert list(blobs) == ["png", "pdf"] and blobs["pdf"].startswith(b"%PDF")
    assert blobs["png"] == figure_bytes(draw(), "png")
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    assert not isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)  # not solved again
    fresh = draw()
    figure_bytes(fresh, "png")  # the layout a lone PNG save computes
    for got, want in zip(fig.axes, fresh.axes, strict=True):
        np.testing.assert_array_equal(got.get_position().bounds, want.get_position().bounds)
