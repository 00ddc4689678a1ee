"""Per-rollout correctness (docs/tasks.md): scorers, pass@k, accuracy, and how well an
uncertainty predicts the wrong rollouts. Notebooks, tests and the pipeline use the same code.

Scorers are plain functions ``(response, reference, **options) -> bool`` (or a score in
[0, 1]); ``load_scorer`` finds built-in and ``module:function`` scorers; ``score_frame`` scores
a rollout frame; the estimators work on its ``correct`` column.
"""

from canopy_entropy.scoring.answers import (
    ScoringError,
    choice_match,
    exact_match,
    extract_choice,
    extract_number,
    normalise_text,
    numeric_match,
    regex_match,
)
from canopy_entropy.scoring.code_exec import (
    CodeExecutionDisabled,
    CodeResult,
    code_passes,
    extract_code,
    run_code,
)
from canopy_entropy.scoring.estimators import (
    accuracy_by_bin,
    auroc,
    average_precision,
    majority_vote,
    pass_at_k,
    pool_correctness,
    prompt_correctness,
    uncertainty_link,
)
from canopy_entropy.scoring.frame import SCORE_COLUMNS, score_frame
from canopy_entropy.scoring.registry import (
    BUILTIN_SCORERS,
    load_scorer,
    scorer_name,
    scorer_version,
)

__all__ = [
    "BUILTIN_SCORERS",
    "SCORE_COLUMNS",
    "CodeExecutionDisabled",
    "CodeResult",
    "ScoringError",
    "accuracy_by_bin",
    "auroc",
    "average_precision",
    "choice_match",
    "code_passes",
    "exact_match",
    "extract_choice",
    "extract_code",
    "extract_number",
    "load_scorer",
    "majority_vote",
    "normalise_text",
    "numeric_match",
    "pass_at_k",
    "pool_correctness",
    "prompt_correctness",
    "regex_match",
    "run_code",
    "score_frame",
    "scorer_name",
    "scorer_version",
    "uncertainty_link",
]
