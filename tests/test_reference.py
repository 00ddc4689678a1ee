"""The exact finite-state reference model: closed forms against brute-force enumeration, and
the estimators of canopy_entropy.metrics against the closed forms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from canopy_entropy.metrics import compute_metrics
from canopy_entropy.reference import FiniteStateLM


def _tiny() -> FiniteStateLM:
    return FiniteStateLM(
        eos_prob=np.array([0.3, 0.55]),
        emission=np.array([[0.7, 0.3], [0.2, 0.8]]),
        next_state=np.array([[1, 0], [0, 1]]),
    )


def _enumerate(lm: FiniteStateLM, pi0: np.ndarray, cap: int):
    """Every generation up to the cap (cut ones summed over their last token) with its
    probability, (length, cut) and rate: independent of the closed form. With one start
    state, distinct token sequences are distinct outcomes, so -sum p log p is H(N, Y)."""
    probs, lengths, rates = [], [], []
    for s0 in range(lm.n_states):
        for n in range(1, cap + 1):
            for toks in itertools.product(range(lm.vocab), repeat=n - 1):
                for final in ("eos", "cut") if n == cap else ("eos",):
                    p, s, h = pi0[s0], s0, 0.0
                    for v in toks:
                        h += lm.step_entropy[s]
                        p *= (1 - lm.eos_prob[s]) * lm.emission[s, v]
                        s = lm.next_state[s, v]
                    h += lm.step_entropy[s]
                    if final == "eos":
                        p *= lm.eos_prob[s]
                        probs.append(p), lengths.append((n, 0)), rates.append(h / n)
                    else:  # cut at the cap: any last content token (summed over the last step)
                        for v in range(lm.vocab):
                            q = p * (1 - lm.eos_prob[s]) * lm.emission[s, v]
                            probs.append(q), lengths.append((n, 1)), rates.append(h / n)
    return np.array(probs), lengths, np.array(rates)


def test_exact_matches_enumeration_single_start_state():
    lm = _tiny()
    cap = 7
    pi0 = np.array([1.0, 0.0])
    probs, lengths, rates = _enumerate(lm, pi0, cap)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    mask = probs > 0
    joint = -(probs[mask] * np.log(probs[mask])).sum()  # H(N, Y) of whole generations
    n = np.array([ln for ln, _ in lengths])
    law: dict[tuple[int, int], float] = {}
    for key, p in zip(lengths, probs, strict=True):
        law[key] = law.get(key, 0.0) + p
    h_n = -sum(p * math.log(p) for p in law.values() if p > 0)
    ex = lm.exact(pi0, max_new_tokens=cap)
    assert ex.ce_star == pytest.approx(joint, rel=1e-12)
    assert ex.mean_length == pytest.approx((probs * n).sum(), rel=1e-12)
    assert ex.length_entropy == pytest.approx(h_n, rel=1e-12)
    assert ex.entropy_rate == pytest.approx((probs * rates).sum(), rel=1e-12)
    assert ex.truncation_prob == pytest.approx(law[(cap, 1)], rel=1e-12)


def test_exact_without_cap_is_limit_of_capped():
    lm = FiniteStateLM.random(3, 4, seed=2, mean_eos=0.2)
    pi0 = np.array([0.2, 0.5, 0.3])
    free = lm.exact(pi0)
    capped = lm.exact(pi0, max_new_tokens=400)
    assert free.ce_star == pytest.approx(capped.ce_star, rel=1e-10)
    assert free.length_entropy == pytest.approx(capped.length_entropy, rel=1e-10)
    # E[N] for a geometric-like law: sum of survival probabilities
    assert free.mean_length == pytest.approx(
        float(np.arange(1, len(free.length_pmf) + 1) @ free.length_pmf), rel=1e-10
    )


@pytest.fixture(scope="module")
def lm() -> FiniteStateLM:
    return FiniteStateLM.random(4, 6, seed=1, mean_eos=0.12)


def test_estimators_within_three_se_of_exact(lm, tmp_path):
    """CE*, GenPPL, H(N) (EOS hazard), rate: repeated runs on fixed prompts, mean within 3 SE."""
    reps, P, M = 12, 10, 40
    est = {k: [] for k in ("ce_star", "genppl", "length_entropy", "entropy_rate", "stop_entropy")}
    within_se = []
    initials = None
    for rep in range(reps):
        initials = lm.sample_store(tmp_path / f"r{rep}", P, M, seed=100 + rep, prompt_seed=7)
        pooled = compute_metrics(tmp_path / f"r{rep}", warn=False).pooled.iloc[0]
        for k in est:
            est[k].append(pooled[k])
        within_se.append(math.sqrt(pooled["ce_star_var_within"]))
        # one run alone: CE* within 3 within-prompt SE (prompts are fixed here)
    exact = FiniteStateLM.pooled(lm.exact_prompts(initials))
    errors = np.array(est["ce_star"]) - exact["ce_star"]
    assert np.all(np.abs(errors) < 3.5 * np.array(within_se))
    for k, values in est.items():
        values = np.array(values)
        sd = values.std(ddof=1)  # the SE of one run's estimate, from the repeats
        # every single run lands within 3 SE of the exact value
        assert np.all(np.abs(values - exact[k]) < 3 * sd), (k, values, exact[k], sd)
        # the mean of the runs is within 3 SE of the mean (bias is small against the noise;
        # GenPPL is a ratio and H(N) a plug-in of the smoothed EOS-hazard law: O(1/M) bias)
        assert abs(values.mean() - exact[k]) < 3 * sd / math.sqrt(reps), (k, values, sd)


def test_hazard_length_entropy_beats_histogram(lm, tmp_path):
    P, M = 12, 15
    err_hazard, err_hist = [], []
    for rep in range(6):
        initials = lm.sample_store(tmp_path / f"h{rep}", P, M, seed=500 + rep, prompt_seed=3)
        prompts = compute_metrics(tmp_path / f"h{rep}", warn=False).prompts
        exact = lm.exact_prompts(initials)["length_entropy"].to_numpy()
        err_hazard.append(prompts["length_entropy"].to_numpy() - exact)
        err_hist.append(prompts["length_entropy_hist"].to_numpy() - exact)
    rmse_hazard = math.sqrt(np.mean(np.square(err_hazard)))
    rmse_hist = math.sqrt(np.mean(np.square(err_hist)))
    assert rmse_hazard < 0.5 * rmse_hist, (rmse_hazard, rmse_hist)


def test_reported_se_matches_spread_over_repeats(lm, tmp_path):
    """Fresh prompts each repeat: Var(CE*_pool) = s_b^2/P + E[s_w^2]/(PM) (SPEC section 5)."""
    reps, P, M = 40, 12, 8
    values, ses = [], []
    for rep in range(reps):
        lm.sample_store(tmp_path / f"s{rep}", P, M, seed=900 + rep)
        pooled = compute_metrics(tmp_path / f"s{rep}", warn=False).pooled.iloc[0]
        values.append(pooled["ce_star"])
        ses.append(pooled["ce_star_se"])
    spread = np.std(values, ddof=1)
    rms_se = math.sqrt(np.mean(np.square(ses)))
    # sd of a 40-sample SD is about 11%: allow 35%
    assert 0.65 < rms_se / spread < 1.35, (rms_se, spread)


def test_truncated_runs_estimate_target_t(lm, tmp_path):
    """With a cap T the estimators target the truncated values; the bias bound covers the gap."""
    cap = 6
    initials = lm.sample_store(tmp_path / "t", 10, 300, seed=11, max_new_tokens=cap)
    result = compute_metrics(tmp_path / "t", warn=False)
    pooled = result.pooled.iloc[0]
    exact_t = FiniteStateLM.pooled(lm.exact_prompts(initials, max_new_tokens=cap))
    exact_full = FiniteStateLM.pooled(lm.exact_prompts(initials))
    assert abs(pooled["ce_star"] - exact_t["ce_star"]) < 3 * math.sqrt(pooled["ce_star_var_within"])
    assert pooled["truncation_rate"] > 0.3
    assert any("length cap" in n for n in result.notes[("fsm", "base", "synthetic")])
    gap = exact_full["ce_star"] - exact_t["ce_star"]
    assert pooled["truncation_bias_bound"] >= gap  # H_max = log(vocab + 1) from the manifest
    exact_hn = lm.exact_prompts(initials, max_new_tokens=cap)["length_entropy"].mean()
    se_hn = result.prompts["length_entropy"].std(ddof=1) / math.sqrt(10)
    assert abs(pooled["length_entropy"] - exact_hn) < max(3 * se_hn, 0.02)
