"""Synthetic run folders for the semantic-diversity and comparison tests (no model needed)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from canopy_entropy.store import RunStore, rollouts_table, slug

WORDS = "the cat dog ran sat on mat big small red blue quick lazy fox jumps over".split()


def make_run(
    root: Path,
    variants: tuple[str, ...] = ("base", "instruct"),
    tasks: tuple[str, ...] = ("math", "story"),
    families: tuple[str, ...] = ("fam",),
    n_prompts: int = 4,
    n_rollouts: int = 6,
    seed: int = 0,
    copy_of: str | None = None,
    drop_prompts: dict[str, list[str]] | None = None,
) -> Path:
    """Write random rollouts (entropy, eos_prob, text) for every family/variant/task.

    ``copy_of``: every variant reuses that variant's rollouts exactly (identical models).
    ``drop_prompts``: variant -> prompt ids left out for that variant.
    """
    store = RunStore(root)
    for family in families:
        for task in tasks:
            cache: dict[str, dict] = {}
            for variant in variants:
                rng = np.random.default_rng(
                    [seed, zlib.crc32(f"{family}/{task}/{copy_of or variant}".encode())]
                )
                if copy_of and copy_of in cache:
                    data = cache[copy_of]
                else:
                    data = {"pid": [], "ri": [], "ent": [], "eos": [], "txt": []}
                    for p in range(n_prompts):
                        if p in (int(x[1:]) for x in (drop_prompts or {}).get(variant, [])):
                            continue
                        for i in range(n_rollouts):
                            n = int(rng.integers(2, 40))
                            data["pid"].append(f"p{p}")
                            data["ri"].append(i)
                            data["ent"].append((rng.random(n) * 2).astype(np.float32))
                            data["eos"].append((rng.random(n) * 0.2).astype(np.float32))
                            data["txt"].append(" ".join(rng.choice(WORDS, n)))
                    if copy_of:
                        cache[copy_of] = data
                table = rollouts_table(
                    run="test",
                    model=f"{family}-{variant}",
                    variant=variant,
                    family=family,
                    task=task,
                    prompt_id=data["pid"],
                    rollout_index=data["ri"],
                    seed=data["ri"],
                    finish_reason=["eos"] * len(data["ri"]),
                    entropy=data["ent"],
                    eos_prob=data["eos"],
                    text=data["txt"],
                )
                store.write_rollouts(slug(family, variant, task), table)
    return Path(root)
