"""canopy import: validation with line numbers, nothing written on error, idempotence, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from canopy_entropy.cli.main import app
from canopy_entropy.errors import CanopyError
from canopy_entropy.importer import import_jsonl
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.store import RunStore

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [
    {"prompt_id": "a", "entropy": [1.0, 0.5], "eos_prob": [0.25, 0.125], "logprob": [-1, -0.5]},
    {"prompt_id": "a", "entropy": [0.5, 0.5, 0.5]},
    {"prompt_id": 7, "entropy": [2.0], "text": "hi", "token_ids": [4]},
    {"prompt_id": 7, "entropy": [0.5] * 4, "variant": "instruct", "task": "math"},
]


def test_import_then_metrics(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", GOOD)
    run = tmp_path / "run"
    summary = import_jsonl(src, run, model="m", variant="base", max_new_tokens=4)
    assert summary.n_rollouts == 4
    order = [(c, "ascending") for c in ("variant", "prompt_id", "rollout_index")]
    table = RunStore(run).read_rollouts().sort_by(order)
    rows = table.to_pylist()
    base = [r for r in rows if r["variant"] == "base"]
    assert [(r["prompt_id"], r["rollout_index"]) for r in base] == [("7", 0), ("a", 0), ("a", 1)]
    assert base[0]["text"] == "hi" and base[0]["token_ids"] == [4]
    assert base[1]["eos_prob"] == [0.25, 0.125] and base[2]["eos_prob"] is None
    # default finish_reason: 'length' exactly when len(entropy) == max_new_tokens
    inst = next(r for r in rows if r["variant"] == "instruct")
    assert inst["finish_reason"] == "length" and inst["task"] == "math" and inst["family"] == "m"
    assert base[2]["finish_reason"] == "eos"
    manifest = RunStore(run).read_manifest()
    assert manifest["imports"][0]["sha256"] == summary.sha256
    assert manifest["policy"]["max_new_tokens"] == 4
    pooled = compute_metrics(run, warn=False).pooled.set_index("variant")
    assert pooled.loc["base", "n_prompts"] == 2
    # prompt a: H = 1.5, 1.5; prompt 7: H = 2.0; pooled = mean over prompts
    assert pooled.loc["base", "ce_star"] == pytest.approx((1.5 + 2.0) / 2)
    assert pooled.loc["instruct", "truncation_rate"] == 1.0


def test_reimport_is_idempotent(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", GOOD)
    run = tmp_path / "run"
    first = import_jsonl(src, run, model="m", variant="base")
    before = compute_metrics(run, warn=False).prompts
    second = import_jsonl(src, run, model="m", variant="base")
    assert first.shards == second.shards
    assert len(RunStore(run).read_manifest()["imports"]) == 1
    assert RunStore(run).read_rollouts(columns=["length"]).num_rows == 4
    assert compute_metrics(run, warn=False).prompts.equals(before)
    # same file under another model label replaces the earlier import of that file
    import_jsonl(src, run, model="other", variant="base")
    models = set(RunStore(run).read_rollouts(columns=["model"]).column("model").to_pylist())
    assert models == {"other"}


def test_bad_lines_are_listed_and_nothing_is_written(tmp_path):
    rows = [
        GOOD[0],
        {"entropy": [1.0]},
        {"prompt_id": "b", "entropy": [1.0, float("nan")]},
        '{"prompt_id": "b", "entropy": [1.0, NaN]}',
        {"prompt_id": "b", "entropy": [1.0, -0.5]},
        {"prompt_id": "b", "entropy": [1.0, 0.5], "logprob": [-1.0]},
        {"prompt_id": "b", "entropy": [1.0], "eos_prob": [1.5]},
        {"prompt_id": "b", "entropy": []},
        "{broken",
        {"prompt_id": "b", "entropy": [1.0], "variant": "chat"},
        {"prompt_id": "b", "entropy": [1.0], "finish_reason": "done"},
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    run = tmp_path / "run"
    with pytest.raises(CanopyError) as info:
        import_jsonl(src, run, model="m", variant="base")
    msg = str(info.value)
    assert "\n" not in msg and "10 bad line(s)" in msg
    for fragment in (
        "line 2: missing 'prompt_id'",
        "lines 3, 4: 'entropy' step 2 is NaN/infinite",
        "line 5: 'entropy' step 2 is -0.5",
        "line 6: 'logprob' has 1 steps but 'entropy' has 2",
        "line 7: 'eos_prob' step 1 is 1.5",
        "line 8: 'entropy' is empty",
        "line 9: invalid JSON",
        "line 10: variant 'chat'",
        "line 11: finish_reason 'done'",
    ):
        assert fragment in msg, fragment
    assert not run.exists()


def test_duplicates_and_overlap_with_another_source(tmp_path):
    dup = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt_id": "a", "entropy": [1.0], "rollout_index": 0}] * 2,
    )
    with pytest.raises(CanopyError, match="rollout 0 of prompt 'a' repeats line 1"):
        import_jsonl(dup, tmp_path / "run", model="m", variant="base")
    one = write_jsonl(tmp_path / "one.jsonl", GOOD[:2])
    import_jsonl(one, tmp_path / "run", model="m", variant="base")
    two = write_jsonl(tmp_path / "two.jsonl", [*GOOD[:2], GOOD[2]])
    with pytest.raises(CanopyError, match=r"already in .* from another source"):
        import_jsonl(two, tmp_path / "run", model="m", variant="base")
    with pytest.raises(CanopyError, match="exceed --max-new-tokens 1"):
        import_jsonl(one, tmp_path / "run2", model="m", variant="base", max_new_tokens=1)


def test_cli_import_and_metrics(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", GOOD)
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(
        app, ["import", str(src), "--run", str(run), "--model", "m", "--variant", "base"]
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["metrics", str(run), "--json", "--out", str(out), "--h-max", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert json.loads(out.read_text()) == doc
    assert (run / "metrics" / "pooled.parquet").exists()
    group = {g["key"]["variant"]: g for g in doc["groups"]}["base"]
    assert group["pooled"]["ce_star"] == pytest.approx(1.75)
    assert not math.isnan(group["pooled"]["truncation_bias_bound"])
    res = runner.invoke(app, ["metrics", str(run), "--by", "variant"])
    assert res.exit_code == 0 and "CE*" in res.stdout and "instruct" in res.stdout


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt_id": "a"}])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "canopy_entropy",
            "import",
            str(bad),
            "--run",
            str(tmp_path / "r"),
            "--model",
            "m",
            "--variant",
            "base",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "line 1: missing 'entropy'" in proc.stderr
    assert "Traceback" not in proc.stderr
