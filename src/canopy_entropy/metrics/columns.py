"""The metric columns, keys and thresholds every metrics module shares."""

from __future__ import annotations

from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.semantic.diversity import DIVERSITY_COLUMNS as _SEMANTIC_DIVERSITY_COLUMNS

DEFAULT_BY = ("model", "variant", "task")


METRIC_COLUMNS = (
    "ce_star",
    "ce_star_surprisal",
    "mean_length",
    "genppl",
    "entropy_rate",
    "bf",
    "truncation_rate",
    "pearson",
    "spearman",
    "kendall",
    "covariance",
    "rate_length_term",
    "within_cov_term",
    "between_cov_term",
    "stop_entropy",
    "stop_entropy_share",
    "length_entropy",
    "length_entropy_hist",
    "content_entropy",
    "ce_star_se",
    "ce_star_var_between",
    "ce_star_var_within",
    "chebyshev_bound",
    "truncation_bias_bound",
    "n_rollouts",
    "n_prompts",
)


# per-prompt diversity statistics merged from RUN/semantic/ (defined once, in semantic.diversity)
DIVERSITY_COLUMNS = tuple(c for c in _SEMANTIC_DIVERSITY_COLUMNS if c != "n_rollouts")


TRUNCATION_WARN_RATE = 0.05  # more rollouts than this cut at the cap: CE* is a lower bound


_KEY_SEPARATOR = "\x1f"


METRICS_SCHEMA_VERSION = "canopy-metrics/1"


_READ_COLUMNS = [
    *PROMPT_KEYS,
    "rollout_index",
    "length",
    "finish_reason",
    "entropy",
    "eos_prob",
    "logprob",
    "entropy_upper",
]
