"""Top-K entropy: exactness when K covers the kept set (ties included), and valid bounds
when it does not, against brute-force entropies of random distributions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from canopy_entropy.engines.topk import pad_ragged, topk_step_stats
from canopy_entropy.errors import CanopyError

V = 60


def _top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries per row as (ids, logprobs), largest first, like a server."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    with np.errstate(divide="ignore"):
        return order, np.log(top)


def _random_dists(rng: np.random.Generator, rows: int, support: int | None = None) -> np.ndarray:
    logits = rng.normal(scale=rng.uniform(0.3, 4.0, size=(rows, 1)), size=(rows, V))
    if support is not None:  # a truncated policy: only `support` tokens kept
        cut = np.sort(logits, axis=1)[:, -support][:, None]
        logits = np.where(logits >= cut, logits, -np.inf)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def test_bounds_contain_true_entropy_for_any_k():
    rng = np.random.default_rng(1)
    probs = _random_dists(rng, 400)
    truth = scipy_entropy(probs, axis=1)
    for k in (1, 2, 5, 20, 59, 60):
        ids, lps = _top_k(probs, k)
        st = topk_step_stats(ids, lps, (0, 3), vocab_size=V, exact_kept_set=False)
        assert np.all(st.entropy <= truth + 1e-5), k
        assert np.all(st.entropy_upper >= truth - 1e-5), k
        np.testing.assert_allclose(st.covered_mass, np.exp(lps).sum(1), rtol=1e-6)
        eos = np.where(np.isin(ids, [0, 3]), np.exp(lps), 0).sum(1)
        np.testing.assert_allclose(st.eos_prob, eos, rtol=1e-6, atol=1e-7)
    # K = V: the whole distribution is known and both bounds are the entropy.
    np.testing.assert_allclose(st.entropy, truth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.entropy_upper, truth, rtol=1e-5, atol=1e-6)


def test_bounds_are_attained():
    """Lower bound: the rest are ties at p_K. Upper bound: the rest is uniform over V - K."""
    k, p_k = 4, 0.05
    head = np.array([0.4, 0.2, 0.1, p_k])
    rest = 1.0 - head.sum()  # 0.25 = 5 ties of 0.05
    ties = np.concatenate([head, np.full(5, p_k), np.zeros(V - 9)])
    uniform = np.concatenate([head, np.full(V - k, rest / (V - k))])
    for dist, which in ((ties, "lower"), (uniform, "upper")):
        ids, lps = _top_k(dist[None, :], k)
        st = topk_step_stats(ids, lps, (), vocab_size=V, exact_kept_set=False)
        got = st.entropy[0] if which == "lower" else st.entropy_upper[0]
        assert got == pytest.approx(scipy_entropy(dist), abs=1e-6), which


def test_small_residual_uses_zero_floor():
    """When 1 - Z < p_K, H(r) >= 0 is the binding lower bound (one residual token)."""
    dist = np.concatenate([[0.5, 0.3, 0.15], [0.05], np.zeros(V - 4)])
    ids, lps = _top_k(dist[None, :], 3)
    st = topk_step_stats(ids, lps, (), vocab_size=V, exact_kept_set=False)
    assert st.entropy[0] == pytest.approx(scipy_entropy(dist), abs=1e-6)


def test_exact_when_k_covers_kept_set():
    rng = np.random.default_rng(2)
    for support in (1, 3, 10, 25):
        probs = _random_dists(rng, 200, support)
        truth = scipy_entropy(probs, axis=1)
        for k in (support, support + 5):
            ids, lps = _top_k(probs, k)
            st = topk_step_stats(ids, lps, (7,), vocab_size=V, exact_kept_set=True)
            np.testing.assert_allclose(st.entropy, truth, rtol=1e-5, atol=1e-6)
            assert st.entropy_upper is None
            np.testing.assert_allclose(st.eos_prob, probs[:, 7], rtol=1e-5, atol=1e-7)
            # bounds mode collapses to the same number when nothing is missing
            sb = topk_step_stats(ids, lps, (7,), vocab_size=V, exact_kept_set=False)
            np.testing.assert_allclose(sb.entropy_upper, sb.entropy, atol=1e-6)


def test_ties_at_kth_value_exact():
    """bf16-style ties: the kept set has more than K tokens, all extra ones at p_K."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        k = int(rng.integers(2, 12))
        n_ties = int(rng.integers(1, 6))
        head = np.sort(rng.uniform(1.0, 3.0, k - 1))[::-1]
        tie = rng.uniform(0.2, 0.9)
        w = np.concatenate([head, np.full(n_ties + 1, tie)])
        dist = np.zeros(V)
        dist[rng.permutation(V)[: len(w)]] = w / w.sum()
        ids, lps = _top_k(dist[None, :], k)
        st = topk_step_stats(ids, lps, (), vocab_size=V, exact_kept_set=True)
        assert st.entropy[0] == pytest.approx(scipy_entropy(dist), abs=2e-6)


def test_duplicate_sampled_entry_counted_once():
    dist = np.concatenate([[0.5, 0.3, 0.2], np.zeros(V - 3)])
    ids, lps = _top_k(dist[None, :], 3)
    # vLLM lists the sampled token (id 1) beside the top-k: same id twice
    st = topk_step_stats(
        ids,
        lps,
        (),
        vocab_size=V,
        exact_kept_set=True,
        extra_ids=np.array([1]),
        extra_logprobs=np.array([np.log(0.3)]),
    )
    assert st.entropy[0] == pytest.approx(scipy_entropy(dist), abs=1e-6)
    assert st.covered_mass[0] == pytest.approx(1.0, abs=1e-6)
    # sampled token outside the top list (a tie at p_K): counted, and p_K stays the top's
    dist = np.concatenate([[0.4, 0.2, 0.2, 0.2], np.zeros(V - 4)])
    st = topk_step_stats(
        np.array([[0, 1, 2]]),
        np.log([[0.4, 0.2, 0.2]]),
        (3,),
        vocab_size=V,
        exact_kept_set=True,
        extra_ids=np.array([3]),
        extra_logprobs=np.log([0.2]),
    )
    assert st.entropy[0] == pytest.approx(scipy_entropy(dist), abs=1e-6)
    assert st.eos_prob[0] == pytest.approx(0.2, abs=1e-7)


def test_pad_ragged_roundtrip():
    counts = np.array([2, 0, 3])
    ids = np.array([4, 5, 6, 7, 8])
    lps = np.log(np.array([0.5, 0.5, 0.2, 0.3, 0.5]))
    pid, plp = pad_ragged(counts, ids, lps)
    assert pid.tolist() == [[4, 5, -1], [-1, -1, -1], [6, 7, 8]]
    assert np.isneginf(plp[1]).all()
    np.testing.assert_allclose(np.exp(plp).sum(1), [1.0, 0.0, 1.0])
    rid, _ = pad_ragged(np.array([2, 2]), np.array([1, 2, 3, 4]), np.zeros(4))
    assert rid.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_positive_inf_logprob_is_refused(bad):
    """A broken entry would otherwise count as probability 0 and change the entropy."""
    ids, lps = _top_k(_random_dists(np.random.default_rng(4), 3), 5)
    broken = lps.copy()
    broken[1, 2] = bad
    with pytest.raises(CanopyError, match="NaN or \\+inf"):
        topk_step_stats(ids, broken, (), vocab_size=V, exact_kept_set=True)
    with pytest.raises(CanopyError, match="NaN or \\+inf"):
        topk_step_stats(
            ids,
            lps,
            (),
            vocab_size=V,
            exact_kept_set=False,
            extra_ids=np.array([1, 2, 3]),
            extra_logprobs=np.array([np.log(0.1), bad, np.log(0.1)]),
        )
    # -inf is a legitimate probability 0 (padding, cut tokens)
    padded = lps.copy()
    padded[:, -1] = -np.inf
    st = topk_step_stats(ids, padded, (), vocab_size=V, exact_kept_set=False)
    assert np.all(np.isfinite(st.entropy)) and np.all(np.isfinite(st.entropy_upper))
