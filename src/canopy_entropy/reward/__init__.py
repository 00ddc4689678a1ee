"""Reward-model filtering: score every rollout with a reward model, keep each prompt's best
share, and recompute the analyses on the kept set (``RUN/reward/``) beside the raw ones."""

from canopy_entropy.reward.score import (
    FALLBACK_FORMAT,
    RewardScorer,
    ScoreResult,
    read_score_cache,
    score_run,
)
from canopy_entropy.reward.view import (
    DEFAULT_KEEP,
    KeptRollouts,
    RewardResult,
    filtered_metrics,
    kept_count,
    kept_diversity,
    raw_vs_kept,
    reward_run,
    select_top,
)

__all__ = [
    "DEFAULT_KEEP",
    "FALLBACK_FORMAT",
    "KeptRollouts",
    "RewardResult",
    "RewardScorer",
    "ScoreResult",
    "filtered_metrics",
    "kept_count",
    "kept_diversity",
    "raw_vs_kept",
    "read_score_cache",
    "reward_run",
    "score_run",
    "select_top",
]
