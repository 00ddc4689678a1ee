"""EOS heatmaps: where in a rollout the model considers stopping (the stored ``eos_prob``).

Per model and task, rollouts are rows and token positions columns; the colour is
``log p_t(EOS)`` at that step on a quantile-clipped scale, and a strip underneath counts the
rollouts still active at each position. ``eos_matrices(run)`` streams the rollout shards once
(vectorised per record batch); ``eos_heatmap(matrices)`` draws them and writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from canopy_entropy.plots.data import MissingInput, check_run_dir
from canopy_entropy.plots.style import RC, new_figure, note_axes, wrap
from canopy_entropy.store import SCHEMA_VERSION, RunStore, iter_file_batches

MODES = ("combined", "prompt")
CLIP = (0.01, 0.99)  # quantiles of log p(EOS) the colour scale is clipped to
_SEPARATOR = "\x1f"  # joins model and task into one key (neither may contain it)
DISPLAY = (600, 800)  # at most this many (rows, columns) of cells drawn per panel


@dataclass(frozen=True, eq=False)
class EOSMatrix:
    """One model/task: the log p(EOS) of every step of its rollouts, kept flat (float32, rows
    in (prompt_id, rollout_index) order) so a large run never holds every dense matrix."""

    values: np.ndarray  # [total steps] log p(EOS), rollout after rollout
    lengths: np.ndarray  # [rollouts]
    prompt_id: np.ndarray  # [rollouts]

    @property
    def width(self) -> int:
        return int(self.lengths.max())

    def order(self, mode: str = "combined") -> np.ndarray:
        """Row order: by length (``combined``) or by length within prompt blocks (``prompt``)."""
        check_mode(mode)
        if mode == "combined":
            return np.argsort(self.lengths, kind="stable")
        return np.lexsort((self.lengths, self.prompt_id))

    def _cells(self, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Row (rollout ``order[i]`` is row i) and position of every stored step."""
        order = np.arange(self.lengths.size) if order is None else order
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        step_row = np.repeat(np.arange(self.lengths.size), self.lengths)
        return rank[step_row], np.arange(self.values.size) - starts[step_row]

    def dense(self, order: np.ndarray | None = None) -> np.ndarray:
        """``[rollouts, width]`` matrix, row i = rollout ``order[i]``, NaN past its end."""
        row, pos = self._cells(order)
        matrix = np.full((self.lengths.size, self.width), np.nan, dtype=np.float32)
        matrix[row, pos] = self.values
        return matrix

    def displayed(self, order: np.ndarray | None = None, shape=DISPLAY) -> np.ndarray:
        """The :meth:`dense` matrix reduced to at most ``shape`` cells by block means over the
        steps present (a panel shows no more pixels than that, so drawing cost stays
        bounded); summed straight from the flat steps, so a paper-scale panel (10,000
        rollouts x 4,000 positions) never exists as a dense matrix. Unchanged when it fits."""
        n, width = self.lengths.size, self.width
        fr, fc = (-(-size // k) for size, k in zip((n, width), shape, strict=True))
        if fr == 1 and fc == 1:
            return self.dense(order)
        rows, cols = -(-n // fr), -(-width // fc)
        row, pos = self._cells(order)
        block = (row // fr) * cols + pos // fc
        total = np.bincount(block, weights=self.values.astype(np.float64), minlength=rows * cols)
        count = np.bincount(block, minlength=rows * cols)
        with np.errstate(invalid="ignore"):  # an empty block (past every end) is NaN
            return (total / count).astype(np.float32).reshape(rows, cols)

    def active(self) -> np.ndarray:
        """How many rollouts are still generating at each position (length >= t)."""
        positions = np.arange(1, self.width + 1)
        shorter = np.searchsorted(np.sort(self.lengths), positions, side="left")
        return self.lengths.size - shorter


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown EOS heatmap mode {mode!r}; use one of {', '.join(MODES)}")


def eos_matrices(run_dir: str | Path, batch_size: int = 1024) -> dict[tuple[str, str], EOSMatrix]:
    """Per (model, task) the log-EOS matrix of a run's rollouts, from one streaming pass over
    the shards (``store.iter_file_batches``); MissingInput when no rollout has an eos_prob."""
    run = check_run_dir(run_dir)
    files = RunStore(run).shard_files()
    if not files:
        raise MissingInput("no rollouts: run `canopy generate` or `canopy import`")
    parts: dict[tuple[str, str], list[tuple[np.ndarray, ...]]] = {}
    cols = ["model", "task", "prompt_id", "rollout_index", "eos_prob"]
    for path in files:
        for batch in iter_file_batches(path, SCHEMA_VERSION, cols, batch_size):
            eos = batch.column("eos_prob")
            lengths = pc.list_value_length(eos).fill_null(0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(eos).to_numpy(zero_copy_only=False).astype(np.float64)
            # (model, task) codes with pyarrow, no pandas per batch (a shard is usually one)
            joined = pc.binary_join_element_wise(
                batch.column("model"), batch.column("task"), _SEPARATOR
            ).dictionary_encode()
            uniques = [tuple(k.split(_SEPARATOR)) for k in joined.dictionary.to_pylist()]
            prompt = batch.column("prompt_id").to_numpy(zero_copy_only=False)
            ridx = batch.column("rollout_index").to_numpy(zero_copy_only=False)
            lengths = lengths.astype(np.int64)
            if len(uniques) == 1:
                parts.setdefault(uniques[0], []).append((lengths, flat, prompt, ridx))
                continue
            codes = joined.indices.to_numpy(zero_copy_only=False)
            step_code = np.repeat(codes, lengths)
            for k, key in enumerate(uniques):
                rows = codes == k
                parts.setdefault(key, []).append(
                    (lengths[rows], flat[step_code == k], prompt[rows], ridx[rows])
                )
    out = {}
    for key in sorted(parts):
        lengths, flat, prompt, ridx = (np.concatenate(p) for p in zip(*parts[key], strict=True))
        if not lengths.any():
            continue
        out[key] = _matrix(lengths, flat, prompt, ridx)
    if not out:
        raise MissingInput(
            "no end-of-sequence probabilities: the rollouts were stored without eos_prob "
            "(an engine that returns only top-k logprobs, or an import without them)"
        )
    return out


def _matrix(
    lengths: np.ndarray, flat: np.ndarray, prompt: np.ndarray, ridx: np.ndarray
) -> EOSMatrix:
    """The flat per-step values of one group, rollouts put in (prompt_id, rollout_index) order."""
    order = np.lexsort((ridx, prompt.astype(str)))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    # the steps of the rollouts in their new order (stable: a rollout's steps stay in order)
    steps = np.argsort(np.repeat(rank, lengths), kind="stable")
    with np.errstate(divide="ignore"):
        values = np.log(flat[steps]).astype(np.float32)
    return EOSMatrix(values, lengths[order], prompt[order].astype(str))


def color_norm(matrices: Mapping[tuple[str, str], EOSMatrix], clip=CLIP) -> Normalize:
    """One colour scale for every panel: the ``clip`` quantiles of the finite log p(EOS)."""
    values = np.concatenate([m.values[np.isfinite(m.values)] for m in matrices.values()])
    if not values.size:
        return Normalize(-1.0, 0.0)
    lo, hi = np.quantile(values, clip)
    return Normalize(float(lo), float(hi) if hi > lo else float(lo) + 1.0, clip=True)


# The heatmaps' fixed layout, in inches: with two axes per (model, task) a layout solver
# (constrained layout) cost more than drawing them, and every margin here is known up front.
PANEL_W, HEAT_H, STRIP_H, STRIP_GAP = 2.7, 2.0, 0.5, 0.06
LEFT, RIGHT, BOTTOM = 0.85, 1.2, 0.5  # y label + ticks; colour bar + its label; x label
COL_GAP, ROW_GAP = 0.7, 0.55  # next panel's y ticks; strip x label above the next title
TITLE_LINE, SUPTITLE_LINE = 0.18, 0.2
MIN_WIDTH = 5.6


def _layout(n_models: int, n_tasks: int, titles: list[str], heading: str):
    """Figure size and axes rectangles: ``(fig, panel(i, j) -> (heat, strip), colorbar)``."""
    width = max(LEFT + RIGHT + n_tasks * PANEL_W + (n_tasks - 1) * COL_GAP, MIN_WIDTH)
    panel_w = (width - LEFT - RIGHT - (n_tasks - 1) * COL_GAP) / n_tasks
    title_size, heading_size = RC["axes.titlesize"], RC["axes.titlesize"] + 1
    wrapped = [wrap(t, panel_w, title_size) for t in titles]
    title_h = 0.12 + TITLE_LINE * max((t.count("\n") + 1 for t in wrapped), default=1)
    heading = wrap(heading, width - 0.3, heading_size)
    top = 0.15 + SUPTITLE_LINE * (heading.count("\n") + 1)
    block = title_h + HEAT_H + STRIP_GAP + STRIP_H
    height = top + n_models * block + (n_models - 1) * ROW_GAP + BOTTOM
    fig = new_figure(width, height, layout=None)
    fig.suptitle(heading, fontsize=heading_size, y=1 - 0.08 / height, va="top")

    def rect(x: float, y_top: float, w: float, h: float) -> list[float]:
        return [x / width, 1 - (y_top + h) / height, w / width, h / height]

    def panel(i: int, j: int):
        x = LEFT + j * (panel_w + COL_GAP)
        y = top + i * (block + ROW_GAP) + title_h
        heat = fig.add_axes(rect(x, y, panel_w, HEAT_H))
        strip = fig.add_axes(rect(x, y + HEAT_H + STRIP_GAP, panel_w, STRIP_H), sharex=heat)
        return heat, strip

    grid_h = n_models * block + (n_models - 1) * ROW_GAP
    colorbar = fig.add_axes(rect(width - RIGHT + 0.35, top + 0.1 * grid_h, 0.14, 0.8 * grid_h))
    return fig, panel, colorbar, dict(zip(titles, wrapped, strict=True))


def eos_heatmap(
    matrices: Mapping[tuple[str, str], EOSMatrix], mode: str = "combined", clip=CLIP
) -> Figure:
    """Heatmaps of log p(EOS) per (model, task) with the active-rollout strip underneath.

    Rows are the rollouts sorted by length (``combined``), or sorted by length within prompt
    blocks separated by lines (``prompt``); the colour scale is clipped to the ``clip``
    quantiles over all panels, so a few near-zero probabilities do not wash out the rest.
    """
    check_mode(mode)
    models = sorted({m for m, _ in matrices})
    tasks = sorted({t for _, t in matrices})
    norm = color_norm(matrices, clip)
    how = "sorted by length" if mode == "combined" else "in prompt blocks, by length"
    titles = [f"{model} · {task}" for model in models for task in tasks]
    heading = f"End-of-sequence log probability per step, rollouts {how}"
    fig, panel, cax, wrapped = _layout(len(models), len(tasks), titles, heading)
    image = None
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax, strip = panel(i, j)
            ax.set_title(wrapped[f"{model} · {task}"])
            mat = matrices.get((model, task))
            if mat is None:
                note_axes(ax, "no rollouts with eos_prob")
                note_axes(strip, "")
                continue
            order = mat.order(mode)
            image = ax.imshow(
                mat.displayed(order),
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                norm=norm,
                extent=(0.5, mat.width + 0.5, len(order) - 0.5, -0.5),
            )
            ax.grid(False)
            if mode == "prompt":  # one line collection for every prompt boundary
                ids = mat.prompt_id[order]
                edges = np.flatnonzero(ids[1:] != ids[:-1]) + 0.5
                ax.hlines(edges, 0.5, mat.width + 0.5, color="#bbbbbb", linewidth=0.6)
            ax.tick_params(labelbottom=False)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            positions = np.arange(1, mat.width + 1)
            strip.step(positions, mat.active(), where="mid", color="#333333")
            strip.set_ylim(bottom=0)
            strip.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            strip.yaxis.set_major_locator(MaxNLocator(3, integer=True))
            strip.set_xlabel("token position t")
            if j == 0:
                ax.set_ylabel("rollouts (by length)" if mode == "combined" else "prompt blocks")
                strip.set_ylabel("active")
    if image is not None:
        bar = fig.colorbar(image, cax=cax, extend="both")
        bar.set_label(f"log p(EOS) (clipped to {clip[0]:.0%}–{clip[1]:.0%} quantiles)")
    else:
        cax.set_visible(False)
    return fig


def eos_heatmap_prompts(matrices: Mapping[tuple[str, str], EOSMatrix]) -> Figure:
    """:func:`eos_heatmap` in prompt-block mode (the rows of each prompt together)."""
    return eos_heatmap(matrices, mode="prompt")
