"""CPU throughput of the transformers engine vs plain `generate` (SmolLM2-135M alias).

Three ways to sample the same batch and length (EOS ignored so every row runs T steps):
  canopy   HFEngine.sample: per-step entropy, EOS mass, logprob, kept mass recorded
  plain    model.generate(do_sample=True, top_k): no entropy at all (the speed floor)
  naive    model.generate(output_logits=True) then the entropies from the stored logits
Timed interleaved in one process (best of --repeats rounds); prints tokens/s and the size of
what is kept per run (O(steps x batch) for canopy, O(steps x batch x vocab) naive); with
--memory also each method's peak RSS in a fresh process.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_generate_cpu.py --batch 16 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
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


def _methods(args):
    """The three ways to sample, each returning (tokens generated, bytes kept per run)."""
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
        attention_mask=torch.ones_like(input_ids),
    )

    def canopy():
        batch = engine.sample(ids, np.arange(args.batch), np.arange(args.batch), policy)
        n = int(batch.offsets[-1])
        return n, 5 * 4 * n  # token, entropy, eos_prob, logprob, kept_mass per step

    def plain():
        with torch.inference_mode():
            out = model.generate(input_ids, **gen_kw)
        return (out.shape[1] - len(ids)) * args.batch, 0

    def naive():
        with torch.inference_mode():
            out = model.generate(
                input_ids, output_logits=True, return_dict_in_generate=True, **gen_kw
            )
            kept = sum(x.numel() * x.element_size() for x in out.logits)
            z = torch.stack(out.logits, dim=1).float()  # [B, T, V]
            kth = torch.topk(z, args.top_k, dim=-1).values[..., -1:]
            z = torch.where(z >= kth, z, -float("inf"))
            logq = torch.log_softmax(z, dim=-1)
            entropy = -(logq.exp() * torch.nan_to_num(logq, neginf=0.0)).sum(-1)
        return entropy.numel(), kept

    return {"plain": plain, "canopy": canopy, "naive": naive}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(args) -> dict:
    """One method in a fresh process: its peak RSS growth above the loaded model."""
    import threading

    fn = _methods(args)[args.method]
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    n, kept = fn()
    dt = time.perf_counter() - t0
    stop.set()
    thread.join()
    return {
        "method": args.method,
        "tokens_per_s": n / dt,
        "rss_growth_mb": (peak[0] - base) / 2**20,
        "kept_mb": kept / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also peak RSS per method")
    parser.add_argument("--method", choices=["canopy", "plain", "naive"])
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    print(
        f"model {args.model}, batch {args.batch}, {args.tokens} new tokens, top-k {args.top_k}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    # Throughput: methods interleaved in one process, best of --repeats rounds (robust to the
    # load of a shared machine drifting over minutes).
    methods = _methods(args)
    methods["plain"]()  # warm-up
    best: dict[str, float] = {}
    kept: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            n, kept[name] = fn()
            best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t0))
    for name in methods:
        print(f"{name:7s} {best[name]:9.1f} tok/s   kept per run {kept[name] / 2**20:9.3f} MB")
    print(f"canopy vs plain generate: {100 * (best['canopy'] / best['plain'] - 1):+.1f}%")
    print(f"canopy vs naive output_logits: {best['canopy'] / best['naive']:.2f}x")
    if args.memory:  # peak RSS, one method per fresh process
        for method in ("canopy", "naive"):
            cmd = [sys.executable, __file__, "--method", method, "--model", args.model]
            cmd += [
                "--batch",
                str(args.batch),
                "--tokens",
                str(args.tokens),
                "--top-k",
                str(args.top_k),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{method:7s} peak RSS growth while sampling {res['rss_growth_mb']:7.0f} MB")


if __name__ == "__main__":
    main()
