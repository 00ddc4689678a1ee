"""Where time goes at paper scale: canopy's stages against their floor or a naive alternative.

On a store from ``make_store.py`` (one run; each pair timed interleaved, ``--repeats`` times,
best of each), with the thread count set explicitly (``--threads``, default 2):

- ``canopy metrics`` (CPU-s, peak RSS) vs the I/O floor: a pyarrow scan of the same per-step
  columns plus per-rollout sums (np.add.reduceat), one thread per shard like the scan;
- ``canopy compare`` (B = 2000) vs a naive per-replicate Python loop over the saved per-prompt
  table (resample prompts, mean paired difference of every metric per family x task), and
  the two bootstraps alone (their timed sections after imports and reading the table);
- the plots stage's data loading (every figure input, the EOS heatmaps' eos_prob included)
  vs the metrics stage's scan of the store, CPU-s and wall (issue 18: at most 1.2x);
- store bytes per step vs 16 raw (token id, entropy, EOS mass, log-prob);
- with ``--analysis``: the whole analysis, metrics through report without embedding
  (``canopy metrics``, ``compare``, ``tables --paper``, ``plot``, ``report`` one after another), wall and
  CPU-s per command (issue 12: under 60 s wall on 2 idle cores).

Each command runs in a child process; CPU-s and peak RSS come from its own rusage.

    PYTHONPATH=src python benchmarks/make_store.py --root /tmp/canopy-paper-0.1 --scale 0.1
    PYTHONPATH=src python benchmarks/bench_paper_scale.py --root /tmp/canopy-paper-0.1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

FLOOR = """
import sys, numpy as np, pyarrow.parquet as pq
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
files = sorted(Path(sys.argv[1], "rollouts").glob("*.parquet"))
def one(path):
    t = pq.read_table(path, columns=["entropy", "logprob", "eos_prob"], use_threads=False)
    out = []
    for name in t.column_names:
        col = t[name].combine_chunks()
        off = col.offsets.to_numpy()
        out.append(np.add.reduceat(col.values.to_numpy(), off[:-1], dtype=np.float64))
    return out
with ThreadPoolExecutor(int(sys.argv[2])) as pool:
    sums = list(pool.map(one, files))
print(sum(len(s[0]) for s in sums), "rollouts")
"""

NAIVE = """
import sys, time, numpy as np, pandas as pd
from canopy_entropy.run.layout import artefact_path
prompts = pd.read_parquet(artefact_path(sys.argv[1], "metrics.prompts"))
start = time.process_time()
B, rng = int(sys.argv[2]), np.random.default_rng(0)
metrics = [c for c in prompts.select_dtypes("number").columns if c not in ("n_rollouts",)]
rows = []
for (fam, task), g in prompts.groupby(["family", "task"]):
    a = g[g.variant == "base"].set_index("prompt_id")[metrics]
    b = g[g.variant == "instruct"].set_index("prompt_id")[metrics].loc[a.index]
    diff = (b.to_numpy() - a.to_numpy())
    reps = []
    for _ in range(B):  # one Python iteration per replicate
        idx = rng.integers(0, len(diff), len(diff))
        reps.append(np.nanmean(diff[idx], axis=0))
    reps = np.array(reps)
    rows.append((fam, task, np.nanstd(reps, axis=0), np.nanpercentile(reps, [2.5, 97.5], axis=0)))
print(len(rows), "groups x", len(metrics), "metrics")
print(time.process_time() - start)  # the loop alone, after imports and reading
"""

# canopy's paired bootstrap alone on the same table (what the naive loop does, after imports)
BOOTSTRAP = """
import sys, time, pandas as pd
from canopy_entropy.comparison.core import compare_prompts
from canopy_entropy.run.layout import artefact_path
prompts = pd.read_parquet(artefact_path(sys.argv[1], "metrics.prompts"))
start = time.process_time()
compare_prompts(prompts, n_boot=int(sys.argv[2]))
print(time.process_time() - start)
"""


SCAN = """
import sys
from canopy_entropy.metrics.scan import _reduce
from canopy_entropy.store import RunStore
_reduce(RunStore(sys.argv[1]))
"""

PLOT_DATA = """
import sys
from pathlib import Path
from canopy_entropy.plots import data
from canopy_entropy.plots.make import REGISTRY, RunInputs
inputs = RunInputs(Path(sys.argv[1]))
for name in sorted({n for spec in REGISTRY.values() for n in spec.inputs}):
    try:
        inputs.get(name)
    except data.MissingInput:
        pass
"""

# the analysis commands in the order their inputs need (tables --paper reads the comparison)
ANALYSIS = (("metrics",), ("compare",), ("tables", "--paper"), ("plot",), ("report",))


def child(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(CPU-s, peak RSS in GiB, wall s) of one child process, from its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(argv[:4])} failed:\n{err[-2000:]}")
    wall = time.perf_counter() - start
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, wall


def inner(argv: list[str], env: dict[str, str]) -> float:
    """The CPU-s a child script prints on its last line (its timed section alone)."""
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[:4])} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="a store written by make_store.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--analysis", action="store_true", help="also time metrics through report")
    args = ap.parse_args()
    root = Path(args.root)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env["OMP_THREAD_LIMIT"] = env["ARROW_NUM_THREADS"] = str(args.threads)
    py = [sys.executable]
    canopy = [*py, "-m", "canopy_entropy"]
    pairs = {
        "metrics": (
            [*canopy, "metrics", str(root)],
            [*py, "-c", FLOOR, str(root), str(args.threads)],
        ),
        "compare": (
            [*canopy, "compare", str(root), "--bootstrap", str(args.bootstrap), "--json"],
            [*py, "-c", NAIVE, str(root), str(args.bootstrap)],
        ),
        "plot-data": ([*py, "-c", PLOT_DATA, str(root)], [*py, "-c", SCAN, str(root)]),
    }
    best: dict[str, list[tuple[float, float]]] = {}
    for r in range(args.repeats):
        for stage, (ours, alt) in pairs.items():  # interleaved, order alternating
            order = [("canopy", ours), ("alt", alt)][:: 1 if r % 2 == 0 else -1]
            for who, argv in order:
                best.setdefault(f"{stage}/{who}", []).append(child(argv, env))
        for who, script in (("canopy", BOOTSTRAP), ("alt", NAIVE)):
            argv = [*py, "-W", "ignore", "-c", script, str(root), str(args.bootstrap)]
            best.setdefault(f"bootstrap/{who}", []).append((inner(argv, env),))
    pick = {k: min(v) for k, v in best.items()}
    files = sorted((root / "rollouts").glob("*.parquet"))
    size = sum(p.stat().st_size for p in files)
    import pyarrow.dataset as ds

    steps = ds.dataset([str(p) for p in files]).to_table(columns=["length"])["length"]
    steps = int(steps.to_numpy().sum())
    m, f = pick["metrics/canopy"], pick["metrics/alt"]
    c, n = pick["compare/canopy"], pick["compare/alt"]
    print(f"store {root}: {len(files)} shards, {steps / 1e6:.2f} M steps, threads {args.threads}")
    print("| step | canopy | alternative | ratio |")
    print("|---|---|---|---|")
    print(
        f"| `canopy metrics` | {m[0]:.1f} CPU-s, {m[1]:.2f} GiB peak | pyarrow scan + "
        f"per-rollout sums (the I/O floor) {f[0]:.1f} CPU-s, {f[1]:.2f} GiB | "
        f"{m[0] / f[0]:.2f}x the floor |"
    )
    print(
        f"| `canopy compare`, B = {args.bootstrap} | {c[0]:.1f} CPU-s | naive per-replicate "
        f"Python loop over the saved per-prompt table {n[0]:.1f} CPU-s | {c[0] / n[0]:.2f}x |"
    )
    bc, bn = pick["bootstrap/canopy"][0], pick["bootstrap/alt"][0]
    print(
        f"| the bootstrap alone (after imports), B = {args.bootstrap} | {bc:.2f} CPU-s | the "
        f"naive loop alone {bn:.2f} CPU-s | {bc / bn:.2f}x |"
    )
    pd_, sc = pick["plot-data/canopy"], pick["plot-data/alt"]
    print(
        f"| plots stage, data loading | {pd_[0]:.1f} CPU-s, {pd_[2]:.1f} s wall | the metrics "
        f"stage's scan of the store {sc[0]:.1f} CPU-s, {sc[2]:.1f} s wall | "
        f"{pd_[0] / sc[0]:.2f}x CPU, {pd_[2] / sc[2]:.2f}x wall |"
    )
    print(
        f"| store size | {size / 2**30:.3f} GiB, {size / steps:.2f} bytes/step | {steps / 1e6:.1f} "
        f"M steps x 16 bytes raw = {steps * 16 / 2**30:.3f} GiB | {size / (16 * steps):.2f}x raw |"
    )

    if args.analysis:
        wall = cpu = 0.0
        for stage, *flags in ANALYSIS:
            c, _, dt = child([*canopy, stage, str(root), *flags], env)
            wall, cpu = wall + dt, cpu + c
            print(f"analysis: canopy {stage}: {dt:.1f} s wall, {c:.1f} CPU-s")
        print(
            f"analysis, metrics through report (no embedding): {wall:.1f} s wall, {cpu:.1f} CPU-s"
        )


if __name__ == "__main__":
    main()
