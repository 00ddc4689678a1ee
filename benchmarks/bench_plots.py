"""Benchmark: figures and report of a large synthetic run (prints seconds; not a test).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_plots.py [--prompts 100]
        [--rollouts 100] [--groups 4] [--max-len 4000]

Rollouts have geometric lengths (mean max-len/8, capped at max-len) and gamma entropies; the
per-step pass (per-rollout sums + running rate, vectorised) is timed apart from matplotlib.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from canopy_entropy.plots import data, make_figures
from canopy_entropy.report import build_report
from canopy_entropy.run.manifest import Manifest, PolicyRecord, write_manifest
from canopy_entropy.store import RunStore, rollouts_table


def write_run(root: Path, prompts: int, rollouts: int, groups: int, max_len: int) -> int:
    rng = np.random.default_rng(0)
    store = RunStore(root)
    write_manifest(root, Manifest(run="bench", policy=PolicyRecord(max_new_tokens=max_len)))
    steps = 0
    for g in range(groups):
        family, variant = f"fam{g // 2}", ("base", "instruct")[g % 2]
        for task in ("math", "story"):
            n = prompts * rollouts
            lengths = np.minimum(rng.geometric(8 / max_len, size=n), max_len)
            flat = rng.gamma(2.0, 0.5, size=int(lengths.sum())).astype(np.float32)
            ent = np.split(flat, np.cumsum(lengths)[:-1])
            steps += flat.size
            table = rollouts_table(
                run="bench",
                model=f"{family}-{variant}",
                variant=variant,
                family=family,
                task=task,
                prompt_id=[f"p{i // rollouts}" for i in range(n)],
                rollout_index=np.arange(n) % rollouts,
                seed=np.arange(n),
                finish_reason=np.where(lengths == max_len, "length", "eos").tolist(),
                entropy=ent,
            )
            store.write_rollouts(f"{family}-{variant}-{task}", table)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--rollouts", type=int, default=100)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=4000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t = time.perf_counter()
        steps = write_run(run, args.prompts, args.rollouts, args.groups, args.max_len)
        n = args.prompts * args.rollouts * args.groups * 2
        print(f"wrote {n:,} rollouts, {steps:,} steps in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        _frame, rr = data.scan_rollouts(run)
        dt = time.perf_counter() - t
        print(
            f"scan_rollouts (per-rollout sums + running rate): {dt:.2f} s "
            f"({steps / dt / 1e6:.0f} M steps/s), {len(rr):,} curve points"
        )
        t = time.perf_counter()
        made = make_figures(run)
        print(f"make_figures (PNG+PDF, {len(made)} files): {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        path = build_report(run)
        print(
            f"build_report (figures fresh, reused): {time.perf_counter() - t:.2f} s, "
            f"{path.stat().st_size / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
