"""Correctness estimators (docs/tasks.md): pass@k, accuracy, majority vote, and how well a
per-rollout uncertainty ranks the incorrect rollouts (AUROC, AUPRC, accuracy by decile).

Per-prompt values are pooled as unweighted means over prompts, like every other pooled metric.
AUROC and AUPRC are pooled differently: all rollouts of a group (every prompt) form one
ranking, so they also reward an uncertainty that tells hard prompts from easy ones, not only
wrong rollouts from right ones within a prompt. Both accept sample weights, so a prompt
bootstrap is ``auroc(u, y, sample_weight=counts[:, prompt_code])`` for all replicates at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.scoring.answers import ScoringError

DEFAULT_BY = ("model", "variant", "task")
DEFAULT_MEASURES = ("rate", "H", "surprisal", "rse")


# ---------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------
def _counts(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ScoringError(f"{name} must be whole numbers, got {values!r}")
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise ScoringError(f"{name} must be whole numbers, got {values!r}")
    return array.astype(np.int64)


def pass_at_k(n, c, k: int):
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k): the chance that k of the n rollouts, drawn
    without replacement, include a correct one (c of the n are correct).

    Computed as the product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` summed in logs and closed
    with ``expm1``, exact to rounding for any n. ``n`` and ``c`` may be arrays (one value per
    prompt); needs ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n_arr, c_arr = np.broadcast_arrays(_counts(n, "n"), _counts(c, "c"))
    k = int(_counts(k, "k"))
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ScoringError(f"correct counts c={c!r} must lie between 0 and n={n!r}")
    if k < 1 or np.any(n_arr < k):
        raise ScoringError(f"pass@k needs 1 <= k <= n; k={k} with n={n!r}")
    # one row per distinct (n, c): prompts usually share n, so this is at most n + 1 rows
    (flat_n, flat_c), inverse = np.unique(
        np.stack([n_arr.ravel(), c_arr.ravel()]), axis=1, return_inverse=True
    )
    width = int(flat_c.max(initial=0))
    j = np.arange(width)
    i = flat_n[:, None] - j[None, :]  # n, n-1, ..., n-c+1
    use = (j[None, :] < flat_c[:, None]) & (i > k)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(use, np.log1p(-k / np.where(use, i, 2 * k)), 0.0)
    out = np.where(flat_n - flat_c < k, 1.0, 0.0 - np.expm1(terms.sum(axis=1)))
    out = out[inverse.ravel()].reshape(n_arr.shape)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------
# AUROC / AUPRC of an uncertainty for predicting an incorrect rollout
# ---------------------------------------------------------------------------------------
def _ranking(uncertainty, incorrect, sample_weight):
    """Weighted true/false positive counts at each distinct threshold, highest first."""
    score = np.asarray(uncertainty, dtype=np.float64)
    label = np.asarray(incorrect)
    if score.ndim != 1 or label.shape != score.shape:
        raise ScoringError(
            f"uncertainty and labels must be 1-D of one length, got {score.shape}, {label.shape}"
        )
    if np.isnan(score).any():
        raise ScoringError(
            f"the uncertainty is NaN for {int(np.isnan(score).sum())} rollouts; drop them first"
        )
    if label.dtype != bool:
        if not np.isin(label, (0, 1)).all():
            raise ScoringError("labels must be 0/1 or booleans (1 = incorrect rollout)")
        label = label.astype(bool)
    weight = np.ones(score.shape) if sample_weight is None else np.asarray(sample_weight, float)
    if weight.shape[-1:] != score.shape or weight.ndim > 2 or (weight < 0).any():
        raise ScoringError(
            f"sample weights must be non-negative, shaped [{len(score)}] or [R, {len(score)}]"
        )
    order = np.argsort(-score, kind="stable")
    ends = np.r_[score[order][1:] != score[order][:-1], True] if len(score) else np.zeros(0, bool)
    w = weight[..., order]
    y = label[order]
    tp = np.cumsum(w * y, axis=-1)[..., ends]
    fp = np.cumsum(w * ~y, axis=-1)[..., ends]
    return tp, fp


def _scalar(out: np.ndarray):
    return float(out) if out.ndim == 0 else out


def auroc(uncertainty, incorrect, sample_weight=None):
    """Area under the ROC curve of ``uncertainty`` for flagging ``incorrect`` rollouts: the
    chance that a random incorrect rollout is more uncertain than a random correct one, ties
    counting one half (the Mann-Whitney U statistic over n_incorrect x n_correct).

    0.5 is no better than chance; NaN when one class is absent. ``sample_weight`` ([n], or
    [R, n] for R weightings at once, e.g. bootstrap counts) weights each rollout.
    """
    tp, fp = _ranking(uncertainty, incorrect, sample_weight)
    zero = np.zeros((*tp.shape[:-1], 1))
    tp, fp = np.concatenate([zero, tp], axis=-1), np.concatenate([zero, fp], axis=-1)
    pos, neg = tp[..., -1], fp[..., -1]
    area = (np.diff(fp, axis=-1) * (tp[..., 1:] + tp[..., :-1]) / 2).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _scalar(np.where(pos * neg > 0, area / (pos * neg), np.nan))


def average_precision(uncertainty, incorrect, sample_weight=None):
    """AUPRC as average precision: ``sum_k (recall_k - recall_{k-1}) * precision_k`` over the
    distinct thresholds of ``uncertainty`` (highest first), positives being ``incorrect``
    rollouts (scikit-learn's ``average_precision_score``). Its chance level is the share of
    incorrect rollouts; NaN when there is none. ``sample_weight`` as in ``auroc``."""
    tp, fp = _ranking(uncertainty, incorrect, sample_weight)
    if tp.shape[-1] == 0:
        return _scalar(np.full(tp.shape[:-1], np.nan))
    pos = tp[..., -1]
    zero = np.zeros((*tp.shape[:-1], 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        out = (np.diff(np.concatenate([zero, tp], axis=-1), axis=-1) * precision).sum(-1) / pos
    return _scalar(np.where(pos > 0, out, np.nan))


# ---------------------------------------------------------------------------------------
# per-prompt and pooled accuracy, pass@k, majority vote
# ---------------------------------------------------------------------------------------
def _require(frame: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ScoringError(
            f"the rollout frame lacks columns {missing}; score it with score_frame(...) first"
        )


def _correct(frame: pd.DataFrame, col: str) -> np.ndarray:
    values = frame[col].to_numpy()
    if pd.isna(values).any():
        raise ScoringError(f"'{col}' is missing for {int(pd.isna(values).sum())} rollouts")
    return values.astype(bool)


def majority_vote(codes: np.ndarray, answers: Sequence, correct: np.ndarray, n_groups: int):
    """Per group: the correctness of its most common answer (None = no answer, not a vote).

    A tie between answers scores the mean correctness of the tied answers (the expected result
    of breaking the tie at random: one right and one wrong answer tied give 0.5); a group
    where no rollout gave an answer scores 0.
    """
    votes = pd.DataFrame({"g": codes, "a": pd.Series(answers, dtype=object), "c": correct})
    votes = votes[votes["a"].notna()]
    out = np.zeros(n_groups)
    if votes.empty:
        return out
    tally = votes.groupby(["g", "a"], sort=False).agg(n=("c", "size"), c=("c", "mean"))
    tally = tally.reset_index()
    top = tally["n"].to_numpy() == tally.groupby("g")["n"].transform("max").to_numpy()
    won = tally[top].groupby("g")["c"].mean()
    out[won.index.to_numpy()] = won.to_numpy()
    return out


def prompt_correctness(
    frame: pd.DataFrame,
    *,
    ks: Sequence[int] = (1,),
    correct_col: str = "correct",
    score_col: str | None = "score",
    answer_col: str | None = "answer",
    prompt_cols: Sequence[str] = PROMPT_KEYS,
) -> pd.DataFrame:
    """One row per prompt: ``n_rollouts``, ``n_correct``, ``accuracy`` (share correct),
    ``mean_score`` (with ``score_col``), ``pass_at_<k>`` for each k, and ``majority`` (the
    majority-vote correctness, see ``majority_vote``) when ``answer_col`` is in the frame.

    pass@k of a prompt with fewer than k rollouts is undefined: NaN, with a warning.
    """
    prompt_cols = list(prompt_cols)
    _require(frame, [*prompt_cols, correct_col])
    grouped = frame.groupby(prompt_cols, sort=True)
    codes = grouped.ngroup().to_numpy()
    out = grouped.size().reset_index()[prompt_cols]
    n_groups = len(out)
    correct = _correct(frame, correct_col)
    n = np.bincount(codes, minlength=n_groups)
    c = np.bincount(codes, weights=correct, minlength=n_groups).astype(np.int64)
    out["n_rollouts"] = n
    out["n_correct"] = c
    out["accuracy"] = c / n
    if score_col is not None and score_col in frame.columns:
        score = frame[score_col].to_numpy(dtype=np.float64)
        out["mean_score"] = np.bincount(codes, weights=score, minlength=n_groups) / n
    for k in ks:
        short = n < k
        if short.any():
            warnings.warn(
                f"pass@{k} is undefined for {int(short.sum())} of {n_groups} prompts with fewer "
                f"than {k} rollouts; they get NaN",
                stacklevel=2,
            )
        value = np.full(n_groups, np.nan)
        if (~short).any():
            value[~short] = pass_at_k(n[~short], c[~short], k)
        out[f"pass_at_{k}"] = value
    if answer_col is not None and answer_col in frame.columns:
        out["majority"] = majority_vote(codes, frame[answer_col].to_numpy(), correct, n_groups)
    return out


CORRECTNESS_COLUMNS = ("accuracy", "mean_score", "majority")


def pool_correctness(prompts: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """Unweighted means over prompts, per ``by`` group, of the ``prompt_correctness`` columns
    (a prompt whose pass@k is NaN is left out of that mean); adds ``n_prompts``."""
    by = list(by)
    _require(prompts, by)
    cols = [
        c
        for c in prompts.columns
        if c in CORRECTNESS_COLUMNS or (c.startswith("pass_at_") and c[8:].isdigit())
    ]
    grouped = prompts.groupby(by, sort=True)
    out = grouped[cols].mean()
    out.insert(0, "n_prompts", grouped.size())
    return out.reset_index()


# ---------------------------------------------------------------------------------------
# the uncertainty link, per group
# ---------------------------------------------------------------------------------------
def _measures(frame: pd.DataFrame, measures: Sequence[str] | None) -> list[str]:
    if measures is None:
        return [m for m in DEFAULT_MEASURES if m in frame.columns]
    _require(frame, measures)
    return list(measures)


def _finite_rows(frame: pd.DataFrame, measure: str) -> pd.DataFrame:
    keep = frame[measure].notna().to_numpy()
    if not keep.all():
        warnings.warn(
            f"'{measure}' is missing for {int((~keep).sum())} of {len(keep)} rollouts; they are "
            "left out of its ranking",
            stacklevel=3,
        )
    return frame[keep]


def uncertainty_link(
    frame: pd.DataFrame,
    measures: Sequence[str] | None = None,
    *,
    by: Sequence[str] = DEFAULT_BY,
    correct_col: str = "correct",
) -> pd.DataFrame:
    """AUROC and AUPRC of each per-rollout uncertainty ``measure`` for predicting an incorrect
    rollout, all rollouts of a ``by`` group ranked together (pooled over prompts).

    Default measures: those of ``rate`` (entropy rate), ``H``, ``surprisal`` and ``rse`` in the
    frame. One row per (group, measure) with ``auroc``, ``auprc``, ``incorrect_rate`` (AUPRC's
    chance level), ``n_rollouts`` and ``n_incorrect``.
    """
    by = list(by)
    _require(frame, [*by, correct_col])
    rows = []
    for measure in _measures(frame, measures):
        usable = _finite_rows(frame, measure)
        for key, g in usable.groupby(by, sort=True):
            incorrect = ~_correct(g, correct_col)
            u = g[measure].to_numpy(dtype=np.float64)
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "measure": measure,
                    "auroc": auroc(u, incorrect),
                    "auprc": average_precision(u, incorrect),
                    "incorrect_rate": float(incorrect.mean()),
                    "n_rollouts": len(g),
                    "n_incorrect": int(incorrect.sum()),
                }
            )
    columns = [*by, "measure", "auroc", "auprc", "incorrect_rate", "n_rollouts", "n_incorrect"]
    return pd.DataFrame(rows, columns=columns)


def accuracy_by_bin(
    frame: pd.DataFrame,
    measure: str = "rate",
    *,
    n_bins: int = 10,
    by: Sequence[str] = DEFAULT_BY,
    correct_col: str = "correct",
) -> pd.DataFrame:
    """Accuracy of the rollouts in each quantile bin (deciles by default) of ``measure``
    within each ``by`` group, pooled over prompts.

    Bin edges are the group's quantiles of ``measure``; equal values always share a bin, so
    heavy ties leave some bins empty (they are omitted; ``n_rollouts`` says how full each is).
    One row per (group, bin) with ``bin`` (0 = least uncertain), ``lo``/``hi`` (the smallest
    and largest value in it), ``n_rollouts`` and ``accuracy``.
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ScoringError(f"n_bins={n_bins!r} must be a positive whole number")
    by = list(by)
    _require(frame, [*by, correct_col, measure])
    parts = []
    for key, g in _finite_rows(frame, measure).groupby(by, sort=True):
        u = g[measure].to_numpy(dtype=np.float64)
        edges = np.quantile(u, np.linspace(0, 1, n_bins + 1)[1:-1])
        stats = pd.DataFrame(
            {"bin": np.searchsorted(edges, u, side="right"), "u": u, "c": _correct(g, correct_col)}
        )
        table = stats.groupby("bin").agg(
            lo=("u", "min"), hi=("u", "max"), n_rollouts=("c", "size"), accuracy=("c", "mean")
        )
        table = table.reset_index()
        for col, value in zip(by, key, strict=True):
            table[col] = value
        parts.append(table)
    columns = [*by, "bin", "lo", "hi", "n_rollouts", "accuracy"]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]
