"""Sharded jobs into one run folder, ``canopy status``, one model per process, fixed chunks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from canopy_entropy import runner
from canopy_entropy.config import load_config
from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.generate import Shard, generate_run
from canopy_entropy.runner import generation
from canopy_entropy.store import RunStore, slug
from canopy_entropy.tasks import load_task_prompts
from cli_helpers import run_cli
from process_helpers import kill_after_commits

REPO = Path(__file__).parents[1]

CONFIG = """\
name = "shards"
tasks = ["math", "coding"]
stages = ["generate", "metrics"]
{models}
[prompts]
n = 3

[generation]
rollouts = 3
max_new_tokens = 12
top_k = 50

[engine]
device = "cpu"
dtype = "float32"
"""


def _models(model: Path, labels: list[str]) -> str:
    return "".join(
        f'\n[[models]]\nmodel = "{model}"\nvariant = "base"\nfamily = "tiny"\nlabel = "{x}"\n'
        for x in labels
    )


@pytest.fixture(scope="module")
def config(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "shards.toml"
    path.write_text(CONFIG.format(models=_models(tiny_model, ["tiny-a", "tiny-b"])))
    return path


@pytest.fixture(scope="module")
def unsharded(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unsharded") / "run"
    results = {r.name: r for r in runner.run_experiment(load_config(config), out)}
    assert results["generate"].status == results["metrics"].status == "done", results
    return out


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # float kernels split by threads
    }


def _canopy(args: list[str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "canopy_entropy", *args], env=_env(), stdout=out, stderr=out
    )


def _rollouts(run_dir: Path):
    keys = ["model", "task", "prompt_id", "rollout_index"]
    return RunStore(run_dir).read_rollouts().sort_by([(k, "ascending") for k in keys])


def _finish(config: Path, out: Path, unsharded: Path) -> None:
    """The final unsharded run samples nothing and analyses; rollouts equal the unsharded run's."""
    results = {r.name: r for r in runner.run_experiment(load_config(config), out)}
    assert results["generate"].status == "skipped", results["generate"]
    assert results["metrics"].status == "done"
    assert _rollouts(out).equals(_rollouts(unsharded))


def test_two_concurrent_shards_then_final_run_equal_unsharded(
    config, unsharded, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    jobs = [_canopy(["run", str(config), "--out", str(out), "--shard", f"{i}/2"], tmp_path / f"{i}.log") for i in (1, 2)]  # fmt: skip
    for i, job in enumerate(jobs, 1):
        assert job.wait() == 0, (tmp_path / f"{i}.log").read_text()
    assert not (out / "metrics").exists()  # a shard never analyses
    # every unit once, each in the shard that owns it: both shards wrote some
    cfg = load_config(config)
    owner = generation.shard_of_units(cfg, generation.load_prompts(cfg), 2)
    assert sorted(owner.values()).count(1) > 0 and sorted(owner.values()).count(2) > 0
    assert len(RunStore(out).shard_files()) == len(owner) == 2 * 2 * 3
    code, text, err = run_cli(["status", str(out), str(config)], capsys, monkeypatch)
    assert code == 0, err
    assert "12/12 prompts complete" in text and "shard 2/2: done" in text
    _finish(config, out, unsharded)


def test_killed_shard_restarted(config, unsharded, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(config)
    owner = generation.shard_of_units(cfg, generation.load_prompts(cfg), 2)
    mine = sorted(u for u, s in owner.items() if s == 1)
    held = 2
    args = ["run", str(config), "--out", str(out), "--shard", "1/2"]
    assert kill_after_commits(args, _env(), out, held, tmp_path / "killed.log") == held
    # status names the shard whose prompts are missing
    code, text, _ = run_cli(["status", str(out), str(config)], capsys, monkeypatch)
    assert code == 0 and f"{held}/12 prompts complete" in text
    assert "shard 1/2: started" in text and f"{len(mine) - held} prompts missing" in text
    assert f"shard 2/2: never started; {12 - len(mine)} prompts missing" in text
    other = _canopy(["run", str(config), "--out", str(out), "--shard", "2/2"], tmp_path / "2.log")
    again = _canopy(args, tmp_path / "again.log")  # restarted while shard 2 runs
    assert other.wait() == 0, (tmp_path / "2.log").read_text()
    assert again.wait() == 0, (tmp_path / "again.log").read_text()
    assert f"{len(mine) - held} prompts sampled" in (tmp_path / "again.log").read_text()
    _finish(config, out, unsharded)


@pytest.mark.parametrize("bad", ["0/2", "3/2", "x"])
def test_bad_shard_is_one_line(bad, config, tmp_path, capsys, monkeypatch):
    for args in (
        ["run", str(config), "--out", str(tmp_path / "r"), "--shard", bad],
        ["generate", "--model", "m", "--prompts", "math", "--run", str(tmp_path), "--shard", bad],
    ):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 2 and "Traceback" not in err, err
        assert err.startswith(f"error: shard '{bad}' is not I/N") and err.count("\n") == 1, err


def test_shards_exclude_an_unsharded_run(config, tmp_path):
    from canopy_entropy.errors import CanopyError

    out = tmp_path / "run"
    with runner.core.run_lock(out, shared=True), runner.core.run_lock(out, shared=True):
        with pytest.raises(CanopyError, match="another run or shard job is using"):
            runner.run_experiment(load_config(config), out)
    with runner.core.run_lock(out):
        with pytest.raises(CanopyError, match="an unsharded 'canopy run' is using"):
            runner.run_experiment(load_config(config), out, shard=Shard(1, 2))


def test_shard_shares_partition_every_model_evenly():
    for count in (1, 2, 3, 5):
        for label in ("a", "tiny-b", "Qwen3-8B"):
            owners = [
                [s for s in range(1, count + 1) if Shard(s, count).owns(label, k)]
                for k in range(40)
            ]
            assert all(len(o) == 1 for o in owners)
            sizes = [sum(o == [s] for o in owners) for s in range(1, count + 1)]
            assert max(sizes) - min(sizes) <= 1, sizes


def test_each_model_in_its_own_process_memory_does_not_grow(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "three.toml"
    path.write_text(CONFIG.format(models=_models(tiny_model, ["m1", "m2", "m3"])))
    seen = []
    real = generation.generate_in_child

    def spy(fn, kwargs, progress):
        result = real(fn, kwargs, progress)
        seen.append((kwargs["model_label"], *result[1:]))
        return result

    monkeypatch.setattr(generation, "generate_in_child", spy)
    results = runner.run_experiment(load_config(path), tmp_path / "run", stages=["generate"])
    assert results[0].status == "done", results[0]
    assert [s[0] for s in seen] == ["m1", "m2", "m3"]
    pids = {s[2] for s in seen}
    assert len(pids) == 3 and os.getpid() not in pids  # a fresh process per model
    peak1, peak3 = seen[0][1], seen[2][1]
    assert peak1 > 50 * 2**20  # a real measurement: torch and the model are in there
    assert peak3 <= peak1 * 1.05, (peak1, peak3)


def test_partly_written_chunk_is_resampled_whole(tiny_model, tmp_path):
    """prompts_per_call = 3 over 5 prompts: chunks {0,1,2}, {3,4}; prompts 1 and 4 lost."""
    prompts = load_task_prompts("math", n=5)
    policy = DecodingPolicy(temperature=1.0, top_k=50, max_new_tokens=12)
    kw = dict(
        model=str(tiny_model), prompts=prompts, rollouts=3, policy=policy, model_label="t",
        device="cpu", dtype="float32", engine_options={"prompts_per_call": 3}, run_name="r",
    )  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    generate_run(full, **kw)
    generate_run(resumed, **kw)
    store = RunStore(resumed)
    names = [slug("t", p.task, p.id) for p in prompts]
    kept = {
        n: store.shard_path(n).stat().st_mtime_ns for i, n in enumerate(names) if i not in (1, 4)
    }
    for i in (1, 4):
        store.shard_path(names[i]).unlink()
    summary = generate_run(resumed, **kw)
    assert summary.prompts_generated == 2 and summary.prompts_skipped == 3
    assert {n: store.shard_path(n).stat().st_mtime_ns for n in kept} == kept  # not rewritten
    assert _rollouts(resumed).equals(_rollouts(full))
