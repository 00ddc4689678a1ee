"""canopy-entropy: how a language model spends its uncertainty over whole generations.

The library API (documented in docs/api.md); every name is imported on first use, so
``import canopy_entropy`` stays light::

    import canopy_entropy as ce
    run = ce.open_run("runs/x")                   # typed view; reading writes nothing
    m = run.metrics                               # saved result if current, else in memory
    cmp = ce.compare(m, a="base", b="instruct", by=["family", "task"], n_boot=2000, seed=0)
    fit = ce.fit_beta_glmm(ce.regression_panel(m), mean="D ~ R_sc * variant", precision="~ 1")
    fig = ce.figures.ce_decomposition(m)          # a matplotlib Figure
    run.save(cmp)                                 # persistence only when asked

Stages (each a module with a narrow interface): tasks -> engines (sampling) -> store (Parquet)
-> metrics -> semantic -> stats -> plots/report, driven by ``canopy_entropy.runner``; the run
folder's contract lives in ``canopy_entropy.run``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute" ("module" alone for a submodule)
_EXPORTS = {
    "open_run": "canopy_entropy.run.view:open_run",
    "Run": "canopy_entropy.run.view:Run",
    "Manifest": "canopy_entropy.run.manifest:Manifest",
    "read_manifest": "canopy_entropy.run.manifest:read_manifest",
    "compute_metrics": "canopy_entropy.metrics:compute_metrics",
    "MetricsResult": "canopy_entropy.metrics:MetricsResult",
    "compare": "canopy_entropy.comparison:compare",
    "CompareResult": "canopy_entropy.comparison:CompareResult",
    "regression_panel": "canopy_entropy.stats.regression:panel_from_metrics",
    "regress": "canopy_entropy.stats.regression:regress",
    "RegressionResult": "canopy_entropy.stats.regression:RegressionResult",
    "fit_beta_glmm": "canopy_entropy.stats.beta_glmm:fit_beta_glmm",
    "relaxed_semantic_entropy": "canopy_entropy.semantic.rse:relaxed_semantic_entropy",
    "token_diagnostics": "canopy_entropy.diagnostics:token_diagnostics",
    "series_table": "canopy_entropy.series:series_table",
    "compare_steps": "canopy_entropy.series:compare_steps",
    "compute_phases": "canopy_entropy.metrics.phases:compute_phases",
    "figures": "canopy_entropy.figures",
    "scoring": "canopy_entropy.scoring",
    "CanopyError": "canopy_entropy.errors:CanopyError",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'canopy_entropy' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = importlib.import_module(module)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
