"""Beta mixed-effects regression fitted like R's glmmTMB (Laplace approximation, ML).

Model: ``y ~ Beta(mu * phi, (1 - mu) * phi)`` with ``logit(mu) = X beta + sum_j b_j[g_j]``,
``log(phi) = W gamma`` and independent random intercepts ``b_j ~ N(0, sd_j^2)`` for crossed
grouping factors. The random effects are integrated out by the Laplace approximation: an inner
Newton solve finds their conditional mode, an outer quasi-Newton (L-BFGS) maximises the Laplace
log-likelihood over ``(beta, gamma, log sd)``. The outer gradient comes from torch.func in
float64; the mode enters through the implicit function theorem (``b(theta) = b0 + H0^{-1}
grad_b f(theta, b0)`` has the value ``b0`` and the derivative ``H^{-1} d2f/db dtheta``), so the
log-determinant term is differentiated exactly as TMB does. Standard errors come from the
Hessian of the Laplace objective (central differences of the exact gradient, as TMB's sdreport).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

from canopy_entropy.errors import CanopyError, require
from canopy_entropy.stats.formula import (
    FixedDesign,
    check_full_rank,
    parse_model_formula,
    prepare_factors,
)

CLIP = 1e-6


class ConvergenceWarning(UserWarning):
    """The optimiser did not reach a clean optimum (large gradient or non-PD Hessian)."""


def _torch():
    torch = require("torch", "regress")
    return torch


@dataclass
class _Problem:
    """Numeric pieces of one fit: response, designs and random-effect index arrays."""

    y: np.ndarray
    X: np.ndarray
    W: np.ndarray
    group_codes: list[np.ndarray]  # per factor: codes into that factor's levels
    group_sizes: list[int]

    @property
    def n_re(self) -> int:
        return int(sum(self.group_sizes))

    def global_index(self) -> list[np.ndarray]:
        """Codes shifted into the stacked random-effect vector."""
        offsets = np.cumsum([0, *self.group_sizes[:-1]])
        return [codes + off for codes, off in zip(self.group_codes, offsets)]


class _Laplace:
    """Laplace log-likelihood of a Beta GLMM with crossed random intercepts (torch float64)."""

    def __init__(self, problem: _Problem):
        torch = _torch()
        self.torch = torch
        self.problem = problem
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        y = problem.y
        self.log_y, self.log_1my = t(np.log(y)), t(np.log1p(-y))
        self.ystar = self.log_y - self.log_1my
        self.X, self.W = t(problem.X), t(problem.W)
        self.p, self.q = problem.X.shape[1], problem.W.shape[1]
        self.k = len(problem.group_sizes)
        self.m = problem.n_re
        self.gidx = [torch.as_tensor(g, dtype=torch.long) for g in problem.global_index()]
        self.re_factor = torch.as_tensor(
            np.repeat(np.arange(self.k), problem.group_sizes), dtype=torch.long
        )
        m = self.m
        self.pair_index = [
            (a * m + b) for a in self.gidx for b in self.gidx
        ]  # flat positions of Z' diag(w) Z contributions
        self.b_mode = torch.zeros(m, dtype=torch.float64)

    # -- pieces ---------------------------------------------------------------------------
    def split(self, theta):
        p, q = self.p, self.q
        return theta[:p], theta[p : p + q], theta[p + q :]

    def zb(self, b):
        out = self.torch.zeros(self.X.shape[0], dtype=self.torch.float64)
        for g in self.gidx:
            out = out + b[g]
        return out

    def zt(self, v):
        out = self.torch.zeros(self.m, dtype=self.torch.float64)
        for g in self.gidx:
            out = out.index_add(0, g, v)
        return out

    def ztwz(self, w):
        torch = self.torch
        flat = torch.zeros(self.m * self.m, dtype=torch.float64)
        for idx in self.pair_index:
            flat = flat.index_add(0, idx, w)
        return flat.reshape(self.m, self.m)

    def loglik_terms(self, eta, phi):
        """Per-row log density, first and second derivative with respect to eta."""
        torch = self.torch
        mu = torch.sigmoid(eta)
        one_m_mu = torch.sigmoid(-eta)
        a, b = mu * phi, one_m_mu * phi
        ell = (
            torch.lgamma(phi)
            - torch.lgamma(a)
            - torch.lgamma(b)
            + (a - 1) * self.log_y
            + (b - 1) * self.log_1my
        )
        v = mu * one_m_mu
        resid = self.ystar - (torch.digamma(a) - torch.digamma(b))
        d1 = phi * v * resid
        d2 = phi * v * (1 - 2 * mu) * resid - phi**2 * v**2 * (
            torch.polygamma(1, a) + torch.polygamma(1, b)
        )
        return ell, d1, d2

    def joint(self, theta, b):
        """Joint log density f(theta, b) (data + random effects), without the 2 pi constant."""
        beta, gamma, logsd = self.split(theta)
        prec = self.torch.exp(-2 * logsd)[self.re_factor] if self.k else b[:0]
        eta = self.X @ beta + self.zb(b)
        phi = self.torch.exp(self.W @ gamma)
        ell, _, _ = self.loglik_terms(eta, phi)
        return ell.sum() - 0.5 * (prec * b * b).sum() + 0.5 * self.torch.log(prec).sum()

    # -- inner problem --------------------------------------------------------------------
    def solve_mode(self, theta, b0=None, tol: float = 1e-10, max_iter: int = 100):
        """Conditional mode of the random effects by damped Newton; returns (b, H)."""
        torch = self.torch
        with torch.no_grad():
            beta, gamma, logsd = self.split(theta)
            b = self.b_mode.clone() if b0 is None else b0.clone()
            if self.k == 0:
                return b, torch.zeros((0, 0), dtype=torch.float64)
            prec = torch.exp(-2 * logsd)[self.re_factor]
            eta_fixed = self.X @ beta
            phi = torch.exp(self.W @ gamma)

            def evaluate(bv):
                ell, d1, d2 = self.loglik_terms(eta_fixed + self.zb(bv), phi)
                f = ell.sum() - 0.5 * (prec * bv * bv).sum()
                g = self.zt(d1) - prec * bv
                return f, g, d2

            f, g, d2 = evaluate(b)
            hess = None
            for _ in range(max_iter):
                hess = self.ztwz(-d2) + torch.diag(prec)
                if float(g.abs().max()) < tol:
                    break
                damping = 0.0
                for _attempt in range(30):
                    try:
                        chol = torch.linalg.cholesky(
                            hess + damping * torch.eye(self.m, dtype=torch.float64)
                        )
                        break
                    except RuntimeError:
                        damping = max(1e-8, damping * 10) if damping else 1e-6
                step = torch.cholesky_solve(g[:, None], chol)[:, 0]
                scale = 1.0
                for _ls in range(40):
                    f_new, g_new, d2_new = evaluate(b + scale * step)
                    if bool(torch.isfinite(f_new)) and float(f_new) >= float(f) - 1e-12 * abs(
                        float(f)
                    ):
                        break
                    scale *= 0.5
                b = b + scale * step
                f, g, d2 = f_new, g_new, d2_new
            hess = self.ztwz(-d2) + torch.diag(prec)
            return b, hess

    # -- outer objective ------------------------------------------------------------------
    def laplace_nll(self, theta, b0, hess0_inv):
        """Negative Laplace log-likelihood with b entering through the implicit function."""
        torch = self.torch
        beta, gamma, logsd = self.split(theta)
        eta_fixed = self.X @ beta
        phi = torch.exp(self.W @ gamma)
        if self.k == 0:
            ell, _, _ = self.loglik_terms(eta_fixed, phi)
            return -ell.sum()
        prec = torch.exp(-2 * logsd)[self.re_factor]
        _, d1, _ = self.loglik_terms(eta_fixed + self.zb(b0), phi)
        grad_b = self.zt(d1) - prec * b0
        b = b0 + hess0_inv @ grad_b  # one Newton step: value b0, IFT derivative
        ell, _, d2 = self.loglik_terms(eta_fixed + self.zb(b), phi)
        hess = self.ztwz(-d2) + torch.diag(prec)
        chol = torch.linalg.cholesky(hess)
        logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        loglik = ell.sum() - 0.5 * (prec * b * b).sum() + 0.5 * torch.log(prec).sum()
        return -(loglik - 0.5 * logdet)

    def value_and_grad(self, theta_np: np.ndarray) -> tuple[float, np.ndarray]:
        """Laplace negative log-likelihood and its exact gradient at ``theta``."""
        torch = self.torch
        from torch.func import grad_and_value

        theta = torch.as_tensor(theta_np, dtype=torch.float64)
        b0, hess = self.solve_mode(theta)
        if self.k:
            try:
                hess_inv = torch.cholesky_inverse(torch.linalg.cholesky(hess))
            except RuntimeError:
                return math.inf, np.zeros_like(theta_np)
            self.b_mode = b0
        else:
            hess_inv = hess
        try:
            g, v = grad_and_value(self.laplace_nll)(theta, b0, hess_inv)
        except RuntimeError:  # Hessian of the random effects not positive definite
            return math.inf, np.zeros_like(theta_np)
        value = float(v)
        if not math.isfinite(value):
            return math.inf, np.zeros_like(theta_np)
        return value, g.numpy().copy()

    def hessian(self, theta_np: np.ndarray, step: float = 1e-4) -> np.ndarray:
        """Hessian of the Laplace objective by central differences of the exact gradient."""
        saved = self.b_mode.clone()
        n = len(theta_np)
        out = np.empty((n, n))
        for i in range(n):
            h = step * max(1.0, abs(theta_np[i]))
            up, down = theta_np.copy(), theta_np.copy()
            up[i] += h
            down[i] -= h
            self.b_mode = saved.clone()
            _, g_up = self.value_and_grad(up)
            self.b_mode = saved.clone()
            _, g_down = self.value_and_grad(down)
            out[i] = (g_up - g_down) / (2 * h)
        self.b_mode = saved
        return 0.5 * (out + out.T)


@dataclass
class BetaGLMMResult:
    """A fitted Beta GLMM: estimates, standard errors, random effects, fit statistics."""

    mean_names: list[str]
    precision_names: list[str]
    groups: list[str]
    theta: np.ndarray
    cov: np.ndarray
    loglik: float
    nobs: int
    ngroups: dict[str, int]
    re_modes: dict[str, pd.Series]
    converged: bool
    max_abs_gradient: float
    hessian_pd: bool
    message: str
    mean_design: FixedDesign
    precision_design: FixedDesign
    group_levels: dict[str, list]
    response: str
    clipped: int = 0
    iterations: int = 0
    fitted_link: np.ndarray = field(default_factory=lambda: np.empty(0))
    fitted_phi: np.ndarray = field(default_factory=lambda: np.empty(0))
    y: np.ndarray = field(default_factory=lambda: np.empty(0))
    reference: dict[str, str] = field(default_factory=dict)
    factor_columns: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return len(self.theta)

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.n_params

    @property
    def beta(self) -> pd.Series:
        return pd.Series(self.theta[: len(self.mean_names)], index=self.mean_names)

    @property
    def gamma(self) -> pd.Series:
        p = len(self.mean_names)
        return pd.Series(self.theta[p : p + len(self.precision_names)], index=self.precision_names)

    @property
    def re_sd(self) -> dict[str, float]:
        p = len(self.mean_names) + len(self.precision_names)
        return {g: float(np.exp(self.theta[p + i])) for i, g in enumerate(self.groups)}

    def _table(self, start: int, names: list[str]) -> pd.DataFrame:
        est = self.theta[start : start + len(names)]
        se = np.sqrt(np.clip(np.diag(self.cov)[start : start + len(names)], 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = est / se
        p = 2 * stats.norm.sf(np.abs(z))
        return pd.DataFrame({"estimate": est, "se": se, "z": z, "p": p}, index=names)

    def mean_table(self) -> pd.DataFrame:
        """Mean-model coefficients (logit scale) with SE, z and p."""
        return self._table(0, self.mean_names)

    def precision_table(self) -> pd.DataFrame:
        """Precision-model coefficients (log scale) with SE, z and p."""
        return self._table(len(self.mean_names), self.precision_names)

    def slope_ratio(
        self, main: str = "R_sc", interaction: str = "R_sc:variantinstruct"
    ) -> dict[str, float]:
        """(b_main + b_interaction) / b_main with a delta-method SE."""
        if main not in self.mean_names or interaction not in self.mean_names:
            raise CanopyError(
                f"slope ratio needs mean terms {main!r} and {interaction!r}; the model has "
                f"{', '.join(self.mean_names)}"
            )
        i, j = self.mean_names.index(main), self.mean_names.index(interaction)
        a, c = self.theta[i], self.theta[j]
        ratio = (a + c) / a
        grad = np.array([-c / a**2, 1 / a])
        cov = self.cov[np.ix_([i, j], [i, j])]
        se = float(np.sqrt(max(grad @ cov @ grad, 0.0)))
        return {
            "estimate": float(ratio),
            "se": se,
            "lo": float(ratio - 1.959963984540054 * se),
            "hi": float(ratio + 1.959963984540054 * se),
            "main": main,
            "interaction": interaction,
        }

    def _frame(self, data: pd.DataFrame) -> pd.DataFrame:
        frame = data.copy()
        for col in self.factor_columns:
            if col in frame.columns and col in self.reference_levels:
                frame[col] = pd.Categorical(frame[col], categories=self.reference_levels[col])
        return frame

    reference_levels: dict[str, list] = field(default_factory=dict)

    def predict(
        self, data: pd.DataFrame | None = None, type: str = "response", re: bool = True
    ) -> np.ndarray:
        """Predicted mean (``type='response'``) or linear predictor (``'link'``).

        ``re=True`` adds the estimated random intercepts (zero for unseen levels); ``re=False``
        gives the population-level prediction.
        """
        if type not in ("response", "link"):
            raise CanopyError(f"predict type must be 'response' or 'link', not {type!r}")
        if data is None:
            eta = self.fitted_link.copy()
            if not re:
                eta = eta - self._re_sum_fitted
        else:
            frame = self._frame(data)
            X = self.mean_design.transform(frame)
            eta = X @ self.beta.to_numpy()
            if re:
                for g in self.groups:
                    if g not in frame.columns:
                        raise CanopyError(f"new data lacks the grouping column {g!r}")
                    modes = self.re_modes[g]
                    keys = frame[g].astype(str)
                    eta = eta + keys.map(modes).fillna(0.0).to_numpy(dtype=float)
        return eta if type == "link" else 1.0 / (1.0 + np.exp(-eta))

    def predict_precision(self, data: pd.DataFrame | None = None) -> np.ndarray:
        """Predicted precision phi."""
        if data is None:
            return self.fitted_phi.copy()
        W = self.precision_design.transform(self._frame(data))
        return np.exp(W @ self.gamma.to_numpy())

    _re_sum_fitted: np.ndarray = field(default_factory=lambda: np.empty(0))

    def to_json(self) -> dict:
        """The ``canopy regress --json`` dictionary with R's term names."""

        def table(df: pd.DataFrame) -> dict:
            return {
                name: {k: _num(row[k]) for k in ("estimate", "se", "z", "p")}
                for name, row in df.iterrows()
            }

        return {
            "mean": table(self.mean_table()),
            "precision": table(self.precision_table()),
            "re_sd": self.re_sd,
            "loglik": float(self.loglik),
            "aic": float(self.aic),
            "nobs": int(self.nobs),
            "ngroups": {k: int(v) for k, v in self.ngroups.items()},
            "converged": bool(self.converged),
            "convergence": {
                "max_abs_gradient": float(self.max_abs_gradient),
                "hessian_positive_definite": bool(self.hessian_pd),
                "message": self.message,
                "iterations": int(self.iterations),
            },
            "clipped_responses": int(self.clipped),
        }


def _num(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _start_values(problem: _Problem) -> np.ndarray:
    """OLS on logit(y) for the mean, method of moments for the precision intercept."""
    y = problem.y
    ystar = np.log(y) - np.log1p(-y)
    beta, *_ = np.linalg.lstsq(problem.X, ystar, rcond=None)
    mu = 1 / (1 + np.exp(-(problem.X @ beta)))
    resid_var = max(float(np.mean((y - mu) ** 2)), 1e-8)
    phi0 = max(float(np.mean(mu * (1 - mu)) / resid_var - 1), 1.0)
    gamma = np.zeros(problem.W.shape[1])
    const = np.flatnonzero(np.all(problem.W == 1.0, axis=0))
    if len(const):
        gamma[const[0]] = math.log(phi0)
    logsd = np.full(len(problem.group_sizes), math.log(0.3))
    return np.concatenate([beta, gamma, logsd])


def fit_beta_glmm(
    data: pd.DataFrame,
    mean: str,
    precision: str = "~ 1",
    reference: dict[str, str] | None = None,
    clip: float = CLIP,
    gtol: float = 1e-3,
    max_iter: int = 2000,
) -> BetaGLMMResult:
    """Fit a Beta GLMM by Laplace ML, like ``glmmTMB(mean, dispformula = precision, beta_family())``.

    ``mean`` is ``"y ~ fixed + (1 | g1) + (1 | g2)"``; ``precision`` is ``"~ fixed"``.
    ``reference`` maps factor columns to their reference level (treatment contrasts).
    """
    mean_f = parse_model_formula(mean)
    prec_f = parse_model_formula(precision if "~" in precision else "~ " + precision)
    if mean_f.response is None:
        raise CanopyError(f"mean formula {mean!r} needs a response, e.g. 'D ~ R_sc * variant'")
    if prec_f.groups:
        raise CanopyError("random effects are not supported in the precision formula")
    if mean_f.response not in data.columns:
        raise CanopyError(
            f"response column {mean_f.response!r} is not in the data (columns: "
            f"{', '.join(map(str, data.columns))})"
        )
    for g in mean_f.groups:
        if g not in data.columns:
            raise CanopyError(f"grouping column {g!r} of '(1 | {g})' is not in the data")
    y_raw = pd.to_numeric(data[mean_f.response], errors="coerce").to_numpy(dtype=float)
    if np.isnan(y_raw).any():
        raise CanopyError(
            f"response {mean_f.response!r} has {int(np.isnan(y_raw).sum())} missing or "
            "non-numeric values; drop those rows first"
        )
    if (y_raw < 0).any() or (y_raw > 1).any():
        raise CanopyError(
            f"response {mean_f.response!r} must lie in [0, 1] for a Beta model; found values "
            f"in [{y_raw.min():.4g}, {y_raw.max():.4g}]"
        )
    at_edge = int(((y_raw <= 0) | (y_raw >= 1)).sum())
    if at_edge:
        warnings.warn(
            f"{at_edge} response value(s) at 0 or 1 clipped to [{clip:g}, {1 - clip:g}]",
            UserWarning,
            stacklevel=2,
        )
    y = np.clip(y_raw, clip, 1 - clip)

    factor_cols = [g for g in mean_f.groups]
    frame = prepare_factors(data, [], reference)
    mean_design, X = FixedDesign.fit(mean_f.fixed, frame, "mean")
    prec_design, W = FixedDesign.fit(prec_f.fixed, frame, "precision")
    check_full_rank(X, mean_design.names, "mean")
    check_full_rank(W, prec_design.names, "precision")

    groups, codes, sizes, levels = [], [], [], {}
    for g in mean_f.groups:
        keys = data[g].astype(str)
        cat = pd.Categorical(keys, categories=sorted(pd.unique(keys)))
        if len(cat.categories) < 2:
            warnings.warn(
                f"grouping factor {g!r} has a single level; its random intercept is not "
                "identifiable (it duplicates the intercept) and was dropped",
                UserWarning,
                stacklevel=2,
            )
            continue
        groups.append(g)
        codes.append(cat.codes.astype(np.int64))
        sizes.append(len(cat.categories))
        levels[g] = list(cat.categories)
    problem = _Problem(y, X, W, codes, sizes)
    lap = _Laplace(problem)
    theta0 = _start_values(problem)

    res = optimize.minimize(
        lap.value_and_grad,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "maxfun": 2 * max_iter, "gtol": 1e-9, "ftol": 1e-15},
    )
    theta = res.x
    value, grad = lap.value_and_grad(theta)
    hess = lap.hessian(theta)
    # Newton polish with the Laplace Hessian: L-BFGS stops early on flat likelihoods.
    for _ in range(5):
        try:
            chol = np.linalg.cholesky(hess)
        except np.linalg.LinAlgError:
            break
        if np.max(np.abs(grad)) < 1e-9:
            break
        step = np.linalg.solve(chol.T, np.linalg.solve(chol, grad))
        cand = theta - step
        cand_value, cand_grad = lap.value_and_grad(cand)
        if not (cand_value <= value + 1e-10 and np.max(np.abs(cand_grad)) < np.max(np.abs(grad))):
            break
        theta, value, grad = cand, cand_value, cand_grad
        if np.max(np.abs(step)) > 1e-3:
            hess = lap.hessian(theta)
    value, grad = lap.value_and_grad(theta)
    try:
        np.linalg.cholesky(hess)
        hessian_pd = True
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        hessian_pd = False
        cov = np.full_like(hess, np.nan)
    max_grad = float(np.max(np.abs(grad))) if len(grad) else 0.0
    converged = bool(math.isfinite(value) and hessian_pd and max_grad < gtol)
    message = str(res.message)
    if not converged:
        reasons = []
        if not hessian_pd:
            reasons.append("the Hessian is not positive definite (parameters not identified?)")
        if max_grad >= gtol:
            reasons.append(f"max |gradient| = {max_grad:.3g} >= {gtol:g}")
        if not math.isfinite(value):
            reasons.append("the log-likelihood is not finite")
        message = "; ".join(reasons) + f" (optimizer: {res.message})"
        warnings.warn(
            "MODEL DID NOT CONVERGE: " + message + ". Estimates and SEs are not trustworthy.",
            ConvergenceWarning,
            stacklevel=2,
        )

    torch = lap.torch
    b = lap.b_mode.numpy().copy() if lap.k else np.empty(0)
    re_modes, re_sum = {}, np.zeros(len(y))
    offset = 0
    for g, size, code in zip(groups, sizes, codes):
        re_modes[g] = pd.Series(b[offset : offset + size], index=levels[g])
        re_sum += b[offset : offset + size][code]
        offset += size
    p, q = X.shape[1], W.shape[1]
    fitted_link = X @ theta[:p] + re_sum
    fitted_phi = np.exp(W @ theta[p : p + q])
    ref_levels = {
        col: list(frame[col].cat.categories)
        for col in frame.columns
        if isinstance(frame[col].dtype, pd.CategoricalDtype)
    }
    del torch
    return BetaGLMMResult(
        mean_names=mean_design.names,
        precision_names=prec_design.names,
        groups=groups,
        theta=theta,
        cov=cov,
        loglik=-value,
        nobs=len(y),
        ngroups={g: s for g, s in zip(groups, sizes)},
        re_modes=re_modes,
        converged=converged,
        max_abs_gradient=max_grad,
        hessian_pd=hessian_pd,
        message=message,
        mean_design=mean_design,
        precision_design=prec_design,
        group_levels=levels,
        response=mean_f.response,
        clipped=at_edge,
        iterations=int(res.nit),
        fitted_link=fitted_link,
        fitted_phi=fitted_phi,
        y=y,
        reference=dict(reference or {}),
        factor_columns=list(ref_levels),
        reference_levels=ref_levels,
        _re_sum_fitted=re_sum,
    )
