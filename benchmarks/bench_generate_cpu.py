"""Slot occupancy and tokens/s of the transformers engine on CPU, side by side (SmolLM2-135M).

Rollouts end at the model's EOS or at the first punctuation mark (". , ! ?"), which gives
exponential-tailed lengths like real rollouts at a fraction of the cost. Per batch size B,
``--prompts`` prompts x B rollouts each, sampled four ways in one process:

  generate  model.generate(do_sample=True), B rows of one prompt until all have ended
  lockstep  today's engine before continuous batching (--old: its hf.py), one prompt a call
  canopy/1  HFEngine, one prompt per call (the default prompts_per_call; --one-per-call)
  canopy/P  HFEngine.sample_many over all prompts: finished slots refilled from the queue

Occupancy is useful tokens / slot-steps (B slots x decode steps); tokens/s counts useful
tokens over wall time. The engines' tokens are checked to be identical (same seeds). Threads
are set explicitly (--threads, default 1: the machine is shared).

    PYTHONPATH=src python benchmarks/bench_generate_cpu.py --batches 16 64 --old /tmp/hf_old/src/canopy_entropy/engines/hf.py
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import time
from pathlib import Path

PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a child.",
    "Describe your favourite city and what makes it special.",
    "Give some advice to someone starting to learn the piano.",
)


def _threads(n: int) -> None:
    """Pin every thread pool before torch is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


def _load_old(path: str):
    spec = importlib.util.spec_from_file_location("hf_old_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HFEngine


def _lockstep_slot_steps(lengths, batch: int) -> int:
    """Slot-steps of one-prompt lockstep batches: each chunk runs to its longest rollout."""
    return sum(batch * int(max(lengths[i : i + batch])) for i in range(0, len(lengths), batch))


def run_generate(model, tok, requests, batch, policy):
    """Plain sampling: B rows of one prompt per call, until every row has ended."""
    import torch

    stop = torch.tensor(policy.eos_token_ids)
    useful = slot_steps = 0
    for ids, _, _ in requests:
        x = torch.tensor([ids] * batch)
        with torch.inference_mode():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=True, top_k=policy.top_k,
                top_p=1.0, max_new_tokens=policy.max_new_tokens,
                eos_token_id=list(policy.eos_token_ids), pad_token_id=policy.eos_token_ids[0],
            )[:, len(ids) :]  # fmt: skip
        hit = torch.isin(out, stop)
        useful += int(torch.where(hit.any(1), hit.int().argmax(1) + 1, out.shape[1]).sum())
        slot_steps += batch * out.shape[1]
    return useful, slot_steps, None


def run_lockstep(old_cls, model, tok, requests, batch, policy):
    """The engine before continuous batching: one prompt per call, chunks in lockstep."""
    import numpy as np

    from canopy_entropy.engines.hf import quiet_transformers

    eng = old_cls.from_model(model, tok, batch_size=batch)
    with quiet_transformers():  # its past_key_values deprecation warnings
        out = [eng.sample(*r, policy) for r in requests]
    lengths = [np.diff(b.offsets) for b in out]
    steps = sum(_lockstep_slot_steps(x, batch) for x in lengths)
    return sum(int(x.sum()) for x in lengths), steps, out


def run_canopy(per_call, model, tok, requests, batch, policy):
    """HFEngine with ``per_call`` prompts per sample_many call."""
    from canopy_entropy.engines.hf import HFEngine

    eng = HFEngine.from_model(model, tok, batch_size=batch, prompts_per_call=per_call)
    out = []
    for c in range(0, len(requests), per_call):
        out += eng.sample_many(requests[c : c + per_call], policy)
    return eng.stats["tokens"], eng.stats["tokens"] + eng.stats["idle_slot_steps"], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompts", type=int, default=3, help="prompts (rollouts: B each)")
    parser.add_argument("--one-per-call", action="store_true", help="also canopy/1")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old", default="/tmp/hf_old/src/canopy_entropy/engines/hf.py")
    args = parser.parse_args()
    _threads(args.threads)
    import numpy as np

    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.hf import HFEngine
    from canopy_entropy.prompting import render_prompt

    t0 = time.perf_counter()
    engine = HFEngine(args.model, device="cpu")
    model, tok = engine.model, engine.tokenizer
    print(f"model {args.model} loaded in {time.perf_counter() - t0:.1f} s; threads {args.threads}")
    ends = {tok.convert_tokens_to_ids(t) for t in (".", ",", "!", "?")}
    stop_ids = tuple(sorted(set(engine.eos_token_ids) | ends))
    policy = DecodingPolicy(
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, eos_token_ids=stop_ids
    )
    prompts = [render_prompt(tok, p, "instruct")[1] for p in PROMPTS[: args.prompts]]
    old_cls = _load_old(args.old) if Path(args.old).exists() else None
    if old_cls is None:
        print(f"(no old engine at {args.old}: the lockstep row is skipped)")
    rows = []
    for batch in args.batches:
        requests = [
            (ids, np.arange(batch, dtype=np.int64) + 1000 * p, np.arange(batch))
            for p, ids in enumerate(prompts)
        ]

        methods = {"generate": functools.partial(run_generate)}
        if old_cls is not None:
            methods["lockstep"] = functools.partial(run_lockstep, old_cls)
        if args.one_per_call:
            methods["canopy/1"] = functools.partial(run_canopy, 1)
        methods[f"canopy/{len(prompts)}"] = functools.partial(run_canopy, len(prompts))
        results = {}
        for name, fn in methods.items():
            start = time.perf_counter()
            useful, slot_steps, out = fn(model, tok, requests, batch, policy)
            wall = time.perf_counter() - start
            results[name] = (useful, slot_steps, wall, out)
            rows.append((batch, name, useful, useful / slot_steps, useful / wall))
        outs = [r[3] for r in results.values() if r[3] is not None]
        same = all(
            np.array_equal(a.token_ids, b.token_ids)
            for other in outs[1:]
            for a, b in zip(outs[0], other, strict=True)
        )
        lengths = np.concatenate([np.diff(b.offsets) for b in outs[0]])
        print(
            f"batch {batch}: {len(prompts)} prompts x {batch} rollouts, lengths mean "
            f"{lengths.mean():.1f}, median {np.median(lengths):.0f}, max {lengths.max()} "
            f"(cap {args.max_new_tokens}); engines' tokens identical: {same}"
        )
    base = {b: tps for b, name, _, _, tps in rows if name == "generate"}
    print(
        f"\n{'batch':>5} {'method':10} {'tokens':>7} {'occupancy':>9} {'tok/s':>7} {'vs generate':>11}"
    )
    for batch, name, useful, occ, tps in rows:
        print(f"{batch:5d} {name:10} {useful:7d} {occ:9.2f} {tps:7.1f} {tps / base[batch]:10.2f}x")


if __name__ == "__main__":
    main()
