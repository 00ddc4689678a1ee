"""canopy import: validation with line numbers, nothing written on error, idempotence, CLI;
hostile input refused in one line, repeated lines warned about, OSErrors rolled back."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import canopy_entropy.importer as importer_mod
import canopy_entropy.store as store_mod
from canopy_entropy.cli.main import app
from canopy_entropy.errors import CanopyError
from canopy_entropy.importer import import_jsonl
from canopy_entropy.metrics import compute_metrics
from canopy_entropy.run.manifest import read_manifest
from canopy_entropy.store import RunStore
from cli_helpers import run_cli

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
    manifest = read_manifest(run)
    assert manifest.imports[0].sha256 == summary.sha256
    assert {m.policy.max_new_tokens for m in manifest.models.values()} == {4}
    assert {m.source for m in manifest.models.values()} == {"import"}
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
    assert len(read_manifest(run).imports) == 1
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


# --- hostile input: each case is refused with one line naming the line and the fix ----------

LN2 = math.log(2.0)  # h(1/2), the binary entropy of an even stop/continue split


def _line(**fields) -> str:
    return json.dumps({"prompt_id": "a", "entropy": [1.0, 0.5], **fields})


NONSENSE = {
    "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file (NUL byte at offset 8)"),
    "gzip": (b"\x1f\x8b\x08\x00" + b"\x00" * 12, "is gzip-compressed; decompress it first"),
    "utf16": (_line().encode("utf-16"), "is UTF-16 text; convert it to UTF-8"),
    "latin1": (b'{"prompt_id": "caf\xe9", "entropy": [1.0]}', "line 1: not UTF-8 text"),
    "seed 2**70": (_line(seed=2**70), "line 1: 'seed' must be an integer in [0, 2**63 - 1]"),
    "seed true": (_line(seed=True), "line 1: 'seed' must be an integer"),
    "entropy 1e39": (_line(entropy=[1e39]), "'entropy' step 1 is 1e+39, beyond the float32"),
    "logprob -1e39": (_line(logprob=[-0.5, -1e39]), "'logprob' step 2 is -1e+39, beyond the"),
    "400 digits": ('{"prompt_id": 1, "entropy": [1' + "0" * 400 + "]}", "beyond the float32"),
    "5000 digits": ('{"prompt_id": 1, "entropy": [1' + "0" * 5000 + "]}", "line 1: invalid JSON"),
    "deep": ('{"prompt_id": 1, "entropy": ' + "[" * 10**5 + "]" * 10**5 + "}", "nested too"),
    "eos_probs": (
        _line(eos_probs=[0.1, 0.5]),
        "unknown field 'eos_probs' (did you mean 'eos_prob'?)",
    ),
    "logprobs": (_line(logprobs=[-1, -1]), "unknown field 'logprobs' (did you mean 'logprob'?)"),
    "entropies": (_line(entropies=[1, 1]), "unknown field 'entropies' (did you mean 'entropy'?)"),
    "reward": (_line(reward=1), "unknown field 'reward'; valid: prompt_id, entropy, eos_prob"),
    "twice": ('{"prompt_id": 1, "entropy": [1], "entropy": [2]}', "key 'entropy' appears twice"),
    "string": (_line(entropy=["0.5", 1.0]), "'entropy' step 1 is the string '0.5', not a number"),
    "bool": (_line(entropy=[1.0, True]), "'entropy' step 2 is true, not a number"),
    "bool eos": (_line(eos_prob=[False, 0.5]), "'eos_prob' step 1 is false, not a number"),
    "null": (_line(kept_mass=[None, 1.0]), "'kept_mass' step 1 is null, not a number"),
    "token 1.7": (_line(token_ids=[1.7, 2]), "'token_ids' step 1 is 1.7; token ids are integers"),
    "token -3": (_line(token_ids=[5, -3]), "'token_ids' step 2 is -3; token ids are integers"),
    "token bool": (_line(token_ids=[5, True]), "'token_ids' step 2 is true, not a number"),
    "token 2**31": (_line(token_ids=[5, 2**31]), "'token_ids' step 2 is 2147483648; token ids"),
    "eos 1 early": (_line(eos_prob=[1.0, 0.1]), "'eos_prob' step 1 is 1 (as float32) but the rol"),
    "eos ~1 early": (_line(eos_prob=[1 - 1e-9, 0.1]), "'eos_prob' step 1 is 1 (as float32)"),
    "eos 1 cut": (
        _line(eos_prob=[0.1, 1.0], finish_reason="length"),
        "'eos_prob' step 2 is 1 (as float32) but it ended with finish_reason 'length'",
    ),
    "eos 0 last": (_line(eos_prob=[0.1, 0.0]), "'eos_prob' of the last step is 0 but the rollou"),
    "eos 1.5": (_line(eos_prob=[0.1, 1.5]), "'eos_prob' step 2 is 1.5, outside [0, 1]"),
    "eos 1+2e-5": (_line(eos_prob=[0.1, 1 + 2e-5]), "'eos_prob' step 2 is 1.00002, outside"),
    "logprob 2e-5": (_line(logprob=[2e-5, -1]), "'logprob' step 1 is 2e-05, outside [-inf, 0]"),
    "kept 0": (_line(kept_mass=[1.0, 0.0]), "'kept_mass' step 2 is 0.0, outside (0, 1]"),
    "kept 1e-50": (_line(kept_mass=[1e-50, 1]), "1e-50, which float32 storage rounds to 0"),
    "kept 1.5": (_line(kept_mass=[1.5, 1.0]), "'kept_mass' step 1 is 1.5, outside (0, 1]"),
    "H < h(eos)": (
        _line(entropy=[0.6, 1.0], eos_prob=[0.5, 0.5]),
        f"'entropy' step 1 is 0.6, below the binary entropy {LN2:.7g} of its eos_prob 0.5",
    ),
    "prompt 1.5": (_line(prompt_id=1.5), "'prompt_id' is the number 1.5; give a string or int"),
    "prompt true": (_line(prompt_id=True), "'prompt_id' is true; give a string or integer"),
    "surrogate": ('{"prompt_id": 1, "entropy": [1], "text": "\\ud800"}', "'text' holds an unp"),
}


@pytest.mark.parametrize("content,fragment", NONSENSE.values(), ids=NONSENSE.keys())
def test_cli_refuses_nonsense_with_one_line(tmp_path, capsys, monkeypatch, content, fragment):
    src = tmp_path / "r.jsonl"
    src.write_bytes(content if isinstance(content, bytes) else content.encode() + b"\n")
    run = tmp_path / "run"
    code, _, err = run_cli(
        ["import", str(src), "--run", str(run), "--model", "m", "--variant", "base"],
        capsys,
        monkeypatch,
    )
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert not run.exists()


def test_all_bad_lines_of_the_new_kinds_are_listed(tmp_path):
    rows = [
        _line(),
        _line(eos_probs=[0.1, 0.5]),
        _line(entropy=["0.5", 1.0]),
        _line(),
        _line(seed=2**70),
        _line(kept_mass=[0, 1]),
        _line(entropy=[0.6, 1.0], eos_prob=[0.5, 0.5]),
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CanopyError) as info:
        import_jsonl(src, tmp_path / "run", model="m", variant="base")
    msg = str(info.value)
    assert "5 bad line(s), nothing imported" in msg
    for n, what in [(2, "eos_probs"), (3, "'0.5'"), (5, "'seed'"), (6, "kept_mass"), (7, "h")]:
        assert f"line {n}: " in msg and what in msg
    assert "line 1:" not in msg and "line 4:" not in msg
    assert not (tmp_path / "run").exists()


def test_values_at_the_edges_are_accepted_and_stored_exactly(tmp_path):
    rows = [
        # token ids written as integral floats; EOS certain on the step that did stop
        {"prompt_id": "a", "entropy": [1.0, 0.0], "eos_prob": [0.1, 1.0], "token_ids": [3.0, 2]},
        # entropy equal to h(eos_prob) up to float32 rounding: content entropy 0
        {"prompt_id": "a", "entropy": [LN2, LN2 - 5e-6], "eos_prob": [0.5, 0.5]},
        # a vanishing EOS mass, kept_mass 1 and logprob 0 (a sure token)
        {"prompt_id": "b", "entropy": [0.0, 2.0], "eos_prob": [1e-50, 0.3], "logprob": [0, -1]},
        {"prompt_id": "b", "entropy": [2.0], "kept_mass": [1.0], "seed": 2**63 - 1},
        # float32 probabilities a few ulps above 1 (the HF engine records up to 1 + 1.1e-6)
        {"prompt_id": "c", "entropy": [1.0, 0.0], "eos_prob": [0.0, 1 + 2.4e-7],
         "kept_mass": [1 + 1e-6, 1.0], "logprob": [1e-6, 0.0]},
    ]  # fmt: skip
    src = tmp_path / "r.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repeat warning, no float overflow note
        import_jsonl(src, run, model="m", variant="base")
    order = [(c, "ascending") for c in ("prompt_id", "rollout_index")]
    got = RunStore(run).read_rollouts().sort_by(order).to_pylist()
    assert got[0]["token_ids"] == [3, 2] and got[0]["eos_prob"] == [pytest.approx(0.1), 1.0]
    assert got[1]["entropy"] == [pytest.approx(LN2, abs=1e-7), pytest.approx(LN2 - 5e-6, abs=1e-7)]
    assert got[2]["eos_prob"] == [0.0, pytest.approx(0.3)] and got[2]["logprob"] == [0.0, -1.0]
    assert got[3]["seed"] == 2**63 - 1 and got[3]["kept_mass"] == [1.0]
    f32 = [float(np.float32(x)) for x in (1 + 2.4e-7, 1 + 1e-6, 1e-6)]
    assert (got[4]["eos_prob"][1], got[4]["kept_mass"][0], got[4]["logprob"][0]) == tuple(f32)


@pytest.mark.parametrize("below,accepted", [(5e-6, True), (2e-5, False), (1e-3, False)])
def test_binary_entropy_tolerance(tmp_path, below, accepted):
    """H_t >= h(lambda_t) - 1e-5: at lambda = 1/4, h = 0.5623... (closed form, not the code's)."""
    lam = 0.25
    h = -(lam * math.log(lam) + (1 - lam) * math.log(1 - lam))
    src = write_jsonl(tmp_path / "r.jsonl", [_line(entropy=[h - below, 1.0], eos_prob=[lam, 0.5])])
    if accepted:
        assert import_jsonl(src, tmp_path / "run", model="m", variant="base").n_rollouts == 1
    else:
        with pytest.raises(CanopyError, match=f"below the binary entropy {h:.7g}"):
            import_jsonl(src, tmp_path / "run", model="m", variant="base")


def test_repeated_lines_warn_with_line_numbers(tmp_path, capsys, monkeypatch):
    once = [_line(), _line(entropy=[2.0, 1.0]), _line(prompt_id="b")]
    src = write_jsonl(tmp_path / "twice.jsonl", once + once)
    run = tmp_path / "run"
    args = ["import", str(src), "--run", str(run), "--model", "m", "--variant", "base"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning: "))
    assert "3 line(s) repeat an earlier line" in warning
    assert "line 4 = line 1, line 5 = line 2, line 6 = line 3" in warning
    # still imported as asked (M doubled): the warning is the user's cue
    assert RunStore(run).read_rollouts(columns=["length"]).num_rows == 6


def test_no_repeat_warning_for_greedy_or_indexed_lines(tmp_path):
    greedy = json.dumps({"prompt_id": "g", "entropy": [0.0, 0.0]})  # the only possible rollout
    indexed = [_line(rollout_index=0, seed=1), _line(rollout_index=1, seed=1)]
    src = write_jsonl(tmp_path / "r.jsonl", [greedy, greedy, greedy, *indexed])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert import_jsonl(src, tmp_path / "run", model="m", variant="base").n_rollouts == 5


# --- OSError while importing: one line naming the path, nothing half-written ---------------


def _cli_import(src, run, capsys, monkeypatch):
    args = ["import", str(src), "--run", str(run), "--model", "m", "--variant", "base"]
    return run_cli(args, capsys, monkeypatch)


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_read_only_run_folder(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("running as root: chmod does not make the folder read-only")
        code, _, err = _cli_import(
            write_jsonl(tmp_path / "r.jsonl", GOOD), run, capsys, monkeypatch
        )
    finally:
        run.chmod(0o755)
    assert code == 2 and err.count("\n") == 1
    assert f"error: cannot import into {run}: Permission denied" in err
    assert f"make {run} writable" in err
    assert _snapshot(run) == {}


@pytest.mark.parametrize(
    "code_,fix",
    [
        (errno.EACCES, "make {run} writable"),
        (errno.EROFS, "make {run} writable"),
        (errno.ENOSPC, "free disk space"),
        (errno.EDQUOT, "free disk space"),
    ],
)
def test_failed_second_shard_rolls_back_the_first(tmp_path, capsys, monkeypatch, code_, fix):
    """An earlier import stays byte-identical; the shard this call wrote first is removed."""
    run = tmp_path / "run"
    import_jsonl(write_jsonl(tmp_path / "first.jsonl", GOOD[2:3]), run, model="m", variant="base")
    before = _snapshot(run)
    real = store_mod.atomic_write_table
    calls = []

    def second_fails(path, table, schema_version, options=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(code_, os.strerror(code_), str(path))
        real(path, table, schema_version, options)

    monkeypatch.setattr(store_mod, "atomic_write_table", second_fails)
    monkeypatch.setattr(importer_mod, "SHARD_ROLLOUTS", 1)  # one shard per rollout
    code, _, err = _cli_import(
        write_jsonl(tmp_path / "r.jsonl", GOOD[:2]), run, capsys, monkeypatch
    )
    assert len(calls) == 2 and code == 2 and err.count("\n") == 1
    assert f"error: cannot import into {run}: {os.strerror(code_)} ({calls[1]})" in err
    assert fix.format(run=run) in err and "nothing imported" in err
    assert _snapshot(run) == before


def test_disk_full_on_the_manifest_removes_the_new_shards(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")  # pyarrow/os give no filename

    monkeypatch.setattr(store_mod, "atomic_write_json", full)
    code, _, err = _cli_import(write_jsonl(tmp_path / "r.jsonl", GOOD), run, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot import into {run}: No space left on device ({run}); free disk space" in err
    assert list((run / "rollouts").iterdir()) == []


def test_unreadable_input_and_run_folder_that_is_a_file(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "r.jsonl", GOOD)
    real_open = open

    def deny(path, *args, **kwargs):
        if Path(path) == src:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(importer_mod, "open", deny, raising=False)
    code, _, err = _cli_import(src, tmp_path / "run", capsys, monkeypatch)
    assert code == 2 and err == f"error: cannot read {src}: Permission denied; check the file\n"
    monkeypatch.undo()
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _cli_import(src, afile, capsys, monkeypatch)
    assert code == 2 and err.startswith(f"error: {afile} is a file, not a run folder")
