"""EOS heatmaps: where in a rollout the model considers stopping (the stored ``eos_prob``).

Per model and task, rollouts are rows and token positions columns; the colour is
``log p_t(EOS)`` at that step on a quantile-clipped scale, and a strip underneath counts the
rollouts still active at each position. ``eos_matrices(run)`` streams the rollout shards once
(vectorised per record batch); ``eos_heatmap(matrices)`` draws them and writes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from canopy_entropy.plots.data import MissingInput, check_run_dir
from canopy_entropy.plots.style import new_figure, note_axes, panel_title, suptitle
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

    def dense(self, order: np.ndarray | None = None) -> np.ndarray:
        """``[rollouts, width]`` matrix, row i = rollout ``order[i]``, NaN past its end."""
        order = np.arange(self.lengths.size) if order is None else order
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        step_row = np.repeat(np.arange(self.lengths.size), self.lengths)
        pos = np.arange(self.values.size) - starts[step_row]
        matrix = np.full((self.lengths.size, self.width), np.nan, dtype=np.float32)
        matrix[rank[step_row], pos] = self.values
        return matrix

    def active(self) -> np.ndarray:
        """How many rollouts are still generating at each position (length >= t)."""
        positions = np.arange(1, self.width + 1)
        shorter = np.searchsorted(np.sort(self.lengths), positions, side="left")
        return self.lengths.size - shorter


def displayed(matrix: np.ndarray, shape: tuple[int, int] = DISPLAY) -> np.ndarray:
    """``matrix`` reduced to at most ``shape`` cells by block means over the steps present
    (a panel shows no more pixels than that, so drawing cost stays bounded); unchanged when it
    already fits."""
    fr, fc = (-(-n // k) for n, k in zip(matrix.shape, shape, strict=True))
    if fr == 1 and fc == 1:
        return matrix
    rows, cols = -(-matrix.shape[0] // fr) * fr, -(-matrix.shape[1] // fc) * fc
    padded = np.full((rows, cols), np.nan, dtype=np.float32)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    blocks = padded.reshape(rows // fr, fr, cols // fc, fc)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN block (past every end)
        return np.nanmean(blocks, axis=(1, 3))


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
    fig = new_figure(max(3.4 * len(tasks) + 1.2, 5.6), 3.3 * max(len(models), 1))
    grid = fig.add_gridspec(2 * len(models), len(tasks), height_ratios=[4, 1] * len(models))
    image = None
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax = fig.add_subplot(grid[2 * i, j])
            strip = fig.add_subplot(grid[2 * i + 1, j], sharex=ax)
            panel_title(ax, f"{model} · {task}", len(tasks))
            mat = matrices.get((model, task))
            if mat is None:
                note_axes(ax, "no rollouts with eos_prob")
                note_axes(strip, "")
                continue
            order = mat.order(mode)
            image = ax.imshow(
                displayed(mat.dense(order)),
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                norm=norm,
                extent=(0.5, mat.width + 0.5, len(order) - 0.5, -0.5),
            )
            ax.grid(False)
            if mode == "prompt":
                ids = mat.prompt_id[order]
                for edge in np.flatnonzero(ids[1:] != ids[:-1]):
                    ax.axhline(edge + 0.5, color="#bbbbbb", linewidth=0.6)
            ax.tick_params(labelbottom=False)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            positions = np.arange(1, mat.width + 1)
            strip.step(positions, mat.active(), where="mid", color="#333333")
            strip.set_ylim(bottom=0)
            strip.set_xlabel("token position t")
            if j == 0:
                ax.set_ylabel("rollouts (by length)" if mode == "combined" else "prompt blocks")
                strip.set_ylabel("active")
    if image is not None:
        bar = fig.colorbar(image, ax=fig.axes, shrink=0.8, extend="both")
        bar.set_label(f"log p(EOS) (clipped to {clip[0]:.0%}–{clip[1]:.0%} quantiles)")
    how = "sorted by length" if mode == "combined" else "in prompt blocks, by length"
    suptitle(fig, f"End-of-sequence log probability per step, rollouts {how}")
    return fig


def eos_heatmap_prompts(matrices: Mapping[tuple[str, str], EOSMatrix]) -> Figure:
    """:func:`eos_heatmap` in prompt-block mode (the rows of each prompt together)."""
    return eos_heatmap(matrices, mode="prompt")
