"""Benchmark: embedding throughput (texts/s) on CPU with the bundled offline encoder.

Embeds synthetic rollout texts of realistic lengths (20-200 words) through ``embed_run`` on a
temporary run folder, then runs it again to time the cache path. Run with
``OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/bench_embed.py [N]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from canopy_entropy.semantic.embed import OFFLINE_ENCODER, embed_run, load_encoder
from canopy_entropy.store import RunStore, rollouts_table

WORDS = (
    "the model samples a story about a lazy fox who jumps over seven quick dogs while "
    "computing the sum of primes below one hundred and then writes python code to verify it"
).split()


def make_run(root: Path, n_texts: int, rollouts_per_prompt: int = 20) -> None:
    rng = np.random.default_rng(0)
    n_words = rng.integers(20, 200, n_texts)
    texts = [" ".join(rng.choice(WORDS, k)) for k in n_words]
    table = rollouts_table(
        run="bench",
        model="m",
        variant="base",
        family="f",
        task="t",
        prompt_id=[f"p{i // rollouts_per_prompt}" for i in range(n_texts)],
        rollout_index=[i % rollouts_per_prompt for i in range(n_texts)],
        seed=list(range(n_texts)),
        finish_reason=["eos"] * n_texts,
        entropy=[np.ones(k, np.float32) for k in n_words],
        text=texts,
    )
    RunStore(root).write_rollouts("bench", table)


def main() -> None:
    n_texts = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    t0 = time.perf_counter()
    load_encoder(OFFLINE_ENCODER)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        make_run(Path(tmp), n_texts)
        t0 = time.perf_counter()
        result = embed_run(tmp, encoder=OFFLINE_ENCODER, progress=False)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = embed_run(tmp, encoder=OFFLINE_ENCODER, progress=False)
        cached = time.perf_counter() - t0
    assert again.n_encoded == 0
    print(f"encoder {OFFLINE_ENCODER} (dim {result.dim}) loaded in {load_s:.1f} s")
    print(
        f"{n_texts} texts (20-200 words): encoding {n_texts / result.seconds_encoding:.0f} texts/s, "
        f"end to end (tokenise, encode, cache, diversity) {n_texts / total:.0f} texts/s; "
        f"cached re-run {cached:.2f} s"
    )


if __name__ == "__main__":
    main()
