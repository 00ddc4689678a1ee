"""EOS heatmaps (fig7): the drawn matrix is log eos_prob placed by a brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

import canopy_entropy.plots.fig_eos as fig_eos
from canopy_entropy.metrics.result import write_metrics
from canopy_entropy.plots import make_figures, read_index
from canopy_entropy.plots.fig_eos import CLIP, ClipScale, eos_heatmap, eos_matrices
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.store import CorruptFileError, RunStore


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
        for r in sel:
            r["eos_prob"] = r["eos_prob"] or []  # a rollout stored without them: an empty row
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


def _assert_drawn(run, matrices, mode, keys=None):
    """The drawn cells, strips, prompt lines and colour scale against :func:`_brute_force`."""
    fig = eos_heatmap(matrices, mode=mode)
    expected = _brute_force(run, mode)
    assert (
        set(matrices) == set(expected) == (keys or {("a", "math"), ("b", "math"), ("a", "stories")})
    )
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
            assert len(changes) == len(set(prompts)) - 1
        all_values.append(matrix[np.isfinite(matrix)])
    lo, hi = np.quantile(np.concatenate(all_values), [0.01, 0.99])
    norm = heat_axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((lo, hi), rel=1e-6)
    return fig


def _count_passes(monkeypatch):
    """Columns of every shard read by the heatmaps, one list per file opened."""
    opened = []
    real = fig_eos.iter_file_batches

    def counting(path, tag, columns, *args, **kwargs):
        opened.append(list(columns))
        return real(path, tag, columns, *args, **kwargs)

    monkeypatch.setattr(fig_eos, "iter_file_batches", counting)
    return opened


@pytest.mark.parametrize("mode", ["combined", "prompt"])
def test_heatmap_draws_log_eos_in_place(tmp_path, mode, monkeypatch):
    run = _run(tmp_path)
    opened = _count_passes(monkeypatch)
    matrices = eos_matrices(run, batch_size=7)  # batches that split the groups
    fig = _assert_drawn(run, matrices, mode)
    # no metrics: the lengths come from the 3 shards' scalar columns, then one eos_prob pass
    assert [("eos_prob" in c) for c in opened] == [False] * 3 + [True] * 3
    assert ("b", "stories") not in matrices  # an empty slot of the grid gets a note
    assert any("no rollouts with eos_prob" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_rows_from_the_metrics_one_pass_and_stale_ones_a_second(tmp_path, monkeypatch):
    """With the per-rollout metrics the shards are read once; when the shards hold other
    rollouts than the metrics list (here a later shard, some rollouts without eos_prob, as
    empty rows) the heatmaps read them a second time, with the same brute-force result."""
    run = _run(tmp_path)
    write_metrics(run, warn=False)
    opened = _count_passes(monkeypatch)
    for mode in ("combined", "prompt"):
        _assert_drawn(run, eos_matrices(run, batch_size=7), mode)
    assert all("eos_prob" in c for c in opened) and len(opened) == 2 * 3
    store = RunStore(run)
    table = store.read_rollouts()
    table = table.filter(pa.compute.equal(table["model"], "a")).slice(0, 8)
    eos = table["eos_prob"].to_pylist()
    table = table.set_column(
        table.schema.get_field_index("eos_prob"),
        "eos_prob",
        pa.array([None if i % 3 == 0 else e for i, e in enumerate(eos)], table["eos_prob"].type),
    )
    ids = pa.array([f"q{i % 2}" for i in range(table.num_rows)])  # prompts the metrics lack
    store.write_rollouts(
        "later", table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids)
    )
    opened.clear()
    for mode in ("combined", "prompt"):
        _assert_drawn(run, eos_matrices(run, batch_size=5), mode)
    assert all("eos_prob" in c for c in opened) and len(opened) == 2 * 2 * 4


@pytest.mark.parametrize("how", ["two threads", "one thread", "streamed"])
def test_every_read_path_draws_the_same_cells(tmp_path, monkeypatch, how):
    """Shards read by worker threads, in this thread, or (larger than the one-read limit)
    batch by batch: the same brute-force cells, also on the stale-metrics second pass."""
    import canopy_entropy.store as st

    monkeypatch.setattr(fig_eos, "scan_threads", lambda: 1 if how == "one thread" else 2)
    if how == "streamed":
        monkeypatch.setattr(st, "_IN_MEMORY", -1)
    run = _run(tmp_path)
    write_metrics(run, warn=False)
    for mode in ("combined", "prompt"):
        _assert_drawn(run, eos_matrices(run, batch_size=3), mode)
    store = RunStore(run)
    table = store.read_rollouts().slice(0, 6)
    ids = pa.array([f"q{i % 2}" for i in range(table.num_rows)])  # rollouts the metrics lack
    store.write_rollouts(
        "later", table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids)
    )
    for mode in ("combined", "prompt"):
        _assert_drawn(run, eos_matrices(run, batch_size=3), mode)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_damaged_shard_is_named_whichever_thread_reads_it(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(fig_eos, "scan_threads", lambda: threads)
    run = _run(tmp_path)
    write_metrics(run, warn=False)
    shard = RunStore(run).shard_files()[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="corrupt file .*" + shard.name):
        eos_matrices(run)


def test_color_scale_from_the_tails_is_np_quantile():
    """The clip quantiles from the lowest and highest values kept while streaming are
    np.quantile's over every finite value, for any order of arrival (sorted ones included),
    ties and non-finite values."""
    rng = np.random.default_rng(3)
    values = np.log(rng.uniform(1e-9, 1, size=20_000)).astype(np.float32)
    values[rng.integers(0, values.size, 300)] = -np.inf
    values[rng.integers(0, values.size, 30)] = np.nan
    values[:2000] = values[2000]  # a run of ties
    finite = values[np.isfinite(values)]
    expected = np.quantile(finite, CLIP)
    keep = math.ceil(0.01 * values.size) + 2  # what eos_matrices keeps for this many steps
    for arrival in (values, np.sort(values), np.sort(values)[::-1], rng.permutation(values)):
        scale = ClipScale(keep)
        for chunk in np.array_split(arrival, 37):
            scale.add(chunk)
        assert scale.count == finite.size
        assert scale.quantiles(CLIP) == [float(v) for v in expected]  # exactly
        with pytest.raises(ValueError, match="beyond"):
            scale.quantiles([0.5])


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
    from canopy_entropy.plots.fig_eos import EOSPanel

    rng = np.random.default_rng(0)
    lengths = np.array([10, 3, 7, 10, 1, 6, 9])
    values = rng.normal(size=int(lengths.sum())).astype(np.float32)
    values[4] = -np.inf  # a step with eos_prob 0: log is -inf, as the dense matrix holds it
    panel = EOSPanel.from_steps(values, lengths, ["p"] * 7, shape=(3, 4))
    order = panel.order("combined")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    matrix = np.full((7, 10), np.nan, dtype=np.float32)  # row i: rollout order[i], by hand
    for i, r in enumerate(order):
        matrix[i, : lengths[r]] = values[starts[r] : starts[r] + lengths[r]]
    shown = panel.shown["combined"]  # blocks of 3 rows x 3 columns
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
    whole = EOSPanel.from_steps(values, lengths, ["p"] * 7, shape=(7, 10))
    np.testing.assert_array_equal(whole.shown["combined"], matrix)  # cell for cell


@pytest.mark.parametrize("n_tasks", [1, 2, 4])
@pytest.mark.parametrize("n_models", [1, 6])
def test_heatmap_layout_keeps_text_inside_and_apart(n_models, n_tasks):
    """The fixed layout at 1, 2 and 4 tasks and 1 and 3 families (x 2 variants): every title,
    label and tick label inside the figure and clear of every other panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from canopy_entropy.plots.fig_eos import EOSPanel
    from canopy_entropy.plots.style import style

    rng = np.random.default_rng(1)
    tasks = ["completion", "coding", "math", "stories"][:n_tasks]
    matrices = {}
    for m in range(n_models):
        for task in tasks:
            lengths = np.minimum(rng.geometric(1 / 300, size=10_000), 4000)
            values = np.log(rng.uniform(1e-9, 1e-3, size=int(lengths.sum()))).astype(np.float32)
            prompts = np.repeat([f"p{k:02d}" for k in range(100)], 100)
            key = (f"smollm2-135m-instruct-{m}", task)
            matrices[key] = EOSPanel.from_steps(values, lengths, prompts)
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
