"""Figures of a run: ``make_figures(run_dir)`` draws them all into ``RUN/figures/``; each figure
is also a public function from frames to a matplotlib Figure (``ce_decomposition(pooled)``)
that writes nothing, for notebooks. ``REGISTRY`` names every figure, its title and inputs."""

from canopy_entropy.plots.figures import (
    ce_decomposition,
    coefficients,
    comparison,
    figure_bytes,
    length_distribution,
    rate_vs_diversity,
    running_rate,
    within_prompt_variance,
)
from canopy_entropy.plots.make import (
    FIGURE_NAMES,
    REGISTRY,
    FigureFiles,
    FigureSpec,
    RunInputs,
    build_figure,
    figures_are_fresh,
    make_figures,
    read_index,
)
from canopy_entropy.plots.style import Palette

__all__ = [
    "FIGURE_NAMES",
    "REGISTRY",
    "FigureFiles",
    "FigureSpec",
    "Palette",
    "RunInputs",
    "build_figure",
    "ce_decomposition",
    "coefficients",
    "comparison",
    "figure_bytes",
    "figures_are_fresh",
    "length_distribution",
    "make_figures",
    "rate_vs_diversity",
    "read_index",
    "running_rate",
    "within_prompt_variance",
]
