"""Per-step policy math against an independent float64 implementation and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.policy_reference import reference_step

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.engines.policy_ops import (
    policy_logprobs,
    splitmix64,
    step_stats,
    step_uniforms,
    step_uniforms_numpy,
)
from canopy_entropy.errors import ConfigError

POLICIES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.8, top_k=50, top_p=0.8, min_p=0.02),
    dict(temperature=1.0, top_k=1),
]
EOS = (3, 7)


def _logits(batch=6, vocab=300, seed=0, bf16=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=gen) * 2.5
    x[:, 3] += 3.0  # make EOS ids plausible so their mass is non-trivial
    if bf16:  # bf16 logits: many exact ties (also at the k-th value)
        x = x.to(torch.bfloat16).float()
    return x


@pytest.mark.parametrize("kw", POLICIES)
@pytest.mark.parametrize("bf16", [False, True])
def test_step_stats_match_float64_reference(kw, bf16):
    logits = _logits(bf16=bf16)
    policy = DecodingPolicy(eos_token_ids=EOS, **kw)
    u = torch.linspace(0.01, 0.99, logits.shape[0], dtype=torch.float64)
    st = step_stats(logits, policy, torch.tensor(EOS), u)
    full = policy_logprobs(logits, policy)
    for b in range(logits.shape[0]):
        h, eos, z, logq = reference_step(logits[b].numpy(), EOS, **kw)
        assert st.entropy[b].item() == pytest.approx(h, abs=1e-5)
        assert st.eos_prob[b].item() == pytest.approx(eos, abs=1e-6)
        assert st.kept_mass[b].item() == pytest.approx(z, abs=1e-6)
        tok = st.token[b].item()
        assert np.isfinite(logq[tok]), "sampled a token outside the kept set"
        assert st.logprob[b].item() == pytest.approx(logq[tok], abs=1e-5)
        np.testing.assert_array_equal(np.isfinite(full[b].numpy()), np.isfinite(logq))
        fin = np.isfinite(logq)
        np.testing.assert_allclose(full[b].numpy()[fin], logq[fin], atol=1e-5)


def test_inverse_cdf_with_stratified_uniforms_reproduces_q():
    """n evenly spaced uniforms give each kept token round(n q) +- 1 draws: exact inverse CDF."""
    logits = _logits(batch=1, vocab=60, seed=3)
    policy = DecodingPolicy(temperature=1.1, top_k=25, top_p=0.95, eos_token_ids=EOS)
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    st = step_stats(logits.expand(n, -1), policy, torch.tensor(EOS), u)
    counts = np.bincount(st.token.numpy(), minlength=60)
    q = np.exp(reference_step(logits[0].numpy(), EOS, 1.1, 25, 0.95)[3])
    assert np.all(np.abs(counts - n * q) <= 1.0 + 1e-9)


def test_greedy_is_first_argmax_with_zero_entropy():
    logits = _logits(batch=4)
    logits[0, 3] = 100.0  # EOS is the argmax in row 0
    policy = DecodingPolicy(temperature=0.0, eos_token_ids=EOS)
    st = step_stats(logits, policy, torch.tensor(EOS), torch.rand(4, dtype=torch.float64))
    np.testing.assert_array_equal(st.token.numpy(), np.argmax(logits.numpy(), axis=1))
    assert st.entropy.abs().sum().item() == 0.0
    assert st.logprob.abs().sum().item() == 0.0
    np.testing.assert_array_equal(st.eos_prob.numpy(), [1.0, 0.0, 0.0, 0.0])


def test_top_k_one_is_deterministic_with_zero_entropy():
    logits = _logits()
    policy = DecodingPolicy(top_k=1, eos_token_ids=EOS)
    st = step_stats(logits, policy, torch.tensor(EOS), torch.rand(6, dtype=torch.float64))
    np.testing.assert_array_equal(st.token.numpy(), np.argmax(logits.numpy(), axis=1))
    np.testing.assert_allclose(st.entropy.numpy(), 0.0, atol=1e-7)


def test_uniform_logits_entropy_is_log_k():
    """Closed form: k equal logits kept -> entropy log k, kept mass k / V."""
    logits = torch.zeros(2, 1000)
    logits[:, :10] = 5.0
    policy = DecodingPolicy(top_k=10, eos_token_ids=(0, 1))
    st = step_stats(
        logits, policy, torch.tensor([0, 1]), torch.tensor([0.0, 0.999], dtype=torch.float64)
    )
    np.testing.assert_allclose(st.entropy.numpy(), math.log(10), rtol=1e-6)
    np.testing.assert_allclose(st.eos_prob.numpy(), 0.2, rtol=1e-6)
    z = 10 * math.exp(5) / (10 * math.exp(5) + 990)
    np.testing.assert_allclose(st.kept_mass.numpy(), z, rtol=1e-6)
    assert st.token.tolist() == [0, 9]


def test_splitmix64_matches_published_value_and_python_reference():
    # splitmix64 seeded with 0: first output 0xE220A8397B1DCDAF (Vigna's reference code).
    first = splitmix64(torch.tensor([0], dtype=torch.int64), 0).item() & ((1 << 64) - 1)
    assert first == 0xE220A8397B1DCDAF
    seeds = np.array([0, 1, 12345, (1 << 63) - 1, 987654321987], dtype=np.int64)
    for step in (0, 1, 17, 4095):
        got = step_uniforms(torch.as_tensor(seeds), step).numpy()
        np.testing.assert_array_equal(got, step_uniforms_numpy(seeds, step))
    u = step_uniforms(torch.arange(20000, dtype=torch.int64), 3).numpy()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.01


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(min_p=1.0), "min_p must be in"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(top_p=float("nan")), "top_p must be a finite number"),
        (dict(stop_strings=("",)), "a stop string is empty"),
    ],
)
def test_policy_validation_messages(kw, match):
    with pytest.raises(ConfigError, match=match):
        DecodingPolicy(eos_token_ids=(1,), **kw).validate()


def test_policy_without_eos_or_stop_is_refused():
    with pytest.raises(ConfigError, match="no EOS token and no stop string"):
        DecodingPolicy().validate()
    DecodingPolicy(stop_strings=("\n\n",)).validate()
