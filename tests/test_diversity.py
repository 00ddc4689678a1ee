"""Semantic diversity (SPEC section 6) against brute-force numpy and known cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canopy_entropy.semantic.diversity import (
    diversity_tables,
    pooled_diversity,
    rollout_diversity,
    vendi_score,
)


def unit_rows(rng: np.random.Generator, m: int, dim: int) -> np.ndarray:
    e = rng.standard_normal((m, dim))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def brute_d(e: np.ndarray) -> np.ndarray:
    e = e.astype(np.float64)
    m = len(e)
    return np.array([1 - np.mean([e[i] @ e[j] for j in range(m) if j != i]) for i in range(m)])


def brute_vendi_kernel(e: np.ndarray) -> float:
    e = e.astype(np.float64)
    lam = np.linalg.eigvals(e @ e.T / len(e)).real
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


@pytest.mark.parametrize(("m", "dim"), [(4, 16), (9, 5), (30, 3), (2, 2)])
def test_d_and_vendi_match_brute_force(m: int, dim: int) -> None:
    e = unit_rows(np.random.default_rng(m * 100 + dim), m, dim)
    np.testing.assert_allclose(rollout_diversity(e), brute_d(e), rtol=0, atol=1e-12)
    np.testing.assert_allclose(vendi_score(e), brute_vendi_kernel(e), rtol=1e-9)


def test_both_vendi_forms_agree_when_m_exceeds_dim() -> None:
    e = unit_rows(np.random.default_rng(1), 40, 6).astype(np.float64)
    lam_cov = np.linalg.eigvalsh(e.T @ e / 40)
    lam_ker = np.linalg.eigvalsh(e @ e.T / 40)
    np.testing.assert_allclose(np.sort(lam_cov), np.sort(lam_ker)[-6:], atol=1e-12)
    np.testing.assert_allclose(np.abs(lam_ker[:-6]), 0, atol=1e-12)
    assert vendi_score(e) == pytest.approx(brute_vendi_kernel(e), rel=1e-10)


def test_identical_embeddings_give_d_zero_vendi_one() -> None:
    e = np.repeat(unit_rows(np.random.default_rng(2), 1, 8), 5, axis=0)
    np.testing.assert_allclose(rollout_diversity(e), 0.0, atol=1e-7)
    assert vendi_score(e) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("m", [3, 7])
def test_orthogonal_embeddings_give_d_one_vendi_m(m: int) -> None:
    e = np.eye(12, dtype=np.float32)[:m]
    np.testing.assert_allclose(rollout_diversity(e), 1.0, atol=1e-12)
    assert vendi_score(e) == pytest.approx(m, rel=1e-10)


def test_single_rollout_is_nan() -> None:
    assert np.isnan(rollout_diversity(np.ones((1, 3), np.float32))).all()


@settings(max_examples=30)
@given(st.integers(2, 12), st.integers(2, 10), st.integers(0, 10_000))
def test_vendi_between_one_and_min_m_dim(m: int, dim: int, seed: int) -> None:
    v = vendi_score(unit_rows(np.random.default_rng(seed), m, dim))
    assert 1.0 - 1e-9 <= v <= min(m, dim) + 1e-9


def test_diversity_tables_per_prompt_columns() -> None:
    rng = np.random.default_rng(3)
    rows, embs = [], []
    sizes = {"p0": 9, "p1": 9, "p2": 5}  # two sizes: exercises the batched Vendi stacks
    for pid, m in sizes.items():
        lengths = rng.integers(1, 8, m)  # ties on purpose
        for i in range(m):
            rows.append(("m", "base", "f", "t", pid, i, int(lengths[i])))
        embs.append(unit_rows(rng, m, 6))
    keys = pd.DataFrame(
        rows, columns=["model", "variant", "family", "task", "prompt_id", "rollout_index", "length"]
    )
    emb = np.concatenate(embs)
    perm = rng.permutation(len(keys))  # order of rows must not matter
    prompts, per_rollout = diversity_tables(keys.iloc[perm], emb[perm])
    start = 0
    for (pid, m), e in zip(sizes.items(), embs, strict=True):
        got = prompts.set_index("prompt_id").loc[pid]
        sub = keys.iloc[start : start + m]
        start += m
        d = brute_d(e)
        assert got["diversity"] == pytest.approx(d.mean(), abs=1e-12)
        assert got["vendi"] == pytest.approx(brute_vendi_kernel(e), rel=1e-9)
        assert got["n_rollouts"] == m
        n = sub["length"].to_numpy()
        assert got["corr_length_d"] == pytest.approx(np.corrcoef(n, d)[0, 1], abs=1e-12)
        order = sorted(range(m), key=lambda i: (n[i], i))
        thirds = np.array_split(np.array(order), 3)
        for k, part in enumerate(thirds):
            want = brute_d(e[part]).mean() if len(part) >= 2 else np.nan
            np.testing.assert_allclose(got[f"diversity_len_t{k + 1}"], want, atol=1e-12)
        got_d = per_rollout[per_rollout["prompt_id"] == pid].sort_values("rollout_index")["d"]
        np.testing.assert_allclose(got_d.to_numpy(), d, atol=1e-12)


def test_pooled_vendi_is_the_geometric_mean_and_d_the_mean() -> None:
    rng = np.random.default_rng(5)
    prompts = pd.DataFrame(
        {
            "model": np.repeat(["a", "b"], 6),
            "task": "t",
            "diversity": rng.uniform(0.1, 0.7, 12),
            "vendi": rng.uniform(1.0, 20.0, 12),
        }
    )
    prompts.loc[3, "vendi"] = np.nan  # a prompt without a score is left out
    got = pooled_diversity(prompts, ["model", "task"]).set_index("model")
    for model, sel in prompts.groupby("model"):
        v = sel["vendi"].dropna().to_numpy()
        assert got.loc[model, "vendi"] == pytest.approx(np.prod(v) ** (1 / len(v)), rel=1e-13)
        assert got.loc[model, "diversity"] == pytest.approx(sel["diversity"].mean(), rel=1e-14)
    assert got.loc["a", "vendi"] < prompts["vendi"][:6].mean()  # below the arithmetic mean
