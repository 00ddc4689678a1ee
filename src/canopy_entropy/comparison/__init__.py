"""Paired comparison of two models on the same prompts (docs/semantic-compare.md), plus length matching.

``compare_run`` pairs the prompts of side A and side B (same family/task/prompt_id within each
by-group), draws one ``[B, P]`` matrix of resampled prompt indices per group and applies it to
both sides, so every replicate compares the two models on the same prompts. Every pooled statistic is
recomputed from per-prompt sufficient statistics (CE*_p, Nbar_p, Rbar_p, H(N)_p, D_p, Vendi_p,
per-prompt correlations and their n_p) with the pooling rules of docs/metrics.md section 4, all replicates at once; no
per-step data is touched after the per-prompt table is built.

Outputs: ``RUN/compare/comparison.parquet`` (+ ``.csv``), a tidy long table; ``RUN/tables/
compare_<set>.{csv,md,tex}`` (rows: tasks, columns: families, cells ``value ± SE``);
``RUN/compare/length_matched.parquet`` (rho(N, r) and rate-diversity relations before/after
matching the two models' rollouts on length).
"""

from canopy_entropy.comparison.bootstrap import (
    PairedReplicates,
    bootstrap_indices,
    paired_bootstrap,
    pooled_statistics,
    resample_counts,
    summarise_replicates,
)
from canopy_entropy.comparison.columns import (
    CI_LEVEL,
    CORRELATION_METRICS,
    RATIO_METRICS,
    TIDY_COLUMNS,
    pairing_columns,
)
from canopy_entropy.comparison.core import CompareResult, compare, compare_prompts, compare_run
from canopy_entropy.comparison.grouped import grouped_midranks, grouped_pearson
from canopy_entropy.comparison.length_matched import (
    length_bins,
    length_matched_analysis,
    match_lengths,
)
from canopy_entropy.comparison.tables import comparison_tables
from canopy_entropy.stats.pooling import LOG_MEAN_COLUMNS, MEAN_COLUMNS

__all__ = [
    "CI_LEVEL",
    "CORRELATION_METRICS",
    "LOG_MEAN_COLUMNS",
    "MEAN_COLUMNS",
    "RATIO_METRICS",
    "TIDY_COLUMNS",
    "CompareResult",
    "PairedReplicates",
    "bootstrap_indices",
    "compare",
    "compare_prompts",
    "compare_run",
    "comparison_tables",
    "grouped_midranks",
    "grouped_pearson",
    "length_bins",
    "length_matched_analysis",
    "match_lengths",
    "paired_bootstrap",
    "pairing_columns",
    "pooled_statistics",
    "resample_counts",
    "summarise_replicates",
]
