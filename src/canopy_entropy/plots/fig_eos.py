"""EOS heatmaps: where in a rollout the model considers stopping (the stored ``eos_prob``).

Per model and task, rollouts are rows and token positions columns; the colour is
``log p_t(EOS)`` at that step on a quantile-clipped scale, and a strip underneath counts the
rollouts still active at each position. ``eos_matrices(run)`` streams the rollout shards once
and sums every step straight into the cells drawn (rows placed by lengths known up front), so
no per-step array of a panel is ever held; ``eos_heatmap(matrices)`` draws them, writes nothing.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from canopy_entropy import store
from canopy_entropy.errors import CanopyError, StoreError
from canopy_entropy.plots.data import MissingInput, check_run_dir
from canopy_entropy.plots.style import RC, new_figure, note_axes, wrap
from canopy_entropy.run.layout import artefact_path, schema_of
from canopy_entropy.store import SCHEMA_VERSION, RunStore, iter_file_batches, read_table
from canopy_entropy.threads import scan_threads

MODES = ("combined", "prompt")
CLIP = (0.01, 0.99)  # quantiles of log p(EOS) the colour scale is clipped to
_SEPARATOR = "\x1f"  # joins model and task into one key (neither may contain it)
DISPLAY = (600, 800)  # at most this many (rows, columns) of cells drawn per panel
_KEYS = ["model", "task", "prompt_id", "rollout_index"]
_CHUNK = 1 << 19  # steps of one (model, task) read before they are added to its cells

Key = tuple[str, str]
Rows = tuple[np.ndarray, np.ndarray, np.ndarray]  # prompt ids (str), rollout indices, lengths


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown EOS heatmap mode {mode!r}; use one of {', '.join(MODES)}")


def _order(lengths: np.ndarray, prompt_id: np.ndarray, mode: str) -> np.ndarray:
    """Row order: by length (``combined``) or by length within prompt blocks (``prompt``)."""
    check_mode(mode)
    if mode == "combined":
        return np.argsort(lengths, kind="stable")
    return np.lexsort((lengths, prompt_id))


class _Tail:
    """The ``keep`` lowest (or highest) values added, in chunks compacted past ``2 * keep``;
    a value beyond ``bound`` (the keep-th kept so far) can no longer be among them."""

    def __init__(self, keep: int, high: bool):
        self.keep, self.high = keep, high
        self.parts: list[np.ndarray] = []
        self.size, self.bound = 0, -np.inf if high else np.inf

    def add(self, values: np.ndarray) -> None:
        values = values[values > self.bound] if self.high else values[values < self.bound]
        values = values[np.isfinite(values)]
        if values.size:
            self.parts.append(values)
            self.size += values.size
            if self.size > 2 * self.keep:
                self._compact()

    def _compact(self) -> None:
        values = np.concatenate(self.parts)
        cut = values.size - self.keep if self.high else self.keep - 1
        values = np.partition(values, cut)
        kept = values[cut:] if self.high else values[: self.keep]
        self.parts, self.size = [kept], kept.size
        self.bound = kept.min() if self.high else kept.max()

    def sorted(self) -> np.ndarray:
        values = np.sort(np.concatenate(self.parts)) if self.parts else np.zeros(0, np.float32)
        return values[-self.keep :] if self.high else values[: self.keep]


class ClipScale:
    """The finite log p(EOS) values the colour scale's clip quantiles come from: all of them,
    or with ``keep`` only the ``keep`` lowest and highest (bounded memory while streaming;
    exact for every quantile whose neighbours lie that close to either end)."""

    def __init__(self, keep: int | None = None):
        self.keep, self.count = keep, 0
        self._all: list[np.ndarray] = []
        self._tails = None if keep is None else (_Tail(keep, False), _Tail(keep, True))

    def add(self, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        self.count += np.count_nonzero(finite)
        if self._tails is None:
            self._all.append(values[finite])
        else:  # the tails see only the values past their bounds, the finite ones of those
            for tail in self._tails:
                tail.add(values)

    @classmethod
    def merged(cls, scales: Sequence[ClipScale]) -> ClipScale:
        """One scale over the values of several (none: empty) that each kept all of theirs."""
        if any(s.keep is not None for s in scales):
            raise ValueError(
                "EOS panels from different eos_matrices() reads: read them in one call so "
                "they share one colour scale"
            )
        out = cls()
        out._all = [v for s in scales for v in s._all]
        out.count = sum(s.count for s in scales)
        return out

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """``np.quantile`` (linear) of the finite values at ``qs``, the same numbers whether
        every value or only the tails were kept."""
        if self._tails is None:
            return [float(v) for v in np.quantile(np.concatenate(self._all), qs)]
        n = self.count
        low, high = (tail.sorted() for tail in self._tails)
        out = []
        for q in qs:
            h = (n - 1) * q  # numpy's virtual index; the two values it falls between:
            i = math.floor(h)
            j = min(i + 1, n - 1)
            if j < low.size:
                a, b = low[i], low[j]
            elif n - i <= high.size:
                a, b = high[high.size - n + i], high[high.size - n + j]
            else:
                raise ValueError(
                    f"quantile {q} is beyond the {self.keep} values kept per tail: read the "
                    "panels with eos_matrices(run, clip=...) as wide as the scale drawn"
                )
            # numpy's own lerp, with a float64 fraction as np.quantile(values, clip) has it
            out.append(float(np.quantile(np.array([a, b]), np.array([h - i]))[0]))
        return out


class _Rows:
    """The rollouts of one model/task in (prompt_id, rollout_index) order (ties: as given),
    and where each rollout read from the shards goes: found by its key, or (``by_position``)
    by its place in a read that visits the rollouts in the order given."""

    def __init__(self, rows: Rows, by_position: bool = False):
        prompt, ridx, lengths = rows
        order = np.lexsort((ridx, prompt))
        self.prompt, self.ridx, self.lengths = prompt[order], ridx[order], lengths[order]
        self.n = order.size
        if by_position:
            self._base = np.empty_like(order)
            self._base[order] = np.arange(order.size)
            self._next = 0
        else:
            self._base = None
            self._prompts = np.unique(self.prompt)
            self._low = int(self.ridx.min(initial=0))
            self._span = int(self.ridx.max(initial=0)) - self._low + 1
            self._keys = self._key(self.prompt, self.ridx)
            self._hits = np.zeros(self.n, np.int64)

    def _key(self, prompt: np.ndarray, ridx: np.ndarray) -> np.ndarray:
        code = np.searchsorted(self._prompts, prompt)
        return code * self._span + (ridx - self._low)

    def locate(self, prompt: np.ndarray, ridx: np.ndarray, lengths: np.ndarray):
        """The row index (in the order above) of each rollout read, or None when one is not
        among these rollouts or has another length."""
        if self.n == 0:
            return None
        if self._base is not None:
            base = self._base[self._next : self._next + prompt.size]
            self._next += prompt.size
        else:
            base = np.minimum(np.searchsorted(self._keys, self._key(prompt, ridx)), self.n - 1)
            np.add.at(self._hits, base, 1)
        if base.size != prompt.size:
            return None
        same = (
            np.array_equal(self.prompt[base], prompt)
            and np.array_equal(self.ridx[base], ridx)
            and np.array_equal(self.lengths[base], lengths)
        )
        return base if same else None

    def complete(self) -> bool:
        """Whether every rollout was read, once."""
        if self._base is not None:
            return self._next == self.n
        return bool((self._hits == 1).all())


class _Grid:
    """The drawn cells of one model/task: per mode, the sums of log p(EOS) over blocks of
    ``fr`` rows (in that mode's order) x ``fc`` positions, added chunk by chunk."""

    def __init__(self, rows: _Rows, shape: tuple[int, int] = DISPLAY):
        self.rows = rows
        n, self.width = rows.n, int(rows.lengths.max(initial=0))
        sizes = zip((n, self.width), shape, strict=True)
        self.fr, self.fc = (max(-(-size // k), 1) for size, k in sizes)
        self.shape = (-(-n // self.fr), -(-self.width // self.fc))
        self._block = {}  # mode -> the row block of each rollout
        for mode in MODES:
            order = _order(rows.lengths, rows.prompt, mode)
            rank = np.empty_like(order)
            rank[order] = np.arange(n)
            self._block[mode] = rank // self.fr
        self._total: dict[str, np.ndarray] = {}  # mode -> sums, from the first chunk on
        self.shown: dict[str, np.ndarray] | None = None  # the block means, once closed

    def add(self, base: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> None:
        """Rollouts ``base`` (row indices) with these lengths and their flat log p(EOS): each
        run of at most ``fc`` positions (one per column block ``col``) is summed once, in
        float64, then added to its cell in every mode."""
        runs = -(-lengths // self.fc)
        rollout = np.repeat(np.arange(lengths.size), runs)
        col = np.arange(rollout.size) - (np.cumsum(runs) - runs)[rollout]
        start = (np.cumsum(lengths) - lengths)[rollout] + col * self.fc
        if rollout.size:
            sums = np.add.reduceat(values, start, dtype=np.float64)
            for mode, block in self._block.items():
                total = self._total.setdefault(mode, np.zeros(self.shape[0] * self.shape[1]))
                np.add.at(total, block[base[rollout]] * self.shape[1] + col, sums)

    def _counts(self, block: np.ndarray) -> np.ndarray:
        """Steps present per cell, from the lengths alone: a rollout of length L fills the
        ``L // fc`` column blocks before its last one with ``fc`` steps and that one with
        ``L % fc`` (cumulated per row block over column blocks, not summed run by run)."""
        rows, cols = self.shape
        full, rest = np.divmod(self.rows.lengths, self.fc)
        where = block * (cols + 1) + full
        ends = np.bincount(where, minlength=rows * (cols + 1)).reshape(rows, cols + 1)
        filled = np.cumsum(ends[:, ::-1], axis=1)[:, ::-1] - ends  # rollouts with full > c
        last = np.bincount(where, rest, rows * (cols + 1)).reshape(rows, cols + 1)
        return (self.fc * filled + last)[:, :cols]

    def close(self) -> None:
        """Turn the sums into block means (over the steps present in each cell) and drop
        them: a finished panel holds only what is drawn."""
        self.shown = {}
        for mode, block in self._block.items():
            total = self._total.pop(mode, np.zeros(self.shape[0] * self.shape[1]))
            with np.errstate(invalid="ignore"):  # an empty block (past every end) is NaN
                mean = total.reshape(self.shape) / self._counts(block)
            self.shown[mode] = mean.astype(np.float32)

    def panel(self, scale: ClipScale) -> EOSPanel:
        """The finished panel, drawn on ``scale``."""
        if self.shown is None:
            self.close()
        return EOSPanel(self.rows.lengths, self.rows.prompt, self.shown, scale)


@dataclass(frozen=True, eq=False)
class EOSPanel:
    """One model/task as drawn: per mode the cells shown (block means of log p(EOS) over the
    steps present, at most :data:`DISPLAY` of them; cell for cell when they fit), with the
    rollouts' lengths and prompt ids in (prompt_id, rollout_index) order and the colour
    scale's values (``scale``, shared by the panels read together)."""

    lengths: np.ndarray  # [rollouts]
    prompt_id: np.ndarray  # [rollouts]
    shown: Mapping[str, np.ndarray]  # mode -> [rows, cols] cells
    scale: ClipScale

    @classmethod
    def from_steps(
        cls, values: np.ndarray, lengths: np.ndarray, prompt_id, shape=DISPLAY
    ) -> EOSPanel:
        """A panel from the flat log p(EOS) of its rollouts (rollout after rollout, rows in
        (prompt_id, given) order): for a notebook's own data and for tests."""
        lengths = np.asarray(lengths, dtype=np.int64)
        prompt, position = np.asarray(prompt_id).astype(str), np.arange(lengths.size)
        grid = _Grid(_Rows((prompt, position, lengths), by_position=True), shape)
        values = np.asarray(values, dtype=np.float32)
        grid.add(grid.rows.locate(prompt, position, lengths), lengths, values)
        scale = ClipScale()
        scale.add(values)
        return grid.panel(scale)

    @property
    def width(self) -> int:
        return int(self.lengths.max())

    def order(self, mode: str = "combined") -> np.ndarray:
        """Row order: by length (``combined``) or by length within prompt blocks (``prompt``)."""
        return _order(self.lengths, self.prompt_id, mode)

    def active(self) -> np.ndarray:
        """How many rollouts are still generating at each position (length >= t)."""
        positions = np.arange(1, self.width + 1)
        shorter = np.searchsorted(np.sort(self.lengths), positions, side="left")
        return self.lengths.size - shorter


def _batches(
    files: Sequence[Path], batch_size: int, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    """The record batches of the shards, verified, decoded in this thread (pyarrow's pool
    only adds CPU time here: a batch is one shard's few columns)."""
    for path in files:
        yield from iter_file_batches(path, SCHEMA_VERSION, columns, batch_size, use_threads=False)


Piece = tuple[Key, Rows, np.ndarray]  # rollouts of one (model, task) and their log p(EOS)


def _pieces(batches: Iterable[pa.RecordBatch]) -> Iterator[Piece]:
    """Per batch and (model, task): the rollouts' keys and lengths and their flat log p(EOS)
    (float64 log, stored as float32; eos_prob 0 gives -inf)."""
    for batch in batches:
        eos = batch.column("eos_prob")
        lengths = pc.list_value_length(eos).fill_null(0).to_numpy(zero_copy_only=False)
        lengths = lengths.astype(np.int64)
        flat = pc.list_flatten(eos).to_numpy(zero_copy_only=False)
        with np.errstate(divide="ignore"):
            flat = np.log(flat.astype(np.float64)).astype(np.float32)
        prompt = batch.column("prompt_id").to_numpy(zero_copy_only=False).astype(str)
        ridx = batch.column("rollout_index").to_numpy(zero_copy_only=False).astype(np.int64)
        for key, rows in _groups(batch):
            if rows is None:
                yield key, (prompt, ridx, lengths), flat
            else:
                values = flat[np.repeat(rows, lengths)]
                yield key, (prompt[rows], ridx[rows], lengths[rows]), values


def _file_pieces(files: Sequence[Path], batch_size: int) -> Iterator[Piece]:
    """The pieces of every shard in file order; shards up to ``store._IN_MEMORY`` bytes are
    read, verified and turned into log p(EOS) by worker threads, a few files ahead (Parquet
    decoding and numpy release the GIL); a larger shard streams batch by batch here, in
    bounded memory."""
    columns = [*_KEYS, "eos_prob"]

    def whole(path: Path) -> list[Piece]:
        return list(_pieces(_batches([path], batch_size, columns)))

    workers = min(len(files), scan_threads())
    if workers < 2:
        yield from _pieces(_batches(files, batch_size, columns))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead: deque = deque()
        queue = iter(files)

        def submit() -> None:
            for path in queue:
                small = path.stat().st_size <= store._IN_MEMORY
                ahead.append(pool.submit(whole, path) if small else path)
                if small:
                    return

        for _ in range(2 * workers):
            submit()
        while ahead:
            item = ahead.popleft()
            if isinstance(item, Path):
                yield from _pieces(_batches([item], batch_size, columns))
                continue
            pieces = item.result()
            submit()
            yield from pieces


def _groups(batch: pa.RecordBatch | pa.Table) -> Iterator[tuple[Key, np.ndarray | None]]:
    """(model, task) of the rows of a batch, with the mask of its rows (None: every row)."""
    model, task = batch["model"], batch["task"]
    joined = pc.binary_join_element_wise(model, task, pa.scalar(_SEPARATOR, model.type))
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    joined = joined.dictionary_encode()
    uniques = [tuple(k.split(_SEPARATOR)) for k in joined.dictionary.to_pylist()]
    if len(uniques) == 1:  # a shard is usually one (model, task)
        yield uniques[0], None
        return
    codes = joined.indices.to_numpy(zero_copy_only=False)
    for k, key in enumerate(uniques):
        yield key, codes == k


def _expected_rows(run: Path, files: Sequence[Path], batch_size: int) -> dict[Key, Rows]:
    """Per (model, task) the rollouts the shards should hold and their lengths: from the
    per-rollout metrics when readable, else from the shards' scalar columns (no per-step
    data); the reading pass checks every rollout against them."""
    columns = [*_KEYS, "length"]
    table = None
    path = artefact_path(run, "metrics.rollouts")
    if path.exists():
        try:
            table = read_table(path, schema_of("metrics.rollouts"), columns)
        except CanopyError:
            table = None
    if table is None:
        batches = list(_batches(files, batch_size, columns))
        if not batches:
            return {}
        table = pa.Table.from_batches(batches)
    prompt = table["prompt_id"].to_numpy().astype(str)
    ridx = table["rollout_index"].to_numpy().astype(np.int64)
    lengths = table["length"].to_numpy().astype(np.int64)
    return {
        key: (prompt, ridx, lengths) if rows is None else (prompt[rows], ridx[rows], lengths[rows])
        for key, rows in _groups(table)
    }


def _chunks(files: Sequence[Path], batch_size: int) -> Iterator[Piece]:
    """The rollouts of the shards per (model, task), in reading order, with their flat
    log p(EOS): consecutive pieces of one (model, task) merged up to about ``_CHUNK`` steps,
    so the work per step runs in few, large numpy calls."""
    pending: list[tuple[Rows, np.ndarray]] = []
    current, steps = None, 0
    for key, rows, values in _file_pieces(files, batch_size):
        if pending and (key != current or steps >= _CHUNK):
            yield current, *_merged(pending)
            pending, steps = [], 0
        current = key
        pending.append((rows, values))
        steps += values.size
    if pending:
        yield current, *_merged(pending)


def _merged(pieces: list[tuple[Rows, np.ndarray]]) -> tuple[Rows, np.ndarray]:
    rows = tuple(np.concatenate(c) for c in zip(*(r for r, _ in pieces), strict=True))
    return rows, np.concatenate([flat for _, flat in pieces])


def _read(
    files: Sequence[Path], grids: dict[Key, _Grid], scale: ClipScale, batch_size: int
) -> tuple[dict[Key, list[Rows]], bool]:
    """One pass over the shards adding every step to its panel's cells and to ``scale``;
    returns the rollouts read per (model, task), in reading order, and whether they were
    exactly the rows the grids expected (if not, the sums are incomplete: read again)."""
    read: dict[Key, list[Rows]] = {}
    ok = True
    for key, rows, values in _chunks(files, batch_size):
        read.setdefault(key, []).append(rows)
        grid = grids.get(key) if ok else None
        base = None if grid is None or grid.shown is not None else grid.rows.locate(*rows)
        if base is None:
            ok = False  # keep recording the rollouts; the sums are dropped
            continue
        grid.add(base, rows[2], values)
        scale.add(values)
        if grid.rows.complete():
            grid.close()
    return read, ok and all(g.rows.complete() for g in grids.values())


def _grids(rows: dict[Key, Rows], clip, by_position: bool) -> tuple[dict[Key, _Grid], ClipScale]:
    """Empty grids for these rollouts and a colour scale keeping just enough of the tails."""
    steps = sum(int(lengths.sum()) for _, _, lengths in rows.values())
    keep = math.ceil(max(clip[0], 1 - clip[1], 0) * steps) + 2
    grids = {key: _Grid(_Rows(r, by_position)) for key, r in rows.items()}
    return grids, ClipScale(keep)


def eos_matrices(run_dir: str | Path, batch_size: int = 1024, clip=CLIP) -> dict[Key, EOSPanel]:
    """Per (model, task) the drawn log-EOS cells of a run's rollouts, from one streaming pass
    over the shards (``store.iter_file_batches``), rows placed by the lengths the per-rollout
    metrics record (without them: the shards' scalar columns); a second pass when the shards
    do not hold exactly those rollouts (stale metrics, rollouts without eos_prob). ``clip``:
    the widest quantiles the colour scale may use. MissingInput when no rollout has an
    eos_prob."""
    run = check_run_dir(run_dir)
    files = RunStore(run).shard_files()
    if not files:
        raise MissingInput("no rollouts: run `canopy generate` or `canopy import`")
    grids, scale = _grids(_expected_rows(run, files, batch_size), clip, by_position=False)
    read, ok = _read(files, grids, scale, batch_size)
    if not ok:  # the rows as read, in reading order, for a second pass
        rows = {
            k: tuple(np.concatenate(p) for p in zip(*parts, strict=True))
            for k, parts in read.items()
        }
        grids, scale = _grids(rows, clip, by_position=True)
        if any(g.width for g in grids.values()):
            if not _read(files, grids, scale, batch_size)[1]:
                raise StoreError(
                    f"the rollouts in {run / 'rollouts'} changed while they were read; "
                    "run `canopy plot` again"
                )
    out = {key: grids[key].panel(scale) for key in sorted(grids) if grids[key].width}
    if not out:
        raise MissingInput(
            "no end-of-sequence probabilities: the rollouts were stored without eos_prob "
            "(an engine that returns only top-k logprobs, or an import without them)"
        )
    return out


def color_norm(matrices: Mapping[Key, EOSPanel], clip=CLIP) -> Normalize:
    """One colour scale for every panel: the ``clip`` quantiles of the finite log p(EOS)."""
    scales = list({id(m.scale): m.scale for m in matrices.values()}.values())
    scale = scales[0] if len(scales) == 1 else ClipScale.merged(scales)
    if not scale.count:  # no panel, or no finite value
        return Normalize(-1.0, 0.0)
    lo, hi = scale.quantiles(clip)
    return Normalize(lo, hi if hi > lo else lo + 1.0, clip=True)


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


def eos_heatmap(matrices: Mapping[Key, EOSPanel], mode: str = "combined", clip=CLIP) -> Figure:
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
            mat = matrices.get((model, task))
            # the title where matplotlib would put it, without it measuring every axis of the
            # figure per save: nothing sits above a panel (an offset text "1e6" only from
            # 10^6 rows on, where it is left to place the title itself)
            fixed = mat is None or mat.lengths.size < 10**6
            ax.set_title(wrapped[f"{model} · {task}"], y=1.0 if fixed else None)
            if mat is None:
                note_axes(ax, "no rollouts with eos_prob")
                note_axes(strip, "")
                continue
            order = mat.order(mode)
            image = ax.imshow(
                mat.shown[mode],
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
            ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
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


def eos_heatmap_prompts(matrices: Mapping[Key, EOSPanel]) -> Figure:
    """:func:`eos_heatmap` in prompt-block mode (the rows of each prompt together)."""
    return eos_heatmap(matrices, mode="prompt")
