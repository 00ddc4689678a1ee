"""Robustness fits of the published analysis: linear mixed models and the Vendi / RSE Beta fits.

On the regression panel (docs/regression.md) (``D``, ``Rbar``, ``Nbar``, task, family, variant, prompt):

- main: ``D ~ Rbar + Nbar + task + family * variant + (1 | prompt)``;
- interaction: ``D ~ R_c * variant + Nbar + task + family + (1 | prompt)``, ``R_c`` = centred
  ``Rbar``;
- quadratic: the interaction model plus ``R_c2 * variant`` (``R_c2 = R_c^2``, R's
  ``I(R_c^2)``); interaction and quadratic fitted by ML and compared by a likelihood-ratio test.

Linear mixed models are fitted with statsmodels ``MixedLM`` on the fixed-effect design of
``stats.formula`` (R's column names and treatment contrasts, as the Beta GLMM). The Vendi and
RSE fits reuse ``stats.beta_glmm`` with the published mean and precision formulas and the
response ``V = (VS - 1) / (M - 1)`` or ``RSE = rse_normalized``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from canopy_entropy.errors import CanopyError, require
from canopy_entropy.stats.beta_glmm import BetaGLMMResult, ConvergenceWarning, fit_beta_glmm
from canopy_entropy.stats.formula import (
    FixedDesign,
    check_full_rank,
    parse_model_formula,
    prepare_factors,
)
from canopy_entropy.stats.regression import (
    KEYS,
    PUBLISHED_MEAN,
    PUBLISHED_PRECISION,
    default_reference,
)

MODELS = ("main", "interaction", "quadratic")


@dataclass(frozen=True, eq=False)
class LMMResult:
    """A fitted linear mixed model with one random intercept: fixed effects (Wald SEs from the
    inverse information), variance components, log-likelihood (ML or REML) and AIC."""

    formula: str
    names: tuple[str, ...]
    params: np.ndarray
    cov: np.ndarray  # covariance of the fixed effects
    group: str
    re_var: float  # variance of the random intercept
    resid_var: float  # residual variance
    loglik: float
    reml: bool
    nobs: int
    ngroups: int
    converged: bool

    @property
    def n_params(self) -> int:
        """Fixed effects plus the two variance parameters."""
        return len(self.params) + 2

    @property
    def aic(self) -> float:
        """``-2 loglik + 2 k`` (from the REML criterion for REML fits, as lme4 reports it)."""
        return -2.0 * self.loglik + 2.0 * self.n_params

    @property
    def bse(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))

    def summary(self) -> pd.DataFrame:
        """Estimate, SE, z and two-sided normal p-value per fixed effect."""
        z = self.params / self.bse
        return pd.DataFrame(
            {"estimate": self.params, "se": self.bse, "z": z, "p": 2 * stats.norm.sf(np.abs(z))},
            index=pd.Index(self.names, name="term"),
        )

    def conf_int(self, level: float = 0.95) -> pd.DataFrame:
        """Wald intervals ``estimate +- z_{(1+level)/2} SE``."""
        if not 0 < level < 1:
            raise CanopyError(f"confidence level must be in (0, 1), got {level}")
        q = stats.norm.ppf(0.5 + level / 2)
        return pd.DataFrame(
            {"lo": self.params - q * self.bse, "hi": self.params + q * self.bse},
            index=pd.Index(self.names, name="term"),
        )


@dataclass(frozen=True, eq=False)
class LRTResult:
    """Likelihood-ratio test of the quadratic against the interaction model (both ML)."""

    interaction: LMMResult
    quadratic: LMMResult
    statistic: float
    df: int
    p_value: float


def fit_mixed(
    data: pd.DataFrame,
    formula: str,
    reference: dict[str, str] | None = None,
    reml: bool = True,
) -> LMMResult:
    """Fit ``"y ~ fixed + (1 | group)"`` (exactly one random intercept) with statsmodels MixedLM.

    Like ``lme4::lmer(formula, REML = reml)``; ``reference`` maps factor columns to their
    reference level (treatment contrasts).
    """
    sm = require("statsmodels.regression.mixed_linear_model", "regress")
    parsed = parse_model_formula(formula)
    if parsed.response is None or parsed.response not in data.columns:
        raise CanopyError(f"formula {formula!r} needs a response column of the data")
    if len(parsed.groups) != 1:
        raise CanopyError(
            f"formula {formula!r} needs exactly one random intercept '(1 | group)', "
            f"found {len(parsed.groups)}"
        )
    group = parsed.groups[0]
    if group not in data.columns:
        raise CanopyError(f"grouping column {group!r} of '(1 | {group})' is not in the data")
    y = pd.to_numeric(data[parsed.response], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(y).all():
        raise CanopyError(
            f"response {parsed.response!r} has {int((~np.isfinite(y)).sum())} missing or "
            "non-numeric values; drop those rows first"
        )
    frame = prepare_factors(data, [], reference)
    design, X = FixedDesign.fit(parsed.fixed, frame, "fixed-effect")
    check_full_rank(X, design.names, "fixed-effect")
    groups = data[group].astype(str).to_numpy()
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise CanopyError(f"grouping factor {group!r} needs at least two levels")
    model = sm.MixedLM(y, X, groups=groups)
    # gradient methods first (lbfgs takes no gtol); Powell when they stall, e.g. at a
    # zero random-intercept variance; the better of the converged fits is kept
    fit, problems = _try_fit(model, reml, ["bfgs", "cg"], gtol=1e-7, maxiter=2000)
    if fit is None or problems:
        retry, retry_problems = _try_fit(model, reml, ["powell", "nm"], maxiter=20000)
        if retry is not None and (fit is None or not retry_problems or retry.llf > fit.llf):
            fit, problems = retry, retry_problems
    if fit is None:
        raise CanopyError(
            f"{formula}: the mixed model cannot be fitted (singular information matrix); "
            "check for collinear or constant columns"
        )
    converged = not problems
    if problems:
        warnings.warn(
            f"{formula}: the mixed-model optimiser did not converge cleanly "
            f"({'; '.join(problems)}); the estimates may be off",
            ConvergenceWarning,
            stacklevel=2,
        )
    re_var = float(np.asarray(fit.cov_re)[0, 0])
    if re_var <= 1e-8 * float(fit.scale):
        warnings.warn(
            f"{formula}: the random-intercept variance is estimated at 0 (a boundary fit: the "
            f"model reduces to ordinary least squares)",
            UserWarning,
            stacklevel=2,
        )
    cov = _fixed_cov(X, groups, re_var, float(fit.scale))
    return LMMResult(
        formula=formula,
        names=tuple(design.names),
        params=np.asarray(fit.fe_params, dtype=float),
        cov=cov,
        group=group,
        re_var=re_var,
        resid_var=float(fit.scale),
        loglik=float(fit.llf),
        reml=reml,
        nobs=len(y),
        ngroups=n_groups,
        converged=converged,
    )


def _try_fit(model, reml: bool, methods: list[str], **kwargs):
    """``(fit, problems)``: a statsmodels fit (None when its information matrix is singular)
    and its convergence complaints; other warnings pass through."""
    sm_warn = require("statsmodels.tools.sm_exceptions", "regress").ConvergenceWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = model.fit(reml=reml, method=methods, **kwargs)
        except np.linalg.LinAlgError:
            return None, ["singular information matrix"]
    problems = []
    for w in caught:
        text = str(w.message).splitlines()[0]
        if text.startswith(("Retrying MixedLM", "The MLE may be on the boundary")):
            continue  # a retry that then converged; statsmodels' boundary test is absolute
        if issubclass(w.category, sm_warn):
            problems.append(text)
        else:
            warnings.warn(w.message, w.category, stacklevel=3)
    if not getattr(fit, "converged", True) and not problems:
        problems.append("no convergence")
    return fit, problems


def _fixed_cov(X: np.ndarray, groups: np.ndarray, re_var: float, resid_var: float) -> np.ndarray:
    """``(X' V^-1 X)^-1`` at the estimated variances, as lme4's ``vcov`` (statsmodels' own
    covariance inverts the observed information including the variance parameters).

    Per group ``V_g^-1 = (I - g / (1 + n_g g) 11') / s2`` with ``g = sb2 / s2``.
    """
    _, codes = np.unique(groups, return_inverse=True)
    sums = np.zeros((codes.max() + 1, X.shape[1]))
    np.add.at(sums, codes, X)
    n_g = np.bincount(codes).astype(float)
    gamma = re_var / resid_var
    w = gamma / (1.0 + n_g * gamma)
    info = (X.T @ X - (sums * w[:, None]).T @ sums) / resid_var
    return np.linalg.inv(info)


def lmm_formula(panel: pd.DataFrame, model: str) -> str:
    """The published formula of ``model`` (main, interaction, quadratic) for this panel: a
    task or family with a single level is left out (it would duplicate the intercept)."""
    if model not in MODELS:
        raise CanopyError(f"unknown mixed model '{model}'; use one of {', '.join(MODELS)}")
    task = panel["task"].nunique() > 1
    family = panel["family"].nunique() > 1
    if model == "main":
        terms = ["Rbar", "Nbar", *(["task"] if task else [])]
        terms.append("family * variant" if family else "variant")
    else:
        terms = ["R_c * variant"]
        if model == "quadratic":
            terms.append("R_c2 * variant")
        terms += ["Nbar", *(["task"] if task else []), *(["family"] if family else [])]
    return "D ~ " + " + ".join(terms) + " + (1 | prompt)"


def lmm_panel(panel: pd.DataFrame) -> pd.DataFrame:
    """The panel plus ``R_c`` (Rbar centred on the panel mean) and ``R_c2 = R_c^2``."""
    missing = [c for c in ("D", "Rbar", "Nbar", "task", "family", "variant", "prompt")
               if c not in panel.columns]  # fmt: skip
    if missing:
        raise CanopyError(f"the regression panel lacks column(s) {', '.join(missing)}")
    out = panel.copy()
    rbar = out["Rbar"].to_numpy(dtype=float)
    out["R_c"] = rbar - rbar.mean()
    out["R_c2"] = out["R_c"] ** 2
    return out


def fit_lmm(
    panel: pd.DataFrame,
    model: str = "main",
    reference: dict[str, str] | None = None,
    reml: bool = False,
) -> LMMResult:
    """Fit one of the published linear mixed models on the panel (ML unless ``reml``).

    Reference levels as the Beta fit: variant ``base``, the first task alphabetically.
    """
    data = lmm_panel(panel)
    ref = default_reference(data, reference)
    return fit_mixed(data, lmm_formula(data, model), reference=ref, reml=reml)


def quadratic_test(panel: pd.DataFrame, reference: dict[str, str] | None = None) -> LRTResult:
    """Interaction vs quadratic model, both by ML: ``2 (l_quad - l_int)`` against chi-square
    with as many degrees of freedom as added terms (2: ``R_c2`` and its variant interaction)."""
    inter = fit_lmm(panel, "interaction", reference, reml=False)
    quad = fit_lmm(panel, "quadratic", reference, reml=False)
    df = len(quad.params) - len(inter.params)
    statistic = max(2.0 * (quad.loglik - inter.loglik), 0.0)
    return LRTResult(inter, quad, statistic, df, float(stats.chi2.sf(statistic, df)))


# ------------------------------------------------------------------ Vendi and RSE Beta fits
def _response_formula(response: str) -> str:
    return response + " ~ " + PUBLISHED_MEAN.split("~", 1)[1].strip()


def vendi_panel_from_frames(panel: pd.DataFrame, diversity: pd.DataFrame) -> pd.DataFrame:
    """The regression panel plus ``V = (VS - 1) / (M - 1)`` (Vendi rescaled to [0, 1])."""
    missing = [c for c in (*KEYS, "vendi", "n_rollouts") if c not in diversity.columns]
    if missing:
        raise CanopyError(
            f"semantic/prompt_diversity.parquet lacks column(s) {', '.join(missing)}; "
            "re-create it with 'canopy embed'"
        )
    right = diversity[[*KEYS, "vendi", "n_rollouts"]]
    out = panel.merge(right, on=KEYS, how="left", validate="one_to_one")
    m = out["n_rollouts"].to_numpy(dtype=float)
    vs = out["vendi"].to_numpy(dtype=float)
    bad = ~np.isfinite(vs) | ~(m >= 2)
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} panel row(s) without a Vendi score (or fewer than 2 rollouts) "
            "dropped",
            UserWarning,
            stacklevel=2,
        )
        out, vs, m = out[~bad], vs[~bad], m[~bad]
    v = (vs - 1.0) / (m - 1.0)
    if ((v < -1e-6) | (v > 1 + 1e-6)).any():
        raise CanopyError(
            "a Vendi score lies outside [1, M]; the diversity table is damaged: re-run "
            "'canopy embed'"
        )
    out = out.copy()
    out["V"] = np.clip(v, 0.0, 1.0)
    return out.reset_index(drop=True)


def vendi_panel(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The Vendi regression panel of a run (after ``canopy embed``)."""
    from canopy_entropy.metrics import current_metrics
    from canopy_entropy.stats.regression import panel_from_metrics

    metrics = current_metrics(run_dir)  # its prompts carry the merged vendi and n_rollouts
    return vendi_panel_from_frames(panel_from_metrics(metrics), metrics.prompts)


def rse_panel_from_frames(metrics: pd.DataFrame, rse: pd.DataFrame) -> pd.DataFrame:
    """Per-prompt metrics joined with RSE: the regression panel (docs/regression.md) with response ``RSE``
    (= ``rse_normalized``) in place of ``D``."""
    for name, frame, cols in (
        ("metrics/prompts.parquet", metrics, [*KEYS, "entropy_rate", "mean_length"]),
        ("semantic/rse.parquet", rse, [*KEYS, "rse_normalized"]),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise CanopyError(f"{name} lacks column(s) {', '.join(missing)}; re-create it")
    left = metrics[[*KEYS, "entropy_rate", "mean_length"]]
    panel = left.merge(rse[[*KEYS, "rse_normalized"]], on=KEYS, how="inner", validate="one_to_one")
    if panel.empty:
        raise CanopyError(
            "no prompt is in both the metrics and the RSE table; run 'canopy semantic-entropy' "
            "on the same run"
        )
    if len(panel) < len(rse):
        warnings.warn(
            f"{len(rse) - len(panel)} RSE row(s) without metrics were left out",
            UserWarning,
            stacklevel=2,
        )
    panel = panel.rename(
        columns={"entropy_rate": "Rbar", "mean_length": "Nbar", "rse_normalized": "RSE"}
    )
    from canopy_entropy.stats.regression import finish_panel

    return finish_panel(panel, "RSE")


def rse_panel(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The RSE regression panel of a run (after ``canopy semantic-entropy``)."""
    from canopy_entropy.metrics import current_metrics
    from canopy_entropy.run.layout import artefact_path
    from canopy_entropy.semantic.rse import read_rse

    run = Path(run_dir)
    rse = read_rse(run)
    if rse is None:
        raise CanopyError(f"{artefact_path(run, 'semantic.rse')} is missing; run "
                          f"'canopy semantic-entropy {run}' first")  # fmt: skip
    return rse_panel_from_frames(current_metrics(run).prompts, rse)


def fit_vendi(panel: pd.DataFrame, reference: dict[str, str] | None = None) -> BetaGLMMResult:
    """The published Beta specification with response ``V = (VS - 1) / (M - 1)``."""
    if "V" not in panel.columns:
        raise CanopyError("the panel has no column V; build it with vendi_panel(run_dir)")
    ref = default_reference(panel, reference)
    return fit_beta_glmm(panel, _response_formula("V"), PUBLISHED_PRECISION, reference=ref)


def fit_rse(panel: pd.DataFrame, reference: dict[str, str] | None = None) -> BetaGLMMResult:
    """The published Beta specification with response ``RSE = rse_normalized`` (values at 0
    or 1 are clipped to [1e-6, 1 - 1e-6] with a warning, as for D)."""
    if "RSE" not in panel.columns:
        raise CanopyError("the panel has no column RSE; build it with rse_panel(run_dir)")
    ref = default_reference(panel, reference)
    return fit_beta_glmm(panel, _response_formula("RSE"), PUBLISHED_PRECISION, reference=ref)
