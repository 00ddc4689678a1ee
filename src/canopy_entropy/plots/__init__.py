"""Figures of a run (SPEC section 8): ``make_figures(run_dir)`` and one function per figure."""

from canopy_entropy.plots.figures import FIGURE_NAMES, FigureFiles, build_figure, make_figures

__all__ = ["FIGURE_NAMES", "FigureFiles", "build_figure", "make_figures"]
