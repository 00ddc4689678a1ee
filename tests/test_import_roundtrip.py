"""Rollouts the project's own samplers wrote pass every import check and come back unchanged.

Guards the import validation against rejecting real data: the exact reference model (all
fields) and the transformers engine on the tiny model, where top-k = 2 makes H_t = h(eos_prob)
exactly, so only float32 rounding separates them (the case the 1e-5 nats tolerance is for).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from canopy_entropy.importer import import_jsonl
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.store import RunStore

PER_STEP = ("entropy", "eos_prob", "logprob", "kept_mass", "token_ids")
ORDER = [(c, "ascending") for c in ("prompt_id", "rollout_index")]


def export_jsonl(table: pa.Table, path: Path) -> Path:
    """Write store rows as import lines (what another tool would produce)."""
    keep = ["prompt_id", "rollout_index", "seed", "finish_reason", *PER_STEP]
    with open(path, "w") as fh:
        for row in table.select(keep).to_pylist():
            fh.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    return path


def import_quietly(src: Path, run: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a repeat-line warning
        return import_jsonl(src, run, **kw)


def test_reference_model_rollouts_round_trip(tmp_path):
    lm = FiniteStateLM.random(n_states=4, vocab=6, seed=1, mean_eos=0.1)
    lm.sample_store(tmp_path / "orig", n_prompts=12, m=30, seed=3, max_new_tokens=40)
    orig = RunStore(tmp_path / "orig").read_rollouts().sort_by(ORDER)
    src = export_jsonl(orig, tmp_path / "r.jsonl")
    import_quietly(src, tmp_path / "back", model="fsm", variant="base", family="fsm",
                   task="synthetic", max_new_tokens=40)  # fmt: skip
    back = RunStore(tmp_path / "back").read_rollouts().sort_by(ORDER)
    assert back.num_rows == orig.num_rows == 360
    for name in ("prompt_id", "rollout_index", "seed", "finish_reason", "length", *PER_STEP):
        assert back.column(name).equals(orig.column(name)), name
    a = compute_metrics(tmp_path / "orig", warn=False).prompts
    b = compute_metrics(tmp_path / "back", warn=False).prompts
    for col in ("ce_star", "mean_length", "length_entropy", "content_entropy"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)


torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from canopy_entropy.engines.hf import HFEngine
    from canopy_entropy.testing import build_tiny_model

    eng = HFEngine(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")), device="cpu")
    yield eng
    eng.close()


@pytest.mark.parametrize("kw", [{"top_k": 2}, {"top_p": 0.5}, {"temperature": 0.3, "min_p": 0.05}])
def test_hf_engine_rollouts_round_trip(engine, tmp_path, kw):
    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.metrics import binary_entropy
    from canopy_entropy.prompting import render_prompt

    prompt = render_prompt(engine.tokenizer, "Write a story about a robot.", "instruct")[1]
    policy = DecodingPolicy(max_new_tokens=30, eos_token_ids=engine.eos_token_ids, **kw)
    batch = engine.sample(prompt, np.arange(48) * 7919 + 11, np.arange(48), policy)
    if kw == {"top_k": 2}:  # EOS and one other token kept: content entropy exactly 0
        margin = batch.entropy.astype(np.float64) - binary_entropy(batch.eos_prob)
        tight = (batch.eos_prob > 0) & (batch.eos_prob < 0.999)  # not both EOS ids kept
        assert tight.sum() > 10 and np.abs(margin[tight]).max() < 1e-6
    rows = [
        {"prompt_id": "p", "rollout_index": int(i), "seed": int(s), "finish_reason": reason,
         **{name: part.tolist() for name, part in zip(PER_STEP, parts, strict=True)}}
        for i, s, reason, *parts in zip(
            batch.rollout_index, batch.seed, batch.finish_reason,
            *(batch.split(getattr(batch, name)) for name in PER_STEP), strict=True,
        )
    ]  # fmt: skip
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_quietly(src, tmp_path / "run", model="tiny", variant="instruct", max_new_tokens=30)
    back = RunStore(tmp_path / "run").read_rollouts().sort_by(ORDER)
    for name in PER_STEP:
        flat = np.concatenate(back.column(name).to_pylist())
        np.testing.assert_array_equal(flat, getattr(batch, name), err_msg=name)
    assert back.column("finish_reason").to_pylist() == batch.finish_reason
