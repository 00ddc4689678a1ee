"""Benchmark: paired bootstrap of all comparison metrics, 2000 replicates, 100 prompts x 24 groups.

Target (issue 5): under 5 s on 2 cores. Run with
``OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_compare.py``.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from canopy_entropy.comparison import compare_prompts


def synthetic_prompts(
    n_prompts: int = 100, families: int = 4, tasks: int = 6, seed: int = 0
) -> pd.DataFrame:
    """Per-prompt statistics for base and instruct in families x tasks groups."""
    rng = np.random.default_rng(seed)
    frames = []
    for f in range(families):
        for t in range(tasks):
            for variant in ("base", "instruct"):
                p = n_prompts
                frames.append(
                    pd.DataFrame(
                        {
                            "model": f"fam{f}-{variant}",
                            "variant": variant,
                            "family": f"fam{f}",
                            "task": f"task{t}",
                            "prompt_id": [f"p{i}" for i in range(p)],
                            "ce_star": rng.gamma(4.0, 20.0, p),
                            "mean_length": rng.gamma(4.0, 50.0, p),
                            "entropy_rate": rng.uniform(0.2, 1.5, p),
                            "length_entropy": rng.uniform(1.0, 5.0, p),
                            "diversity": rng.uniform(0.1, 0.6, p),
                            "vendi": rng.uniform(1.0, 30.0, p),
                            "pearson": rng.uniform(-0.9, 0.9, p),
                            "spearman": rng.uniform(-0.9, 0.9, p),
                            "kendall": rng.uniform(-0.7, 0.7, p),
                            "covariance": rng.normal(0.0, 2.0, p),
                            "n_rollouts": np.full(p, 100),
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    prompts = synthetic_prompts()
    compare_prompts(prompts.head(400), n_boot=50)  # warm-up (imports, caches)
    times, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        table, _ = compare_prompts(prompts, n_boot=2000, seed=0)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    groups = table.groupby(["family", "task"]).ngroups
    print(
        f"paired bootstrap: {groups} groups x 100 prompts x {table['metric'].nunique()} metrics, "
        f"B=2000: wall best {min(times):.2f} s, median {sorted(times)[1]:.2f} s; "
        f"CPU {min(cpu):.2f} s (target < 5 s on 2 cores)"
    )


if __name__ == "__main__":
    main()
