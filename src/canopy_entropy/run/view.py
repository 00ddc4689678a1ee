"""A typed, read-only view of a run folder for notebooks: ``canopy_entropy.open_run(path)``.

Reading writes nothing. ``run.metrics`` is the saved result when it is current, else computed
in memory (never saved); ``run.save(result)`` is the only way this view writes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from canopy_entropy.errors import CanopyError
from canopy_entropy.run.layout import artefact_path
from canopy_entropy.run.manifest import Manifest, read_manifest


class Run:
    """One run folder: its manifest, rollouts and the results of its stages."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CanopyError(f"run folder {self.path} does not exist; check the path")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @functools.cached_property
    def manifest(self) -> Manifest:
        """How the rollouts were made: models, policy, seed scheme, EOS ids, imports."""
        return read_manifest(self.path)

    def rollouts(self) -> Any:
        """One row per rollout (keys, rollout_index, length, finish_reason, H, r, surprisal,
        stop_entropy, and d when diversity was measured), as a pandas DataFrame."""
        return self.metrics.rollouts

    @functools.cached_property
    def metrics(self) -> Any:
        """The run's ``MetricsResult``: the saved one when current, else computed in memory."""
        from canopy_entropy.metrics import MetricsResult, run_metrics

        if artefact_path(self.path, "metrics.json").exists():
            saved = MetricsResult.load(self.path)
            if saved.is_fresh(self.path) and saved.rollouts is not None:
                return saved
        return run_metrics(self.path, warn=False)

    @property
    def comparison(self) -> Any:
        """The saved ``CompareResult`` (None when the compare stage has not run)."""
        from canopy_entropy.comparison import CompareResult

        if not artefact_path(self.path, "compare.table").exists():
            return None
        return CompareResult.load(self.path)

    @property
    def regression(self) -> Any:
        """The saved ``RegressionResult`` (None when the regress stage has not run)."""
        from canopy_entropy.stats.regression import RegressionResult

        if not artefact_path(self.path, "regression.result").exists():
            return None
        return RegressionResult.load(self.path)

    def save(self, result: Any) -> Any:
        """Persist a result (metrics, comparison, regression) into this run folder."""
        save = getattr(result, "save", None)
        if save is None:
            raise CanopyError(f"{type(result).__name__} cannot be saved into a run folder")
        return save(self.path)


def open_run(path: str | os.PathLike[str]) -> Run:
    """A typed, read-only view of the run folder ``path``."""
    return Run(path)
