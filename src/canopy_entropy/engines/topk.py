"""The per-step fields (docs/metrics.md section 1) from the top-K log-probs an engine or server returns.

vLLM (``processed_logprobs``) and OpenAI-compatible servers hand back, per generated step,
the K largest log-probs (and the sampled token's). This module turns those into the step
entropy, EOS mass and sampled log-prob in vectorised numpy, on ``[steps, K]`` arrays.

Two situations:

* the K entries cover the policy's whole kept set (vLLM processed log-probs with
  ``logprobs >= top_k``): the entropy is exact. When low precision (bf16) produces ties at the
  K-th value, the kept set is larger than K and the missing mass ``1 - Z`` sits on tokens that
  all have the K-th probability ``p_K``; their contribution ``-(1 - Z) log p_K`` is added
  (``exact_kept_set=True``).
* only the top-K of a larger distribution is known (hosted APIs, top-20): the entropy lies in
  ``[lower, upper]`` with ``H = h(Z) + Z H(q) + (1 - Z) H(r)``, ``q`` the renormalised top-K,
  ``r`` the unknown rest over ``V - K`` tokens each at most ``p_K``, so
  ``H(r) in [max(0, log((1 - Z) / p_K)), log(V - K)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canopy_entropy.errors import CanopyError

# Below this missing mass the returned set is taken as complete (float32 logsumexp noise).
MASS_TOLERANCE = 1e-5


@dataclass
class TopKStepStats:
    """Per-step fields derived from top-K log-probs (float32 arrays of length ``steps``)."""

    entropy: np.ndarray
    entropy_upper: np.ndarray | None
    eos_prob: np.ndarray
    covered_mass: np.ndarray  # Z: mass of the returned (deduplicated) top entries


def pad_ragged(
    counts: np.ndarray, token_ids: np.ndarray, logprobs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter flat per-step entries (``counts[s]`` for step ``s``) into ``[steps, Kmax]``.

    Padding has token id ``-1`` and log-prob ``-inf`` (probability 0).
    """
    counts = np.asarray(counts, dtype=np.int64)
    steps = len(counts)
    width = int(counts.max()) if steps else 0
    if steps and width and int(counts.min()) == width:  # regular: a plain reshape
        return (
            np.asarray(token_ids, dtype=np.int64).reshape(steps, width),
            np.asarray(logprobs, dtype=np.float64).reshape(steps, width),
        )
    ids = np.full((steps, width), -1, dtype=np.int64)
    lps = np.full((steps, width), -np.inf, dtype=np.float64)
    if steps == 0 or width == 0:
        return ids, lps
    rows = np.repeat(np.arange(steps), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    cols = np.arange(len(rows)) - np.repeat(starts, counts)
    ids[rows, cols] = token_ids
    lps[rows, cols] = logprobs
    return ids, lps


def _refuse_broken(logprobs: np.ndarray) -> None:
    """NaN or +inf log-probs would silently become probability 0: refuse them."""
    bad = np.isnan(logprobs) | (logprobs == np.inf)
    if bad.any():
        raise CanopyError(
            f"{int(bad.sum())} top-K log-probs are NaN or +inf, so no entropy can be computed; "
            "the model's numbers are broken (try dtype 'bfloat16' or 'float32')"
        )


def topk_step_stats(
    top_ids: np.ndarray,
    top_logprobs: np.ndarray,
    eos_token_ids: tuple[int, ...] | list[int],
    *,
    vocab_size: int,
    exact_kept_set: bool,
    extra_ids: np.ndarray | None = None,
    extra_logprobs: np.ndarray | None = None,
) -> TopKStepStats:
    """Step entropy (or bounds), EOS mass and covered mass from ``[steps, K]`` top entries.

    ``top_ids``/``top_logprobs`` are the K largest entries per step (padding: id -1, -inf;
    NaN or +inf raise ``CanopyError``);
    ``extra_ids``/``extra_logprobs`` optional further known entries per step (the sampled
    token), which never set ``p_K`` and are skipped when already among the top entries. Ids
    within a top row are distinct (servers return a dict, vLLM a torch top-k). With ``exact_kept_set`` the residual mass is taken to be ties at ``p_K`` (exact for
    a policy whose kept set the top-K covers up to ties); otherwise lower and upper bounds are
    returned (``entropy`` = lower, ``entropy_upper`` = upper).
    """
    top_ids = np.asarray(top_ids, dtype=np.int64)
    # float32 per entry (what the engines return; exp is ~10x faster than in float64),
    # sums accumulated in float64.
    top_lp = np.asarray(top_logprobs, dtype=np.float32)
    steps, width = top_ids.shape
    _refuse_broken(top_lp)
    if extra_logprobs is not None:
        _refuse_broken(np.asarray(extra_logprobs, dtype=np.float64))
    finite = np.isfinite(top_lp)  # -inf (cut / padding): probability 0
    p = np.exp(top_lp)
    eos_arr = np.asarray(list(eos_token_ids), dtype=np.int64)
    is_eos = np.zeros(top_ids.shape, dtype=bool)
    for e in eos_arr.tolist():
        is_eos |= top_ids == e
    covered = p.sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # 0 * -inf in masked-out entries
        plogp = np.where(finite, p * top_lp, np.float32(0))  # p log p = p * logprob
    neg_sum_plogp = -plogp.sum(axis=1, dtype=np.float64)
    eos_prob = np.where(is_eos, p, np.float32(0)).sum(axis=1, dtype=np.float64)
    n_known = finite.sum(axis=1)
    p_k = np.where(finite, p, np.float32(np.inf)).min(axis=1) if width else np.full(steps, np.inf)
    p_k = p_k.astype(np.float64)
    if extra_ids is not None:
        ex_ids = np.asarray(extra_ids, dtype=np.int64).reshape(steps)
        ex_lp = np.asarray(extra_logprobs, dtype=np.float64).reshape(steps)
        # the sampled token is counted once: skip it when it is already among the top entries
        in_top = (top_ids == ex_ids[:, None]).any(axis=1) if width else np.zeros(steps, bool)
        use = np.isfinite(ex_lp) & ~in_top & (ex_ids != -1)
        ex_lp = np.where(use, ex_lp, -np.inf)
        ex_p = np.exp(ex_lp)
        covered = covered + ex_p
        with np.errstate(invalid="ignore"):
            neg_sum_plogp = neg_sum_plogp - np.where(use, ex_p * ex_lp, 0.0)
        eos_prob = eos_prob + np.where(np.isin(ex_ids, eos_arr), ex_p, 0.0)
        n_known = n_known + use
    missing = np.clip(1.0 - covered, 0.0, 1.0)
    has_missing = missing > MASS_TOLERANCE
    # -sum_known p log p  +  residual part: (1 - Z) H(r) - (1 - Z) log(1 - Z)
    # because H = -sum_known p log p - sum_rest p log p and the rest has mass 1 - Z.
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pk = np.log(np.where(np.isfinite(p_k), p_k, 1.0))
        # exact: the residual is ties at p_K, contributing -(1 - Z) log p_K exactly.
        rest_ties = np.where(has_missing & np.isfinite(p_k), -missing * log_pk, 0.0)
        # bounds: residual tokens each <= min(p_K, 1 - Z), so
        # -sum_rest p log p >= -(1 - Z) log min(p_K, 1 - Z)   (H(r) >= max(0, log((1-Z)/p_K)))
        # (no tolerance here: any missing mass widens the bracket)
        some = missing > 0
        safe_missing = np.where(some, missing, 1.0)
        cap = np.minimum(np.where(np.isfinite(p_k), p_k, 1.0), safe_missing)
        rest_lower = np.where(some, -missing * np.log(cap), 0.0)
        n_rest = np.maximum(vocab_size - n_known, 1)
        # uniform rest: -sum_rest p log p <= (1 - Z) (log(V - K) - log(1 - Z))
        rest_upper = np.where(some, missing * (np.log(n_rest) - np.log(safe_missing)), 0.0)
    if exact_kept_set:
        return TopKStepStats(
            entropy=(neg_sum_plogp + rest_ties).astype(np.float32),
            entropy_upper=None,
            eos_prob=eos_prob.astype(np.float32),
            covered_mass=covered.astype(np.float32),
        )
    lower = neg_sum_plogp + rest_lower
    upper = np.maximum(neg_sum_plogp + rest_upper, lower)
    return TopKStepStats(
        entropy=lower.astype(np.float32),
        entropy_upper=upper.astype(np.float32),
        eos_prob=eos_prob.astype(np.float32),
        covered_mass=covered.astype(np.float32),
    )
