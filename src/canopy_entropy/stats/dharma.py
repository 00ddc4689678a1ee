"""Simulation-based residual diagnostics for a fitted Beta GLMM, like R's DHARMa.

For every row we simulate ``nsim`` responses from the fitted model, either conditional on the
estimated random effects or with freshly drawn ones. The scaled residual is the randomised
share of simulations below the observation, ``(#{sim < obs} + U * (#{sim == obs} + 1)) /
(nsim + 1)``, which is exactly uniform under a correct model. Tests: Kolmogorov-Smirnov
uniformity, DHARMa's two-sided simulation dispersion test (variance of ``obs - fitted``
against the same for each simulated data set) and the binomial outlier test (an observation
outside the simulation envelope has probability ``2 / (nsim + 1)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from canopy_entropy.errors import CanopyError
from canopy_entropy.stats.beta_glmm import CLIP, BetaGLMMResult


def simulate_responses(
    result: BetaGLMMResult, nsim: int, rng: np.random.Generator, conditional: bool = True
) -> np.ndarray:
    """``n x nsim`` Beta draws from the fitted model (REs estimated or freshly drawn)."""
    if nsim < 1:
        raise CanopyError(f"nsim must be at least 1, not {nsim}")
    n = result.nobs
    eta_fixed = result.predict(type="link", re=False)
    if conditional:
        eta = np.repeat((eta_fixed + result._re_sum_fitted)[:, None], nsim, axis=1)
    else:
        eta = np.repeat(eta_fixed[:, None], nsim, axis=1)
        for g, sd in result.re_sd.items():
            levels = result.group_levels[g]
            codes = result.group_codes[g]
            draws = rng.normal(0.0, sd, size=(len(levels), nsim))
            eta = eta + draws[codes]
    mu = 1.0 / (1.0 + np.exp(-eta))
    phi = result.fitted_phi[:, None]
    sims = rng.beta(mu * phi, (1 - mu) * phi, size=(n, nsim))
    return np.clip(sims, CLIP, 1 - CLIP)


def scaled_residuals(observed: np.ndarray, simulated: np.ndarray, rng: np.random.Generator):
    """Randomised PIT residuals: exactly uniform on (0, 1) when the model is right."""
    below = (simulated < observed[:, None]).sum(axis=1)
    ties = (simulated == observed[:, None]).sum(axis=1)
    return (below + rng.uniform(size=len(observed)) * (ties + 1)) / (simulated.shape[1] + 1)


def dispersion_test(observed: np.ndarray, simulated: np.ndarray, fitted: np.ndarray) -> dict:
    """DHARMa's default dispersion test: var(obs - fitted) against var(sim - fitted), two-sided."""
    obs_stat = float(np.var(observed - fitted, ddof=1))
    sim_stat = np.var(simulated - fitted[:, None], axis=0, ddof=1)
    p_greater = float(np.mean(sim_stat >= obs_stat))
    p_less = float(np.mean(sim_stat <= obs_stat))
    return {
        "ratio": obs_stat / float(np.mean(sim_stat)),
        "p": min(2 * min(p_greater, p_less), 1.0),
    }


def outlier_test(observed: np.ndarray, simulated: np.ndarray) -> dict:
    """Binomial test of the share of observations outside the simulation envelope."""
    nsim = simulated.shape[1]
    outside = (observed < simulated.min(axis=1)) | (observed > simulated.max(axis=1))
    k, n = int(outside.sum()), len(observed)
    expected = 2 / (nsim + 1)
    p = stats.binomtest(k, n, expected, alternative="two-sided").pvalue
    return {"outliers": k, "n": n, "expected_rate": expected, "rate": k / n, "p": float(p)}


@dataclass
class Diagnostics:
    """Residuals and test p-values for conditional and unconditional simulations."""

    residuals: pd.DataFrame
    tests: dict

    def to_json(self) -> dict:
        """Plain dictionary for diagnostics.json / the CLI JSON."""
        return self.tests


def run_diagnostics(result: BetaGLMMResult, nsim: int = 250, seed: int = 0) -> Diagnostics:
    """Simulate, compute scaled residuals and the three tests (conditional and unconditional)."""
    if nsim < 250:
        import warnings

        warnings.warn(f"nsim = {nsim} < 250: diagnostics are coarse", UserWarning, stacklevel=2)
    rng = np.random.default_rng(seed)
    observed = result.y
    tests, columns = {"nsim": nsim, "seed": seed}, {}
    for name, conditional in (("conditional", True), ("unconditional", False)):
        sims = simulate_responses(result, nsim, rng, conditional=conditional)
        fitted = result.predict(type="response", re=conditional)
        resid = scaled_residuals(observed, sims, rng)
        ks = stats.kstest(resid, "uniform")
        tests[name] = {
            "ks": {"statistic": float(ks.statistic), "p": float(ks.pvalue)},
            "dispersion": dispersion_test(observed, sims, fitted),
            "outliers": outlier_test(observed, sims),
        }
        columns[f"residual_{name}"] = resid
        columns[f"predicted_{name}"] = fitted
    frame = pd.DataFrame({"observed": observed, **columns})
    return Diagnostics(frame, tests)


def _save(fig, base: Path) -> list[Path]:
    """Save a figure as PNG and PDF atomically, in the figures' style and without creation
    dates (re-runs give identical files)."""
    from canopy_entropy.plots.figures import figure_bytes
    from canopy_entropy.plots.style import restyle
    from canopy_entropy.store import atomic_write_bytes

    restyle(fig)
    paths = []
    for ext in ("png", "pdf"):
        path = base.with_suffix(f".{ext}")
        atomic_write_bytes(path, figure_bytes(fig, ext))
        paths.append(path)
    return paths


def plot_diagnostics(diag: Diagnostics, out_dir: Path, stem: str = "regression") -> list[Path]:
    """QQ plot and residual-vs-predicted plot as PNG and PDF.

    Uses the unconditional simulations (fresh random effects), DHARMa's default for mixed
    models; conditional residuals are known to look under-dispersed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resid = np.sort(diag.residuals["residual_unconditional"].to_numpy())
    n = len(resid)
    expected = (np.arange(1, n + 1) - 0.5) / n
    tests = diag.tests["unconditional"]
    paths = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(expected, resid, ".", ms=3, color="C0")
    ax.plot([0, 1], [0, 1], color="C3", lw=1)
    ax.set_xlabel("expected (uniform)")
    ax.set_ylabel("observed scaled residual")
    ax.set_title("QQ plot of scaled residuals", fontsize=10)
    ax.text(
        0.02,
        0.98,
        f"KS p = {tests['ks']['p']:.3g}\ndispersion p = {tests['dispersion']['p']:.3g}\n"
        f"outlier p = {tests['outliers']['p']:.3g}",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    fig.tight_layout()
    paths += _save(fig, out_dir / f"{stem}_qq")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    pred = diag.residuals["predicted_unconditional"].to_numpy()
    rank = stats.rankdata(pred) / len(pred)
    res = diag.residuals["residual_unconditional"].to_numpy()
    ax.plot(rank, res, ".", ms=3, alpha=0.6, color="C0")
    for q in (0.25, 0.5, 0.75):
        ax.axhline(q, color="C3", ls="--", lw=0.8)
    order = np.argsort(rank)
    window = max(len(res) // 20, 5)
    for q in (0.25, 0.5, 0.75):
        smooth = (
            pd.Series(res[order]).rolling(window, center=True, min_periods=3).quantile(q).to_numpy()
        )
        ax.plot(rank[order], smooth, color="k", lw=1)
    ax.set_xlabel("model prediction (rank transformed)")
    ax.set_ylabel("scaled residual")
    ax.set_ylim(0, 1)
    ax.set_title("Residuals vs predicted", fontsize=10)
    fig.tight_layout()
    paths += _save(fig, out_dir / f"{stem}_resid")
    plt.close(fig)
    return paths
