"""Figures serialise without creation dates, so two renders are byte-identical."""

from __future__ import annotations

from matplotlib.figure import Figure

from canopy_entropy.plots.figures import figure_bytes


def test_two_renders_are_byte_identical_and_undated():
    fig = Figure()  # no pyplot: no GUI backend involved
    fig.add_subplot().plot([1, 3, 2])
    for fmt, stamp in (("pdf", b"CreationDate"), ("svg", b"<dc:date>")):
        first, second = figure_bytes(fig, fmt), figure_bytes(fig, fmt)
        assert first == second
        assert stamp not in first  # a date would make reruns differ once the clock moves
    assert figure_bytes(fig, "pdf").startswith(b"%PDF")
