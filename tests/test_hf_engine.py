"""The transformers engine on the tiny model: teacher-forced verification, seeds, finishes,
continuous batching, options and a quiet log."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
import pytest
import torch
from tests.policy_reference import reference_step

from canopy_entropy.engines import hf as hf_module
from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.engines.hf import HFEngine, HFOptions, quiet_transformers
from canopy_entropy.engines.policy_ops import step_stats, step_uniforms
from canopy_entropy.engines.registry import get_engine
from canopy_entropy.errors import ConfigError
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


TEXTS = (
    "Write a story about a robot.",
    "Hi",
    "def add(a, b):\n    return a + b  # and a longer prompt than the others, to pad",
    "Once upon a time",
)


def _requests(engine, m=6, texts=TEXTS):
    """Prompts of different lengths, each with its own seeds."""
    return [(_prompt(engine, t), _seeds(m, 100 * i), np.arange(m)) for i, t in enumerate(texts)]


def _uncached_rollout(model, prompt, seed, policy):
    """A second implementation: one rollout, a full forward pass per step, no cache, no batch."""
    eos = torch.tensor(policy.eos_token_ids)
    seq, out = list(prompt), []
    with torch.no_grad():
        for t in range(policy.max_new_tokens):
            logits = model(input_ids=torch.tensor([seq])).logits[:, -1, :]
            u = step_uniforms(torch.tensor([seed]), t)
            tok = int(step_stats(logits, policy, eos, u).token[0])
            out.append(tok)
            seq.append(tok)
            if tok in policy.eos_token_ids:
                break
    return out


def _assert_same(got, ref):
    np.testing.assert_array_equal(got.offsets, ref.offsets)
    np.testing.assert_array_equal(got.token_ids, ref.token_ids)
    assert got.finish_reason == ref.finish_reason
    for name in ("entropy", "eos_prob", "logprob", "kept_mass"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), atol=1e-5)


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
def test_teacher_forced_recomputation_matches_recorded_steps(engine, kw, monkeypatch):
    """A forward pass over prompt + rollout recomputes every recorded step (float64 oracle)."""
    policy = DecodingPolicy(max_new_tokens=48, eos_token_ids=EOS_IDS, **kw)
    requests = _requests(engine, texts=TEXTS[:2])
    monkeypatch.setattr(engine, "batch_size", 4)  # both prompts share 4 slots, refilled
    batches = engine.sample_many(requests, policy)
    eos_seen = 0.0
    steps = 0
    for (prompt, _, _), batch in zip(requests, batches, strict=True):
        assert set(batch.finish_reason) <= {"eos", "length"}
        e, s = _check_teacher_forced(engine, prompt, batch, kw)
        eos_seen += e
        steps += s
    assert steps > 120 and eos_seen > 0.05  # the check covered EOS mass, not just zeros


def _check_teacher_forced(engine, prompt, batch, kw):
    eos_seen = 0.0
    steps = 0
    for i in range(len(batch.seed)):
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
    return eos_seen, steps


def test_rollouts_equal_an_uncached_sampler_whatever_the_batching(engine, monkeypatch):
    """Tokens are a function of the seed only: the same for every batch size, refill order and
    grouping of prompts per call, and equal to a no-cache, one-rollout-at-a-time sampler."""
    policy = DecodingPolicy(temperature=1.0, top_k=50, max_new_tokens=40, eos_token_ids=EOS_IDS)
    requests = _requests(engine)
    assert len({len(r[0]) for r in requests}) == len(requests)  # prompts of different lengths
    expected = [
        [_uncached_rollout(engine.model, prompt, int(s), policy) for s in seeds]
        for prompt, seeds, _ in requests
    ]
    runs = {}
    for size in (1, 3, 8, 13, 24):
        monkeypatch.setattr(engine, "batch_size", size)
        runs[f"batch {size}, all prompts"] = engine.sample_many(requests, policy)
    monkeypatch.setattr(engine, "batch_size", 5)
    runs["one prompt per call"] = [engine.sample(*r, policy) for r in requests]
    runs["reversed prompts"] = engine.sample_many(requests[::-1], policy)[::-1]
    runs["two calls"] = engine.sample_many(requests[:3], policy) + engine.sample_many(
        requests[3:], policy
    )
    lengths = np.concatenate([np.diff(b.offsets) for b in runs["one prompt per call"]])
    assert len(set(lengths.tolist())) > 6 and lengths.max() == 40  # rollouts end at many steps
    for name, batches in runs.items():
        for batch, want in zip(batches, expected, strict=True):
            assert [t.tolist() for t in batch.split(batch.token_ids)] == want, name
        for batch, ref in zip(batches, runs["one prompt per call"], strict=True):
            _assert_same(batch, ref)
    # a rollout alone equals the same rollout among the others
    prompt, seeds, _ = requests[2]
    alone = engine.sample(prompt, seeds[4:5], np.array([4]), policy)
    assert alone.token_ids.tolist() == expected[2][4]


def _simulate_slots(lengths: list[int], slots: int) -> tuple[int, int]:
    """Forward passes and idle slot-steps of refilling ``slots`` slots in order (by hand).

    A rollout of n tokens takes its first token from the prefill and then n - 1 forwards; a
    slot freed after a forward takes the next rollout before the following forward.
    """
    queue = list(lengths)
    live: list[int] = []  # forwards each live slot still needs
    forwards = idle = 0
    while queue or live:
        while queue and len(live) < slots:
            left = queue.pop(0) - 1
            if left:  # a one-token rollout ends on its prefill token and frees the slot again
                live.append(left)
        if not live:
            continue
        forwards += 1
        idle += slots - len(live)
        live = [x - 1 for x in live if x > 1]
    return forwards, idle


def test_occupancy_counts_match_a_simulation_of_the_slots(engine, monkeypatch):
    policy = DecodingPolicy(top_k=50, max_new_tokens=40, eos_token_ids=EOS_IDS)
    requests = _requests(engine, m=5)
    monkeypatch.setattr(engine, "batch_size", 4)
    monkeypatch.setattr(engine, "stats", {"forwards": 0, "tokens": 0, "idle_slot_steps": 0})
    batches = engine.sample_many(requests, policy)
    lengths = np.concatenate([np.diff(b.offsets) for b in batches]).tolist()
    forwards, idle = _simulate_slots(lengths, 4)
    assert engine.stats == {"forwards": forwards, "tokens": sum(lengths), "idle_slot_steps": idle}
    assert engine.occupancy == pytest.approx(sum(lengths) / (sum(lengths) + idle))
    # lockstep batches of one prompt (the old engine) idle far more on the same lengths
    per_prompt = [np.diff(b.offsets) for b in batches]
    lockstep = sum(4 * max(x[i : i + 4]) for x in per_prompt for i in range(0, len(x), 4))
    assert engine.occupancy > sum(lengths) / lockstep + 0.1


def test_sliding_window_model_with_padded_refills_equals_the_uncached_sampler(engine):
    """Hybrid sliding-window (window 6) + full attention: prompts and rollouts longer than the
    window, rows of different lengths in one batch, refills."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=engine.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512, eos_token_id=list(EOS_IDS), pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(3)
    model = Gemma3ForCausalLM(cfg).eval()
    gemma = HFEngine.from_model(model, engine.tokenizer, batch_size=3)
    policy = DecodingPolicy(temperature=1.2, max_new_tokens=30, eos_token_ids=EOS_IDS)
    requests = [
        (p[:n], s[:4], i[:4]) for (p, s, i), n in zip(_requests(engine), (3, 9, 40, 5), strict=True)
    ]
    batches = gemma.sample_many(requests, policy)
    lengths = np.concatenate([np.diff(b.offsets) for b in batches])
    assert lengths.max() > 6 and len(set(lengths.tolist())) > 3
    for (prompt, seeds, _), batch in zip(requests, batches, strict=True):
        want = [_uncached_rollout(model, prompt, int(s), policy) for s in seeds]
        assert [t.tolist() for t in batch.split(batch.token_ids)] == want
        ids = torch.tensor([prompt + batch.token_ids[: batch.offsets[1]].tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 :].double().numpy()
        for t in range(batch.offsets[1]):
            h = reference_step(logits[t], EOS_IDS, temperature=1.2)[0]
            assert abs(batch.entropy[t] - h) < 1e-4


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
    policy = DecodingPolicy(top_k=30, max_new_tokens=30, eos_token_ids=EOS_IDS)
    requests = _requests(engine, m=4, texts=TEXTS[:2])
    monkeypatch.setattr(engine, "batch_size", 2)
    ref = engine.sample_many(requests, policy)
    original = hf_module._PaddedCache.forward
    rows = []

    def flaky(self, tokens):
        rows.append(len(tokens))
        if len(tokens) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, tokens)

    monkeypatch.setattr(hf_module._PaddedCache, "forward", flaky)
    engine.batch_size = 8
    got = engine.sample_many(requests, policy)
    assert rows[:2] == [8, 4] and max(rows[2:]) == 2 and engine.batch_size == 2
    for a, b in zip(got, ref, strict=True):
        _assert_same(a, b)


def test_other_errors_are_not_swallowed(engine, monkeypatch):
    def broken(self, tokens):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(hf_module._PaddedCache, "forward", broken)
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


def test_no_deprecated_cache_warning_is_emitted(engine):
    """The cache goes in as ``cache=``: no FutureWarning, no transformers deprecation log
    (checked with a verbose engine, so nothing is merely hidden)."""
    loud = HFEngine.from_model(engine.model, engine.tokenizer, verbose=True, batch_size=3)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loud.sample_many(
                _requests(engine, m=4),
                DecodingPolicy(top_k=20, max_new_tokens=8, eos_token_ids=EOS_IDS),
            )
            # the check can fail: the deprecated keyword does warn here
            engine.model(input_ids=torch.tensor([[5, 6]]), past_key_values=None)
    finally:
        tf_logger.removeHandler(handler)
    deprecated = [w for w in caught if "past_key_values" in str(w.message)]
    assert len(deprecated) == 1 and deprecated[0].category is FutureWarning
    assert not [r for r in records if "deprecated" in r.getMessage()]


def test_loading_bars_and_warnings_stay_out_of_the_output_unless_verbose(tiny_model, capfd):
    HFEngine(str(tiny_model), device="cpu").close()
    quiet = capfd.readouterr()
    HFEngine(str(tiny_model), device="cpu", verbose=True).close()
    loud = capfd.readouterr()
    assert "Loading weights" in loud.err  # transformers does draw a bar when allowed to
    assert "Loading weights" not in quiet.err and quiet.out == ""


def test_quiet_transformers_hides_notes_but_not_errors(engine):
    from transformers.utils import logging as tf_logging

    before = tf_logging.get_verbosity()
    log = tf_logging.get_logger("transformers.canopy_test")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_transformers():
                engine.model(input_ids=torch.tensor([[5, 6]]), past_key_values=None)
                log.warning("a note for developers")
                log.error("a real problem")
                with pytest.raises(ValueError, match="exactly one of"):
                    engine.model(input_ids=None)
            assert not caught
            engine.model(input_ids=torch.tensor([[5, 6]]), past_key_values=None)
            log.warning("a note again")
    finally:
        log.removeHandler(handler)
    assert len(caught) == 1  # filters are restored on exit
    assert [r.getMessage() for r in records] == ["a real problem", "a note again"]
    assert tf_logging.get_verbosity() == before


def test_options_are_declared_and_unknown_ones_refused(tiny_model):
    assert set(HFEngine.OPTIONS) == {f.name for f in dataclasses.fields(HFOptions)}
    assert HFEngine.OPTIONS["batch_size"] == int | None
    with pytest.raises(ConfigError, match="engine 'hf' has no option 'batch_sise'; did you mean"):
        get_engine("hf", str(tiny_model), batch_sise=8)
    with pytest.raises(ConfigError, match="option 'prompts_per_call' must be int"):
        HFEngine(str(tiny_model), prompts_per_call="4")
    with pytest.raises(ConfigError, match="prompts_per_call must be >= 1"):
        HFEngine(str(tiny_model), prompts_per_call=0)
    eng = get_engine("hf", str(tiny_model), device="cpu", prompts_per_call=3, batch_size=None)
    assert eng.prompts_per_call == 3 and eng.batch_size is None


def test_bad_requests_are_one_line_errors(engine):
    policy = DecodingPolicy(eos_token_ids=EOS_IDS)
    with pytest.raises(ConfigError, match="the prompt has no tokens"):
        engine.sample_many(
            [(_prompt(engine), _seeds(2), np.arange(2)), ([], _seeds(1), [0])], policy
        )
    with pytest.raises(ConfigError, match="3 seeds for 2 rollout indices"):
        engine.sample(_prompt(engine), _seeds(3), np.arange(2), policy)
    assert engine.sample_many([], policy) == []
