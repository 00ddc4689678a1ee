"""Shared helpers: build small rollout tables by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from canopy_entropy.store import rollouts_table


def make_rollouts(
    prompts: dict[str, list[list[float]]],
    *,
    eos: dict[str, list[list[float]]] | None = None,
    logprob: dict[str, list[list[float]]] | None = None,
    finish: dict[str, list[str]] | None = None,
    model: str = "m",
    variant: str = "base",
    family: str = "f",
    task: str = "t",
) -> pa.Table:
    """Rollouts as ``{prompt_id: [entropy list per rollout]}`` -> ROLLOUT_SCHEMA table."""
    tables = []
    for pid, ents in prompts.items():
        n = len(ents)
        tables.append(
            rollouts_table(
                run="r",
                model=model,
                variant=variant,
                family=family,
                task=task,
                prompt_id=pid,
                rollout_index=list(range(n)),
                seed=[0] * n,
                finish_reason=(finish or {}).get(pid, ["eos"] * n),
                entropy=[np.asarray(e, dtype=np.float32) for e in ents],
                eos_prob=None
                if eos is None
                else [np.asarray(e, dtype=np.float32) for e in eos[pid]],
                logprob=None
                if logprob is None
                else [np.asarray(e, dtype=np.float32) for e in logprob[pid]],
            )
        )
    return pa.concat_tables(tables)
