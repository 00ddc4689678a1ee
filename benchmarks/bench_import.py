"""Benchmark: peak RSS and CPU seconds of ``import_jsonl`` on a file of 1x and 4x the size
(prints a table; not a test). Each import runs in a fresh process (``resource`` of the child).

    PYTHONPATH=src python benchmarks/bench_import.py [--rollouts 12000] [--mean-len 294]
        [--before-src /path/to/old/src]

With ``--before-src`` the same files are also imported by the code under that src folder
(e.g. a ``git worktree`` of an older commit), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = """
import sys
from canopy_entropy.importer import import_jsonl
s = import_jsonl(sys.argv[1], sys.argv[2], model="m", variant="base")
print(s.n_rollouts)
"""


def write_file(path: Path, rollouts: int, mean_len: int, seed: int = 0) -> int:
    """``rollouts`` lines, 100 per prompt, geometric lengths, entropy/eos_prob/logprob/ids."""
    rng = np.random.default_rng(seed)
    steps = 0
    with open(path, "w") as fh:
        for i in range(rollouts):
            n = int(min(rng.geometric(1 / mean_len), 8 * mean_len))
            lam = rng.random(n) * 0.01
            lam[-1] = 0.5
            ent = 0.7 + rng.gamma(2.0, 0.5, n)  # above h(eos_prob) <= log 2
            row = {
                "prompt_id": f"p{i // 100}",
                "entropy": ent.astype(np.float32).tolist(),
                "eos_prob": lam.astype(np.float32).tolist(),
                "logprob": (-rng.gamma(1.0, 1.0, n)).astype(np.float32).tolist(),
                "token_ids": rng.integers(0, 150_000, n).tolist(),
            }
            fh.write(json.dumps(row) + "\n")
            steps += n
    return steps


def measure(src: str, jsonl: Path, run: Path) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of one import in a fresh process (its own rusage)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *sys.path[1:]])}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(jsonl), str(run)], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"import under {src} failed ({child.returncode})")
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss in KB (Linux)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=12_000)
    ap.add_argument("--mean-len", type=int, default=294)
    ap.add_argument("--before-src", default=None)
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    sources = [("after", here)] + ([("before", args.before_src)] if args.before_src else [])
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for scale in (1, 4):
            path = Path(tmp) / f"x{scale}.jsonl"
            steps = write_file(path, args.rollouts * scale, args.mean_len)
            size = path.stat().st_size / 1e6
            for label, src in sources:
                rss, cpu = measure(src, path, Path(tmp) / f"run-{label}-{scale}")
                rows.append((label, scale, args.rollouts * scale, steps, size, rss, cpu))
    print(
        f"{'code':7}{'file':>5}{'rollouts':>10}{'steps':>12}{'MB':>8}{'peak RSS MB':>13}{'CPU s':>8}"
    )
    for label, scale, n, steps, size, rss, cpu in sorted(rows):
        print(f"{label:7}{scale:>4}x{n:>10,}{steps:>12,}{size:>8.0f}{rss:>13.0f}{cpu:>8.1f}")


if __name__ == "__main__":
    main()
