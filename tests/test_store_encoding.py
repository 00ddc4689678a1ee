"""The compact rollout encodings: applied to every per-step list, lossless, and old stores (zstd
only, dictionary on) still read and give the same metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from canopy_entropy.metrics import compute_metrics
from canopy_entropy.reference import rollouts_table_from_flat
from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.run.manifest import Manifest, ModelRecord, PolicyRecord, write_manifest
from canopy_entropy.store import (
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    RunStore,
    atomic_write_table,
    read_table,
    verify_file,
)

PER_STEP = ("token_ids", "entropy", "eos_prob", "logprob", "kept_mass", "entropy_upper")
LEGACY = {"compression": "zstd"}  # what atomic_write_table wrote before ROLLOUT_OPTIONS


def _table(seed: int, prompts: int = 3, rollouts: int = 8):
    """Rollouts of task ``t<seed>`` with model-like floats (full mantissas, wide exponents)."""
    rng = np.random.default_rng(seed)
    R = prompts * rollouts
    length = rng.integers(1, 60, R)
    offsets = np.concatenate([[0], np.cumsum(length)])
    n = int(offsets[-1])
    draw = {
        "prompt": np.repeat(np.arange(prompts), rollouts),
        "rollout_index": np.tile(np.arange(rollouts), prompts),
        "offsets": offsets,
        "token_ids": rng.integers(0, 49_152, n, dtype=np.int32),
        "entropy": (rng.gamma(3.4, 0.96, n) * 10.0 ** -rng.uniform(0, 4, n)).astype(np.float32),
        "eos_prob": (10.0 ** rng.normal(-8.9, 2.1, n)).clip(0, 1).astype(np.float32),
        "logprob": (-rng.exponential(2.0, n)).astype(np.float32),
        "kept_mass": np.ones(n, dtype=np.float32),
        "finish_reason": np.where(length > 50, "length", "eos"),
    }
    keys = {"model": "m", "variant": "base", "family": "m", "task": f"t{seed}"}
    return rollouts_table_from_flat(
        draw, run="r", keys=keys, seed=seed, with_eos_prob=True, with_logprob=True
    )


def _store(root, tables, options=None):
    store = RunStore(root)
    for i, table in enumerate(tables):
        if options is None:
            store.write_rollouts(f"s{i}", table)
        else:  # the writer as it was before the compact encodings
            atomic_write_table(store.shard_path(f"s{i}"), table, SCHEMA_VERSION, options)
    policy = PolicyRecord(max_new_tokens=50)
    record = ModelRecord(
        label="m", model="m", variant="base", family="m", source="import", policy=policy
    )
    write_manifest(root, Manifest(run="r", models={"m": record}))
    return store


def _encodings(path) -> dict[str, tuple[str, ...]]:
    meta = pq.read_metadata(path).row_group(0)
    return {
        meta.column(i).path_in_schema.split(".")[0]: meta.column(i).encodings
        for i in range(meta.num_columns)
    }


def test_per_step_lists_are_byte_stream_split_without_dictionary(tmp_path):
    store = _store(tmp_path / "new", [_table(0)])
    path = store.shard_files()[0]
    encodings = _encodings(path)
    for name in PER_STEP:
        assert "BYTE_STREAM_SPLIT" in encodings[name], (name, encodings[name])
        assert "RLE_DICTIONARY" not in encodings[name] and "PLAIN_DICTIONARY" not in encodings[name]
    assert not [n for n, e in encodings.items() if "RLE_DICTIONARY" in e or "PLAIN_DICTIONARY" in e]
    meta = pq.read_metadata(path).row_group(0)
    assert {meta.column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    with_stats = {meta.column(i).path_in_schema for i in range(meta.num_columns)
                  if meta.column(i).is_stats_set}  # fmt: skip
    assert with_stats == set(PROMPT_KEYS)  # what filtered reads prune shards by
    assert verify_file(path, SCHEMA_VERSION)  # the content digest is still recorded
    legacy = _store(tmp_path / "old", [_table(0)], LEGACY)
    old = _encodings(legacy.shard_files()[0])
    assert all("BYTE_STREAM_SPLIT" not in old[name] for name in PER_STEP)


def test_encoding_is_lossless_bit_for_bit(tmp_path):
    table = _table(1).cast(ROLLOUT_SCHEMA)
    store = _store(tmp_path, [table])
    back = read_table(store.shard_files()[0], SCHEMA_VERSION)
    for name in PER_STEP[:-1]:
        a = table[name].combine_chunks().values.to_numpy()
        b = back[name].combine_chunks().values.to_numpy()
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert back.equals(table)


def test_compact_store_is_smaller_on_model_like_floats(tmp_path):
    tables = [_table(s, prompts=4, rollouts=50) for s in range(2)]
    new = _store(tmp_path / "new", tables)
    old = _store(tmp_path / "old", tables, LEGACY)
    size = {
        k: sum(p.stat().st_size for p in s.shard_files()) for k, s in (("new", new), ("old", old))
    }
    assert size["new"] < 0.8 * size["old"], size


def test_old_store_reads_and_gives_identical_metrics(tmp_path):
    tables = [_table(2), _table(3)]
    new = compute_metrics(_store(tmp_path / "new", tables), warn=False)
    old = compute_metrics(_store(tmp_path / "old", tables, LEGACY), warn=False)
    for attr in ("prompts", "pooled"):
        a, b = getattr(new, attr), getattr(old, attr)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    # and the per-rollout sums behind them match an independent reduction of the raw floats
    per_prompt: dict[tuple[str, str], list[float]] = {}
    for table in tables:
        rows = zip(table["task"].to_pylist(), table["prompt_id"].to_pylist(), strict=True)
        for key, e in zip(rows, table["entropy"].to_pylist(), strict=True):
            per_prompt.setdefault(key, []).append(float(np.sum(np.float64(e))))
    ce = new.prompts.set_index(["task", "prompt_id"])["ce_star"]
    assert len(ce) == len(per_prompt) == 6
    for key, sums in per_prompt.items():
        assert ce[key] == pytest.approx(np.mean(sums), rel=1e-12)
