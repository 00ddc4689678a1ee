"""docs/regression.md: the regression panel of a run and the published Beta GLMM fit.

``build_panel(run_dir)`` joins per-prompt diversity ``D`` with entropy rate ``Rbar`` and mean
length ``Nbar`` (one row per task x prompt x family x variant), clips ``D`` and z-scores
``Rbar`` and ``1 / Nbar``. ``regress_run(run_dir)`` fits the published specification and writes
RUN/regression/*, RUN/tables/regression.* and the diagnostic figures.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError
from canopy_entropy.run.layout import PROMPT_KEYS, artefact_path, schema_of
from canopy_entropy.stats.beta_glmm import CLIP, BetaGLMMResult, fit_beta_glmm
from canopy_entropy.store import (
    atomic_write_json,
    atomic_write_table,
    atomic_write_text,
    read_table,
)

PUBLISHED_MEAN = (
    "D ~ R_sc * variant + ns(invN_sc, df = 4) * variant + task + (1 | prompt) + (1 | family)"
)
PUBLISHED_PRECISION = "~ variant * task + ns(invN_sc, df = 3) + R_sc * variant + family"
KEYS = list(PROMPT_KEYS)


def zscore(values: np.ndarray) -> np.ndarray:
    """(x - mean) / sd with the n - 1 denominator, as R's ``scale``."""
    values = np.asarray(values, dtype=np.float64)
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    if not np.isfinite(sd) or sd == 0:
        raise CanopyError("cannot z-score a constant column (all values equal); need variation")
    return (values - values.mean()) / sd


# per-prompt correctness (metrics.accuracy) carried into the panel as covariates / responses
PANEL_EXTRA = ("accuracy", "majority", "pass_at_5", "pass_at_10")


def panel_from_frames(metrics: pd.DataFrame, diversity: pd.DataFrame) -> pd.DataFrame:
    """Join per-prompt metrics and diversity into the regression panel (docs/regression.md)."""
    for name, frame, cols in (
        ("metrics/prompts.parquet", metrics, [*KEYS, "entropy_rate", "mean_length"]),
        ("semantic/prompt_diversity.parquet", diversity, [*KEYS, "diversity"]),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise CanopyError(f"{name} lacks column(s) {', '.join(missing)}; re-create it")
    extra = [c for c in PANEL_EXTRA if c in metrics.columns]  # correctness, when scored
    left = metrics[[*KEYS, "entropy_rate", "mean_length", *extra]]
    right = diversity[[*KEYS, "diversity"]]
    panel = left.merge(right, on=KEYS, how="inner", validate="one_to_one")
    if panel.empty:
        raise CanopyError(
            "no (model, variant, family, task, prompt_id) row is in both the metrics and the "
            "diversity table; run 'canopy embed' on the same run"
        )
    dropped = len(left) + len(right) - 2 * len(panel)
    panel = panel.rename(columns={"entropy_rate": "Rbar", "mean_length": "Nbar", "diversity": "D"})
    if dropped:
        warnings.warn(
            f"{dropped} prompt row(s) present in only one of metrics/diversity were left out",
            UserWarning,
            stacklevel=2,
        )
    panel = finish_panel(panel, "D")
    d = panel["D"].to_numpy(dtype=float)
    n_clip = int(((d < CLIP) | (d > 1 - CLIP)).sum())
    if n_clip:
        warnings.warn(
            f"{n_clip} diversity value(s) outside [{CLIP:g}, {1 - CLIP:g}] clipped",
            UserWarning,
            stacklevel=2,
        )
    panel["D"] = np.clip(d, CLIP, 1 - CLIP)
    return panel


def finish_panel(panel: pd.DataFrame, response: str) -> pd.DataFrame:
    """The shared end of every regression panel: rows with a missing ``response``, rate or
    length dropped (with a warning), sorted, and the derived columns ``prompt``, ``R_sc``
    (z-scored Rbar) and ``invN_sc`` (z-scored 1 / Nbar) added."""
    bad = ~np.isfinite(panel[["Rbar", "Nbar", response]].to_numpy(dtype=float)).all(axis=1)
    bad |= panel["Nbar"].to_numpy(dtype=float) <= 0
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} panel row(s) with missing {response}, entropy rate or length "
            "dropped",
            UserWarning,
            stacklevel=3,
        )
        panel = panel[~bad]
    panel = panel.sort_values(["task", "prompt_id", "family", "variant"]).reset_index(drop=True)
    panel["prompt"] = panel["task"].astype(str) + "/" + panel["prompt_id"].astype(str)
    panel["R_sc"] = zscore(panel["Rbar"].to_numpy())
    panel["invN_sc"] = zscore(1.0 / panel["Nbar"].to_numpy(dtype=float))
    cols = ["task", "prompt", "prompt_id", "family", "variant", "model"]
    extra = [c for c in PANEL_EXTRA if c in panel.columns and c != response]
    return panel[[*cols, response, "Rbar", "Nbar", "R_sc", "invN_sc", *extra]]


def build_panel(run_dir: str | Path) -> pd.DataFrame:
    """The regression panel of a run folder, from its saved (current) metrics, which hold the
    merged semantic diversity."""
    from canopy_entropy.metrics import current_metrics

    return panel_from_metrics(current_metrics(run_dir))


def panel_from_metrics(metrics: Any) -> pd.DataFrame:
    """The regression panel of a ``MetricsResult`` whose prompts carry diversity ``D``."""
    if "diversity" not in metrics.prompts.columns:
        raise CanopyError(
            "these metrics have no semantic diversity; run 'canopy embed' and then "
            "'canopy metrics' on the run"
        )
    return panel_from_frames(metrics.prompts, metrics.prompts)


def default_reference(panel: pd.DataFrame, reference: dict[str, str] | None) -> dict[str, str]:
    """The published reference levels: variant 'base', the first task alphabetically, unless given."""
    ref = dict(reference or {})
    variants = set(panel["variant"].astype(str))
    if "variant" not in ref:
        if "base" not in variants:
            raise CanopyError(
                f"no variant 'base' in the panel (variants: {', '.join(sorted(variants))}); "
                "pass --reference variant=NAME"
            )
        ref["variant"] = "base"
    ref.setdefault("task", sorted(panel["task"].astype(str))[0])
    return ref


def interaction_name(result: BetaGLMMResult, main: str = "R_sc") -> str | None:
    """The R name of the ``R_sc`` x non-reference variant interaction, if in the model."""
    for name in result.mean_names:
        parts = name.split(":")
        if len(parts) == 2 and main in parts and any(p.startswith("variant") for p in parts):
            return name
    return None


def result_json(result: BetaGLMMResult, diagnostics: dict | None = None) -> dict:
    """The ``--json`` dictionary plus the slope ratio (when the model has the interaction)."""
    out = result.to_json()
    inter = interaction_name(result)
    out["slope_ratio"] = (
        result.slope_ratio("R_sc", inter) if inter and "R_sc" in result.mean_names else None
    )
    if diagnostics is not None:
        out["diagnostics"] = diagnostics
    return out


def coefficient_table(result: BetaGLMMResult) -> pd.DataFrame:
    """Long table of mean/precision coefficients and random-effect SDs."""
    frames = []
    for part, table in (("mean", result.mean_table()), ("precision", result.precision_table())):
        t = table.reset_index(names="term")
        t.insert(0, "part", part)
        frames.append(t)
    re_rows = pd.DataFrame(
        {
            "part": "re_sd",
            "term": list(result.re_sd),
            "estimate": list(result.re_sd.values()),
            "se": np.nan,
            "z": np.nan,
            "p": np.nan,
        }
    )
    return pd.concat([*frames, re_rows], ignore_index=True)


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"


def table_markdown(table: pd.DataFrame, result: BetaGLMMResult) -> str:
    """Markdown coefficient table with the fit statistics underneath."""
    lines = ["| part | term | estimate | SE | z | p |", "|---|---|---:|---:|---:|---:|"]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.part} | `{row.term}` | {_fmt(row.estimate)} | {_fmt(row.se)} | "
            f"{_fmt(row.z)} | {_fmt(row.p)} |"
        )
    lines.append("")
    lines.append(
        f"logLik = {result.loglik:.4f}, AIC = {result.aic:.4f}, nobs = {result.nobs}, "
        f"groups: {', '.join(f'{k} {v}' for k, v in result.ngroups.items())}, "
        f"converged: {'yes' if result.converged else 'NO'}"
    )
    return "\n".join(lines) + "\n"


def table_latex(table: pd.DataFrame) -> str:
    """LaTeX tabular of the coefficient table."""

    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%")):
            s = s.replace(a, b)
        return s

    lines = [r"\begin{tabular}{llrrrr}", r"\hline", r"part & term & estimate & SE & $z$ & $p$ \\"]
    lines.append(r"\hline")
    for row in table.itertuples(index=False):
        cells = [esc(row.part), r"\texttt{" + esc(row.term) + "}"]
        cells += [_fmt(v) for v in (row.estimate, row.se, row.z, row.p)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def mean_curves(result: BetaGLMMResult, panel: pd.DataFrame, n_grid: int = 50) -> pd.DataFrame:
    """Population-level predicted mean D along R_sc per task and variant at median invN_sc."""
    rows = []
    for (task, variant), sub in panel.groupby(["task", "variant"], observed=True, sort=True):
        grid = np.linspace(sub["R_sc"].min(), sub["R_sc"].max(), n_grid)
        frame = pd.DataFrame(
            {
                "task": task,
                "variant": variant,
                "R_sc": grid,
                "invN_sc": float(sub["invN_sc"].median()),
                "family": panel["family"].iloc[0],
                "prompt": "",
            }
        )
        frame["D"] = result.predict(frame, type="response", re=False)
        rows.append(frame[["task", "variant", "R_sc", "invN_sc", "D"]])
    return pd.concat(rows, ignore_index=True)


def write_tables(result: BetaGLMMResult, out_dir: Path, stem: str = "regression") -> None:
    """RUN/tables/regression.csv, .md and .tex."""
    table = coefficient_table(result)
    atomic_write_text(out_dir / f"{stem}.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / f"{stem}.md", table_markdown(table, result))
    atomic_write_text(out_dir / f"{stem}.tex", table_latex(table))


@dataclass
class RegressionResult:
    """A regression of a run: the saved summary (coefficients, SEs, random-effect SDs,
    log-likelihood, AIC, slope ratio, formula, reference levels, diagnostics), the panel, the
    fitted mean curves and residuals; ``fit`` is the fitted model (in memory only)."""

    summary: dict[str, Any]
    panel: pd.DataFrame
    curves: pd.DataFrame | None = None
    residuals: pd.DataFrame | None = None
    fit: BetaGLMMResult | None = None

    def coefficients(self, part: str = "mean") -> pd.DataFrame:
        """The ``mean`` or ``precision`` coefficient table (estimate, se, z, p by term)."""
        if part not in ("mean", "precision"):
            raise CanopyError(f"part must be 'mean' or 'precision', not {part!r}")
        return pd.DataFrame.from_dict(self.summary[part], orient="index").rename_axis("term")

    def save(self, run_dir: str | Path) -> None:
        """Write RUN/regression/ (result.json, panel, curves, diagnostics) atomically."""
        out = {
            "regression.panel": self.panel,
            "regression.curves": self.curves,
            "regression.residuals": self.residuals,
        }
        for name, frame in out.items():
            path = artefact_path(run_dir, name)
            if frame is None:
                path.unlink(missing_ok=True)  # never leave an earlier fit's file beside this one
                continue
            atomic_write_table(path, pa.Table.from_pandas(frame, preserve_index=False),
                               schema_of(name))  # fmt: skip
        diag = self.summary.get("diagnostics")
        diag_path = artefact_path(run_dir, "regression.diagnostics")
        if diag is None:
            diag_path.unlink(missing_ok=True)
        else:
            atomic_write_json(diag_path, diag)
        atomic_write_json(artefact_path(run_dir, "regression.result"), self.summary)

    @classmethod
    def load(cls, run_dir: str | Path) -> RegressionResult:
        """Read RUN/regression/ (verified)."""
        path = artefact_path(run_dir, "regression.result")
        if not path.exists():
            raise CanopyError(f"{run_dir} has no regression; run 'canopy regress {run_dir}' first")
        try:
            summary = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CanopyError(f"{path} is damaged ({exc}); re-run 'canopy regress'") from exc

        def frame(name: str) -> pd.DataFrame | None:
            p = artefact_path(run_dir, name)
            return read_table(p, schema_of(name)).to_pandas() if p.exists() else None

        return cls(summary=summary, panel=frame("regression.panel"),
                   curves=frame("regression.curves"), residuals=frame("regression.residuals"))  # fmt: skip


def regress(
    panel: pd.DataFrame,
    *,
    diagnostics: bool = True,
    nsim: int = 250,
    seed: int = 0,
    reference: dict[str, str] | None = None,
    mean: str = PUBLISHED_MEAN,
    precision: str = PUBLISHED_PRECISION,
) -> RegressionResult:
    """Fit the Beta mixed model (default: the published specification) on a panel, with
    DHARMa-style diagnostics; nothing is written."""
    from canopy_entropy.stats.dharma import run_diagnostics

    ref = default_reference(panel, reference)
    result = fit_beta_glmm(panel, mean, precision, reference=ref)
    diag = run_diagnostics(result, nsim=nsim, seed=seed) if diagnostics else None
    summary = result_json(result, diag.to_json() if diag is not None else None)
    summary["formula"] = {"mean": mean, "precision": precision}
    summary["reference"] = ref
    curves = None
    if {"R_sc", "invN_sc", "task", "variant"} <= set(panel.columns):
        try:  # only when the mean model uses no other columns
            curves = mean_curves(result, panel)
        except CanopyError:
            curves = None
    return RegressionResult(
        summary=summary,
        panel=panel,
        curves=curves,
        residuals=diag.residuals if diag is not None else None,
        fit=result,
    )


def regress_run(
    run_dir: str | Path,
    diagnostics: bool = True,
    nsim: int = 250,
    seed: int = 0,
    reference: dict[str, str] | None = None,
    mean: str = PUBLISHED_MEAN,
    precision: str = PUBLISHED_PRECISION,
) -> RegressionResult:
    """The regress stage: fit on the run's saved metrics and write every regression output."""
    run = Path(run_dir)
    return regress_panel(build_panel(run), run, diagnostics, nsim, seed, reference, mean, precision)


def regress_panel(
    panel: pd.DataFrame,
    run: Path,
    diagnostics: bool = True,
    nsim: int = 250,
    seed: int = 0,
    reference: dict[str, str] | None = None,
    mean: str = PUBLISHED_MEAN,
    precision: str = PUBLISHED_PRECISION,
) -> RegressionResult:
    """Fit on a ready panel and write RUN/regression, RUN/tables and the diagnostic figures."""
    from canopy_entropy.stats.dharma import plot_diagnostics, run_diagnostics

    result = regress(panel, diagnostics=False, reference=reference, mean=mean, precision=precision)
    if diagnostics:
        diag = run_diagnostics(result.fit, nsim=nsim, seed=seed)
        result.summary["diagnostics"] = diag.to_json()
        result.residuals = diag.residuals
        plot_diagnostics(diag, run / "figures", "regression")
    else:  # never leave diagnostics figures of an earlier fit next to this one
        for k in ("qq", "resid"):
            for e in ("png", "pdf"):
                (run / "figures" / f"regression_{k}.{e}").unlink(missing_ok=True)
    result.save(run)
    write_tables(result.fit, run / "tables")
    return result


# --------------------------------------------------- robustness models (``regress --model``)
MODELS = ("beta", "lmm", "quadratic", "vendi", "rse")


def lmm_json(fit: Any) -> dict:
    """A linear mixed fit (``stats.lmm.LMMResult``) as JSON: coefficient table with 95% Wald
    intervals, variance components, log-likelihood and AIC."""
    table = fit.summary().join(fit.conf_int())
    return {
        "formula": fit.formula,
        "coefficients": {
            str(term): {k: _json_float(row[k]) for k in ("estimate", "se", "z", "p", "lo", "hi")}
            for term, row in table.iterrows()
        },
        "re_var": float(fit.re_var),
        "resid_var": float(fit.resid_var),
        "loglik": float(fit.loglik),
        "aic": float(fit.aic),
        "reml": bool(fit.reml),
        "nobs": int(fit.nobs),
        "ngroups": int(fit.ngroups),
        "converged": bool(fit.converged),
    }


def _json_float(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def model_panel(run_dir: str | Path, model: str) -> pd.DataFrame:
    """The panel robustness model ``model`` is fitted on: the diversity panel (lmm,
    quadratic), plus ``V`` from the Vendi score (vendi), or with ``RSE`` as response (rse)."""
    from canopy_entropy.stats import lmm

    check_model(model)
    if model == "vendi":
        return lmm.vendi_panel(run_dir)
    if model == "rse":
        return lmm.rse_panel(run_dir)
    return build_panel(run_dir)


def check_model(model: str) -> None:
    """A one-line error for a model name that is not one of :data:`MODELS`."""
    if model not in MODELS:
        raise CanopyError(f"unknown regression model {model!r}; choose from {', '.join(MODELS)}")


def fit_model(panel: pd.DataFrame, model: str, reference: dict[str, str] | None = None) -> dict:
    """Fit robustness model ``model`` (not ``beta``) on a ready panel; its result.json.

    ``lmm``: the main and interaction linear mixed models (ML); ``quadratic``: the interaction
    and quadratic models and their likelihood-ratio test; ``vendi`` / ``rse``: the published
    Beta specification with response ``V`` / ``RSE``.
    """
    from canopy_entropy.stats import lmm

    check_model(model)
    if model == "beta":
        raise CanopyError("the beta model is fitted by regress(); fit_model fits the others")
    ref = default_reference(panel, reference)
    out: dict[str, Any] = {"model": model, "reference": ref}
    if model == "lmm":
        fits = {name: lmm.fit_lmm(panel, name, ref) for name in ("main", "interaction")}
        out["fits"] = {name: lmm_json(f) for name, f in fits.items()}
    elif model == "quadratic":
        test = lmm.quadratic_test(panel, ref)
        out["fits"] = {
            "interaction": lmm_json(test.interaction),
            "quadratic": lmm_json(test.quadratic),
        }
        out["lrt"] = {"statistic": test.statistic, "df": test.df, "p_value": test.p_value}
    else:
        fit = lmm.fit_vendi(panel, ref) if model == "vendi" else lmm.fit_rse(panel, ref)
        response = "V" if model == "vendi" else "RSE"
        out.update(result_json(fit))
        out["response"] = response
        out["formula"] = {
            "mean": response + " ~ " + PUBLISHED_MEAN.split("~", 1)[1].strip(),
            "precision": PUBLISHED_PRECISION,
        }
    return out


def regress_model_run(
    run_dir: str | Path, model: str, reference: dict[str, str] | None = None
) -> dict:
    """Fit robustness model ``model`` on a run and write ``RUN/regression/<model>/result.json``."""
    summary = fit_model(model_panel(run_dir, model), model, reference)
    write_model_result(Path(run_dir) / "regression", summary)
    return summary


def write_model_result(folder: Path, summary: dict) -> Path:
    """``folder/<model>/result.json`` of a robustness fit (atomic)."""
    path = Path(folder) / summary["model"] / "result.json"
    atomic_write_json(path, summary)
    return path
