"""H(min(N, T)) from the EOS hazard: brute-force laws on hand-made hazards, the exact model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import entr

from canopy_entropy.metrics import compute_metrics
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.run.manifest import Manifest, ModelRecord, PolicyRecord, write_manifest
from canopy_entropy.stats.length_law import capped_length_entropy, geometric_run_entropy
from canopy_entropy.store import RunStore
from metrics_helpers import make_rollouts

# four rollouts that all end by EOS; lengths 1, 2, 3, 4; lambda per step
EOS = [[0.5], [0.25, 0.5], [0.0, 0.25, 0.5], [0.25, 0.25, 0.25, 0.5]]


def capped_store(tmp_path, eos, finish, cap):
    """A run folder whose manifest records the cap T (no rollout need reach it)."""
    store = RunStore(tmp_path / "run")
    table = make_rollouts(
        {"p": [[0.5] * len(e) for e in eos]}, eos={"p": eos}, finish={"p": finish}
    )
    store.write_rollouts("s", table)
    record = ModelRecord("m", "m", "base", "m", "import", policy=PolicyRecord(max_new_tokens=cap))
    write_manifest(store.root, Manifest(models={"m": record}))
    return store


def brute_force_law(eos: list[list[float]], cap: int) -> np.ndarray:
    """The law on 1..T plus "cut", built one length at a time from the documented rule."""
    M = len(eos)
    lengths = sorted(len(e) for e in eos)
    n_max = lengths[-1]
    p_hat = [sum(e[n - 1] for e in eos if len(e) >= n) / M for n in range(1, n_max + 1)]
    leftover = max(1.0 - sum(p_hat), 0.0)
    u = min(lengths[math.floor(0.75 * (M - 1))], cap - 1, n_max - 1)
    at_risk = [len(e) - u for e in eos if len(e) > u]
    q = sum(e[n - 1] for e in eos for n in range(u + 1, len(e) + 1)) / sum(at_risk)
    fitted = len(at_risk) / M * (1 - q) ** (n_max - u)
    spread = min(leftover, fitted)
    law = list(p_hat)
    for n in range(n_max + 1, cap + 1):
        law.append(spread * q * (1 - q) ** (n - n_max - 1))
    law.append(leftover - sum(law[n_max:]))  # "cut at T": whatever is left
    return np.array(law)


@pytest.mark.parametrize("cap", [4, 6, 30])
def test_capped_law_matches_brute_force(tmp_path, cap):
    law = brute_force_law(EOS, cap)
    assert len(law) == cap + 1  # lengths 1..T and "cut": nothing beyond T
    assert law.sum() == pytest.approx(1.0, abs=1e-15)
    assert law.min() >= 0
    # cut = 1 - sum_{n <= T} of the reported law
    assert law[-1] == pytest.approx(1.0 - law[:-1].sum(), abs=1e-15)
    store = capped_store(tmp_path, EOS, ["eos"] * 4, cap)
    row = compute_metrics(store, warn=False).prompts.iloc[0]
    assert row["length_entropy"] == pytest.approx(entr(law).sum(), rel=1e-12)


def test_hand_values_of_the_capped_law():
    # p_hat = .25, .25, .1875, .125; leftover .1875; u = 3, one rollout at risk for one step
    # with lambda .5: q = .5; fitted P(N > 4) = 1/4 * 1/2 = .125 of the leftover spreads
    law = brute_force_law(EOS, 6)
    expected = [0.25, 0.25, 0.1875, 0.125, 0.0625, 0.03125, 0.09375]
    assert law == pytest.approx(expected, abs=1e-15)


def test_cut_rollouts_give_the_whole_leftover_to_cut(tmp_path):
    eos = [[0.25, 0.25, 0.25], [0.5]]  # the first is cut at T = 3
    store = capped_store(tmp_path, eos, ["length", "eos"], 3)
    row = compute_metrics(store, warn=False).prompts.iloc[0]
    p_hat = np.array([0.375, 0.125, 0.125])
    law = np.append(p_hat, 1 - p_hat.sum())
    assert row["length_entropy"] == pytest.approx(entr(law).sum(), rel=1e-14)


def test_mass_over_one_is_scaled_and_nothing_is_left(tmp_path):
    eos = [[0.75, 0.75], [0.75, 0.75]]  # p_hat = .75, .75: sum 1.5
    store = capped_store(tmp_path, eos, ["eos", "eos"], 10)
    row = compute_metrics(store, warn=False).prompts.iloc[0]
    assert row["length_entropy"] == pytest.approx(math.log(2), rel=1e-14)


def test_geometric_run_entropy_is_the_entropy_of_its_law():
    for q, k in [(0.3, 1), (0.3, 7), (0.05, 40), (1.0, 5)]:
        law = [q * (1 - q) ** (j - 1) for j in range(1, k + 1)] + [(1 - q) ** k]
        assert geometric_run_entropy(q, k) == pytest.approx(entr(np.array(law)).sum(), 1e-12)
    law = np.array([0.2 * 0.8**j for j in range(2000)])
    assert geometric_run_entropy(0.2, np.inf) == pytest.approx(entr(law).sum(), rel=1e-12)


def test_capped_length_entropy_random_laws_against_explicit_arrays():
    rng = np.random.default_rng(4)
    for _ in range(50):
        n_max, cap = int(rng.integers(1, 6)), int(rng.integers(6, 12))
        p = rng.uniform(0, 0.3, n_max)
        q, budget = rng.uniform(0.05, 1.0), rng.uniform(0, 0.5)
        leftover = max(1 - p.sum(), 0)
        body = p / max(p.sum(), 1)
        spread = min(leftover, budget)
        tail = [spread * q * (1 - q) ** j for j in range(cap - n_max)]
        law = np.concatenate([body, tail, [leftover - sum(tail)]])
        assert len(law) == cap + 1 and law.sum() == pytest.approx(1, abs=1e-12)
        got = capped_length_entropy(p[None], np.array([n_max]), np.array([cap]), q, budget)
        assert got[0] == pytest.approx(entr(law).sum(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("cap", [15, 40])  # cuts about 10% / 0.2% of the rollouts
def test_reference_model_within_three_se(tmp_path, cap):
    lm = FiniteStateLM.random(4, 6, seed=1, mean_eos=0.12)
    P = 20
    initials = lm.sample_store(tmp_path / "r", P, 200, seed=21, max_new_tokens=cap)
    prompts = compute_metrics(tmp_path / "r", warn=False).prompts
    exact = lm.exact_prompts(initials, max_new_tokens=cap)["length_entropy"].to_numpy()
    err = prompts["length_entropy"].to_numpy() - exact
    se = err.std(ddof=1) / math.sqrt(P)
    assert abs(err.mean()) < 3 * se, (err.mean(), se)
