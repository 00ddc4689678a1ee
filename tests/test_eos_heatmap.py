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
        if mode == "prompt":  # one separator per change of prompt
            changes = sum(a != b for a, b in zip(prompts[1:], prompts[:-1], strict=True))
            assert len(ax.lines) == changes == 3
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
    from canopy_entropy.plots.fig_eos import displayed

    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(7, 10)).astype(np.float32)
    matrix[5:, 6:] = np.nan  # past the end of the longest rollouts
    shown = displayed(matrix, (3, 4))  # blocks of 3 rows x 3 columns
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
    assert displayed(matrix, (7, 10)) is matrix  # small panels drawn cell for cell
