"""EOS heatmaps (fig7): the drawn matrix is log eos_prob placed by a brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from canopy_entropy.plots import make_figures, read_index
from canopy_entropy.plots.fig_eos import eos_heatmap, eos_matrices
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.store import RunStore


def _run(tmp_path, with_eos_prob=True):
    run = tmp_path / "run"
    for k, (model, task) in enumerate((("a", "math"), ("b", "math"), ("a", "stories"))):
        lm = FiniteStateLM.random(3, 5, seed=10 + k, mean_eos=0.12)
        lm.sample_store(
            run,
            4,
            5,
            seed=k,
            model=model,
            task=task,
            max_new_tokens=30,
            with_eos_prob=with_eos_prob,
        )
    return run


def _brute_force(run, mode):
    """Per (model, task): rows in the heatmap's order, log eos_prob put in place one by one."""
    rows = RunStore(run).read_rollouts().to_pylist()
    out = {}
    for key in sorted({(r["model"], r["task"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["task"]) == key]
        sel.sort(key=lambda r: (r["prompt_id"], r["rollout_index"]))
        if mode == "combined":
            sel = sorted(sel, key=lambda r: len(r["eos_prob"]))  # stable: ties keep key order
        else:
            sel = sorted(sel, key=lambda r: (r["prompt_id"], len(r["eos_prob"])))
        width = max(len(r["eos_prob"]) for r in sel)
        matrix = np.full((len(sel), width), np.nan, dtype=np.float32)  # float32 as stored
        for i, r in enumerate(sel):
            for t, p in enumerate(r["eos_prob"]):
                matrix[i, t] = math.log(p) if p > 0 else -math.inf
        active = [sum(len(r["eos_prob"]) >= t for r in sel) for t in range(1, width + 1)]
        out[key] = (matrix, np.array(active), [r["prompt_id"] for r in sel])
    return out


@pytest.mark.parametrize("mode", ["combined", "prompt"])
def test_heatmap_draws_log_eos_in_place(tmp_path, mode):
    run = _run(tmp_path)
    matrices = eos_matrices(run, batch_size=7)  # batches that split the groups
    fig = eos_heatmap(matrices, mode=mode)
    expected = _brute_force(run, mode)
    assert set(matrices) == set(expected) == {("a", "math"), ("b", "math"), ("a", "stories")}
    heat_axes = [ax for ax in fig.axes if ax.images]
    titles = {ax.get_title(): ax for ax in heat_axes}
    all_values = []
    for (model, task), (matrix, active, prompts) in expected.items():
        ax = titles[f"{model} · {task}"]
        drawn = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
        np.testing.assert_array_equal(drawn, matrix)
        strip = fig.axes[fig.axes.index(ax) + 1]
        np.testing.assert_array_equal(strip.lines[0].get_ydata(), active)
        if mode == "prompt":  # one separator per change of prompt, between the two blocks
            changes = [i + 0.5 for i in range(len(prompts) - 1) if prompts[i] != prompts[i + 1]]
            (lines,) = ax.collections
            assert sorted(seg[0][1] for seg in lines.get_segments()) == changes
            assert len(changes) == 3
        all_values.append(matrix[np.isfinite(matrix)])
    lo, hi = np.quantile(np.concatenate(all_values), [0.01, 0.99])
    norm = heat_axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((lo, hi), rel=1e-6)
    assert ("b", "stories") not in matrices  # an empty slot of the grid gets a note
    assert any("no rollouts with eos_prob" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_canopy_plot_draws_the_heatmaps_or_says_why_not(tmp_path):
    run = _run(tmp_path)
    names = ["fig7_eos_heatmap", "fig7_eos_heatmap_prompts"]
    written = make_figures(run, names=names, formats=("png",))
    assert sorted(p.name for p in written) == [f"{n}.png" for n in names]
    assert read_index(run)["figures"]["fig7_eos_heatmap"]["files"] == ["fig7_eos_heatmap.png"]
    bare = _run(tmp_path / "bare", with_eos_prob=False)
    written = make_figures(bare, names=names, formats=("png",))
    assert list(written) == []
    assert "stored without eos_prob" in written.notes["fig7_eos_heatmap"]


def test_large_panels_are_drawn_as_block_means():
    from canopy_entropy.plots.fig_eos import EOSMatrix

    rng = np.random.default_rng(0)
    lengths = np.array([10, 3, 7, 10, 1, 6, 9])
    values = rng.normal(size=int(lengths.sum())).astype(np.float32)
    values[4] = -np.inf  # a step with eos_prob 0: log is -inf, as the dense matrix holds it
    mat = EOSMatrix(values, lengths, np.array(["p"] * 7))
    order = mat.order("combined")
    matrix = mat.dense(order)
    shown = mat.displayed(order, (3, 4))  # blocks of 3 rows x 3 columns
    assert shown.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            cells = [float(matrix[r, c]) for r in range(3 * i, min(3 * i + 3, 7))
                     for c in range(3 * j, min(3 * j + 3, 10))]  # fmt: skip
            cells = [v for v in cells if not math.isnan(v)]
            if cells:
                assert shown[i, j] == pytest.approx(sum(cells) / len(cells), rel=1e-6)
            else:
                assert math.isnan(shown[i, j])
    assert np.isneginf(shown).sum() == 1  # the -inf step's block, no other
    np.testing.assert_array_equal(mat.displayed(order, (7, 10)), matrix)  # cell for cell


@pytest.mark.parametrize("n_tasks", [1, 2, 4])
@pytest.mark.parametrize("n_models", [1, 6])
def test_heatmap_layout_keeps_text_inside_and_apart(n_models, n_tasks):
    """The fixed layout at 1, 2 and 4 tasks and 1 and 3 families (x 2 variants): every title,
    label and tick label inside the figure and clear of every other panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from canopy_entropy.plots.fig_eos import EOSMatrix
    from canopy_entropy.plots.style import style

    rng = np.random.default_rng(1)
    tasks = ["completion", "coding", "math", "stories"][:n_tasks]
    matrices = {}
    for m in range(n_models):
        for task in tasks:
            lengths = np.minimum(rng.geometric(1 / 300, size=10_000), 4000)
            values = np.log(rng.uniform(1e-9, 1e-3, size=int(lengths.sum()))).astype(np.float32)
            prompts = np.repeat([f"p{k:02d}" for k in range(100)], 100)
            matrices[(f"smollm2-135m-instruct-{m}", task)] = EOSMatrix(values, lengths, prompts)
    with style():
        fig = eos_heatmap(matrices, mode="prompt")
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
    width, height = fig.bbox.width, fig.bbox.height
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label]  # and the tick labels drawn:
        texts += [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        texts += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
        for text in texts:
            if not text.get_visible() or not text.get_text():
                continue
            box = text.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height
            for other in fig.axes:
                if other is not ax:
                    assert not box.overlaps(other.get_window_extent(renderer)), text.get_text()
    title = fig._suptitle.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= width and title.y1 <= height
    assert not any(title.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
