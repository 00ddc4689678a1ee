"""The transformers engine on the tiny model: teacher-forced verification, seeds, finishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.policy_reference import reference_step

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.engines.hf import HFEngine
from canopy_entropy.prompting import render_prompt

EOS_IDS = (2, 4)  # <|eos|> and <|im_end|> of the tiny model


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = HFEngine(str(tiny_model), device="cpu")
    yield eng
    eng.close()


def _prompt(engine, text="Write a story about a robot.", variant="instruct"):
    return render_prompt(engine.tokenizer, text, variant)[1]


def _seeds(n, offset=0):
    return np.arange(offset, offset + n, dtype=np.int64) * 7919 + 11


def test_engine_facts(engine):
    assert engine.eos_token_ids == EOS_IDS
    assert engine.vocab_size == len(engine.tokenizer)
    assert engine.context_length == 512
    info = engine.describe()
    assert info["engine"] == "hf" and len(info["tokenizer_sha256"]) == 64


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, top_k=20),
        dict(temperature=1.3, top_p=0.85),
        dict(temperature=1.0, min_p=0.05),
        dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.01),
    ],
)
def test_teacher_forced_recomputation_matches_recorded_steps(engine, kw):
    """A forward pass over prompt + rollout recomputes every recorded step (float64 oracle)."""
    prompt = _prompt(engine)
    policy = DecodingPolicy(max_new_tokens=48, eos_token_ids=EOS_IDS, **kw)
    batch = engine.sample(prompt, _seeds(6), np.arange(6), policy)
    assert set(batch.finish_reason) <= {"eos", "length"}
    eos_seen = 0.0
    steps = 0
    for i in range(6):
        lo, hi = batch.offsets[i], batch.offsets[i + 1]
        toks = batch.token_ids[lo:hi]
        if batch.finish_reason[i] == "eos":
            assert toks[-1] in EOS_IDS and not np.isin(toks[:-1], EOS_IDS).any()
        else:
            assert hi - lo == 48 and not np.isin(toks, EOS_IDS).any()
        ids = torch.tensor([prompt + toks.tolist()])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0].double().numpy()
        for t in range(hi - lo):
            h, eos, z, logq = reference_step(logits[len(prompt) - 1 + t], EOS_IDS, **kw)
            assert abs(batch.entropy[lo + t] - h) < 1e-4
            assert abs(batch.eos_prob[lo + t] - eos) < 1e-4
            assert abs(batch.logprob[lo + t] - logq[toks[t]]) < 1e-4
            assert abs(batch.kept_mass[lo + t] - z) < 1e-4
            eos_seen += eos
            steps += 1
    assert steps > 60 and eos_seen > 0.05  # the check covered EOS mass, not just zeros


def test_same_rollouts_for_batch_sizes_1_3_8(engine):
    prompt = _prompt(engine)
    policy = DecodingPolicy(temperature=1.0, top_k=50, max_new_tokens=40, eos_token_ids=EOS_IDS)
    results = []
    for size in (1, 3, 8):
        engine.batch_size = size
        results.append(engine.sample(prompt, _seeds(8), np.arange(8), policy))
    engine.batch_size = None
    ref = results[0]
    assert len(set(ref.offsets.tolist())) > 4  # rollouts of different lengths
    for other in results[1:]:
        np.testing.assert_array_equal(other.offsets, ref.offsets)
        np.testing.assert_array_equal(other.token_ids, ref.token_ids)
        assert other.finish_reason == ref.finish_reason
        for name in ("entropy", "eos_prob", "logprob", "kept_mass"):
            np.testing.assert_allclose(getattr(other, name), getattr(ref, name), atol=1e-5)
    # a rollout depends on its seed only: rollout 5 alone equals rollout 5 in the batch
    alone = engine.sample(prompt, _seeds(8)[5:6], np.array([5]), policy)
    np.testing.assert_array_equal(alone.token_ids, ref.token_ids[ref.offsets[5] : ref.offsets[6]])


def test_greedy_equals_transformers_generate(engine):
    prompt = _prompt(engine, "Once upon a time", "base")
    policy = DecodingPolicy(temperature=0.0, max_new_tokens=30, eos_token_ids=EOS_IDS)
    batch = engine.sample(prompt, _seeds(3), np.arange(3), policy)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = engine.model.generate(
            ids, do_sample=False, max_new_tokens=30, eos_token_id=list(EOS_IDS), pad_token_id=0
        )[0, len(prompt) :].numpy()
    per = batch.split(batch.token_ids)
    for toks in per:
        np.testing.assert_array_equal(toks, out[: len(toks)])
    assert np.all(batch.entropy == 0) and np.all(batch.logprob == 0)
    assert batch.text[0] == engine.tokenizer.decode(out[: len(per[0])], skip_special_tokens=True)


def test_stop_string_ends_rollout_at_first_occurrence(engine):
    prompt = _prompt(engine)
    base_policy = DecodingPolicy(top_k=50, max_new_tokens=40, eos_token_ids=EOS_IDS)
    ref = engine.sample(prompt, _seeds(1), np.arange(1), base_policy)
    toks = ref.token_ids.tolist()
    assert len(toks) >= 8
    stop = engine.tokenizer.decode(toks[5:7])
    expected = next(j for j in range(len(toks)) if stop in engine.tokenizer.decode(toks[: j + 1]))
    policy = DecodingPolicy(
        top_k=50, max_new_tokens=40, eos_token_ids=EOS_IDS, stop_strings=(stop,)
    )
    got = engine.sample(prompt, _seeds(1), np.arange(1), policy)
    assert got.finish_reason == ["stop"]
    np.testing.assert_array_equal(got.token_ids, toks[: expected + 1])
    np.testing.assert_allclose(got.entropy, ref.entropy[: expected + 1], atol=1e-6)


def test_out_of_memory_halves_batch_and_keeps_results(engine, monkeypatch):
    prompt = _prompt(engine)
    policy = DecodingPolicy(top_k=30, max_new_tokens=30, eos_token_ids=EOS_IDS)
    engine.batch_size = 2
    ref = engine.sample(prompt, _seeds(8), np.arange(8), policy)
    original = HFEngine._sample_batch
    calls = []

    def flaky(self, cache, logits, seeds, pol):
        calls.append(len(seeds))
        if len(seeds) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, cache, logits, seeds, pol)

    monkeypatch.setattr(HFEngine, "_sample_batch", flaky)
    engine.batch_size = 8
    got = engine.sample(prompt, _seeds(8), np.arange(8), policy)
    assert calls == [8, 4, 2, 2, 2, 2] and engine.batch_size == 2
    np.testing.assert_array_equal(got.token_ids, ref.token_ids)
    assert got.finish_reason == ref.finish_reason
    engine.batch_size = None


def test_other_errors_are_not_swallowed(engine, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(HFEngine, "_sample_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.sample(
            _prompt(engine), _seeds(2), np.arange(2), DecodingPolicy(eos_token_ids=EOS_IDS)
        )


def test_length_cap_and_eos_finish_reasons(engine):
    policy = DecodingPolicy(top_k=50, max_new_tokens=5, eos_token_ids=EOS_IDS)
    batch = engine.sample(_prompt(engine), _seeds(16), np.arange(16), policy)
    lengths = np.diff(batch.offsets)
    for n, reason, toks in zip(
        lengths, batch.finish_reason, batch.split(batch.token_ids), strict=True
    ):
        assert n <= 5
        assert reason == ("eos" if toks[-1] in EOS_IDS else "length")
        assert reason == "eos" or n == 5
    assert batch.rollout_index.tolist() == list(range(16))
