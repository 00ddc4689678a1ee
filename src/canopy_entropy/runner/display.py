"""The live view of ``canopy run``: a model x task grid, the current stage, tokens/s and ETA
(rich, CLI only; a plain line per event when the output is not a terminal)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from canopy_entropy.config import ExperimentConfig


@dataclass
class StageResult:
    name: str
    status: str  # done | skipped | not available | failed | not run
    detail: str = ""
    seconds: float = 0.0


@dataclass
class RunDisplay:
    """Rich live view: current stage, model x task grid, tokens/s and ETA."""

    cfg: ExperimentConfig
    console: Console
    totals: dict[tuple[str, str], int] = field(default_factory=dict)
    done: dict[tuple[str, str], int] = field(default_factory=dict)
    stage: str = ""
    tokens_per_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    session_prompts: int = 0
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
            lines.append(Text(f"{self.tokens_per_s:,.0f} tokens/s   ETA {self.eta()}"))
        for r in self.results:
            lines.append(Text(f"  {r.name:<9} {r.status}{': ' + r.detail if r.detail else ''}"))
        return Group(grid, *lines)

    def eta(self) -> str:
        total = sum(self.totals.values())
        remaining = total - sum(self.done.values())
        elapsed = time.monotonic() - self.started
        if remaining <= 0:
            return "0s"
        if self.session_prompts == 0 or elapsed <= 0:
            return "estimating…"
        secs = remaining * elapsed / self.session_prompts
        return time.strftime("%H:%M:%S", time.gmtime(secs)) if secs >= 60 else f"{secs:.0f}s"

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def set_stage(self, name: str) -> None:
        self.stage = name
        if self.live is None:
            self.console.print(f"[bold]stage[/] {name} …", highlight=False)
        self.refresh()

    def add_result(self, result: StageResult) -> None:
        self.results.append(result)
        if self.live is None:
            extra = f": {result.detail}" if result.detail else ""
            self.console.print(f"  {result.name}: {result.status}{extra}", highlight=False)
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
