"""GPU throughput on an 8B-class shape: random-weight Llama-3.1-8B config, bf16, EOS ignored.

Compares, on the same batch and length:
  canopy   HFEngine.sample (exact per-step entropy, EOS mass, logprob, kept mass)
  plain    model.generate(do_sample=True, top_k) (no entropy: the speed floor)
and reports tokens/s, peak GPU memory and the share of the HBM-bandwidth roofline (bytes
that must be read per decoding step: all weights once + the KV cache of every row, over the
device's peak bandwidth). The naive ``output_logits=True`` variant would keep
steps x batch x vocab logits (1024 x 256 x 128256 x 2 bytes = 67 GB): it is reported as that
projection, and measured only when it fits (``--naive``).

    python benchmarks/bench_generate_gpu.py --batch 256 --tokens 1024 --hbm-tbps 3.35
    python benchmarks/bench_generate_gpu.py --tiny --device cpu   # smoke test of the script
"""

from __future__ import annotations

import argparse
import time


def build_model(tiny: bool, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if tiny:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=4096)  # fmt: skip
    else:  # meta-llama/Llama-3.1-8B shapes
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=500000.0,
                          rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
    cfg.eos_token_id = cfg.vocab_size - 1
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device, in the target dtype
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model, cfg


def main() -> None:
    import numpy as np
    import torch

    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.hf import HFEngine
    from canopy_entropy.testing import build_tiny_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument(
        "--hbm-tbps", type=float, default=3.35, help="peak HBM TB/s (H100 SXM 3.35, H200 4.8)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny config (script smoke test)")
    parser.add_argument("--naive", action="store_true", help="also run output_logits=True")
    parser.add_argument("--skip-plain", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, cfg = build_model(args.tiny, args.device, dtype)
    never = cfg.vocab_size - 1
    engine = HFEngine.from_model(
        model, build_tiny_tokenizer(), name="llama-3.1-8b-random", batch_size=args.batch
    )
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, cfg.vocab_size - 10, (args.prompt_len,), generator=gen).tolist()
    policy = DecodingPolicy(top_k=args.top_k, max_new_tokens=args.tokens, eos_token_ids=(never,))
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(fn):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        n = fn()
        sync()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return n, dt, peak

    # warm-up (kernels, allocator)
    engine.sample(prompt, np.arange(min(8, args.batch)), np.arange(min(8, args.batch)),
                  DecodingPolicy(top_k=args.top_k, max_new_tokens=8, eos_token_ids=(never,)))  # fmt: skip

    def canopy():
        b = engine.sample(prompt, np.arange(args.batch), np.arange(args.batch), policy)
        return int(b.offsets[-1])

    ids = torch.tensor([prompt] * args.batch, device=args.device)
    gen_kw = dict(do_sample=True, top_k=args.top_k, top_p=1.0, max_new_tokens=args.tokens,
                  min_new_tokens=args.tokens, eos_token_id=never, pad_token_id=never,
                  attention_mask=torch.ones_like(ids))  # fmt: skip

    def plain():
        with torch.inference_mode():
            out = model.generate(ids, **gen_kw)
        return (out.shape[1] - len(prompt)) * args.batch

    def naive():
        with torch.inference_mode():
            out = model.generate(ids, output_logits=True, return_dict_in_generate=True, **gen_kw)
            ent = []
            for step_logits in out.logits:  # entropy afterwards, from the kept logits
                z = step_logits.float()
                kth = torch.topk(z, args.top_k, dim=-1).values[:, -1:]
                z = torch.where(z >= kth, z, -float("inf"))
                logq = torch.log_softmax(z, dim=-1)
                ent.append(-(logq.exp() * torch.nan_to_num(logq, neginf=0.0)).sum(-1))
        return int(torch.stack(ent).numel())

    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    kv_per_token = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * (cfg.hidden_size // cfg.num_attention_heads)
        * torch.finfo(dtype).bits
        // 8
    )
    mean_ctx = args.prompt_len + (args.tokens + 1) / 2
    step_bytes = weight_bytes + args.batch * mean_ctx * kv_per_token
    roofline_tps = args.batch / (step_bytes / (args.hbm_tbps * 1e12))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; params {n_params / 1e9:.2f} B, "
          f"batch {args.batch}, {args.tokens} new tokens, prompt {args.prompt_len}, top-k {args.top_k}")  # fmt: skip
    print(
        f"roofline: {step_bytes / 1e9:.1f} GB read per step on average -> {roofline_tps:,.0f} tok/s at {args.hbm_tbps} TB/s"
    )
    runs = [("canopy", canopy)] + ([] if args.skip_plain else [("plain", plain)])
    if args.naive:
        runs.append(("naive", naive))
    results = {}
    for name, fn in runs:
        n, dt, peak = measure(fn)
        results[name] = n / dt
        print(
            f"{name:7s} {n / dt:10,.0f} tok/s  {dt:8.1f} s  peak {peak:6.1f} GiB  roofline share {n / dt / roofline_tps:6.1%}"
        )
    if "plain" in results:
        print(f"canopy vs plain generate: {100 * (results['canopy'] / results['plain'] - 1):+.1f}%")
    logits_gb = args.tokens * args.batch * cfg.vocab_size * torch.finfo(dtype).bits / 8 / 1e9
    print(f"naive output_logits would keep {logits_gb:,.1f} GB of logits; canopy keeps "
          f"{args.tokens * args.batch * 5 * 4 / 1e6:,.1f} MB of per-step fields")  # fmt: skip


if __name__ == "__main__":
    main()
