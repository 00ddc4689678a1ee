"""One consistent figure style: colours per model family, base dashed / instruct solid.

Every figure of ``canopy plot`` draws through these helpers so a family has the same colour
and a variant the same line style in every panel, figure and report of a run.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import matplotlib
from matplotlib.figure import Figure

# Colour-blind-safe palette (Okabe-Ito, black dropped), then tab10 for more families.
FAMILY_PALETTE = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#F0E442",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
)
VARIANT_LINESTYLE = {"base": "--", "instruct": "-"}
OTHER_LINESTYLE = ":"
VARIANT_MARKER = {"base": "o", "instruct": "s"}
# Components of the CE* decomposition (figure 4): neutral colours, distinct from families.
COMPONENT_COLORS = {
    "rate_length_term": "#4C72B0",
    "within_cov_term": "#DD8452",
    "between_cov_term": "#937860",
    "stop": "#8172B3",
    "content": "#CCB974",
}

RC: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,  # gridlines behind bars and markers, never over them
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text for journals
    "svg.fonttype": "none",
    "svg.hashsalt": "canopy-entropy",  # stable SVG ids: re-runs give identical files
}


@contextmanager
def style():
    """Context in which figures are created and saved with the canopy style."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A pyplot-free Figure: no global state and no backend switch (safe inside notebooks);
    ``savefig`` renders PNG/PDF/SVG through matplotlib's own canvases; freed when dropped.
    ``layout=None`` for a figure that places its axes itself."""
    return Figure(figsize=(width, height), layout=layout)


class Palette:
    """Stable colours per family and line styles per variant for one run."""

    def __init__(self, families: Iterable[str]):
        ordered = sorted({str(f) for f in families})
        self.colors = {f: FAMILY_PALETTE[i % len(FAMILY_PALETTE)] for i, f in enumerate(ordered)}

    @classmethod
    def of(cls, frame: Any) -> Palette:
        """The palette of the families in a frame's ``family`` column."""
        return cls(frame["family"].astype(str) if "family" in frame else ())

    def color(self, family: str) -> str:
        """Colour of a family (unknown families get a grey)."""
        return self.colors.get(str(family), "#555555")

    @staticmethod
    def linestyle(variant: str) -> str:
        """Base dashed, instruct solid, anything else dotted."""
        return VARIANT_LINESTYLE.get(str(variant), OTHER_LINESTYLE)

    @staticmethod
    def marker(variant: str) -> str:
        return VARIANT_MARKER.get(str(variant), "^")

    def line_kwargs(self, family: str, variant: str) -> dict[str, Any]:
        """Keyword arguments for ``Axes.plot`` of one model line."""
        return {"color": self.color(family), "linestyle": self.linestyle(variant)}


def note_axes(ax: Any, text: str) -> None:
    """Write a centred note into an empty panel (used when a panel has nothing to show)."""
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=8,
        color="#666666",
        wrap=True,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to lines no wider than ``width_in`` inches at ``fontsize`` points
    (an average glyph is about 0.55 em), so titles never run past their axes."""
    chars = max(int(width_in * 72 / (0.55 * fontsize)), 8)
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) or text


def suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    size = RC["axes.titlesize"] + 1
    fig.suptitle(wrap(text, fig.get_figwidth() - 0.3, size), fontsize=size)


def panel_title(ax: Any, text: str, n_columns: int) -> None:
    """An axes title wrapped to the width of one of ``n_columns`` panels."""
    fig = ax.get_figure()
    width = fig.get_figwidth() / max(n_columns, 1) - 0.4
    ax.set_title(wrap(text, width, RC["axes.titlesize"]))


def restyle(fig: Figure) -> None:
    """Give a figure drawn elsewhere (pyplot, other rc settings) the canopy look: no top or
    right spine, light gridlines behind the data, the canopy font sizes."""
    for ax in fig.axes:
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_axisbelow(True)
        ax.grid(True, alpha=RC["grid.alpha"], linewidth=RC["grid.linewidth"])
        ax.title.set_fontsize(RC["axes.titlesize"])
        for text in (ax.xaxis.label, ax.yaxis.label):
            text.set_fontsize(RC["axes.labelsize"])
        ax.tick_params(labelsize=RC["xtick.labelsize"])
