"""generate_run and `canopy generate`: store contents, manifest, resume after a real kill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from canopy_entropy.engines.base import DecodingPolicy, rollout_seed
from canopy_entropy.engines.hf import HFEngine
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.generate import _check_context, generate_run, load_prompts
from canopy_entropy.prompting import render_prompt
from canopy_entropy.run.manifest import read_manifest
from canopy_entropy.store import RunStore, slug
from canopy_entropy.tasks import load_task_prompts
from canopy_entropy.tasks.base import Prompt
from canopy_entropy.tasks.jsonl import content_id
from cli_helpers import run_cli
from process_helpers import kill_after_commits

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    Prompt("p1", "Write a story about a robot.", "stories"),
    Prompt("p2", "What is 12 times 7?", "math"),
    Prompt("p3", "Once upon a time", "stories"),
]


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = HFEngine(str(tiny_model), device="cpu")
    yield eng
    eng.close()


def _policy(**kw):
    return DecodingPolicy(top_k=40, max_new_tokens=24, **kw)


def test_generate_run_writes_store_manifest_and_prompts(tmp_path, engine, tiny_model):
    events = []
    summary = generate_run(
        tmp_path / "run", model=str(tiny_model), prompts=PROMPTS, rollouts=4, policy=_policy(),
        variant="instruct", family="tiny-fam", model_label="tiny-it", engine_instance=engine,
        seed=7, progress=events.append,
    )  # fmt: skip
    store = RunStore(tmp_path / "run")
    table = store.read_rollouts()
    assert table.num_rows == 12 and summary.prompts_generated == 3
    assert summary.tokens == int(pc.sum(table["length"]).as_py())
    assert [e["prompts_done"] for e in events] == [1, 2, 3]
    assert set(events[-1]) == {
        "prompts_done",
        "prompts_total",
        "rollouts_done",
        "tokens",
        "elapsed_s",
        "task",
        "prompt_id",
    }
    assert [(e["task"], e["prompt_id"]) for e in events] == [(p.task, p.id) for p in PROMPTS]
    assert sorted(p.stem for p in store.shard_files()) == sorted(
        slug("tiny-it", p.task, p.id) for p in PROMPTS
    )
    rows = table.to_pylist()
    for row in rows:
        assert (
            row["model"] == "tiny-it"
            and row["family"] == "tiny-fam"
            and row["variant"] == "instruct"
        )
        assert row["seed"] == rollout_seed(
            7, row["prompt_id"], row["rollout_index"], stream="tiny-it"
        )
        assert row["length"] == len(row["token_ids"]) == len(row["entropy"]) == len(row["logprob"])
        assert row["text"] == engine.tokenizer.decode(row["token_ids"], skip_special_tokens=True)
    assert {r["task"] for r in rows} == {"stories", "math"}
    manifest = read_manifest(tmp_path / "run")
    entry = manifest.models["tiny-it"]
    assert entry.policy.eos_token_ids == (2, 4) and entry.vocab_size == engine.vocab_size
    assert entry.engine["engine"] == "hf" and manifest.approximate is False
    assert manifest.policy.top_k == 40 and manifest.seed_scheme.run_seed == 7
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["schema"] == (
        "canopy-manifest/2"
    )
    prompts = store.read_prompts().to_pylist()
    for row in prompts:
        rendered, ids = render_prompt(engine.tokenizer, row["text"], "instruct")
        assert row["rendered"] == rendered and row["token_count"] == len(ids)


def test_rerun_skips_done_shards_and_refuses_other_settings(tmp_path, engine, tiny_model):
    kw = dict(
        model=str(tiny_model),
        prompts=PROMPTS[:2],
        rollouts=3,
        engine_instance=engine,
        model_label="m",
    )
    generate_run(tmp_path, policy=_policy(), **kw)
    before = {p: p.stat().st_mtime_ns for p in RunStore(tmp_path).shard_files()}
    again = generate_run(tmp_path, policy=_policy(), **kw)
    assert again.prompts_skipped == 2 and again.prompts_generated == 0
    assert {p: p.stat().st_mtime_ns for p in RunStore(tmp_path).shard_files()} == before
    with pytest.raises(ConfigError, match=r"another decoding policy .*temperature"):
        generate_run(tmp_path, policy=_policy(temperature=0.5), **kw)
    with pytest.raises(ConfigError, match="seed 0"):
        generate_run(tmp_path, policy=_policy(), seed=1, **kw)
    with pytest.raises(ConfigError, match="3 rollouts per prompt"):
        generate_run(tmp_path, policy=_policy(), **{**kw, "rollouts": 5})


def test_common_random_numbers_share_streams_across_models(tmp_path, engine, tiny_model):
    kw = dict(prompts=PROMPTS[:1], rollouts=3, policy=_policy(), engine_instance=engine)
    generate_run(
        tmp_path / "a", model=str(tiny_model), model_label="A", common_random_numbers=True, **kw
    )
    generate_run(
        tmp_path / "a", model=str(tiny_model), model_label="B", common_random_numbers=True, **kw
    )
    generate_run(tmp_path / "b", model=str(tiny_model), model_label="C", **kw)
    a = RunStore(tmp_path / "a").read_rollouts().to_pandas()
    b = RunStore(tmp_path / "b").read_rollouts().to_pandas()
    seeds_a = a[a.model == "A"].sort_values("rollout_index").seed.tolist()
    assert seeds_a == a[a.model == "B"].sort_values("rollout_index").seed.tolist()
    assert set(seeds_a).isdisjoint(b.seed.tolist())


def test_prompt_longer_than_context_is_rejected_by_name(tmp_path, engine, tiny_model):
    long_prompt = Prompt(
        "too-long", "The quick brown fox jumps over the lazy dog. " * 60, "stories"
    )
    with pytest.raises(ConfigError, match=r"prompt 'too-long'.*lower --max-new-tokens or drop"):
        generate_run(
            tmp_path, model=str(tiny_model), prompts=[PROMPTS[0], long_prompt], rollouts=2,
            policy=_policy(), engine_instance=engine,
        )  # fmt: skip
    assert not RunStore(tmp_path).shard_files()
    assert not (tmp_path / "manifest.json").exists()  # nothing recorded: a fixed re-run is allowed
    with pytest.raises(ConfigError, match=r"prompt 'empty'.*no tokens"):
        _check_context([Prompt("empty", "", "t")], {0: ("", [])}, _policy(), 512)


def test_no_double_bos_on_tiny_model(engine):
    tok = engine.tokenizer
    _, base_ids = render_prompt(tok, "Once upon a time", "base")
    rendered, chat_ids = render_prompt(tok, "Once upon a time", "instruct")
    assert base_ids[0] == tok.bos_token_id and base_ids.count(tok.bos_token_id) == 1
    assert rendered.startswith("<|bos|><|im_start|>user\n")
    assert chat_ids[0] == tok.bos_token_id and chat_ids.count(tok.bos_token_id) == 1


def test_load_prompts_jsonl_ids_and_errors(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": "x"}\n{"prompt": "c", "task": "t"}\n')
    got = load_prompts(str(path))
    # same ids as the runner's jsonl source: explicit id, else a content hash
    assert got == [
        Prompt(content_id("math", "a"), "a", "math"),
        Prompt("x", "b", "math"),
        Prompt(content_id("math", "c"), "c", "t"),
    ]
    assert [p.id for p in load_task_prompts("math", source="jsonl", path=path)] == [
        p.id for p in got
    ]
    assert load_prompts(str(path), 2) == got[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(CanopyError, match=r"bad.jsonl line 2: no 'prompt' field"):
        load_prompts(str(bad))
    with pytest.raises(CanopyError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(CanopyError):
        load_prompts("no-such-task-name")


def test_cli_error_is_one_line(tmp_path, tiny_model, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    args = ["--model", str(tiny_model), "--prompts", str(bad), "--run", str(tmp_path / "r")]
    code, _, err = run_cli(["generate", *args, "--rollouts", "2"], capsys, monkeypatch)
    assert code == 2
    assert err.strip().startswith("error:") and "bad.jsonl line 1: not valid JSON" in err
    assert "Traceback" not in err


def test_kill_and_resume_gives_identical_store(tmp_path, tiny_model, capsys, monkeypatch):
    prompts = [Prompt(str(i), t, "demo") for i, t in enumerate(
        ["Write a story about a robot.", "What is 12 times 7?", "Once upon a time",
         "How many apples are left?", "def add(a, b):", "She opened the door", "A man is sitting"], start=1)]  # fmt: skip
    jsonl = tmp_path / "demo.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts))
    run = tmp_path / "killed" / "run"
    args = ["--model", str(tiny_model), "--prompts", str(jsonl), "--run", str(run), "--rollouts", "6",
            "--top-k", "40", "--top-p", "0.95", "--max-new-tokens", "40", "--seed", "3", "--variant", "instruct"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        # the same intra-op thread count as this process, which resumes the run: float
        # reductions are only bit-identical under the same kernel split
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    held = 2
    n_first = kill_after_commits(["generate", *args], env, run, held, tmp_path / "child.log")
    assert n_first == held
    code, _, err = run_cli(["generate", *args], capsys, monkeypatch)
    assert code == 0, err
    assert f"{len(prompts) - held} prompts generated, {held} already done" in " ".join(err.split())
    # reference: one uninterrupted run of the same command, in a folder with the same run name
    clean_args = list(args)
    clean_args[clean_args.index("--run") + 1] = str(tmp_path / "clean" / "run")
    code, _, err = run_cli(["generate", *clean_args], capsys, monkeypatch)
    assert code == 0, err
    key = ["prompt_id", "rollout_index"]
    got = RunStore(run).read_rollouts().to_pandas().sort_values(key).reset_index(drop=True)
    ref = (
        RunStore(tmp_path / "clean" / "run")
        .read_rollouts()
        .to_pandas()
        .sort_values(key)
        .reset_index(drop=True)
    )
    assert len(got) == len(ref) == 6 * len(prompts)
    for col in ref.columns:
        for a, b in zip(got[col], ref[col], strict=True):
            if isinstance(b, np.ndarray):
                np.testing.assert_array_equal(a, b, err_msg=col)
            else:
                assert a == b or (a is None and b is None), col
    assert RunStore(run).read_prompts().num_rows == len(prompts)


class _ManyPromptEngine(HFEngine):
    """An HF engine that also offers the continuous-batching ``sample_many`` entry point."""

    prompts_per_call = 2

    def sample_many(self, requests, policy):
        self.calls = getattr(self, "calls", 0) + 1
        return [self.sample(ids, seeds, idx, policy) for ids, seeds, idx in requests]


def test_sample_many_path_writes_the_same_store_as_per_prompt_calls(tmp_path, tiny_model, engine):
    prompts = [*PROMPTS, Prompt("p4", "She opened the door", "stories")]
    kw = dict(model=str(tiny_model), prompts=prompts, rollouts=3, policy=_policy(), seed=5)
    generate_run(tmp_path / "a" / "run", engine_instance=engine, **kw)
    many = _ManyPromptEngine(str(tiny_model), device="cpu")
    generate_run(tmp_path / "b" / "run", engine_instance=many, **kw)
    assert many.calls == 2  # 4 prompts, 2 per call
    key = ["prompt_id", "rollout_index"]
    a = RunStore(tmp_path / "a" / "run").read_rollouts().to_pandas().sort_values(key)
    b = RunStore(tmp_path / "b" / "run").read_rollouts().to_pandas().sort_values(key)
    assert len(a) == len(b) == 12
    for col in ("prompt_id", "seed", "length", "finish_reason"):
        assert list(a[col]) == list(b[col])
    for x, y in zip(a["token_ids"], b["token_ids"], strict=True):
        np.testing.assert_array_equal(x, y)
    assert RunStore(tmp_path / "b" / "run").read_prompts().num_rows == 4
