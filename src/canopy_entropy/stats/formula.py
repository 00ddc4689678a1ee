"""R-style model formulas on top of formulaic, with R's column names and a stored ``ns`` basis.

``parse_model_formula("D ~ x * variant + ns(z, df = 4) + task + (1 | prompt) + (1 | family)")``
splits off the response and the random intercepts; ``FixedDesign.fit(rhs, data)`` builds the
fixed-effect design with treatment contrasts (reference level = first category, configurable),
names columns as R's ``model.matrix`` does (``(Intercept)``, ``taskT2``, ``ns(z, df = 4)1``,
``variantinstruct:R_sc`` with variables in formula order) and reuses stored knots and levels
for new data.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from formulaic import model_matrix
from formulaic.transforms import stateful_transform

from canopy_entropy.errors import CanopyError
from canopy_entropy.stats.splines import NaturalSplineBasis

_RANDOM_INTERCEPT = re.compile(r"\(\s*1\s*\|\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\)")
_RANDOM_ANY = re.compile(r"\([^()]*\|[^()]*\)")


@stateful_transform
def ns(x, df: int | None = None, knots=None, _state=None):
    """formulaic stateful transform for R's ``ns``: knots chosen on the fitting data, then reused."""
    values = np.asarray(x, dtype=np.float64)
    if "knots" not in _state:
        basis = NaturalSplineBasis.fit(values, df=df, knots=knots)
        _state["knots"] = list(basis.knots)
        _state["boundary_knots"] = list(basis.boundary_knots)
    basis = NaturalSplineBasis(tuple(_state["knots"]), tuple(_state["boundary_knots"]))
    matrix = basis(values)
    return {str(i + 1): matrix[:, i] for i in range(matrix.shape[1])}


@dataclass(frozen=True)
class ModelFormula:
    """A parsed mean or precision formula: response, fixed-effect right-hand side, groups."""

    response: str | None
    fixed: str
    groups: tuple[str, ...]


def parse_model_formula(text: str) -> ModelFormula:
    """Split ``"y ~ fixed + (1 | g1) + (1 | g2)"`` into response, fixed part and groups."""
    if "~" not in text:
        raise CanopyError(f"formula {text!r} has no '~'; write e.g. 'D ~ R_sc * variant'")
    lhs, rhs = text.split("~", 1)
    response = lhs.strip() or None
    groups = tuple(_RANDOM_INTERCEPT.findall(rhs))
    rest = _RANDOM_INTERCEPT.sub(" ", rhs)
    if _RANDOM_ANY.search(rest):
        bad = _RANDOM_ANY.search(rest).group(0)
        raise CanopyError(
            f"random-effect term {bad!r} is not supported; only random intercepts '(1 | group)'"
        )
    parts = [p.strip() for p in re.split(r"\+(?![^()]*\))", rest)]
    fixed = " + ".join(p for p in parts if p)
    if not fixed:
        fixed = "1"
    if len(set(groups)) != len(groups):
        raise CanopyError(f"formula {text!r} repeats a random intercept group")
    return ModelFormula(response, fixed, groups)


def r_deparse(expr: str) -> str:
    """Render a Python call expression the way R deparses it: ``ns(x, df = 4)``."""
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return expr

    def render(n: ast.AST) -> str:
        if isinstance(n, ast.Call):
            args = [render(a) for a in n.args]
            args += [f"{k.arg} = {render(k.value)}" for k in n.keywords]
            return f"{render(n.func)}({', '.join(args)})"
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            return '"' + n.value + '"'
        return ast.unparse(n)

    return render(node)


def _split_top(name: str, sep: str = ":") -> list[str]:
    """Split a column name on ``sep`` outside brackets and parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(name):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    parts.append(name[start:])
    return parts


def prepare_factors(
    data: pd.DataFrame, factors: list[str], reference: dict[str, str] | None = None
) -> pd.DataFrame:
    """Turn text columns into categoricals with sorted levels, the reference level first."""
    reference = reference or {}
    out = data.copy()
    for col in out.columns:
        series = out[col]
        if col in factors or series.dtype == object or pd.api.types.is_string_dtype(series):
            if isinstance(series.dtype, pd.CategoricalDtype):
                levels = list(series.cat.categories)
            else:
                levels = sorted(pd.unique(series.dropna()).tolist(), key=str)
            if col in reference:
                ref = reference[col]
                if ref not in [str(v) for v in levels]:
                    raise CanopyError(
                        f"reference level {ref!r} is not a level of {col!r} (levels: "
                        f"{', '.join(map(str, levels))})"
                    )
                ref_value = next(v for v in levels if str(v) == ref)
                levels = [ref_value] + [v for v in levels if v != ref_value]
            out[col] = pd.Categorical(series, categories=levels)
    for col in reference:
        if col not in out.columns:
            raise CanopyError(f"--reference names {col!r}, which is not a column of the data")
    return out


@dataclass
class FixedDesign:
    """A fitted fixed-effect design: formulaic model spec plus R column names and order."""

    rhs: str
    spec: object
    names: list[str]
    order: np.ndarray
    formulaic_names: list[str] = field(default_factory=list)

    @classmethod
    def fit(
        cls, rhs: str, data: pd.DataFrame, what: str = "model"
    ) -> tuple[FixedDesign, np.ndarray]:
        """Build the design matrix on ``data``; returns the design and the matrix (R order)."""
        try:
            mm = model_matrix(rhs, data, context={"ns": ns}, na_action="raise")
        except CanopyError:
            raise
        except Exception as exc:
            raise CanopyError(f"{what} formula '{rhs}' cannot be built: {exc}") from exc
        spec = mm.model_spec
        fnames = list(mm.columns)
        var_order = _variable_order(rhs, spec)
        rnames, keys = [], []
        for term_index, structure in enumerate(spec.structure):
            factors = [str(f.expr) for f in structure.term.factors]
            for col in structure.columns:
                parts = _split_top(col) if col != "Intercept" else ["Intercept"]
                if len(parts) != len(factors):
                    parts = [col]
                    factors = factors[:1]
                info = [_part_to_r(p, f, spec) for p, f in zip(parts, factors, strict=False)]
                ranked = sorted(
                    zip(factors, info, strict=False),
                    key=lambda fi: var_order.get(fi[0].replace(" ", ""), 0),
                )
                rnames.append(":".join(name for _, (name, _) in ranked))
                keys.append((term_index, *reversed([level for _, (_, level) in ranked])))
        order = np.array(sorted(range(len(keys)), key=lambda i: keys[i]), dtype=np.int64)
        design = cls(rhs, spec, [rnames[i] for i in order], order, [fnames[i] for i in order])
        return design, np.asarray(mm.values, dtype=np.float64)[:, order]

    def transform(self, data: pd.DataFrame) -> np.ndarray:
        """Design matrix for new data with the stored knots and factor levels."""
        try:
            mm = self.spec.get_model_matrix(data, context={"ns": ns}, na_action="raise")
        except Exception as exc:
            raise CanopyError(f"cannot build the design for new data: {exc}") from exc
        return np.asarray(mm.values, dtype=np.float64)[:, self.order]


def _variable_order(rhs: str, spec) -> dict[str, int]:
    """Position of each factor's first appearance in the formula text (R's variable order)."""
    compact = rhs.replace(" ", "")
    order = {}
    for structure in spec.structure:
        for f in structure.term.factors:
            key = str(f.expr).replace(" ", "")
            pos = compact.find(key)
            order[key] = pos if pos >= 0 else len(compact)
    return order


def _part_to_r(part: str, factor: str, spec) -> tuple[str, int]:
    """R name of one factor's column and its level index inside the factor."""
    if part == "Intercept":
        return "(Intercept)", 0
    kind_state = spec.encoder_state.get(factor)
    base = r_deparse(factor)
    m = re.fullmatch(r"(.*)\[T\.(.*)\]", part, flags=re.S)
    if m and kind_state is not None and "categories" in kind_state[1]:
        categories = [str(c) for c in kind_state[1]["categories"]]
        level = m.group(2)
        return f"{base}{level}", categories.index(level) if level in categories else 0
    m = re.fullmatch(r"(.*)\[(.*)\]", part, flags=re.S)
    if m:
        suffix = m.group(2)
        return f"{base}{suffix}", int(suffix) if suffix.isdigit() else 0
    return base, 0


def check_full_rank(matrix: np.ndarray, names: list[str], what: str) -> None:
    """Raise a one-line CanopyError naming columns that are linear combinations of others."""
    from scipy.linalg import qr

    if matrix.shape[1] == 0:
        return
    scale = np.sqrt((matrix**2).sum(axis=0))
    zero = [names[j] for j in np.flatnonzero(scale == 0)]
    if zero:
        raise CanopyError(
            f"{what} column(s) {', '.join(zero)} are all zero (a factor level absent from the "
            "data?); drop or recode them"
        )
    normalized = matrix / scale
    _, r, piv = qr(normalized, mode="economic", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = max(matrix.shape) * np.finfo(float).eps * 100 * diag[0]
    rank = int((diag > tol).sum())
    if rank == matrix.shape[1]:
        return
    kept = piv[:rank]
    dropped = piv[rank:]
    messages = []
    for j in dropped[:3]:
        coef, *_ = np.linalg.lstsq(normalized[:, kept], normalized[:, j], rcond=None)
        partners = [names[kept[i]] for i in np.flatnonzero(np.abs(coef) > 1e-8)]
        messages.append(f"'{names[j]}' = combination of {', '.join(repr(p) for p in partners)}")
    raise CanopyError(
        f"{what} design is rank deficient (perfectly collinear columns): "
        + "; ".join(messages)
        + "; remove one of the collinear terms"
    )
