"""Every trajectory metric of docs/metrics.md sections 2-6, per prompt and pooled per group.

The rollout store is streamed batch by batch (bounded memory): each batch's per-step lists are
reduced on flat arrays + offsets to per-rollout scalars (length, summed entropy, surprisal,
summed binary stop entropy) plus, per prompt and step, the EOS-hazard accumulator
``sum_i 1{N_i >= n} lambda_in`` of docs/metrics.md section 5. Everything after that works on per-rollout
arrays with ``np.bincount`` and padded ``[prompt, rollout]`` matrices; the only Python loops run
over prompts, never over steps or rollouts.

Conventions (see docs/metrics.md):

* a *prompt* is one (model, variant, family, task, prompt_id); groups pool prompts by ``by``;
* pooled values are unweighted means over prompts (docs/metrics.md section 4), correlations pooled by the
  docs/metrics.md section-4 rules, the rate/length split pooled as
  ``CE*_pool = Nbar_pool * Rbar_pool + between_cov_term + within_cov_term`` exactly;
* ``length_entropy`` is H(min(N, T)) from the EOS-hazard law on ``{1..T}`` plus the outcome
  "cut at T" (the leftover mass); without cut rollouts part of the leftover is spread over the
  unseen lengths up to T (``stats.length_law``); no mass is ever put beyond T;
* ``content_entropy = ce_star - length_entropy`` (the histogram H(N) when no ``eos_prob``).
"""

from canopy_entropy.metrics.columns import (
    DEFAULT_BY,
    DIVERSITY_COLUMNS,
    METRIC_COLUMNS,
    METRICS_SCHEMA_VERSION,
    PROMPT_KEYS,
    TRUNCATION_WARN_RATE,
)
from canopy_entropy.metrics.pool import pool_group
from canopy_entropy.metrics.result import (
    MetricsResult,
    compute_metrics,
    current_metrics,
    load_metrics_json,
    run_metrics,
    write_metrics,
)
from canopy_entropy.metrics.scan import binary_entropy, per_rollout_frame, segment_sums

__all__ = [
    "DEFAULT_BY",
    "DIVERSITY_COLUMNS",
    "METRICS_SCHEMA_VERSION",
    "METRIC_COLUMNS",
    "PROMPT_KEYS",
    "TRUNCATION_WARN_RATE",
    "MetricsResult",
    "binary_entropy",
    "compute_metrics",
    "current_metrics",
    "load_metrics_json",
    "per_rollout_frame",
    "pool_group",
    "run_metrics",
    "segment_sums",
    "write_metrics",
]
