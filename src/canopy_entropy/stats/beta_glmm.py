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
from scipy import optimize, special, stats

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
        return [codes + off for codes, off in zip(self.group_codes, offsets, strict=False)]


def _trigamma_np(x: np.ndarray) -> np.ndarray:
    """Trigamma via torch (scipy's polygamma goes through a slow zeta)."""
    torch = _torch()
    return torch.polygamma(1, torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _tetragamma(x):
    """psi''(x) for x > 0 in torch: upward recurrence to x >= 10, then the asymptotic series.

    torch's own polygamma(2, .) is ~15x slower and dominates the outer gradient otherwise.
    """
    torch = _torch()
    acc = torch.zeros_like(x)
    xs = x
    for _ in range(10):
        small = xs < 10
        acc = acc - torch.where(small, 2.0 / xs**3, torch.zeros_like(xs))
        xs = torch.where(small, xs + 1.0, xs)
    inv = 1.0 / xs
    inv2 = inv * inv
    series = inv2 * (
        -1.0
        - inv
        + inv2
        * (
            -0.5
            + inv2
            * (
                1.0 / 6
                + inv2 * (-1.0 / 6 + inv2 * (0.3 + inv2 * (-5.0 / 6 + inv2 * (691.0 / 210))))
            )
        )
    )
    return acc + series


def _trigamma_function():
    """torch autograd.Function for trigamma with the fast tetragamma as its derivative."""
    torch = _torch()
    global _TRIGAMMA
    if _TRIGAMMA is None:

        class Trigamma(torch.autograd.Function):
            @staticmethod
            def forward(x):
                return torch.polygamma(1, x)

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(inputs[0])

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensors
                return grad * _tetragamma(x)

        _TRIGAMMA = Trigamma
    return _TRIGAMMA


_TRIGAMMA = None


def _beta_terms(eta, phi, log_y, log_1my):
    """Per-row Beta log density and its first two eta-derivatives (numpy, logit link)."""
    mu = special.expit(eta)
    one_m_mu = special.expit(-eta)
    a, b = mu * phi, one_m_mu * phi
    with np.errstate(all="ignore"):
        return _beta_terms_inner(mu, one_m_mu, a, b, phi, log_y, log_1my)


def _beta_terms_inner(mu, one_m_mu, a, b, phi, log_y, log_1my):
    ell = (
        special.gammaln(phi)
        - special.gammaln(a)
        - special.gammaln(b)
        + (a - 1) * log_y
        + (b - 1) * log_1my
    )
    v = mu * one_m_mu
    resid = (log_y - log_1my) - (special.digamma(a) - special.digamma(b))
    d1 = phi * v * resid
    d2 = phi * v * (1 - 2 * mu) * resid - phi**2 * v**2 * (_trigamma_np(a) + _trigamma_np(b))
    return ell, d1, d2


class _BlockHessian:
    """Negative Hessian of the joint density in the random effects, by block elimination.

    Random intercepts of one factor never share a row, so the block of the largest factor
    (stacked first) is diagonal; the other factors form a small dense Schur complement ``S``.
    """

    def __init__(self, lap: _Laplace, w: np.ndarray, prec: np.ndarray):
        mb, mr = lap.m_big, lap.m - lap.m_big
        self.mb, self.mr = mb, mr
        self.d_big = np.bincount(lap.big_codes, weights=w, minlength=mb) + prec[:mb]
        if not np.all(self.d_big > 0):
            raise np.linalg.LinAlgError("random-effect Hessian not positive definite")
        self.logdet = float(np.log(self.d_big).sum())
        if mr:
            C = np.zeros(mb * mr)
            for rc in lap.rest_codes:
                C += np.bincount(lap.big_codes * mr + rc, weights=w, minlength=mb * mr)
            C = C.reshape(mb, mr)
            D = np.zeros(mr * mr)
            for ra in lap.rest_codes:
                for rb in lap.rest_codes:
                    D += np.bincount(ra * mr + rb, weights=w, minlength=mr * mr)
            D = D.reshape(mr, mr) + np.diag(prec[mb:])
            self.A = C / self.d_big[:, None]
            S = D - C.T @ self.A
            chol = np.linalg.cholesky(S)
            self.logdet += 2 * float(np.log(np.diag(chol)).sum())
            eye = np.eye(mr)
            self.S_inv = np.linalg.solve(chol.T, np.linalg.solve(chol, eye))
        else:
            self.A = np.zeros((mb, 0))
            self.S_inv = np.zeros((0, 0))

    def solve(self, g: np.ndarray) -> np.ndarray:
        """H^{-1} g."""
        g_big, g_rest = g[: self.mb], g[self.mb :]
        x_rest = self.S_inv @ (g_rest - self.A.T @ g_big)
        return np.concatenate([g_big / self.d_big - self.A @ x_rest, x_rest])

    def leverage_and_diag(self, lap: _Laplace) -> tuple[np.ndarray, np.ndarray]:
        """``s_i = (Z H^-1 Z')_ii`` per row and ``diag(H^-1)``."""
        AS = self.A @ self.S_inv
        h_bb = 1.0 / self.d_big + (AS * self.A).sum(axis=1)
        s = h_bb[lap.big_codes]
        for rc in lap.rest_codes:
            s = s - 2 * AS[lap.big_codes, rc]
            for rc2 in lap.rest_codes:
                s = s + self.S_inv[rc, rc2]
        return s, np.concatenate([h_bb, np.diag(self.S_inv)])


class _Laplace:
    """Laplace log-likelihood of a Beta GLMM with crossed random intercepts."""

    def __init__(self, problem: _Problem):
        torch = _torch()
        self.torch = torch
        self.problem = problem
        y = problem.y
        self.log_y_np, self.log_1my_np = np.log(y), np.log1p(-y)
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        self.log_y, self.log_1my = t(self.log_y_np), t(self.log_1my_np)
        self.ystar = self.log_y - self.log_1my
        self.X_np, self.W_np = problem.X, problem.W
        self.X, self.W = t(problem.X), t(problem.W)
        self.p, self.q = problem.X.shape[1], problem.W.shape[1]
        self.k = len(problem.group_sizes)
        self.m = problem.n_re
        self.gidx_np = problem.global_index()
        self.gidx = [torch.as_tensor(g, dtype=torch.long) for g in self.gidx_np]
        self.re_factor_np = np.repeat(np.arange(self.k), problem.group_sizes)
        self.re_factor = torch.as_tensor(self.re_factor_np, dtype=torch.long)
        # the first factor is the largest (the caller orders them): its block is diagonal
        self.m_big = problem.group_sizes[0] if self.k else 0
        self.big_codes = self.gidx_np[0] if self.k else np.empty(0, np.int64)
        self.rest_codes = [g - self.m_big for g in self.gidx_np[1:]]
        self.b_mode = np.zeros(self.m)

    def split(self, theta):
        p, q = self.p, self.q
        return theta[:p], theta[p : p + q], theta[p + q :]

    # -- numpy helpers for the inner problem ----------------------------------------------
    def _zb(self, b: np.ndarray) -> np.ndarray:
        out = np.zeros(len(self.log_y_np))
        for g in self.gidx_np:
            out += b[g]
        return out

    def _zt(self, v: np.ndarray) -> np.ndarray:
        out = np.zeros(self.m)
        for g in self.gidx_np:
            out += np.bincount(g, weights=v, minlength=self.m)
        return out

    def solve_mode(self, theta: np.ndarray, b0: np.ndarray | None = None, tol: float = 1e-10):
        """Conditional mode of the random effects by damped Newton; returns (b, block Hessian)."""
        beta, gamma, logsd = self.split(theta)
        prec = np.exp(-2 * logsd)[self.re_factor_np]
        eta_fixed = self.X_np @ beta
        phi = np.exp(self.W_np @ gamma)
        b = (self.b_mode if b0 is None else b0).copy()

        def evaluate(bv):
            ell, d1, d2 = _beta_terms(eta_fixed + self._zb(bv), phi, self.log_y_np, self.log_1my_np)
            f = ell.sum() - 0.5 * (prec * bv * bv).sum()
            return f, self._zt(d1) - prec * bv, -d2

        f, g, w = evaluate(b)
        for _ in range(200):
            if not np.isfinite(f):
                raise np.linalg.LinAlgError("non-finite joint density")
            if np.max(np.abs(g)) < tol:
                break
            damping = 0.0
            for _attempt in range(40):
                try:
                    step = _BlockHessian(self, w, prec + damping).solve(g)
                    break
                except np.linalg.LinAlgError:
                    damping = damping * 10 if damping else 1e-6 * (1 + np.max(np.abs(w)))
                    w = np.maximum(w, 0.0)
            scale = 1.0
            for _ls in range(50):
                f_new, g_new, w_new = evaluate(b + scale * step)
                if np.isfinite(f_new) and f_new >= f - 1e-12 * abs(f):
                    break
                scale *= 0.5
            b = b + scale * step
            f, g, w = f_new, g_new, w_new
        return b, _BlockHessian(self, w, prec)

    # -- torch pieces for the outer gradient ----------------------------------------------
    def loglik_terms(self, eta, phi):
        """Per-row log density, first and second derivative with respect to eta (torch)."""
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
        trigamma = _trigamma_function().apply
        d2 = phi * v * (1 - 2 * mu) * resid - phi**2 * v**2 * (trigamma(a) + trigamma(b))
        return ell, d1, d2

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

    def laplace_nll(self, theta, b0, solver, leverage, hess0_inv_diag):
        """Gradient surrogate of the negative Laplace log-likelihood (value differs by a constant).

        The mode enters through one Newton step from ``b0`` (value ``b0``, implicit-function
        derivative ``H^-1 d2f/db dtheta``). The log-determinant term is replaced by its
        first-order expansion ``0.5 * (sum_i s_i w_i + sum_r [H^-1]_rr prec_r)`` with
        ``s_i = (Z H^-1 Z')_ii``: the exact gradient of ``0.5 log det H`` without
        differentiating an m x m factorisation. Returns ``(surrogate, log-det part)``.
        """
        torch = self.torch
        beta, gamma, logsd = self.split(theta)
        eta_fixed = self.X @ beta
        phi = torch.exp(self.W @ gamma)
        if self.k == 0:
            ell, _, _ = self.loglik_terms(eta_fixed, phi)
            return -ell.sum(), torch.zeros((), dtype=torch.float64)
        prec = torch.exp(-2 * logsd)[self.re_factor]
        _, d1, _ = self.loglik_terms(eta_fixed + self.zb(b0), phi)
        grad_b = self.zt(d1) - prec * b0
        d_big, A, S_inv = solver
        mb = self.m_big
        g_big, g_rest = grad_b[:mb], grad_b[mb:]
        x_rest = S_inv @ (g_rest - A.T @ g_big)
        b = b0 + torch.cat([g_big / d_big - A @ x_rest, x_rest])  # one Newton step
        ell, _, d2 = self.loglik_terms(eta_fixed + self.zb(b), phi)
        half_logdet = 0.5 * ((leverage * (-d2)).sum() + (hess0_inv_diag * prec).sum())
        loglik = ell.sum() - 0.5 * (prec * b * b).sum() + 0.5 * torch.log(prec).sum()
        return -loglik + half_logdet, half_logdet

    def value_and_grad(self, theta_np: np.ndarray) -> tuple[float, np.ndarray]:
        """Laplace negative log-likelihood and its exact gradient at ``theta``."""
        torch = self.torch
        from torch.func import grad_and_value

        theta_np = np.asarray(theta_np, dtype=np.float64)
        theta = torch.as_tensor(theta_np, dtype=torch.float64)
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        if self.k:
            try:
                b0, block = self.solve_mode(theta_np)
            except np.linalg.LinAlgError:
                return math.inf, np.zeros_like(theta_np)
            self.b_mode = b0
            leverage, inv_diag = block.leverage_and_diag(self)
            solver = (t(block.d_big), t(block.A), t(block.S_inv))
            args = (t(b0), solver, t(leverage), t(inv_diag))
            logdet = block.logdet
        else:
            args, logdet = (None, None, None, None), 0.0
        g, (v, surrogate_part) = grad_and_value(
            lambda th: self.laplace_nll(th, *args), has_aux=True
        )(theta)
        value = float(v) - float(surrogate_part) + 0.5 * logdet
        if not math.isfinite(value):
            return math.inf, np.zeros_like(theta_np)
        return value, g.numpy().copy()

    def hessian(self, theta_np: np.ndarray, step: float = 1e-4) -> np.ndarray:
        """Hessian of the Laplace objective by central differences of the exact gradient."""
        saved = self.b_mode.copy()
        n = len(theta_np)
        out = np.empty((n, n))
        for i in range(n):
            h = step * max(1.0, abs(theta_np[i]))
            up, down = theta_np.copy(), theta_np.copy()
            up[i] += h
            down[i] -= h
            self.b_mode = saved.copy()
            _, g_up = self.value_and_grad(up)
            self.b_mode = saved.copy()
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

    def summary(self) -> pd.DataFrame:
        """Every coefficient: ``part`` (mean on the logit scale, precision on the log scale),
        term, estimate, SE, z and p."""
        parts = [("mean", self.mean_table()), ("precision", self.precision_table())]
        return pd.concat(
            [t.rename_axis("term").reset_index().assign(part=name) for name, t in parts],
            ignore_index=True,
        )[["part", "term", "estimate", "se", "z", "p"]]

    def conf_int(self, level: float = 0.95) -> pd.DataFrame:
        """Wald intervals ``estimate +- z_(1+level)/2 * SE`` for every coefficient."""
        if not 0 < level < 1:
            raise CanopyError(f"level must be in (0, 1), got {level}")
        out = self.summary()
        z = float(stats.norm.ppf(0.5 + level / 2))
        return out.assign(lo=out["estimate"] - z * out["se"], hi=out["estimate"] + z * out["se"])[
            ["part", "term", "lo", "hi"]
        ]

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
    group_codes: dict[str, np.ndarray] = field(default_factory=dict)
    singular: list[str] = field(default_factory=list)

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
                "singular_groups": list(self.singular),
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
        if data[g].isna().any():
            raise CanopyError(
                f"grouping column {g!r} has {int(data[g].isna().sum())} missing values; "
                "drop those rows or give them a level"
            )
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
    # largest factor first: its block of the random-effect Hessian is diagonal
    order = sorted(range(len(groups)), key=lambda i: -sizes[i])
    groups, codes, sizes = (
        [groups[i] for i in order],
        [codes[i] for i in order],
        [sizes[i] for i in order],
    )
    problem = _Problem(y, X, W, codes, sizes)
    lap = _Laplace(problem)
    theta0 = _start_values(problem)

    # dense BFGS: with a few dozen parameters it needs ~5x fewer gradients than L-BFGS
    res = optimize.minimize(
        lap.value_and_grad,
        theta0,
        jac=True,
        method="BFGS",
        options={"maxiter": max_iter, "gtol": 1e-4},
    )
    if not res.success and np.max(np.abs(res.jac)) > 1e-2:
        res = optimize.minimize(
            lap.value_and_grad,
            res.x,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "maxcor": 50, "gtol": 1e-6, "ftol": 1e-14},
        )
    theta = res.x
    value, grad = lap.value_and_grad(theta)
    hess = lap.hessian(theta)
    # Newton polish with the Laplace Hessian: quasi-Newton stops early on flat likelihoods.
    for _ in range(8):
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

    b = lap.b_mode.copy() if lap.k else np.empty(0)
    p, q = X.shape[1], W.shape[1]
    singular = [g for i, g in enumerate(groups) if np.exp(theta[p + q + i]) < 1e-4]
    if singular:
        warnings.warn(
            f"random-effect SD of {', '.join(map(repr, singular))} is essentially zero "
            "(boundary fit); the grouping explains no extra variance",
            UserWarning,
            stacklevel=2,
        )
    re_modes, re_sum = {}, np.zeros(len(y))
    offset = 0
    for g, size, code in zip(groups, sizes, codes, strict=False):
        re_modes[g] = pd.Series(b[offset : offset + size], index=levels[g])
        re_sum += b[offset : offset + size][code]
        offset += size
    fitted_link = X @ theta[:p] + re_sum
    fitted_phi = np.exp(W @ theta[p : p + q])
    ref_levels = {
        col: list(frame[col].cat.categories)
        for col in frame.columns
        if isinstance(frame[col].dtype, pd.CategoricalDtype)
    }
    return BetaGLMMResult(
        mean_names=mean_design.names,
        precision_names=prec_design.names,
        groups=groups,
        theta=theta,
        cov=cov,
        loglik=-value,
        nobs=len(y),
        ngroups={g: s for g, s in zip(groups, sizes, strict=False)},
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
        group_codes=dict(zip(groups, codes, strict=False)),
        singular=singular,
    )
