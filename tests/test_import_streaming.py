"""Streaming import: chunked writes give the one-shot store, a bad last line writes nothing, a
killed import re-run gives the clean store, and the orjson fast path parses as ``json`` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import canopy_entropy.importer as importer_mod
from canopy_entropy.errors import CanopyError
from canopy_entropy.importer import import_jsonl
from canopy_entropy.run.manifest import read_manifest
from canopy_entropy.store import RunStore

SRC = str(Path(__file__).resolve().parents[1] / "src")
ORDER = [(c, "ascending") for c in ("model", "variant", "task", "prompt_id", "rollout_index")]


def rows(n: int = 60) -> list[dict]:
    """Rollouts of two groups, interleaved, some with rollout_index given, varied lengths."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        steps = int(rng.integers(1, 9))
        lam = (rng.random(steps) * 0.3).round(6).tolist()
        row = {
            "prompt_id": f"p{i % 5}",
            "entropy": (1.0 + rng.random(steps)).round(6).tolist(),
            "eos_prob": lam,
            "token_ids": rng.integers(0, 50_000, steps).tolist(),
            "text": f"rollout {i} ✓",
            "task": ("math", "story")[i % 2],
        }
        if i % 7 == 0:
            row["rollout_index"] = 100 + i
        out.append(row)
    return out


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items))
    return path


def table(run: Path) -> pa.Table:
    return RunStore(run).read_rollouts().sort_by(ORDER)


def test_chunked_import_gives_the_one_shot_store(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "r.jsonl", rows())
    one = import_jsonl(src, tmp_path / "one", model="m", variant="base", run_name="r")
    assert len(one.shards) == 2  # one shard per group
    monkeypatch.setattr(importer_mod, "STEP_BUDGET", 12)  # a few rollouts per shard
    monkeypatch.setattr(importer_mod, "SHARD_ROLLOUTS", 4)
    many = import_jsonl(src, tmp_path / "many", model="m", variant="base", run_name="r")
    assert len(many.shards) >= 60 // 4
    assert sorted(f.name for f in RunStore(tmp_path / "many").shard_files()) == sorted(many.shards)
    assert table(tmp_path / "many").equals(table(tmp_path / "one"))
    # independently: the stored values are the file's, as float32, with indices in file order
    got = table(tmp_path / "one").to_pylist()
    want = rows()
    index: dict = {}
    for r in want:
        key = ("story" if r["task"] == "story" else "math", r["prompt_id"])
        index.setdefault(key, []).append(r)
    for r in got:
        given = [w for w in index[(r["task"], r["prompt_id"])] if w.get("rollout_index")]
        missing = [w for w in index[(r["task"], r["prompt_id"])] if "rollout_index" not in w]
        nxt = max([w["rollout_index"] + 1 for w in given], default=0)
        w = next((w for w in given if w["rollout_index"] == r["rollout_index"]), None)
        w = w or missing[r["rollout_index"] - nxt]
        assert r["entropy"] == np.float32(w["entropy"]).tolist()
        assert r["eos_prob"] == np.float32(w["eos_prob"]).tolist()
        assert r["token_ids"] == w["token_ids"] and r["text"] == w["text"]
    assert many.n_rollouts == one.n_rollouts == 60 and many.n_prompts == one.n_prompts == 10


def test_bad_line_near_the_end_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(importer_mod, "STEP_BUDGET", 12)  # shards would be due early on
    bad = {"prompt_id": "z", "entropy": [1.0, 2.0], "eos_prob": [0.5]}
    src = write_jsonl(tmp_path / "r.jsonl", [*rows(), bad, rows(1)[0]])
    run = tmp_path / "run"
    with pytest.raises(CanopyError, match=r"1 bad line.*line 61: 'eos_prob' has 1 steps"):
        import_jsonl(src, run, model="m", variant="base")
    assert not run.exists()


def test_duplicate_index_and_its_earlier_line(tmp_path):
    items = rows(10)
    items.append({**items[7], "rollout_index": 107})  # line 8 gave prompt p2 index 107
    src = write_jsonl(tmp_path / "r.jsonl", items)
    with pytest.raises(
        CanopyError, match=r"1 duplicate.*line 11: rollout 107 of prompt 'p2' repeats line 8"
    ):
        import_jsonl(src, tmp_path / "run", model="m", variant="base")


_KILL = """
import os, sys
import canopy_entropy.importer as imp
import canopy_entropy.store as store
imp.STEP_BUDGET, imp.SHARD_ROLLOUTS = 12, 4
where, after = sys.argv[3], int(sys.argv[4])
calls = []
if where == "write":
    real_write = store.atomic_write_table
    def write(path, table, tag, options=None):
        calls.append(path)
        if len(calls) > after:
            os._exit(9)
        real_write(path, table, tag, options)
    store.atomic_write_table = write
else:
    real_replace = os.replace
    def replace(a, b):
        if ".staging" not in str(b):  # a staged shard renamed into rollouts/
            calls.append(b)
            if len(calls) > after:
                os._exit(9)
        real_replace(a, b)
    os.replace = replace
imp.import_jsonl(sys.argv[1], sys.argv[2], model="m", variant="base", run_name="r")
"""


@pytest.mark.parametrize(("where", "after"), [("write", 3), ("rename", 5)])
def test_killed_import_rerun_gives_the_same_store(tmp_path, where, after):
    src = write_jsonl(tmp_path / "r.jsonl", rows())
    clean = tmp_path / "clean"
    import_jsonl(src, clean, model="m", variant="base", run_name="r")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL, str(src), str(run), where, str(after)],
        env={"PYTHONPATH": SRC + ":" + ":".join(sys.path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 9, proc.stderr
    shards = RunStore(run).shard_files()
    assert len(shards) == (0 if where == "write" else after)  # killed part-way
    assert not read_manifest(run, missing_ok=True).imports
    summary = import_jsonl(src, run, model="m", variant="base", run_name="r")
    assert table(run).equals(table(clean))
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in clean.iterdir())
    assert [i.shards for i in read_manifest(run).imports] == [tuple(summary.shards)]


@pytest.mark.parametrize(
    "line",
    [
        '{"prompt_id": "a", "entropy": [1.0], "entropy": [2.0]}',
        '{"prompt_id": "a", "entropy" : [1.0], "text": "x\\":", "entropy":[2.0]}',
        '{"prompt_id": 18446744073709551616, "entropy": [1.0]}',
        '{"prompt_id": "a", "entropy": [1e400]}',
        '{"prompt_id": "a", "entropy": [NaN]}',
        '{"prompt_id": "a", "entropy": [0.1], "seed": 18446744073709551616}',
        '{"prompt_id": "a", "entropy": [0.1], "text": "\\ud800"}',
        '{"prompt_id": "a", "entropy": [0.1, 100000000000000000000000000000000000000000]}',
        '{"prompt_id": "a", "entropy": [0.1], "x": {"y": 1, "y": 2}}',
        '{"prompt_id": "a", "entropy": [0.1], "text": "a \\"k\\": 1", "seed": 3}',
    ],
)
def test_fast_parse_decides_as_the_stdlib_parse(line):
    """The record or error of every line is the one json.loads (with the duplicate-key hook)
    gives: orjson's result is used only where it cannot differ."""
    defaults = {"model": "m", "variant": "base", "family": None, "task": None}
    raw = line.encode()
    obj, err = importer_mod._parse(raw, first=True)
    want = (None, err) if err else importer_mod._validate_line(obj, defaults, None)
    got = importer_mod._record(raw, True, defaults, None)
    assert got[1] == want[1]
    if want[0] is not None:
        assert got[0].keys() == want[0].keys()
        for k, value in want[0].items():
            assert (
                np.array_equal(got[0][k], value)
                if isinstance(value, np.ndarray)
                else (got[0][k] == value)
            )
