"""Scale-out on CPU, side by side in one invocation: one process vs 2 Ray workers vs 2 shards.

The same small study (one model, two tasks) is generated three ways, one after another, each
with ``canopy run --stages generate`` in fresh subprocesses and every torch pool at 1 thread:

  1 process   canopy run CONFIG --out A                      (one child process samples)
  2 Ray       canopy run CONFIG_RAY --out B                  (workers = 2, num_cpus = 1, on a
              local Ray of 2 CPUs started by this script before the clock starts)
  2 shards    canopy run CONFIG --out C --shard 1/2 & --shard 2/2   (concurrently)

Wall time is from start to the last process's exit (model loading included: what a user
waits for); rollouts/s and tokens/s are over it; the ratio is against one process. "steady"
is decoding once the models are loaded: the tokens of every prompt after the first committed
over the time from the first commit to the last (file times of the store). The three
stores are checked to hold the same rollouts. The tiny test model by default (its cost is
mostly per-step overhead), ``--model smollm2-135m-instruct`` for the offline SmolLM2 alias.

    PYTHONPATH=src python benchmarks/bench_scaleout.py --prompts 8 --rollouts 8 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from canopy_entropy.store import RunStore

CONFIG = """\
name = "scaleout"
tasks = ["math", "coding"]
stages = ["generate"]

[prompts]
n = {prompts}

[generation]
rollouts = {rollouts}
max_new_tokens = {max_new_tokens}
top_k = 50

[engine]
device = "cpu"
dtype = "float32"
{ray}
[[models]]
model = "{model}"
label = "m"
"""

RAY = 'backend = "ray"\nworkers = 2\n\n[engine.ray]\nnum_cpus = 1\n'


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS"):
        env[var] = "1"
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return {**env, **(extra or {})}


def _timed(commands: list[list[str]], env: dict[str, str], logs: Path) -> float:
    """Wall seconds until every command (started together) has exited with 0."""
    start = time.perf_counter()
    procs = []
    for i, cmd in enumerate(commands):
        log = (logs / f"{int(start)}-{i}.log").open("w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
    for proc, log in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(proc.args)} failed; see {log.name}")
    return time.perf_counter() - start


def _steady_tokens_per_s(run: Path) -> float:
    """Tokens of every prompt but the first committed over the time from the first commit to
    the last (shard file times): decoding once every process has loaded its model."""
    files = sorted(RunStore(run).shard_files(), key=lambda f: f.stat().st_mtime_ns)
    span = (files[-1].stat().st_mtime_ns - files[0].stat().st_mtime_ns) / 1e9
    tokens = sum(int(pc.sum(pq.read_table(f, columns=["length"])["length"]).as_py())
                 for f in files[1:])  # fmt: skip
    return tokens / span if span > 0 else float("nan")


def _rollouts(run: Path):
    keys = ["model", "task", "prompt_id", "rollout_index"]
    return RunStore(run).read_rollouts().sort_by([(k, "ascending") for k in keys])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model (default: the tiny test model)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per task (2 tasks)")
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    model = args.model
    if not model:
        from canopy_entropy.testing import build_tiny_model

        model = str(build_tiny_model(root / "tiny"))
    sizes = dict(prompts=args.prompts, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens)
    local, with_ray = root / "local.toml", root / "ray.toml"
    local.write_text(CONFIG.format(model=model, ray="", **sizes))
    with_ray.write_text(CONFIG.format(model=model, ray=RAY, **sizes))
    canopy = [sys.executable, "-m", "canopy_entropy", "run"]
    gen = ["--stages", "generate"]

    t = time.perf_counter()
    context = ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    ray_start = time.perf_counter() - t
    address = context.address_info["address"]
    try:
        walls = {
            "1 process": _timed([[*canopy, str(local), "--out", str(root / "a"), *gen]], _env(), root),
            "2 Ray workers": _timed([[*canopy, str(with_ray), "--out", str(root / "b"), *gen]],
                                    _env({"RAY_ADDRESS": address}), root),
            "2 shards": _timed([[*canopy, str(local), "--out", str(root / "c"), *gen, "--shard", s]
                                for s in ("1/2", "2/2")], _env(), root),
        }  # fmt: skip
    finally:
        ray.shutdown()
    tables = {mode: _rollouts(root / d) for mode, d in zip(walls, "abc", strict=True)}
    ref = tables["1 process"]
    same = all(t.equals(ref) for t in tables.values())
    n_roll, tokens = ref.num_rows, int(pc.sum(ref["length"]).as_py())
    print(f"study: 1 model x 2 tasks x {args.prompts} prompts x {args.rollouts} rollouts "
          f"(max {args.max_new_tokens} new tokens): {n_roll} rollouts, {tokens} tokens; "
          f"model {Path(model).name}; {os.cpu_count()} CPUs; local Ray started in "
          f"{ray_start:.1f} s (not counted)")  # fmt: skip
    print(f"{'mode':<15}{'wall s':>9}{'rollouts/s':>12}{'tokens/s':>11}{'ratio':>8}"
          f"{'steady tok/s':>14}{'ratio':>8}")  # fmt: skip
    base = walls["1 process"]
    steady = {mode: _steady_tokens_per_s(root / d) for mode, d in zip(walls, "abc", strict=True)}
    for mode, wall in walls.items():
        print(f"{mode:<15}{wall:>9.1f}{n_roll / wall:>12.2f}{tokens / wall:>11.1f}"
              f"{base / wall:>8.2f}{steady[mode]:>14.1f}"
              f"{steady[mode] / steady['1 process']:>8.2f}")  # fmt: skip
    print(f"rollouts identical in all three stores: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
