"""The live view of ``canopy run``: a model x task grid, the current stage, tokens/s and ETA
(rich, CLI only; a plain line per event when the output is not a terminal).

Throughput and ETA come from decoding after a warm-up: each model's first finished prompt
only starts the clock (it carries model loading, the first prefill and any compilation).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from canopy_entropy.config import ExperimentConfig


@dataclass
class StageResult:
    name: str
    status: str  # done | skipped | failed | not run
    detail: str = ""
    seconds: float = 0.0


def result_line(r: StageResult) -> str:
    """``name status (time): detail`` for the live view and the log."""
    secs = f" ({format_seconds(r.seconds)})" if r.seconds else ""
    return f"{r.name:<9} {r.status}{secs}{': ' + r.detail if r.detail else ''}"


def format_seconds(secs: float) -> str:
    """A duration for people: ``4.2s``, ``42s`` or ``01:02:03``."""
    if secs < 10:
        return f"{secs:.1f}s"
    return time.strftime("%H:%M:%S", time.gmtime(secs)) if secs >= 60 else f"{secs:.0f}s"


@dataclass
class ThroughputEstimator:
    """Decode throughput from (time, tokens, prompts) observations, excluding each segment's
    warm-up (a segment is one model: its first observation is the baseline, not a sample).

    ``tokens`` and ``prompts`` are running totals within the segment. An estimate exists once
    ``min_prompts`` prompts and ``min_seconds`` of decoding were measured after warm-up; the
    current segment's own rate is used once it has that much, else the pooled one.
    """

    min_prompts: int = 1
    min_seconds: float = 3.0
    _base: tuple[float, int, int] | None = None  # the current segment's warm-up end
    _last: tuple[float, int, int] | None = None
    _done: tuple[float, int, int] = (0.0, 0, 0)  # measured seconds, tokens, prompts before it

    def start_segment(self) -> None:
        """A new model starts: fold the current segment's measurements into the pool."""
        self._done = self._pooled()
        self._base = self._last = None

    def observe(self, now: float, tokens: int, prompts: int) -> None:
        """The running totals of the current segment at time ``now``."""
        if self._base is None:
            self._base = (now, tokens, prompts)
        self._last = (now, tokens, prompts)

    def _current(self) -> tuple[float, int, int]:
        if self._base is None or self._last is None:
            return (0.0, 0, 0)
        return tuple(b - a for a, b in zip(self._base, self._last, strict=True))  # type: ignore[return-value]

    def _pooled(self) -> tuple[float, int, int]:
        return tuple(a + b for a, b in zip(self._done, self._current(), strict=True))  # type: ignore[return-value]

    def _measured(self) -> tuple[float, int, int] | None:
        for secs, tokens, prompts in (self._current(), self._pooled()):
            if prompts >= self.min_prompts and secs >= self.min_seconds:
                return secs, tokens, prompts
        return None

    def tokens_per_s(self) -> float | None:
        """Generated tokens per second after warm-up, or None while estimating."""
        m = self._measured()
        return m[1] / m[0] if m else None

    def eta_seconds(self, remaining_prompts: int) -> float | None:
        """Seconds for ``remaining_prompts`` more prompts, or None while estimating."""
        if remaining_prompts <= 0:
            return 0.0
        m = self._measured()
        return remaining_prompts * m[0] / m[2] if m else None


@dataclass
class RunDisplay:
    """Rich live view: current stage, model x task grid, tokens/s and ETA."""

    cfg: ExperimentConfig
    console: Console
    totals: dict[tuple[str, str], int] = field(default_factory=dict)
    done: dict[tuple[str, str], int] = field(default_factory=dict)
    stage: str = ""
    clock: Callable[[], float] = time.monotonic
    estimator: ThroughputEstimator = field(default_factory=ThroughputEstimator)
    segment: str | None = None  # the model whose prompts the estimator is timing
    results: list[StageResult] = field(default_factory=list)
    live: Live | None = None

    def render(self) -> Group:
        grid = Table(title=f"canopy run · {self.cfg.name}", title_justify="left", expand=False)
        grid.add_column("model")
        grid.add_column("variant")
        for task in self.cfg.tasks:
            grid.add_column(task, justify="right")
        for m in self.cfg.models:
            cells = []
            for task in self.cfg.tasks:
                d, t = self.done.get((m.label, task), 0), self.totals.get((m.label, task), 0)
                style = "green" if t and d >= t else ("yellow" if d else "dim")
                cells.append(Text(f"{d}/{t}", style=style))
            grid.add_row(m.label, m.variant, *cells)
        lines = [Text.assemble(("stage: ", "bold"), (self.stage or "-", "cyan"))]
        if self.stage == "generate":
            lines.append(Text(self.speed()))
        for r in self.results:
            lines.append(Text(f"  {result_line(r)}"))
        return Group(grid, *lines)

    def observe(self, model: str, tokens: int, prompts: int) -> None:
        """Generation progress of ``model`` in this session: generated tokens (steps, as the
        summary counts them) and prompts finished so far by its engine."""
        if model != self.segment:
            self.estimator.start_segment()
            self.segment = model
        self.estimator.observe(self.clock(), tokens, prompts)

    def eta(self) -> str:
        """The time left for the grid's remaining prompts, or ``estimating…``."""
        remaining = sum(self.totals.values()) - sum(self.done.values())
        secs = self.estimator.eta_seconds(remaining)
        return "estimating…" if secs is None else format_seconds(secs)

    def speed(self) -> str:
        """``N tokens/s · ETA …`` from measured decoding, or ``estimating…`` until then."""
        rate = self.estimator.tokens_per_s()
        if rate is None:
            return f"estimating… tokens/s · ETA {self.eta()}"
        return f"{rate:,.0f} tokens/s · ETA {self.eta()}"

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def set_stage(self, name: str) -> None:
        self.stage = name
        self.refresh()

    def add_result(self, result: StageResult) -> None:
        """Record a finished stage; in logs it is the stage's one line, with its time."""
        self.results.append(result)
        if self.live is None:
            self.console.print(f"stage {result_line(result)}", highlight=False, markup=False)
        self.refresh()

    @contextlib.contextmanager
    def running(self) -> Iterator[RunDisplay]:
        if not self.console.is_terminal:
            yield self
            return
        with Live(self.render(), console=self.console, refresh_per_second=4) as live:
            self.live = live
            try:
                yield self
            finally:
                self.live = None
