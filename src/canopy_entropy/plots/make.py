"""Drawing a run's figures into ``RUN/figures/``: the registry, ``make_figures`` and the index.

A figure is one function of ``plots.figures`` plus one :data:`REGISTRY` entry naming its
title and its inputs (methods of :class:`RunInputs`, each read once per call). ``make_figures``
renders every registered figure whose inputs exist as PNG/PDF/SVG (atomic writes), removes the
files of a figure that can no longer be drawn, and records in ``figures/index.json`` what was
drawn, the notes of what was not and the fingerprint (``run.freshness.input_fingerprint``) of
the inputs the plots stage declares, so the report knows whether the figures are up to date.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from canopy_entropy.errors import CanopyError
from canopy_entropy.plots import data, fig_accuracy, fig_eos, fig_series
from canopy_entropy.plots import figures as F
from canopy_entropy.plots.style import Palette, style
from canopy_entropy.run.freshness import input_fingerprint
from canopy_entropy.store import atomic_write_bytes, atomic_write_json

FORMATS = ("png", "pdf")
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class FigureSpec:
    """One figure: the function that draws it, its title and the inputs it is called with."""

    function: Callable[..., Figure]
    title: str
    inputs: tuple[str, ...]  # RunInputs methods, passed positionally
    caption: str = ""


REGISTRY: dict[str, FigureSpec] = {
    "fig1_running_rate": FigureSpec(
        F.running_rate,
        "Running entropy rate vs token position",
        ("running_rate",),
        "mean prefix entropy rate of the rollouts still active at each position",
    ),
    "fig2_length_distribution": FigureSpec(
        F.length_distribution,
        "Output length distributions",
        ("rollouts", "length_caps"),
        "share of rollouts up to each length; dotted: the length cap",
    ),
    "fig3_within_prompt_variance": FigureSpec(
        F.within_prompt_variance,
        "Within-prompt variance of entropy rate and length",
        ("rollouts",),
        "how much rollouts of one prompt differ, over prompts",
    ),
    "fig4_ce_decomposition": FigureSpec(
        F.ce_decomposition,
        "CE* decomposition",
        ("metrics_pooled",),
        "CE* as rate × length plus covariances, and the share of stopping decisions",
    ),
    "fig5_comparison": FigureSpec(
        F.comparison,
        "Comparison with bootstrap intervals",
        ("comparison",),
        "",  # the compared sides name it (figure_caption)
    ),
    "fig6_rate_vs_diversity": FigureSpec(
        F.rate_vs_diversity,
        "Entropy rate vs diversity with fitted curves",
        ("rate_diversity",),
        "per prompt; lines: the regression's population-level mean",
    ),
    "fig6_coefficients": FigureSpec(
        F.coefficients,
        "Regression coefficients",
        ("regression_result",),
        "mean-model coefficients with 95% Wald intervals",
    ),
    "fig7_eos_heatmap": FigureSpec(
        fig_eos.eos_heatmap,
        "End-of-sequence probability per step",
        ("eos_matrices",),
        "log p(EOS) per rollout (rows, by length) and position; strip: rollouts still active",
    ),
    "fig7_eos_heatmap_prompts": FigureSpec(
        fig_eos.eos_heatmap_prompts,
        "End-of-sequence probability per step, by prompt",
        ("eos_matrices",),
        "as fig7, rows grouped into prompt blocks (each sorted by length)",
    ),
    "fig8_accuracy_vs_rate": FigureSpec(
        fig_accuracy.accuracy_vs_rate,
        "Accuracy vs entropy rate",
        ("accuracy",),
        "accuracy of the rollouts in each entropy-rate decile; bars: 95% Wilson intervals",
    ),
    "fig8_auroc": FigureSpec(
        fig_accuracy.auroc_bars,
        "AUROC of the uncertainties for incorrect rollouts",
        ("accuracy",),
        "all rollouts of a model and task ranked together; dashed: chance",
    ),
    "fig8_series_trend": FigureSpec(
        fig_series.series_trend,
        "Checkpoint series: metrics against step",
        ("series_table",),
        "pooled metrics of each checkpoint against its step; band: ± SE of CE*",
    ),
}
FIGURE_NAMES = tuple(REGISTRY)
# Drawn by the regress stage (stats.dharma) into figures/, listed in the index and the report.
REGRESS_FIGURES = {
    "regression_qq": "Residual QQ plot (DHARMa-style, unconditional simulations)",
    "regression_resid": "Scaled residuals vs predicted (DHARMa-style)",
}


def plots_inputs() -> tuple[str, ...]:
    """The run-folder paths the plots stage declares as its inputs (runner.stages)."""
    from canopy_entropy.runner.stages import stage_named

    return stage_named("plots").inputs


class RunInputs:
    """Lazily loaded inputs of one run folder, each read at most once (notes cached too)."""

    def __init__(self, run: Path, min_active: int = F.DEFAULT_MIN_ACTIVE):
        self.run, self.min_active = run, min_active
        self._cache: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """Input ``name`` (raises MissingInput with the note when it cannot be read)."""
        if name not in self._cache:
            try:
                self._cache[name] = getattr(self, name)()
            except data.MissingInput as exc:
                self._cache[name] = exc
        value = self._cache[name]
        if isinstance(value, data.MissingInput):
            raise value
        return value

    def running_rate(self) -> pd.DataFrame:
        return data.running_rate(self.run)

    def rollouts(self) -> pd.DataFrame:
        return data.rollouts_frame(self.run)

    def length_caps(self) -> dict[str, int]:
        return data.length_caps(self.run)

    def metrics_pooled(self) -> pd.DataFrame:
        return data.metrics_pooled(self.run)

    def comparison(self) -> pd.DataFrame:
        return data.comparison(self.run)

    def rate_diversity(self) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
        return data.rate_diversity_points(self.run)

    def regression_result(self) -> dict[str, Any]:
        return data.regression_result(self.run)

    def accuracy(self) -> Any:
        return fig_accuracy.accuracy_tables(self.run)

    def eos_matrices(self) -> dict[tuple[str, str], fig_eos.EOSPanel]:
        return fig_eos.eos_matrices(self.run)

    def series_table(self) -> pd.DataFrame:
        return fig_series.series_input(self.run)

    def palette(self) -> Palette:
        """One palette for every figure: the families of the manifest and the rollouts."""
        families = {m.family for m in data.read_manifest(self.run).models.values()}
        try:
            families |= set(self.get("rollouts")["family"].astype(str))
        except data.MissingInput:
            pass
        return Palette(families)


def build_figure(name: str, inputs: RunInputs, palette: Palette | None = None) -> Figure:
    """Draw the registered figure ``name`` from a run's inputs (MissingInput with a note)."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise CanopyError(f"unknown figure '{name}'; choose from {', '.join(FIGURE_NAMES)}")
    args: list[Any] = []
    for value in (inputs.get(n) for n in spec.inputs):  # a tuple input is several arguments
        args.extend(value) if isinstance(value, tuple) else args.append(value)
    kwargs: dict[str, Any] = {}
    params = inspect.signature(spec.function).parameters
    if "palette" in params:
        kwargs["palette"] = palette or inputs.palette()
    if "min_active" in params:
        kwargs["min_active"] = inputs.min_active
    with style():
        return spec.function(*args, **kwargs)


def figure_caption(name: str, run: Path) -> str:
    """The caption of a drawn figure; fig5's names the compared sides."""
    if name == "fig5_comparison":
        comp = data.comparison(run)
        a, b = str(comp["a_label"].iloc[0]), str(comp["b_label"].iloc[0])
        return f"{b} vs {a}: change per metric with 95% paired prompt-bootstrap intervals"
    return REGISTRY[name].caption if name in REGISTRY else ""


class FigureFiles(list):  # list[Path] with the notes of the skipped figures
    """Paths written by :func:`make_figures`; ``notes`` maps skipped figure names to reasons."""

    def __init__(self, paths: Sequence[Path] = (), notes: dict[str, str] | None = None):
        super().__init__(paths)
        self.notes: dict[str, str] = dict(notes or {})


def _fingerprint(run: Path, min_active: int) -> str:
    return input_fingerprint(run, plots_inputs(), {"min_active": min_active})


def make_figures(
    run_dir: str | Path,
    *,
    min_active: int = F.DEFAULT_MIN_ACTIVE,
    formats: Sequence[str] = FORMATS,
    names: Sequence[str] = FIGURE_NAMES,
) -> FigureFiles:
    """Render every figure whose inputs exist to ``RUN/figures/<name>.<fmt>`` (atomic writes).

    Returns the written paths; ``.notes`` says why each other figure was skipped. Both go into
    ``figures/index.json`` with the inputs' fingerprint. The files of a skipped figure are
    removed, so the folder never shows a figure from older inputs.
    """
    run = data.check_run_dir(run_dir)
    if min_active < 1:
        raise CanopyError(f"min_active must be >= 1 (got {min_active})")
    unknown = sorted(set(names) - set(FIGURE_NAMES))
    if unknown:
        raise CanopyError(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURE_NAMES)}")
    out_dir = run / "figures"
    inputs = RunInputs(run, min_active)
    palette = inputs.palette()
    written = FigureFiles()
    for name in names:
        try:
            fig = build_figure(name, inputs, palette)
        except data.MissingInput as exc:
            written.notes[name] = str(exc)
            for path in out_dir.glob(f"{name}.*"):
                path.unlink()
            continue
        for fmt, blob in F.figure_formats(fig, formats).items():
            path = out_dir / f"{name}.{fmt}"
            atomic_write_bytes(path, blob)
            written.append(path)
    _write_index(run, min_active, names, written)
    return written


def _write_index(run: Path, min_active: int, names: Sequence[str], written: FigureFiles) -> None:
    """figures/index.json: per figure its title, files or note; figures not drawn in this
    call keep their entries when drawn with the same ``min_active`` from the same inputs."""
    old = read_index(run) or {}
    fingerprint = _fingerprint(run, min_active)
    keep = old.get("fingerprint") == fingerprint
    entries: dict[str, Any] = {}
    for name, spec in REGISTRY.items():
        files = sorted(p.name for p in written if p.stem == name)
        if name in names:
            entry = {"title": spec.title, "files": files, "note": written.notes.get(name, "")}
        elif keep and name in old.get("figures", {}):
            entry = old["figures"][name]
        else:
            continue
        entries[name] = {**entry, "stage": "plots"}
    fig_dir = run / "figures"
    for name, title in REGRESS_FIGURES.items():
        files = sorted(p.name for p in fig_dir.glob(f"{name}.*"))
        if files:
            entries[name] = {"title": title, "files": files, "note": "", "stage": "regress"}
    atomic_write_json(
        fig_dir / INDEX_NAME,
        {"min_active": min_active, "fingerprint": fingerprint, "figures": entries},
    )


def read_index(run_dir: str | Path) -> dict[str, Any] | None:
    """figures/index.json of a run, or None when absent or unreadable."""
    path = Path(run_dir) / "figures" / INDEX_NAME
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("figures"), dict) else None


def figures_are_fresh(run_dir: str | Path, min_active: int = F.DEFAULT_MIN_ACTIVE) -> bool:
    """True when figures/ was drawn (with ``min_active``) from the inputs as they are now and
    every file the index lists is there."""
    run = Path(run_dir)
    index = read_index(run)
    if index is None or index.get("fingerprint") != _fingerprint(run, min_active):
        return False
    return all(
        (run / "figures" / f).exists() for e in index["figures"].values() for f in e["files"]
    )
