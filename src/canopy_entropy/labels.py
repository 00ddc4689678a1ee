"""One table of what every reported quantity is called: name -> label, unit, one-line meaning.

Figures, the report (and the CLI) show ``label(name)`` instead of a column name such as
``ce_star`` or ``partial_corr_r_d_logN``, and the meaning as a tooltip or caption, so a reader
never meets a raw identifier. Names absent from the table are shown as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    """How a quantity is shown: a short label, its unit ('' when unitless), what it means."""

    label: str
    unit: str
    meaning: str


_NATS = "nats"
_TABLE: dict[str, tuple[str, str, str]] = {
    # --- pooled and per-prompt metrics (metrics/*.parquet) ------------------------------------
    "ce_star": ("CE*", _NATS, "Canopy Entropy: exact joint entropy H(N, Y | X) of a whole rollout"),
    "ce_star_surprisal": ("CE* (surprisal)", _NATS, "CE* estimated from sampled surprisals"),
    "mean_length": ("N̄", "tokens", "mean output length"),
    "genppl": ("GenPPL", "", "generation perplexity exp(CE* / N̄)"),
    "entropy_rate": ("R̄", "nats/token", "mean per-token entropy rate of a rollout"),
    "bf": ("BF", "", "branching factor exp(R̄): effective choices per token"),
    "truncation_rate": ("truncated", "share", "share of rollouts that hit the length cap"),
    "pearson": ("ρ(N, r) Pearson", "", "within-prompt Pearson correlation of length and rate"),
    "spearman": ("ρ(N, r) Spearman", "", "within-prompt rank correlation of length and rate"),
    "kendall": ("τ(N, r) Kendall", "", "within-prompt Kendall correlation of length and rate"),
    "covariance": ("Cov(N, r)", "nats", "within-prompt covariance of length and rate"),
    "rate_length_term": ("N̄ · R̄", _NATS, "part of CE* explained by mean length times mean rate"),
    "within_cov_term": ("within-prompt Cov", _NATS, "CE* part from Cov(N, r) inside prompts"),
    "between_cov_term": ("between-prompt Cov", _NATS, "CE* part from Cov(N̄, R̄) across prompts"),
    "stop_entropy": ("stop entropy", _NATS, "entropy of the decisions to stop or continue"),
    "stop_entropy_share": ("stop share", "share", "share of CE* spent on stopping decisions"),
    "length_entropy": ("H(N)", _NATS, "entropy of the output length"),
    "length_entropy_hist": ("H(N) (histogram)", _NATS, "plug-in entropy of the sampled lengths"),
    "content_entropy": ("H(Y | N)", _NATS, "entropy of the content given its length"),
    "ce_star_se": ("SE (analytic)", _NATS, "within-prompt analytic standard error of pooled CE*"),
    "ce_star_var_between": (
        "var between",
        "nats²",
        "part of SE² from prompts differing (0: the prompts' CE* differ no more than the "
        "rollout noise explains)",
    ),
    "ce_star_var_within": ("var within", "nats²", "part of SE² from rollout noise inside prompts"),
    "chebyshev_bound": ("Chebyshev 95%", _NATS, "|estimate − CE*| ≤ bound with probability ≥ 95%"),
    "truncation_bias_bound": ("truncation bias ≤", _NATS, "most entropy lost past the cap"),
    "n_rollouts": ("rollouts", "", "number of rollouts"),
    "n_prompts": ("prompts", "", "number of prompts"),
    "diversity": ("D", "", "semantic diversity: mean pairwise cosine distance of rollouts"),
    "vendi": ("Vendi", "", "Vendi score: effective number of distinct rollouts"),
    "rse": ("RSE", _NATS, "relaxed semantic entropy: entropy of the judge's rollout clusters"),
    "rse_normalized": ("RSE / log m", "", "relaxed semantic entropy normalised to [0, 1]"),
    "rse_clusters": ("RSE clusters", "", "number of meaning clusters the judge found"),
    "dominant": ("dominant", "", "which part of SE² is larger: more prompts or more rollouts"),
    # --- comparison (compare/comparison.parquet) -----------------------------------------------
    "diff": ("difference", "", "B − A"),
    "pct": ("% change", "%", "100 · (B − A) / A"),
    "n_boot": ("bootstrap replicates", "", "paired prompt-bootstrap replicates"),
    # --- length-matched analysis (compare/length_matched.parquet) -----------------------------
    "rho_pearson_N_r": ("ρ(N, r) Pearson", "", "within-prompt correlation of length and rate"),
    "rho_spearman_N_r": ("ρ(N, r) Spearman", "", "within-prompt rank correlation"),
    "corr_r_d": ("ρ(r, d)", "", "within-prompt correlation of rate and rollout diversity"),
    "partial_corr_r_d_logN": (
        "ρ(r, d | log N)",
        "",
        "correlation of rate and diversity with log length held fixed",
    ),
    "slope_d_on_r": ("slope of d on r", "", "within-prompt least-squares slope"),
    "unmatched": ("all rollouts", "", "statistic over every rollout"),
    "matched": ("length-matched", "", "statistic after matching the sides' length histograms"),
    "n_rollouts_unmatched": ("rollouts (all)", "", "rollouts before matching"),
    "n_rollouts_matched": ("rollouts (matched)", "", "rollouts kept by the length matching"),
    # --- regression (regression/result.json) --------------------------------------------------
    "nobs": ("observations", "", "panel rows (one per prompt, model family and variant)"),
    "loglik": ("log-likelihood", "", "maximised log-likelihood"),
    "aic": ("AIC", "", "Akaike information criterion (lower is better)"),
    "slope_ratio": ("slope ratio", "", "(b_R + b_R×instruct) / b_R: instruct slope over base"),
    "clipped_responses": ("clipped D values", "", "responses moved inside (0, 1) before fitting"),
    "R_sc": ("entropy rate (z)", "", "entropy rate R̄, z-scored over the panel"),
    "invN_sc": ("1/N̄ (z)", "", "inverse mean length, z-scored over the panel"),
    "D": ("D", "", "semantic diversity of a prompt's rollouts"),
    "Rbar": ("R̄", "nats/token", "a prompt's mean entropy rate"),
    "Nbar": ("N̄", "tokens", "a prompt's mean output length"),
    "R_c": ("entropy rate (centred)", "", "R̄ minus its panel mean"),
    "R_c2": ("entropy rate² (centred)", "", "squared centred entropy rate (quadratic check)"),
    "V": ("Vendi (rescaled)", "", "(Vendi − 1) / (M − 1), in [0, 1]"),
    "RSE": ("RSE / log m", "", "relaxed semantic entropy normalised to [0, 1]"),
}
LABELS: Mapping[str, Label] = {k: Label(*v) for k, v in _TABLE.items()}


def label(name: str) -> str:
    """The short label of ``name`` (the name itself when it has none)."""
    entry = LABELS.get(name)
    return entry.label if entry else name


def header(name: str) -> str:
    """Label with its unit, for axis and column titles: 'CE* (nats)'."""
    entry = LABELS.get(name)
    if entry is None:
        return name
    return f"{entry.label} ({entry.unit})" if entry.unit and entry.unit != "share" else entry.label


def meaning(name: str) -> str:
    """One line saying what ``name`` is ('' when unknown)."""
    entry = LABELS.get(name)
    return entry.meaning if entry else ""


def term_label(term: str, reference: Mapping[str, str] | None = None) -> str:
    """A regression term in words: 'R_sc:variantinstruct' -> 'entropy rate (z) × instruct'.

    Factor dummies are R's ``<factor><level>`` names; ``reference`` (factor -> reference level,
    as recorded in result.json) gives the factors, so 'taskmath' reads 'task = math'."""
    if term == "(Intercept)":
        return "intercept"
    factors = sorted({"variant", "task", "family", *(reference or {})}, key=len, reverse=True)

    def one(part: str) -> str:
        if part in LABELS:
            return label(part)
        if part.startswith("ns(") or part.startswith("bs("):
            inner, _, k = part.partition(")")
            var = inner[3:].split(",")[0].strip()
            return f"spline {k or ''} of {label(var)}".replace("  ", " ")
        for factor in factors:
            if part.startswith(factor) and len(part) > len(factor):
                level = part[len(factor) :]
                base = (reference or {}).get(factor)
                text = level if factor == "variant" else f"{factor} = {level}"
                return f"{text} (vs {base})" if base else text
        return part

    return " × ".join(one(p) for p in term.split(":"))
