"""SPEC section 7: the regression panel of a run and the published Beta GLMM fit.

``build_panel(run_dir)`` joins per-prompt diversity ``D`` with entropy rate ``Rbar`` and mean
length ``Nbar`` (one row per task x prompt x family x variant), clips ``D`` and z-scores
``Rbar`` and ``1 / Nbar``. ``regress_run(run_dir)`` fits the published specification and writes
RUN/regression/*, RUN/tables/regression.* and the diagnostic figures.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError
from canopy_entropy.stats.beta_glmm import CLIP, BetaGLMMResult, fit_beta_glmm
from canopy_entropy.store import atomic_write_json, atomic_write_table, atomic_write_text

PUBLISHED_MEAN = (
    "D ~ R_sc * variant + ns(invN_sc, df = 4) * variant + task + (1 | prompt) + (1 | family)"
)
PUBLISHED_PRECISION = "~ variant * task + ns(invN_sc, df = 3) + R_sc * variant + family"
PANEL_SCHEMA_VERSION = "canopy-regression-panel/1"
KEYS = ["model", "variant", "family", "task", "prompt_id"]


def zscore(values: np.ndarray) -> np.ndarray:
    """(x - mean) / sd with the n - 1 denominator, as R's ``scale``."""
    values = np.asarray(values, dtype=np.float64)
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    if not np.isfinite(sd) or sd == 0:
        raise CanopyError("cannot z-score a constant column (all values equal); need variation")
    return (values - values.mean()) / sd


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:
        raise CanopyError(f"cannot read {path} ({exc}); re-create it") from exc


def _prompt_metrics(run: Path) -> pd.DataFrame:
    path = run / "metrics" / "prompts.parquet"
    if not path.exists():
        try:
            from canopy_entropy.metrics import write_metrics
        except ImportError as exc:
            raise CanopyError(f"{path} is missing; run 'canopy metrics {run}' first") from exc
        write_metrics(run)
    return _read_parquet(path)


def panel_from_frames(metrics: pd.DataFrame, diversity: pd.DataFrame) -> pd.DataFrame:
    """Join per-prompt metrics and diversity into the SPEC section 7 panel."""
    for name, frame, cols in (
        ("metrics/prompts.parquet", metrics, [*KEYS, "entropy_rate", "mean_length"]),
        ("semantic/prompt_diversity.parquet", diversity, [*KEYS, "diversity"]),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise CanopyError(f"{name} lacks column(s) {', '.join(missing)}; re-create it")
    left = metrics[[*KEYS, "entropy_rate", "mean_length"]]
    right = diversity[[*KEYS, "diversity"]]
    panel = left.merge(right, on=KEYS, how="inner", validate="one_to_one")
    if panel.empty:
        raise CanopyError(
            "no (model, variant, family, task, prompt_id) row is in both the metrics and the "
            "diversity table; run 'canopy embed' on the same run"
        )
    dropped = len(left) + len(right) - 2 * len(panel)
    panel = panel.rename(columns={"entropy_rate": "Rbar", "mean_length": "Nbar", "diversity": "D"})
    bad = ~np.isfinite(panel[["Rbar", "Nbar", "D"]].to_numpy(dtype=float)).all(axis=1)
    bad |= panel["Nbar"].to_numpy(dtype=float) <= 0
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} panel row(s) with missing D, entropy rate or length dropped",
            UserWarning,
            stacklevel=2,
        )
        panel = panel[~bad]
    if dropped:
        warnings.warn(
            f"{dropped} prompt row(s) present in only one of metrics/diversity were left out",
            UserWarning,
            stacklevel=2,
        )
    panel = panel.sort_values(["task", "prompt_id", "family", "variant"]).reset_index(drop=True)
    d = panel["D"].to_numpy(dtype=float)
    n_clip = int(((d < CLIP) | (d > 1 - CLIP)).sum())
    if n_clip:
        warnings.warn(
            f"{n_clip} diversity value(s) outside [{CLIP:g}, {1 - CLIP:g}] clipped",
            UserWarning,
            stacklevel=2,
        )
    panel["D"] = np.clip(d, CLIP, 1 - CLIP)
    panel["prompt"] = panel["task"].astype(str) + "/" + panel["prompt_id"].astype(str)
    panel["R_sc"] = zscore(panel["Rbar"].to_numpy())
    panel["invN_sc"] = zscore(1.0 / panel["Nbar"].to_numpy(dtype=float))
    cols = ["task", "prompt", "prompt_id", "family", "variant", "model"]
    return panel[[*cols, "D", "Rbar", "Nbar", "R_sc", "invN_sc"]]


def build_panel(run_dir: str | Path) -> pd.DataFrame:
    """The regression panel of a run folder (metrics computed first when missing)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist")
    div_path = run / "semantic" / "prompt_diversity.parquet"
    if not div_path.exists():
        raise CanopyError(f"{div_path} is missing; run 'canopy embed {run}' first")
    return panel_from_frames(_prompt_metrics(run), _read_parquet(div_path))


def default_reference(panel: pd.DataFrame, reference: dict[str, str] | None) -> dict[str, str]:
    """SPEC reference levels: variant 'base', the first task alphabetically, unless given."""
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


def regress_run(
    run_dir: str | Path,
    diagnostics: bool = True,
    nsim: int = 250,
    seed: int = 0,
    reference: dict[str, str] | None = None,
    mean: str = PUBLISHED_MEAN,
    precision: str = PUBLISHED_PRECISION,
) -> dict:
    """Fit the published specification on a run and write every regression output."""
    run = Path(run_dir)
    panel = build_panel(run)
    return regress_panel(panel, run, diagnostics, nsim, seed, reference, mean, precision)


def regress_panel(
    panel: pd.DataFrame,
    run: Path,
    diagnostics: bool = True,
    nsim: int = 250,
    seed: int = 0,
    reference: dict[str, str] | None = None,
    mean: str = PUBLISHED_MEAN,
    precision: str = PUBLISHED_PRECISION,
) -> dict:
    """Fit on a ready panel and write RUN/regression, RUN/tables and RUN/figures outputs."""
    from canopy_entropy.stats.dharma import plot_diagnostics, run_diagnostics

    ref = default_reference(panel, reference)
    result = fit_beta_glmm(panel, mean, precision, reference=ref)
    out = run / "regression"
    diag_json = None
    if diagnostics:
        diag = run_diagnostics(result, nsim=nsim, seed=seed)
        diag_json = diag.to_json()
        atomic_write_json(out / "diagnostics.json", diag_json)
        atomic_write_table(
            out / "diagnostics.parquet",
            pa.Table.from_pandas(diag.residuals, preserve_index=False),
            PANEL_SCHEMA_VERSION,
        )
        plot_diagnostics(diag, run / "figures", "regression")
    else:  # never leave diagnostics of an earlier fit next to this one
        stale = [out / "diagnostics.json", out / "diagnostics.parquet"]
        stale += [
            run / "figures" / f"regression_{k}.{e}" for k in ("qq", "resid") for e in ("png", "pdf")
        ]
        for path in stale:
            path.unlink(missing_ok=True)
    payload = result_json(result, diag_json)
    payload["formula"] = {"mean": mean, "precision": precision}
    payload["reference"] = ref
    atomic_write_json(out / "result.json", payload)
    atomic_write_table(
        out / "panel.parquet",
        pa.Table.from_pandas(panel, preserve_index=False),
        PANEL_SCHEMA_VERSION,
    )
    curves = None
    if {"R_sc", "invN_sc", "task", "variant"} <= set(panel.columns):
        try:  # only when the mean model uses no other columns
            curves = mean_curves(result, panel)
        except CanopyError:
            curves = None
    if curves is not None:
        atomic_write_table(
            out / "curves.parquet",
            pa.Table.from_pandas(curves, preserve_index=False),
            PANEL_SCHEMA_VERSION,
        )
    write_tables(result, run / "tables")
    return payload
