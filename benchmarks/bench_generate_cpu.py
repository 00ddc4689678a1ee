"""CPU throughput of the transformers engine vs plain `generate` (SmolLM2-135M alias).

Three ways to sample the same batch and length (EOS ignored so every row runs T steps):
  canopy   HFEngine.sample: per-step entropy, EOS mass, logprob, kept mass recorded
  plain    model.generate(do_sample=True, top_k): no entropy at all (the speed floor)
  naive    model.generate(output_logits=True) then the entropies from the stored logits
Each runs in its own subprocess so peak RSS is comparable. Prints tokens/s, peak RSS and the
size of what is kept per run (O(steps x batch) for canopy, O(steps x batch x vocab) naive).

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_generate_cpu.py --batch 16 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = "Write a short story about a robot who learns to paint."


def _setup(args):
    import torch

    torch.manual_seed(0)
    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.hf import HFEngine
    from canopy_entropy.prompting import render_prompt

    engine = HFEngine(args.model, device="cpu", batch_size=args.batch)
    _, ids = render_prompt(engine.tokenizer, PROMPT, "instruct")
    never = engine.vocab_size - 1  # an id that is never sampled: EOS effectively ignored
    policy = DecodingPolicy(top_k=args.top_k, max_new_tokens=args.tokens, eos_token_ids=(never,))
    return engine, ids, policy, never


def run_one(args) -> dict:
    import numpy as np
    import torch

    engine, ids, policy, never = _setup(args)
    model = engine.model
    input_ids = torch.tensor([ids] * args.batch)
    gen_kw = dict(
        do_sample=True,
        top_k=args.top_k,
        top_p=1.0,
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        eos_token_id=never,
        pad_token_id=never,
    )
    kept_bytes = 0
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            if args.method == "canopy":
                batch = engine.sample(ids, np.arange(args.batch), np.arange(args.batch), policy)
                n_tokens = int(batch.offsets[-1])
                kept_bytes = 4 * 4 * batch.offsets[-1] + 4 * batch.offsets[-1]
            elif args.method == "plain":
                out = model.generate(input_ids, **gen_kw)
                n_tokens = (out.shape[1] - len(ids)) * args.batch
            else:
                out = model.generate(
                    input_ids, output_logits=True, return_dict_in_generate=True, **gen_kw
                )
                logits = torch.stack(out.logits, dim=1).float()  # [B, T, V]
                kept_bytes = sum(x.numel() * x.element_size() for x in out.logits)
                z = logits.clone()
                kth = torch.topk(z, args.top_k, dim=-1).values[..., -1:]
                z[z < kth] = -float("inf")
                logq = torch.log_softmax(z, dim=-1)
                q = logq.exp()
                entropy = -torch.where(q > 0, q * logq, 0.0).sum(-1)
                n_tokens = entropy.numel()
        best = min(best, time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": args.method,
        "tokens": n_tokens,
        "seconds": best,
        "tokens_per_s": n_tokens / best,
        "peak_rss_mb": rss / 2**20,
        "kept_mb": kept_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", choices=["canopy", "plain", "naive"])
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    print(
        f"model {args.model}, batch {args.batch}, {args.tokens} new tokens, top-k {args.top_k}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    results = {}
    for method in ("plain", "canopy", "naive"):
        cmd = [sys.executable, __file__, "--method", method, "--model", args.model]
        cmd += ["--batch", str(args.batch), "--tokens", str(args.tokens)]
        cmd += ["--top-k", str(args.top_k), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results[method] = res
        print(
            f"{method:7s} {res['tokens_per_s']:9.1f} tok/s  {res['seconds']:7.2f} s  "
            f"peak RSS {res['peak_rss_mb']:7.0f} MB  kept per run {res['kept_mb']:8.2f} MB"
        )
    plain = results["plain"]["tokens_per_s"]
    print(
        f"canopy vs plain generate: {100 * (results['canopy']['tokens_per_s'] / plain - 1):+.1f}%"
    )
    print(
        f"canopy vs naive output_logits: "
        f"{results['canopy']['tokens_per_s'] / results['naive']['tokens_per_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
