"""Token diagnostics from top-k log-probs (the vLLM prompt log-prob path): exact p, log p and
rank, intervals around entropy and expected rank that hold the full-vocabulary values
(``token_diagnostics``), points when k covers the vocabulary, and attained at their ends."""

from __future__ import annotations

import numpy as np
import pytest

from canopy_entropy.diagnostics import token_diagnostics, topk_diagnostics


def _inputs(logits: np.ndarray, targets: np.ndarray, k: int):
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = -np.sort(-logp, axis=1)[:, :k]
    full = token_diagnostics(logp.astype(np.float32), targets)
    t_lp = logp[np.arange(len(targets)), targets]
    return top, t_lp, full


@pytest.mark.parametrize("k", [1, 5, 20, 63, 64])
def test_bounds_hold_the_full_vocabulary_values(k):
    rng = np.random.default_rng(k)
    V, P = 64, 200
    logits = rng.normal(size=(P, V)) * rng.uniform(0.2, 4.0, size=(P, 1))
    targets = rng.integers(0, V, size=P)
    top, t_lp, full = _inputs(logits, targets, k)
    got = topk_diagnostics(top, targets, t_lp, full.rank, vocab_size=V)
    np.testing.assert_array_equal(got.rank, full.rank)
    np.testing.assert_allclose(got.p, full.p, rtol=1e-5)
    tol = 1e-4
    assert np.all(got.entropy_lower <= full.entropy + tol)
    assert np.all(full.entropy <= got.entropy_upper + tol)
    assert np.all(got.expected_rank_lower <= full.expected_rank * (1 + tol))
    assert np.all(full.expected_rank <= got.expected_rank_upper * (1 + tol))
    assert np.all(got.relative_rank_lower <= full.relative_rank + tol)
    assert np.all(full.relative_rank <= got.relative_rank_upper + tol)
    if k == V:  # the whole vocabulary: points, equal to the exact values
        assert got.exact.all()
        for lo, hi, exact in ((got.entropy_lower, got.entropy_upper, full.entropy),
                              (got.expected_rank_lower, got.expected_rank_upper,
                               full.expected_rank)):  # fmt: skip
            np.testing.assert_array_equal(lo, hi)
            np.testing.assert_allclose(lo, exact, rtol=2e-5, atol=2e-5)
    else:  # a point only where the missing mass is float32 noise (<= 1e-6)
        np.testing.assert_array_equal(got.exact, 1.0 - np.exp(top).sum(axis=1) <= 1e-6)
        if k < V - 1:  # one unknown token left has a known rank: then E[R] is a point too
            wide = ~got.exact
            assert np.all(got.expected_rank_upper[wide] > got.expected_rank_lower[wide])


def test_expected_rank_bounds_are_attained():
    """Closed forms: rest mass as ties at p_k attains the lower bound, rest spread uniformly
    over the remaining ranks the upper bound."""
    ties = np.log(np.array([[0.4, 0.2, 0.1, 0.1, 0.1, 0.1]]))  # k = 3, rest 0.3 = 3 x 0.1
    low = topk_diagnostics(ties[:, :3], [0], ties[:, 0], [1], vocab_size=6)
    exact = 1 * 0.4 + 2 * 0.2 + (3 + 4 + 5 + 6) * 0.1
    assert low.expected_rank_lower[0] == pytest.approx(exact, rel=1e-6)
    uniform = np.log(np.array([[0.5, 0.3] + [0.025] * 8]))  # k = 2, rest 0.2 over 8 ranks
    high = topk_diagnostics(uniform[:, :2], [0], uniform[:, 0], [1], vocab_size=10)
    exact = 0.5 + 2 * 0.3 + 0.025 * sum(range(3, 11))
    assert high.expected_rank_upper[0] == pytest.approx(exact, rel=1e-6)
    # uniform over K (the SPEC sanity check) with the whole vocabulary: E[R] = (K + 1) / 2
    flat = np.full((1, 8), np.log(1 / 8))
    point = topk_diagnostics(flat, [3], flat[:, 3], [8], vocab_size=8)
    assert point.expected_rank_lower[0] == point.expected_rank_upper[0] == pytest.approx(4.5)


def test_score_run_vllm_options_are_checked(tmp_path):
    from canopy_entropy.diagnostics import ReferenceAnswer, score_run
    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.errors import ConfigError

    answers = [ReferenceAnswer(id="a", task="t", prompt="p", answer="x")]
    kw = dict(model="gemma3-270m", answers=answers)
    with pytest.raises(ConfigError, match="raw distribution only"):
        score_run(tmp_path, engine="vllm", policy=DecodingPolicy(temperature=0.5), **kw)
    with pytest.raises(ConfigError, match="use it with --engine vllm"):
        score_run(tmp_path, prompt_logprobs=5, **kw)
    with pytest.raises(ConfigError, match="unknown scoring engine"):
        score_run(tmp_path, engine="openai", **kw)
