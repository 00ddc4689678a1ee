"""What recording exact entropy costs with vLLM, and how fast the log-prob conversion is.

Run in the vLLM venv (see .ci/vllm-tests.sh), e.g.:
  VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_NUM_OF_RESERVED_CPU=0 HF_HUB_OFFLINE=1 \
  PYTHONPATH=src .venv-vllm/bin/python benchmarks/bench_vllm_engine.py [--model PATH] [--memory]

1. conversion: ``completions_to_steps`` on synthetic flat log-probs (k = 100), steps/s;
2. end to end: the same rollouts (same seeds, so the same tokens) with plain
   ``LLM.generate`` (no log-probs) and with ``VLLMEngine.sample_many`` (top-k processed
   log-probs + conversion + text decoding); tokens/s and the overhead;
3. host memory per call (``--memory``): peak RSS growth of one call at length caps 500 and
   4000 (rollouts that never stop, full-vocabulary log-probs), before (one ``LLM.generate``
   holding every log-prob object to the end of the call, then converting: the engine before
   streaming) and after (``VLLMEngine.sample_many``, streamed), side by side. Each column
   runs in its own fresh process; the peak is the kernel's VmHWM, reset before each call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    from canopy_entropy.engines.vllm import completions_to_steps

    requests, steps, k, vocab = 64, 512, 100, 128_256
    outs = synthetic_outputs(requests, steps, k, vocab)
    policy = DecodingPolicy(top_k=k, max_new_tokens=steps, eos_token_ids=(1, 2))
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        completions_to_steps([o.outputs[0] for o in outs], policy, (1, 2), vocab)
        best = min(best, time.perf_counter() - t)
    n = requests * steps
    print(f"conversion: {n} steps x (k+1={k + 1}) entries in {best * 1e3:.1f} ms "
          f"= {n / best / 1e6:.2f} M steps/s")  # fmt: skip


def bench_end_to_end(model: str, rollouts: int, max_new: int, top_k: int) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.vllm import VLLMEngine, sampling_params_kwargs

    eng = VLLMEngine(model, dtype="float32", kv_cache_memory_bytes=256 << 20, max_model_len=512,
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


def _memory_child(model: str, mode: str, caps: list[int], rollouts: int) -> None:
    """One process: peak RSS growth per call at each cap, ``mode`` 'before' or 'after'."""
    import gc

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.vllm import VLLMEngine, completions_to_steps, sampling_params_kwargs

    def status_mib(key: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith(key + ":"))

    eng = VLLMEngine(model, dtype="float32", kv_cache_memory_bytes=64 << 20,
                     max_model_len=max(caps) + 16, enforce_eager=True, decode_text=False)  # fmt: skip
    prompt, seeds = [1, 10, 11, 12], np.arange(rollouts, dtype=np.int64)

    def call(cap: int) -> int:
        policy = DecodingPolicy(max_new_tokens=cap, eos_token_ids=eng.eos_token_ids)
        if mode == "after":
            return int(
                eng.sample_many([(prompt, seeds, np.arange(rollouts))], policy)[0].offsets[-1]
            )
        params = [SamplingParams(**sampling_params_kwargs(policy, s, eng.eos_token_ids,
                                                          eng.vocab_size)) for s in seeds.tolist()]  # fmt: skip
        outs = eng._local.llm.generate([TokensPrompt(prompt_token_ids=prompt)] * rollouts, params,
                                       use_tqdm=False)  # fmt: skip
        lengths, _ = completions_to_steps([o.outputs[0] for o in outs], policy,
                                          eng.eos_token_ids, eng.vocab_size)  # fmt: skip
        return int(lengths.sum())

    call(16)
    out = {}
    for cap in caps:
        gc.collect()
        before = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        steps = call(cap)
        out[cap] = (status_mib("VmHWM") - before, steps)
    eng.close()
    print(json.dumps(out))


def bench_memory(model: str, caps: list[int], rollouts: int) -> None:
    results = {}
    for mode in ("before", "after"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", mode, "--model", model,
             "--rollouts", str(rollouts), *map(str, caps)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"host peak RSS growth per call, {rollouts} rollouts, full-vocabulary log-probs:")
    print(f"{'cap':>6} {'steps':>7} {'before (MiB)':>13} {'after (MiB)':>12}")
    for cap in map(str, caps):
        (b, steps), (a, _) = results["before"][cap], results["after"][cap]
        print(f"{cap:>6} {steps:>7} {b:>13.1f} {a:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: a small random Llama)")
    parser.add_argument("--rollouts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--memory", action="store_true", help="host memory per call instead")
    parser.add_argument("--memory-child", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("caps", nargs="*", type=int, default=[500, 4000])
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.model, args.memory_child, args.caps, args.rollouts)
        return
    model = args.model
    if args.memory:
        if model is None:  # EOS logit at the median: rollouts practically never stop
            from canopy_entropy.testing import build_tiny_model

            model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "m", eos_quantile=0.5,
                                         max_position_embeddings=max(args.caps) + 64))  # fmt: skip
        bench_memory(model, args.caps, min(args.rollouts, 8))
        return
    bench_conversion()
    if model is None:
        from canopy_entropy.testing import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "m", hidden_size=256,
                                     num_layers=4, num_heads=4, eos_quantile=0.002))  # fmt: skip
    bench_end_to_end(model, args.rollouts, args.max_new_tokens, args.top_k)


if __name__ == "__main__":
    main()
