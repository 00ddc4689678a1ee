"""Relaxed semantic entropy: clustering of hand-made verdict matrices, the verdict parser, the
run stage with a stub judge behind the real Engine interface, and a real local judge."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from canopy_entropy.engines.base import Engine, RolloutBatch
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.semantic import rse as rse_mod
from canopy_entropy.semantic.rse import (
    RETRY_REMINDER,
    load_judge_prompt,
    parse_verdict,
    read_rse,
    read_verdicts,
    relaxed_semantic_entropy,
    render_judge_prompt,
    rse_run,
    subsample,
)
from canopy_entropy.store import RunStore, rollouts_table


def entropy_of_sizes(sizes: list[int]) -> float:
    m = sum(sizes)
    return -sum(s / m * math.log(s / m) for s in sizes)


# --------------------------------------------------------------------- hand-made matrices
def test_asymmetric_verdicts_do_not_link():
    v = np.zeros((3, 3), dtype=bool)
    v[0, 1] = True  # 0 says similar to 1, 1 says different to 0
    v[1, 2] = v[2, 1] = True
    res = relaxed_semantic_entropy(v)
    assert res.num_clusters == 2
    assert res.labels.tolist() == [0, 1, 1]
    assert res.entropy == pytest.approx(entropy_of_sizes([1, 2]))
    assert res.normalized == pytest.approx(entropy_of_sizes([1, 2]) / math.log(3))


def test_chain_is_one_cluster():
    v = np.eye(3, dtype=bool)  # diagonal ignored either way
    v[0, 1] = v[1, 0] = v[1, 2] = v[2, 1] = True  # a~b, b~c, a!~c
    res = relaxed_semantic_entropy(v)
    assert res.num_clusters == 1
    assert res.labels.tolist() == [0, 0, 0]
    assert res.entropy == 0.0
    assert res.normalized == 0.0


def test_all_similar_and_none_similar():
    m = 5
    all_sim = relaxed_semantic_entropy(np.ones((m, m), dtype=bool))
    assert (all_sim.num_clusters, all_sim.entropy, all_sim.normalized) == (1, 0.0, 0.0)
    none = relaxed_semantic_entropy(np.eye(m, dtype=int))  # 0/1 ints, only the diagonal
    assert none.num_clusters == m
    assert none.labels.tolist() == list(range(m))
    assert none.entropy == pytest.approx(math.log(m))
    assert none.normalized == pytest.approx(1.0)


def test_single_rollout_and_mixed_sizes():
    one = relaxed_semantic_entropy(np.array([[False]]))
    assert (one.num_clusters, one.entropy, one.normalized, one.labels.tolist()) == (
        1, 0.0, 0.0, [0],
    )  # fmt: skip
    # clusters {0,3,5}, {1,4}, {2} by symmetric verdicts, plus one-way noise 2 -> 0
    groups = [0, 1, 2, 0, 1, 0]
    v = np.array([[a == b for b in groups] for a in groups])
    v[2, 0] = True
    res = relaxed_semantic_entropy(v)
    assert res.labels.tolist() == groups
    assert res.entropy == pytest.approx(entropy_of_sizes([3, 2, 1]))


def test_bad_verdict_matrices_raise():
    with pytest.raises(CanopyError, match="square"):
        relaxed_semantic_entropy(np.ones((2, 3), dtype=bool))
    with pytest.raises(CanopyError, match="booleans"):
        relaxed_semantic_entropy(np.full((2, 2), 0.5))


# --------------------------------------------------------------------- prompts and parser
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Response: similar", True),
        ("response: DIFFERENT.", False),
        ("  **Response:** similar  ", True),
        ("The two agree on 12.\nResponse: similar\n", True),
        ("Response: similar\n\nBoth answers compute 12.", True),
        ("Similar", True),
        ("different.", False),
        ("Response: not similar", None),
        ("Response: similar but different strategies", None),
        ("Response: similar\nResponse: different", None),
        ("Response: similarly", None),
        ("They are similar.", None),
        ("Response A: similar", None),
        ("similar\nmore text", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) is expected


def test_packaged_prompts_and_override(tmp_path):
    for task in ("math", "coding", "completion", "stories"):
        tpl = load_judge_prompt(task)
        assert tpl.count("Response: similar") >= 2 and tpl.count("Response: different") >= 2
        # the worked examples' verdicts are themselves parseable lines
        assert re.search(r"^Response: (similar|different)$", tpl, re.M)
    filled = render_judge_prompt(load_judge_prompt("math"), "Q?", "x {response_b} y", "B")
    assert "x {response_b} y" in filled and "{question}" not in filled
    bad = tmp_path / "bad.txt"
    bad.write_text("only {question} and {response_a}")
    with pytest.raises(ConfigError, match="response_b"):
        load_judge_prompt("math", bad)
    with pytest.raises(ConfigError, match="no judge prompt for task 'poetry'"):
        load_judge_prompt("poetry")


def test_subsample_nested_and_seeded():
    small = subsample(40, 10, seed=3, key="k")
    large = subsample(40, 25, seed=3, key="k")
    assert len(set(small)) == 10 and set(small) <= set(large)
    assert np.array_equal(small, subsample(40, 10, seed=3, key="k"))
    assert not np.array_equal(small, subsample(40, 10, seed=4, key="k"))
    assert subsample(5, 10, seed=0, key="k").tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------- stub judge
CUSTOM = "Q: {question}\n<<A>>{response_a}<</A>>\n<<B>>{response_b}<</B>>\n"


def group_of(text: str) -> str:
    return text.split()[0]


class StubJudge(Engine):
    """A judge engine with only ``sample``: similar iff the texts' first words match, plus
    scripted quirks (one-way similarity, unparseable answers) keyed on words in the texts."""

    name = "stub"
    chat = True  # takes the rendered user text itself
    eos_token_ids = (0,)

    def __init__(self, fail_after: int | None = None):
        self.prompts: list[str] = []
        self.fail_after = fail_after

    def describe(self) -> dict:
        return {"engine": self.name, "model": "stub-judge"}

    def answer(self, prompt: str) -> str:
        a = prompt.split("<<A>>")[1].split("<</A>>")[0]
        b = prompt.split("<<B>>")[1].split("<</B>>")[0]
        retry = prompt.endswith(RETRY_REMINDER)
        if "mute" in a or ("shy" in a and not retry) or ("oneway" in a and "fussy" in b):
            return "Hmm, hard to say."
        if group_of(a) == "x" and group_of(b) == "y":
            return "Response: similar"  # only this order: x and y never link
        return "Response: similar" if group_of(a) == group_of(b) else "Response: different"

    def sample(self, prompt, seeds, rollout_indices, policy) -> RolloutBatch:
        assert policy.temperature == 0.0 and policy.max_new_tokens == 16
        assert isinstance(prompt, str) and len(seeds) == 1
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise RuntimeError("judge server went away")
        self.prompts.append(prompt)
        return RolloutBatch(
            rollout_index=np.zeros(1, np.int32),
            seed=np.asarray(seeds, np.int64),
            finish_reason=["eos"],
            offsets=np.array([0, 1], np.int64),
            token_ids=np.zeros(1, np.int32),
            entropy=np.zeros(1, np.float32),
            text=[self.answer(prompt)],
        )


class BatchedStubJudge(StubJudge):
    """The same judge with ``sample_many`` (how HTTP and vLLM engines batch)."""

    prompts_per_call = 7

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batch_sizes: list[int] = []

    def sample_many(self, requests, policy):
        self.batch_sizes.append(len(requests))
        return [self.sample(*r, policy) for r in requests]


def write_run(root: Path, prompts: dict[str, list[str]], task: str = "math") -> Path:
    store = RunStore(root)
    pids, ridx, ent, txt = [], [], [], []
    for pid, texts in prompts.items():
        for i, t in enumerate(texts):
            pids.append(pid)
            ridx.append(i)
            ent.append(np.full(3, 0.5, np.float32))
            txt.append(t)
    table = rollouts_table(
        run="t", model="m", variant="base", family="f", task=task, prompt_id=pids,
        rollout_index=ridx, seed=ridx, finish_reason=["eos"] * len(pids), entropy=ent, text=txt,
    )  # fmt: skip
    store.write_rollouts(f"m-{task}", table)
    n = len(prompts)
    questions = pa.table(
        {
            "run": ["t"] * n, "model": ["m"] * n, "variant": ["base"] * n, "family": ["f"] * n,
            "task": [task] * n, "prompt_id": list(prompts),
            "text": [f"question of {pid}?" for pid in prompts], "rendered": [None] * n,
            "token_count": pa.array([None] * n, pa.int32()),
        }
    )  # fmt: skip
    store.write_prompts(f"m-{task}", questions)
    return root


PROMPTS = {
    "p-plain": ["a one", "a two", "b three", "a four", "c five", "b six"],  # sizes 3, 2, 1
    "p-oneway": ["x one", "y two", "x three", "y four", "z five"],  # x, y never link
    "p-retry": ["a shy", "a two", "b three", "b shy four"],  # parseable on the retry
    "p-impute": ["a oneway", "a fussy", "a three", "b four", "b five", "c six"],
    "p-mute": ["a mute", "a two", "b three", "b four", "c five"],  # 4 of 20 orders fail
}


def overrides(tmp_path: Path) -> dict:
    path = tmp_path / "custom.txt"
    path.write_text(CUSTOM)
    return {"math": path}


def expected_sizes(texts: list[str]) -> list[int]:
    return sorted(Counter(group_of(t) for t in texts).values(), reverse=True)


@pytest.mark.parametrize("judge_cls", [StubJudge, BatchedStubJudge])
def test_stub_judge_run(tmp_path, judge_cls):
    run = write_run(tmp_path / "run", PROMPTS)
    judge = judge_cls()
    events: list[dict] = []
    res = rse_run(
        run, engine=judge, m=24, judge_prompts=overrides(tmp_path), progress=events.append
    )
    table = res.table.set_index("prompt_id")
    # left out: p-mute (4 of 20 orders unparseable, 20% > 5%) with a note
    assert "p-mute" not in table.index and res.n_left_out == 1
    assert any("1 of 5 prompt(s) left out" in n and "p-mute" in n for n in res.notes)
    assert not any("weak judge" in n for n in res.notes)
    # closed form from the first-word groups (x/y are one-way only, so groups stay apart)
    for pid in ("p-plain", "p-oneway", "p-retry", "p-impute"):
        texts = PROMPTS[pid]
        sizes = expected_sizes(texts)
        row = table.loc[pid]
        assert row["rse"] == pytest.approx(entropy_of_sizes(sizes))
        assert row["rse_normalized"] == pytest.approx(
            entropy_of_sizes(sizes) / math.log(len(texts))
        )
        assert row["rse_clusters"] == len(sizes) and row["rse_m"] == len(texts)
    # the retried pairs recovered; one order of p-impute failed and took the other's verdict
    assert table.loc["p-retry", "rse_failures"] == 0
    assert table.loc["p-impute", "rse_failures"] == 1
    assert table.loc["p-plain", "rse_failures"] == 0
    pairs = sum(len(t) * (len(t) - 1) for t in PROMPTS.values())
    # p-retry: 'a shy' and 'b shy four' as A -> 2 x 3 orders asked twice; p-impute: 1 twice;
    # p-mute: 4 orders with 'a mute' as A asked twice
    retries = 6 + 1 + 4
    assert res.calls == len(judge.prompts) == pairs + retries
    assert res.pairs_judged == pairs and res.pairs_cached == 0
    assert sum(p.endswith(RETRY_REMINDER) for p in judge.prompts) == retries
    if judge_cls is BatchedStubJudge:
        assert max(judge.batch_sizes) == 7
    assert events[-1]["pairs_done"] == events[-1]["pairs_total"] == pairs
    assert events[-1]["prompts_done"] == events[-1]["prompts_total"] == 5
    # every ordered pair is asked exactly once on the first attempt (both orders present)
    firsts = [p for p in judge.prompts if not p.endswith(RETRY_REMINDER)]
    assert len(set(firsts)) == pairs
    assert sum("Q: question of p-plain?\n" in p for p in firsts) == 30
    # written files agree with the returned table; a rerun asks nothing and reproduces it
    stored = read_rse(run)
    assert stored.set_index("prompt_id")["rse"].to_dict() == table["rse"].to_dict()
    verdicts = read_verdicts(run)
    assert len(verdicts) == pairs and (verdicts["verdict"] == -1).sum() == 4 + 1
    again_judge = judge_cls()
    again = rse_run(run, engine=again_judge, m=24, judge_prompts=overrides(tmp_path))
    assert again.calls == 0 and again_judge.prompts == [] and again.pairs_cached == pairs
    assert again.table.equals(res.table)


def test_larger_m_reuses_cached_verdicts(tmp_path):
    texts = [f"{'ab'[i % 2]} t{i}" for i in range(10)]
    run = write_run(tmp_path / "run", {"p": texts})
    first = rse_run(run, engine=StubJudge(), m=4, judge_prompts=overrides(tmp_path))
    assert first.calls == 4 * 3 and first.table["rse_m"].tolist() == [4]
    second = rse_run(run, engine=StubJudge(), m=6, judge_prompts=overrides(tmp_path))
    assert second.calls == 6 * 5 - 4 * 3 and second.pairs_cached == 12
    used = [texts[i] for i in subsample(10, 6, 0, "m/base/f/math/p")]
    assert second.table["rse"].iloc[0] == pytest.approx(entropy_of_sizes(expected_sizes(used)))
    # another judge never reuses these verdicts
    other = rse_run(
        run, engine=StubJudge(), judge_name="other", m=4, judge_prompts=overrides(tmp_path)
    )
    assert other.calls == 12


def test_resume_after_a_kill(tmp_path):
    prompts = {"p1": PROMPTS["p-plain"], "p2": PROMPTS["p-oneway"]}
    run = write_run(tmp_path / "run", prompts)
    with pytest.raises(RuntimeError, match="went away"):
        rse_run(run, engine=StubJudge(fail_after=40), judge_prompts=overrides(tmp_path))
    # p1's 30 verdicts were saved before p2 started; nothing of p2 was
    assert len(read_verdicts(run)) == 30 and read_rse(run) is None
    judge = StubJudge()
    res = rse_run(run, engine=judge, judge_prompts=overrides(tmp_path))
    assert res.calls == len(judge.prompts) == 20 and res.pairs_cached == 30
    assert len(res.table) == 2


def test_bad_inputs(tmp_path):
    run = write_run(tmp_path / "run", {"p": ["a", "b"]})
    with pytest.raises(ConfigError, match="m must be at least 2"):
        rse_run(run, engine=StubJudge(), m=1)
    with pytest.raises(ConfigError, match="task\\(s\\) coding not in the run"):
        rse_run(run, engine=StubJudge(), judge_prompts={"coding": tmp_path / "x.txt"})
    nameless = StubJudge()
    nameless.describe = lambda: {"engine": "stub"}
    with pytest.raises(ConfigError, match="judge_name"):
        rse_run(run, engine=nameless)
    table = rollouts_table(
        run="t", model="m", variant="base", family="f", task="math", prompt_id=["q", "q"],
        rollout_index=[0, 1], seed=[0, 1], finish_reason=["eos", "eos"],
        entropy=[np.zeros(1, np.float32)] * 2, text=[None, "x"],
    )  # fmt: skip
    RunStore(tmp_path / "run2").write_rollouts("s", table)
    with pytest.raises(CanopyError, match="have no text"):
        rse_run(tmp_path / "run2", engine=StubJudge())


# --------------------------------------------------------------------- real local judges
@pytest.fixture(scope="module")
def long_tiny_model(tmp_path_factory) -> Path:
    """The tiny random model with room for the packaged judge prompts (4096 positions)."""
    from canopy_entropy.testing import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("judge") / "model", max_position_embeddings=4096
    )


def test_tiny_model_judge_end_to_end(tmp_path, long_tiny_model):
    pytest.importorskip("transformers")
    run = write_run(tmp_path / "run", {"p1": ["12 apples", "twelve", "13"], "p2": ["1", "2"]})
    res = rse_run(run, judge=str(long_tiny_model), engine="hf", m=24,
                  engine_options={"device": "cpu"})  # fmt: skip
    pairs = 3 * 2 + 2 * 1
    verdicts = read_verdicts(run)
    assert len(verdicts) == pairs
    # random weights: no output is a verdict, so every pair was asked twice and counted
    assert (verdicts["verdict"] == -1).all() and (verdicts["attempts"] == 2).all()
    assert res.calls == 2 * pairs and res.n_left_out == 2 and res.table.empty
    assert any("2 of 2 prompt(s) left out" in n for n in res.notes)
    assert res.judge == f"hf:{long_tiny_model}"
    assert read_rse(run).empty


def test_prompt_longer_than_judge_context_is_counted(tmp_path, tiny_model):
    pytest.importorskip("transformers")
    run = write_run(tmp_path / "run", {"p": ["a", "b"]})
    res = rse_run(run, judge=str(tiny_model), engine="hf", engine_options={"device": "cpu"})
    assert res.calls == 0 and res.n_left_out == 1
    assert any("longer than the judge's context" in n for n in res.notes)
    assert (read_verdicts(run)["attempts"] == 0).all()


def test_weak_default_judge_is_named(monkeypatch, tmp_path):
    """The default judge identity carries the weak-judge note (the model itself is not loaded:
    the engine registry hands back the stub)."""
    import canopy_entropy.engines.registry as registry

    made = []

    def fake_get_engine(name, model, **options):
        made.append((name, model))
        return StubJudge()

    monkeypatch.setattr(registry, "get_engine", fake_get_engine)
    run = write_run(tmp_path / "run", {"p": ["a x", "a y"]})
    res = rse_run(run, judge_prompts=overrides(tmp_path))
    assert made == [("hf", rse_mod.DEFAULT_JUDGE)]
    assert res.judge == "hf:smollm2-135m-instruct"
    assert any("weak judge" in n for n in res.notes)
    assert res.table["rse"].tolist() == [0.0]


def test_rse_file_schema(tmp_path):
    run = write_run(tmp_path / "run", {"p": ["a", "a b", "c"]})
    rse_run(run, engine=StubJudge(), judge_prompts=overrides(tmp_path))
    import pyarrow.parquet as pq

    schema = pq.read_schema(run / "semantic" / "rse.parquet")
    assert schema.field("rse_clusters").type == pa.int32()
    assert schema.metadata[b"canopy.judge"] == b"stub:stub-judge"
    assert schema.names == [
        "model", "variant", "family", "task", "prompt_id",
        "rse", "rse_normalized", "rse_clusters", "rse_m", "rse_failures",
    ]  # fmt: skip


def test_cli(monkeypatch, capsys, tmp_path):
    import canopy_entropy.engines.registry as registry
    from canopy_entropy.cli import semantic_entropy as cli_mod
    from cli_helpers import run_cli

    assert cli_mod.DEFAULT_JUDGE == rse_mod.DEFAULT_JUDGE
    made = []

    def fake_get_engine(name, model, **options):
        made.append((name, model, options))
        return StubJudge()

    monkeypatch.setattr(registry, "get_engine", fake_get_engine)
    run = write_run(tmp_path / "run", {"p": ["a one", "a two", "b three"]})
    custom = overrides(tmp_path)["math"]
    args = ["semantic-entropy", str(run), "--judge", "judge-x", "--m", "3", "--device", "cpu"]
    code, out, err = run_cli([*args, "--judge-prompt", f"math={custom}"], capsys, monkeypatch)
    assert code == 0, err
    assert made == [("hf", "judge-x", {"device": "cpu"})]
    assert "judge hf:judge-x: 1 prompts, m = 3; 6 judge calls" in out
    expected = entropy_of_sizes([2, 1])
    assert f"RSE = {expected:.4f}" in out
    assert read_rse(run)["rse"].iloc[0] == pytest.approx(expected)
    code, _, err = run_cli([*args, "--judge-prompt", "math"], capsys, monkeypatch)
    assert code == 2 and "error: --judge-prompt 'math' must look like TASK=FILE" in err
    code, _, err = run_cli([*args, "--base-url", "http://x"], capsys, monkeypatch)
    assert code == 2 and "apply to --engine openai only" in err
