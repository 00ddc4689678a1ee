"""`canopy score`'s vLLM path (prompt log-probs) on the tiny model: with the whole vocabulary
returned it equals the transformers teacher-forced diagnostics; with top-k only, p, log p and
rank stay exact and the entropy / expected-rank intervals hold the exact values.

Runs only where vllm imports (its own CI step and venv: .ci/vllm-tests.sh)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from canopy_entropy.diagnostics import (
    ReferenceAnswer,
    encode_answers,
    teacher_force,
    vllm_prompt_diagnostics,
)

pytestmark = pytest.mark.vllm
ANSWERS = [
    ReferenceAnswer(
        id="a1", task="math", prompt="What is 12 times 7?", answer=" 84, since 12 x 7 = 84."
    ),
    ReferenceAnswer(
        id="a2", task="math", prompt="Once upon a time", answer=" there was a small village."
    ),
]


@pytest.fixture(scope="module")
def setup(tiny_model):
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    vocab = len(tok)
    llm = vllm.LLM(model=str(tiny_model), dtype="float32", kv_cache_memory_bytes=64 << 20,
                   enforce_eager=True, max_logprobs=vocab, seed=0)  # fmt: skip
    encoded = encode_answers(tok, ANSWERS, "base", None)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    offsets, flat = teacher_force(hf, encoded, batch_size=2)
    return llm, encoded, vocab, offsets, flat


def test_whole_vocabulary_prompt_logprobs_equal_teacher_forcing(setup):
    llm, encoded, vocab, offsets, flat = setup
    got_offsets, got = vllm_prompt_diagnostics(llm, encoded, k=vocab, vocab_size=vocab)
    np.testing.assert_array_equal(got_offsets, offsets)
    assert got.exact.all()
    np.testing.assert_array_equal(got.rank, flat["rank"])
    np.testing.assert_allclose(got.logp, flat["logp"], atol=2e-4)
    np.testing.assert_allclose(got.entropy_lower, flat["entropy"], atol=2e-4)
    np.testing.assert_allclose(got.expected_rank_upper, flat["expected_rank"], rtol=2e-4)


def test_top_k_prompt_logprobs_bound_the_exact_values(setup):
    llm, encoded, vocab, _, flat = setup
    _, got = vllm_prompt_diagnostics(llm, encoded, k=5, vocab_size=vocab)
    np.testing.assert_array_equal(got.rank, flat["rank"])
    np.testing.assert_allclose(got.logp, flat["logp"], atol=2e-4)
    tol = 2e-4
    assert np.all(got.entropy_lower <= flat["entropy"] + tol)
    assert np.all(flat["entropy"] <= got.entropy_upper + tol)
    assert np.all(got.expected_rank_lower <= flat["expected_rank"] * (1 + tol))
    assert np.all(flat["expected_rank"] <= got.expected_rank_upper * (1 + tol))


def test_score_run_through_vllm_writes_the_transformers_numbers(setup, tiny_model, tmp_path):
    from canopy_entropy.diagnostics import score_run

    llm, *_ = setup
    hf = score_run(tmp_path / "hf", model=str(tiny_model), answers=ANSWERS, device="cpu",
                   dtype="float32")  # fmt: skip
    via = score_run(tmp_path / "vllm", model=str(tiny_model), answers=ANSWERS, engine="vllm",
                    engine_instance=llm)  # fmt: skip
    for col in ("mean_nll", "mean_entropy", "mean_relative_rank"):
        np.testing.assert_allclose(via.answers[col], hf.answers[col], atol=5e-4)
    np.testing.assert_array_equal(via.answers["share_above_expected"],
                                  hf.answers["share_above_expected"])  # fmt: skip
