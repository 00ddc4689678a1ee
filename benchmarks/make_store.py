"""A synthetic rollout store of the published study's size, written with canopy's own writer.

3 families x 2 variants x 4 tasks x 100 prompts x 100 rollouts = 240,000 rollouts (~72 M steps)
at ``--scale 1`` (``--scale 0.1`` keeps 10 prompts per group: 24,000 rollouts, ~7 M steps). One
shard per prompt, named as ``canopy generate`` names them, written by ``RunStore.write_rollouts``
(or, with ``--legacy``, with the Parquet options canopy used before the compact encodings), plus
a manifest, so ``canopy metrics`` / ``compare`` run on it unchanged.

Lengths: per prompt a mean ~ LogNormal(log 315, 0.6), per rollout geometric around it, capped at
4000 (finish 'length'); others end with EOS (token 2). Per-step values follow a mixture fitted to
a SmolLM2-135M-Instruct sample (offline alias, T = 1, 96 rollouts, 36 k steps); every value keeps
a full float32 mantissa, as a model's do:

- entropy: with probability 4% (instruct 15%) a near-deterministic step, log10 H ~ U(-4.5, 0);
  otherwise H ~ Gamma(3.4, 0.96 c) with a per-prompt scale c ~ LogNormal(0, 0.25) (instruct
  x 0.7). Sample quantiles 10/50/90%: 0.92 / 3.24 / 5.52 nats.
- logprob: -H * Gamma(1.3, 1/1.3) (E[surprisal | H] = H, as for sampling at T = 1); sample
  ratio quantiles 25/50/75%: 0.33 / 0.66 / 1.24.
- eos_prob: log10 ~ N(-8.9, 2.1), 3% from N(-3.5, 1.2); the final EOS step ~ Beta(0.5, 8) with
  logprob = log eos_prob. Sample log10 quantiles 10/50/90%: -11.6 / -8.9 / -6.1.
- token_ids: P(id) ~ (id + 40)^-1.15 over a 49,152-token vocabulary (sample id quantiles
  25/50/75%: 260 / 718 / 3746).
- kept_mass: 1.0 (no top-k / top-p, as in the sample).

    PYTHONPATH=src python benchmarks/make_store.py --root /tmp/canopy-paper-0.1 --scale 0.1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from canopy_entropy.reference import rollouts_table_from_flat
from canopy_entropy.run.manifest import Manifest, ModelRecord, PolicyRecord, write_manifest
from canopy_entropy.store import (
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    RunStore,
    atomic_write_table,
    slug,
)

CAP = 4000
VOCAB = 49_152
EOS_ID = 2
# The Parquet options rollout shards had before store.ROLLOUT_OPTIONS (for comparisons).
LEGACY_OPTIONS = {"compression": "zstd"}
FAMILIES, VARIANTS, TASKS = 3, ("base", "instruct"), 4


def _token_cdf() -> np.ndarray:
    p = (np.arange(VOCAB) + 40.0) ** -1.15
    return np.cumsum(p / p.sum())


def draw_group(
    rng: np.random.Generator, n_prompts: int, n_rollouts: int, variant: str, cdf: np.ndarray
) -> dict[str, np.ndarray]:
    """Flat per-step arrays + offsets for one (model, task) group (rollouts_table_from_flat)."""
    instruct = variant == "instruct"
    R = n_prompts * n_rollouts
    prompt = np.repeat(np.arange(n_prompts), n_rollouts)
    mean_len = np.exp(rng.normal(np.log(315.0), 0.6, n_prompts))[prompt]
    length = np.minimum(rng.geometric(1.0 / np.maximum(mean_len, 1.0)), CAP)
    offsets = np.zeros(R + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    n = int(offsets[-1])
    step_prompt = np.repeat(prompt, length)

    scale = np.exp(rng.normal(0.0, 0.25, n_prompts)) * (0.7 if instruct else 1.0)
    entropy = rng.gamma(3.4, 0.96, n) * scale[step_prompt]
    confident = rng.random(n) < (0.15 if instruct else 0.04)
    entropy[confident] = 10.0 ** rng.uniform(-4.5, 0.0, int(confident.sum()))
    logprob = -entropy * rng.gamma(1.3, 1 / 1.3, n)
    log_eos = np.where(rng.random(n) < 0.03, rng.normal(-3.5, 1.2, n), rng.normal(-8.9, 2.1, n))
    eos_prob = 10.0 ** np.minimum(log_eos, 0.0)
    token_ids = np.minimum(np.searchsorted(cdf, rng.random(n)), VOCAB - 1).astype(np.int32)

    ended = length < CAP
    last = offsets[1:][ended] - 1
    eos_prob[last] = rng.beta(0.5, 8.0, len(last)) + 1e-6
    logprob[last] = np.log(eos_prob[last])
    token_ids[last] = EOS_ID
    return {
        "prompt": prompt,
        "rollout_index": np.tile(np.arange(n_rollouts), n_prompts),
        "offsets": offsets,
        "token_ids": token_ids,
        "entropy": entropy.astype(np.float32),
        "eos_prob": eos_prob.astype(np.float32),
        "logprob": logprob.astype(np.float32),
        "kept_mass": np.ones(n, dtype=np.float32),
        "finish_reason": np.where(ended, "eos", "length"),
    }


def build(
    root: Path, scale: float = 1.0, seed: int = 0, options: dict | None = None, rollouts: int = 100
) -> int:
    """Write the store under ``root`` (one shard per prompt) and its manifest; return its steps.

    ``options`` are Parquet writer options for the shards (None: the store's own)."""
    n_prompts = max(1, round(100 * scale))
    store = RunStore(root)
    cdf = _token_cdf()
    labels, steps = {}, 0
    for f in range(FAMILIES):
        for variant in VARIANTS:
            model = f"fam{f}-{variant}"
            labels[model] = (variant, f"fam{f}")
            for t in range(TASKS):
                task = f"task{t}"
                rng = np.random.default_rng([seed, f, VARIANTS.index(variant), t])
                draw = draw_group(rng, n_prompts, rollouts, variant, cdf)
                steps += int(draw["offsets"][-1])
                keys = {"model": model, "variant": variant, "family": f"fam{f}", "task": task}
                group_seed = seed * 1000 + f * 10 + t
                table = rollouts_table_from_flat(
                    draw, run="paper", keys=keys, seed=group_seed, with_eos_prob=True,
                    with_logprob=True,
                )  # fmt: skip
                for p in range(n_prompts):
                    shard = table.slice(p * rollouts, rollouts)
                    name = slug(model, task, f"p{p:04d}")
                    if options is None:
                        store.write_rollouts(name, shard)
                    else:
                        atomic_write_table(
                            store.shard_path(name), shard.cast(ROLLOUT_SCHEMA), SCHEMA_VERSION,
                            options=options,
                        )  # fmt: skip
    policy = PolicyRecord(max_new_tokens=CAP)
    models = {
        m: ModelRecord(label=m, model=m, variant=v, family=fam, source="import", policy=policy)
        for m, (v, fam) in labels.items()
    }
    write_manifest(store.root, Manifest(run="paper", models=models))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="run folder to create (must not exist)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 100 prompts/group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--legacy", action="store_true", help="write with the pre-compact options")
    args = ap.parse_args()
    root = Path(args.root)
    if root.exists():
        raise SystemExit(f"error: {root} exists; remove it or choose another --root")
    t0 = time.perf_counter()
    steps = build(root, args.scale, args.seed, LEGACY_OPTIONS if args.legacy else None)
    size = sum(p.stat().st_size for p in (root / "rollouts").glob("*.parquet"))
    print(
        f"{root}: {steps / 1e6:.2f} M steps, {size / 2**20:.0f} MiB of shards "
        f"({size / steps:.2f} bytes/step) in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
