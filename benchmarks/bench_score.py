"""Benchmark: ``canopy score`` diagnostics for one 4k-token answer with a 150k vocabulary.

A random-weight Llama (LlamaConfig built here: vocabulary 150,000, hidden 64, 2 layers) scores
a random 4,096-token answer after a 16-token prompt. Two implementations, each in its own
process so that peak RSS is its own:

- chunked: ``diagnostics.teacher_force`` (output layer and diagnostics per chunk of rows within
  ``--chunk-mib``; the shipped code);
- naive: full logits ``[positions, vocab]`` at once, ``log_softmax``, one ``torch.sort`` of
  everything, ``(sorted * k).sum``.

The naive one runs on ``--naive-positions`` positions (default: all on CUDA, 512 on CPU where
4,096 would need about 14 GB: 2.4 GB of full float32 logits plus about 2.7 MB per position).
The two are checked to agree on the positions both computed. Run with one thread as the tests
do:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_score.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np

VOCAB, HIDDEN, PROMPT = 150_000, 64, 16


def build_model(device: str, dtype: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=HIDDEN // 2, max_position_embeddings=8192,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits of order 1-10: peaked, not uniform
    return model.to(device=device, dtype=getattr(torch, dtype))


def ids(answer: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(1)
    seq = rng.integers(0, VOCAB, PROMPT + answer).tolist()
    return seq[:PROMPT], seq[PROMPT:]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chunked(device: str, dtype: str, answer: int, chunk_mib: int, queue) -> None:
    import torch

    from canopy_entropy.diagnostics import EncodedAnswer, rows_per_chunk, teacher_force

    model = build_model(device, dtype)
    prompt_ids, answer_ids = ids(answer)
    encoded = [EncodedAnswer(prompt_ids, answer_ids)]
    base_rss = peak_rss_mib()
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    teacher_force(model, [EncodedAnswer(prompt_ids, answer_ids[:64])], chunk_bytes=chunk_mib << 20)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    _, flat = teacher_force(model, encoded, chunk_bytes=chunk_mib << 20)
    sync()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    queue.put({
        "name": "chunked", "positions": answer, "seconds": elapsed, "cpu_seconds": cpu, "tokens_per_s": answer / elapsed,
        "peak_rss_mib": peak_rss_mib(), "rss_before_mib": base_rss,
        "rows_per_chunk": rows_per_chunk(VOCAB, chunk_mib << 20),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "expected_rank": flat["expected_rank"].tolist(), "rank": flat["rank"].tolist(),
        "entropy": flat["entropy"].tolist(),
    })  # fmt: skip


def naive(device: str, dtype: str, answer: int, positions: int, queue) -> None:
    import torch

    model = build_model(device, dtype)
    prompt_ids, answer_ids = ids(answer)
    seq = torch.tensor([prompt_ids + answer_ids], device=device)
    targets = torch.tensor(answer_ids[:positions], device=device)
    base_rss = peak_rss_mib()
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        logits = model(input_ids=seq).logits[0, PROMPT - 1 : PROMPT - 1 + positions].float()
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        logp_t = logp.gather(1, targets[:, None])
        rank = (logp >= logp_t).sum(-1)
        ordered = torch.sort(p, dim=-1, descending=True).values
        expected = (ordered * torch.arange(1, VOCAB + 1, device=device)).sum(-1)
    sync()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    queue.put({
        "name": "naive", "positions": positions, "seconds": elapsed, "cpu_seconds": cpu,
        "tokens_per_s": positions / elapsed, "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": base_rss, "rows_per_chunk": positions,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "expected_rank": expected.cpu().tolist(), "rank": rank.cpu().tolist(),
        "entropy": entropy.cpu().tolist(),
    })  # fmt: skip


def run(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--answer", type=int, default=4096)
    parser.add_argument("--chunk-mib", type=int, default=256)
    parser.add_argument("--naive-positions", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    naive_n = args.naive_positions or (args.answer if args.device.startswith("cuda") else 512)
    results = [
        run(chunked, args.device, args.dtype, args.answer, args.chunk_mib),
        run(naive, args.device, args.dtype, args.answer, min(naive_n, args.answer)),
    ]
    a, b = results
    n = b["positions"]
    rel = np.max(
        np.abs(np.subtract(a["expected_rank"][:n], b["expected_rank"]))
        / np.array(b["expected_rank"])
    )
    rank_diff = np.abs(np.subtract(a["rank"][:n], b["rank"]))
    print(f"vocab {VOCAB:,}, answer {args.answer:,} tokens, {args.device} {args.dtype}")
    print(
        f"{'':8} {'positions':>9} {'s':>7} {'cpu s':>7} {'tok/s':>9} {'RSS before':>10} {'peak RSS MiB':>13} {'CUDA peak MiB':>14} {'rows/chunk':>10}"
    )
    for r in results:
        cuda = f"{r['cuda_peak_mib']:.0f}" if r["cuda_peak_mib"] is not None else "-"
        print(f"{r['name']:8} {r['positions']:>9} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['rss_before_mib']:>10.0f} {r['peak_rss_mib']:>13.0f} {cuda:>14} {r['rows_per_chunk']:>10}")  # fmt: skip
    print(
        f"agreement on {n} positions: max rel. diff of E[R] {rel:.1e}; ranks equal at "
        f"{np.mean(rank_diff == 0):.3f} of positions, max |diff| {rank_diff.max()} (float32 "
        "rounding of the two output-layer matmuls reorders near-tied tokens)"
    )
    if args.json:
        keep = ("name", "positions", "seconds", "cpu_seconds", "tokens_per_s", "peak_rss_mib", "cuda_peak_mib",
                "rows_per_chunk", "rss_before_mib")  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump([{k: r[k] for k in keep} for r in results], fh, indent=2)


if __name__ == "__main__":
    main()
