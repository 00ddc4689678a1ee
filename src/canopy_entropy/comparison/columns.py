"""What the comparison compares and how each metric pools: one definition for the bootstrap,
the tables and the figures."""

from __future__ import annotations

from collections.abc import Sequence

# Pooled as unweighted means of the per-prompt value (GenPPL and BF derive from these).


RATIO_METRICS = (
    "ce_star",
    "genppl",
    "bf",
    "entropy_rate",
    "mean_length",
    "length_entropy",
    "diversity",
    "vendi",
    "rse",
    "rse_normalized",
    "accuracy",
    "majority",
    "pass_at_5",
    "pass_at_10",
)


CORRELATION_METRICS = ("pearson", "spearman", "kendall", "covariance")


METRIC_SETS = {
    "entropy": ("ce_star", "genppl", "bf", "entropy_rate", "mean_length", "length_entropy"),
    "correlation": CORRELATION_METRICS,
    "diversity": ("diversity", "vendi", "rse", "rse_normalized"),
    "correctness": (
        "accuracy",
        "majority",
        "pass_at_5",
        "pass_at_10",
        "auroc_rate",
        "auroc_H",
        "auroc_surprisal",
        "auroc_rse",
    ),
}


CI_LEVEL = 0.95


TIDY_COLUMNS = (
    "metric",
    "kind",
    "a",
    "b",
    "a_se",
    "b_se",
    "diff",
    "diff_se",
    "diff_lo",
    "diff_hi",
    "pct",
    "pct_se",
    "pct_lo",
    "pct_hi",
    "ratio_lo",
    "ratio_hi",
    "n_prompts",
    "a_label",
    "b_label",
    "a_lo",
    "a_hi",
    "b_lo",
    "b_hi",
)


def pairing_columns(by: Sequence[str], a_key: str) -> list[str]:
    """Columns identifying the same prompt on both sides, beyond the by-columns.

    A prompt is (family, task, prompt_id) when comparing variants of a family, and
    (task, prompt_id) when comparing models by name (they may belong to different families).
    """
    cols = ["family", "task"] if a_key == "variant" else ["task"]
    return [c for c in cols if c not in by] + ["prompt_id"]
