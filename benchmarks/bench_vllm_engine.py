"""What recording exact entropy costs with vLLM, and how fast the log-prob conversion is.

Run in the vLLM venv (see .ci/vllm-tests.sh), e.g.:
  VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_NUM_OF_RESERVED_CPU=0 HF_HUB_OFFLINE=1 \
  PYTHONPATH=src .venv-vllm/bin/python benchmarks/bench_vllm_engine.py [--model PATH]

1. conversion: ``outputs_to_compact`` on synthetic flat log-probs (k = 100), steps/s;
2. end to end: the same rollouts (same seeds, so the same tokens) with plain
   ``LLM.generate`` (no log-probs) and with ``VLLMEngine.sample_many`` (top-k processed
   log-probs + conversion + text decoding); tokens/s and the overhead.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def synthetic_outputs(requests: int, steps: int, k: int, vocab: int, seed: int = 0):
    """RequestOutput-like objects with FlatLogprobs-like logprobs (sampled first, then top-k)."""
    rng = np.random.default_rng(seed)
    outs = []
    for _ in range(requests):
        logits = rng.normal(size=(steps, k))
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(steps)])
        pick = rng.integers(0, k, steps)
        sampled_ids = ids[np.arange(steps), pick]
        flat_ids = np.concatenate([sampled_ids[:, None], ids], 1).ravel().tolist()
        flat_lp = np.concatenate([lp[np.arange(steps), pick][:, None], lp], 1).ravel().tolist()
        starts = (np.arange(steps) * (k + 1)).tolist()
        logprobs = SimpleNamespace(
            start_indices=starts,
            end_indices=[s + k + 1 for s in starts],
            token_ids=flat_ids,
            logprobs=flat_lp,
        )
        comp = SimpleNamespace(
            token_ids=sampled_ids.tolist(), logprobs=logprobs, finish_reason="length"
        )
        outs.append(SimpleNamespace(outputs=[comp]))
    return outs


def bench_conversion() -> None:
    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.vllm import outputs_to_compact

    requests, steps, k, vocab = 64, 512, 100, 128_256
    outs = synthetic_outputs(requests, steps, k, vocab)
    policy = DecodingPolicy(top_k=k, max_new_tokens=steps, eos_token_ids=(1, 2))
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        outputs_to_compact(outs, policy, (1, 2), vocab)
        best = min(best, time.perf_counter() - t)
    n = requests * steps
    print(f"conversion: {n} steps x (k+1={k + 1}) entries in {best * 1e3:.1f} ms "
          f"= {n / best / 1e6:.2f} M steps/s")  # fmt: skip


def bench_end_to_end(model: str, rollouts: int, max_new: int, top_k: int) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.vllm import VLLMEngine, sampling_params_kwargs

    eng = VLLMEngine(model, dtype="float32", gpu_memory_utilization=0.05, max_model_len=512,
                     enforce_eager=True)  # fmt: skip
    eos = eng.eos_token_ids
    policy = DecodingPolicy(temperature=1.0, top_k=top_k, max_new_tokens=max_new, eos_token_ids=eos)
    prompt = eng.tokenizer("Once upon a time", add_special_tokens=True)["input_ids"]
    seeds = np.arange(1, rollouts + 1, dtype=np.int64)
    llm = eng._local.llm

    def plain() -> int:
        params = []
        for s in seeds.tolist():
            kw = sampling_params_kwargs(policy, s, eos, eng.vocab_size)
            kw["logprobs"] = None
            params.append(SamplingParams(**kw))
        outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * rollouts, params,
                            use_tqdm=False)  # fmt: skip
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def engine() -> int:
        (batch,) = eng.sample_many([(prompt, seeds, np.arange(rollouts))], policy)
        return len(batch.token_ids)

    engine()  # warm-up
    results = {}
    for name, fn in (("plain generate", plain), ("VLLMEngine", engine)) * 2:
        t = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t
        results[name] = min(results.get(name, (np.inf, n))[0], dt), n
    for name, (dt, n) in results.items():
        print(f"{name:>15}: {n} tokens in {dt:.2f} s = {n / dt:,.0f} tokens/s")
    overhead = results["VLLMEngine"][0] / results["plain generate"][0] - 1
    print(f"recording exact entropy (top_k={top_k} processed log-probs) costs {overhead:+.1%}")
    eng.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: a small random Llama)")
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=100)
    args = parser.parse_args()
    bench_conversion()
    model = args.model
    if model is None:
        from canopy_entropy.testing import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "m", hidden_size=256,
                                     num_layers=4, num_heads=4, eos_quantile=0.002))  # fmt: skip
    bench_end_to_end(model, args.rollouts, args.max_new_tokens, args.top_k)


if __name__ == "__main__":
    main()
