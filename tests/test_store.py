"""Rollout store: round trip, atomic shards under a killed writer, bad files, streaming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canopy_entropy.errors import StoreError
from canopy_entropy.run.manifest import read_manifest
from canopy_entropy.store import (
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    RunStore,
    clean_stale_temps,
    rollouts_table,
    verify_file,
)
from metrics_helpers import make_rollouts

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_round_trip_keeps_every_field(tmp_path):
    table = rollouts_table(
        run="r",
        model="m",
        variant="instruct",
        family="f",
        task="t",
        prompt_id=["p0", "p0"],
        rollout_index=[0, 1],
        seed=[11, 12],
        finish_reason=["eos", "length"],
        entropy=[np.array([0.5, 0.25], np.float32), np.array([1.0], np.float32)],
        token_ids=[np.array([5, 2]), np.array([7])],
        eos_prob=[np.array([0.1, 0.9]), None],
        logprob=[np.array([-0.5, -0.1]), np.array([-1.0])],
        text=["hi", None],
    )
    store = RunStore(tmp_path)
    store.write_rollouts("shard", table)
    back = store.read_rollouts()
    assert back.schema.equals(ROLLOUT_SCHEMA)
    assert back.column("length").to_pylist() == [2, 1]
    assert back.column("eos_prob").to_pylist()[1] is None
    assert back.column("eos_prob").to_pylist()[0] == pytest.approx([0.1, 0.9])
    assert back.column("token_ids").to_pylist() == [[5, 2], [7]]
    assert back.column("text").to_pylist() == ["hi", None]
    assert store.has_shard("shard") and not store.has_shard("other")


def test_rollouts_table_rejects_inconsistent_rows():
    with pytest.raises(StoreError, match="'logprob' has 1 steps"):
        make_rollouts({"a": [[0.5, 0.5]]}, logprob={"a": [[-1.0]]})
    with pytest.raises(StoreError, match="unknown finish_reason"):
        make_rollouts({"a": [[0.5]]}, finish={"a": ["done"]})


def test_killed_writer_leaves_no_visible_partial_shard(tmp_path):
    """SIGKILL a process in the middle of writing big shards: every visible shard is whole."""
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {SRC!r})
        from canopy_entropy.store import RunStore, rollouts_table
        store = RunStore({str(tmp_path)!r})
        rng = np.random.default_rng(0)
        ent = [rng.random(4000).astype(np.float32) for _ in range(300)]
        i = 0
        while True:
            t = rollouts_table(run="r", model="m", variant="base", family="f", task="t",
                               prompt_id="p", rollout_index=range(300), seed=[0] * 300,
                               finish_reason=["eos"] * 300, entropy=ent, logprob=ent)
            store.write_rollouts(f"s{{i:04d}}", t)
            print(i, flush=True)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0"  # one shard is complete
        assert proc.stdout.readline().strip() == "1"  # the next write has begun after this
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = RunStore(tmp_path)
    files = store.shard_files()
    assert len(files) >= 2, "the reported shards must be visible"
    store.validate()
    for path in files:
        assert verify_file(path, SCHEMA_VERSION)  # whole and sealed with its digest
        assert pq.read_table(path).num_rows == 300
    assert store.read_rollouts(columns=["length"]).num_rows == 300 * len(files)
    leftovers = sorted(store.rollouts_dir.glob(".*.tmp"))
    assert all(f"@{proc.pid}" in p.name for p in leftovers)
    assert clean_stale_temps(tmp_path) == leftovers
    assert not list(store.rollouts_dir.glob(".*.tmp"))


def test_corrupt_and_foreign_files_are_named(tmp_path):
    store = RunStore(tmp_path)
    store.write_rollouts("good", make_rollouts({"a": [[0.5]]}))
    bad = store.rollouts_dir / "broken.parquet"
    bad.write_bytes((store.rollouts_dir / "good.parquet").read_bytes()[:100])
    with pytest.raises(StoreError, match=r"corrupt file .*broken\.parquet .*delete it"):
        store.validate()
    with pytest.raises(StoreError, match=r"broken\.parquet"):
        list(store.iter_batches())
    with pytest.raises(StoreError, match=r"corrupt file .*broken\.parquet"):
        store.has_shard("broken")  # a resume check never takes a damaged shard as done
    bad.unlink()
    pq.write_table(pa.table({"x": [1, 2]}), store.rollouts_dir / "foreign.parquet")
    with pytest.raises(StoreError, match=r"foreign file .*foreign\.parquet"):
        store.dataset()
    with pytest.raises(StoreError, match="foreign"):
        from canopy_entropy.metrics import compute_metrics

        compute_metrics(tmp_path, warn=False)


def test_empty_run_and_bad_manifest(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(StoreError, match="no rollouts"):
        store.dataset()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_streaming_reads_in_bounded_batches(tmp_path):
    store = RunStore(tmp_path)
    for k in range(3):
        store.write_rollouts(f"s{k}", make_rollouts({f"p{k}": [[0.5] * 3] * 50}))
    batches = list(store.iter_batches(columns=["prompt_id", "length"], batch_size=16))
    assert len(batches) >= 9 and max(b.num_rows for b in batches) <= 16
    assert sum(b.num_rows for b in batches) == 150
    assert set(batches[0].schema.names) == {"prompt_id", "length"}


def test_read_keys_maps_each_group_to_the_shards_holding_it(tmp_path):
    """Per (model, variant, family, task) exactly the shards with a row of it (a shard may
    hold several groups), checked shard by shard; a group's read of those shards alone
    returns every one of its rollouts."""
    store = RunStore(tmp_path)
    store.write_rollouts("a0", make_rollouts({"p0": [[0.5] * 2] * 3}, model="a", task="x"))
    store.write_rollouts("a1", make_rollouts({"p1": [[0.5] * 4] * 2}, model="a", task="x"))
    mixed = pa.concat_tables(
        [
            make_rollouts({"p2": [[0.1] * 3] * 2}, model="a", task="y"),
            make_rollouts({"p3": [[0.2] * 5] * 4}, model="b", task="x"),
        ]
    )
    store.write_rollouts("mixed", mixed)
    keys, index = store.read_keys(["prompt_id", "rollout_index", "length"])
    assert keys.column_names == ["prompt_id", "rollout_index", "length"] and keys.num_rows == 11
    expected: dict[tuple, set] = {}
    for path in store.shard_files():
        for row in pq.read_table(path, columns=["model", "variant", "family", "task"]).to_pylist():
            expected.setdefault(tuple(row.values()), set()).add(path)
    assert {k: set(v) for k, v in index.items()} == expected
    assert index[("a", "base", "f", "x")] == [store.shard_path("a0"), store.shard_path("a1")]
    for (model, _, _, task), files in index.items():
        flt = (pa.compute.field("model") == model) & (pa.compute.field("task") == task)
        part = store.read_rollouts(columns=["prompt_id"], filter=flt, files=files)
        whole = store.read_rollouts(columns=["prompt_id"], filter=flt)
        assert sorted(part["prompt_id"].to_pylist()) == sorted(whole["prompt_id"].to_pylist())
