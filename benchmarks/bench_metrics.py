"""Benchmark: compute_metrics on 24 groups x 100 prompts x 100 rollouts, lengths up to 4000.

Writes the store once to /tmp/canopy-bench-metrics (reused on later runs), then times
``compute_metrics`` (streaming read + every metric). Per-step values are continuous random
floats (no unrealistic compression). Run with OMP_NUM_THREADS=2:

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_metrics.py [--groups 24]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from canopy_entropy.metrics import compute_metrics
from canopy_entropy.reference import rollouts_table_from_flat
from canopy_entropy.run.manifest import Manifest, ModelRecord, PolicyRecord, write_manifest
from canopy_entropy.store import RunStore

CAP = 4000


def build(root: Path, groups: int, prompts: int, rollouts: int, mean_length: float) -> None:
    store = RunStore(root)
    rng = np.random.default_rng(0)
    for g in range(groups):
        R = prompts * rollouts
        length = np.minimum(rng.geometric(1.0 / mean_length, size=R), CAP)
        offsets = np.zeros(R + 1, dtype=np.int64)
        np.cumsum(length, out=offsets[1:])
        total = int(offsets[-1])
        draw = {
            "prompt": np.repeat(np.arange(prompts), rollouts),
            "rollout_index": np.tile(np.arange(rollouts), prompts),
            "offsets": offsets,
            "token_ids": rng.integers(0, 50_000, size=total, dtype=np.int32),
            "entropy": rng.gamma(1.5, 1.0, size=total).astype(np.float32),
            "eos_prob": rng.beta(0.2, 60.0, size=total).astype(np.float32),
            "logprob": (-rng.exponential(1.5, size=total)).astype(np.float32),
            "kept_mass": np.ones(total, dtype=np.float32),
            "finish_reason": np.where(length == CAP, "length", "eos"),
        }
        model, variant = f"model{g // 8}", ("base", "instruct")[g % 2]
        task = f"task{(g // 2) % 4}"
        table = rollouts_table_from_flat(
            draw,
            run="bench",
            keys={"model": model, "variant": variant, "family": model, "task": task},
            seed=g,
            with_eos_prob=True,
            with_logprob=True,
        )
        store.write_rollouts(f"g{g:02d}", table)
    policy = PolicyRecord(max_new_tokens=CAP, top_k=100)
    write_manifest(
        store.root,
        Manifest(
            run="bench",
            models={
                m: ModelRecord(
                    label=m, model=m, variant="", family=m, source="import", policy=policy
                )
                for m in {f"model{g // 8}" for g in range(groups)}
            },
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--rollouts", type=int, default=100)
    ap.add_argument("--mean-length", type=float, default=600.0)
    ap.add_argument("--root", default="/tmp/canopy-bench-metrics")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    root = Path(args.root)
    tag = root / f".built-{args.groups}-{args.prompts}-{args.rollouts}-{args.mean_length}"
    if args.rebuild or not tag.exists():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        build(root, args.groups, args.prompts, args.rollouts, args.mean_length)
        tag.touch()
        print(f"built store in {time.perf_counter() - t0:.1f} s")
    size = sum(p.stat().st_size for p in (root / "rollouts").glob("*.parquet"))
    t0, c0 = time.perf_counter(), time.process_time()
    result = compute_metrics(root, warn=False)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_rollouts = int(result.pooled["n_rollouts"].sum())
    steps = float((result.prompts["mean_length"] * result.prompts["n_rollouts"]).sum())
    print(
        f"compute_metrics: {elapsed:.2f} s wall, {cpu:.2f} s CPU for {len(result.pooled)} groups, "
        f"{len(result.prompts)} prompts, {n_rollouts} rollouts, {steps / 1e6:.1f} M steps "
        f"({size / 2**30:.2f} GiB of shards)"
    )


if __name__ == "__main__":
    main()
