"""Tasks: builtin sets, few-shot rendering, fence stripping, stable ids, subsets, sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canopy_entropy.errors import CanopyError
from canopy_entropy.tasks import TASK_NAMES, TASKS, builtin_exemplars, load_task_prompts
from canopy_entropy.tasks.hf import clean_text, latest_version_split
from canopy_entropy.tasks.jsonl import content_id
from canopy_entropy.tasks.render import strip_closing_fence

# the repository root is parents[1]; the shared data folder sits next to it
PAPER = Path(__file__).parents[1] / ".." / "shared" / "data" / "paper-prompts"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_builtin_sets(task):
    prompts = load_task_prompts(task)
    assert len(prompts) == 12
    assert [p.id for p in prompts] == [f"{task}-{i:02d}" for i in range(1, 13)]
    assert all(p.task == task and p.text.strip() for p in prompts)
    assert len({p.text for p in prompts}) == 12
    assert len(builtin_exemplars(task)) >= 4
    assert load_task_prompts(task) == prompts  # stable


def test_first_n_and_seeded_random_subset():
    full = load_task_prompts("math")
    assert load_task_prompts("math", n=3) == full[:3]
    a = load_task_prompts("math", n=5, sample="random", seed=7)
    b = load_task_prompts("math", n=5, sample="random", seed=7)
    c = load_task_prompts("math", n=5, sample="random", seed=8)
    assert a == b and a != c
    order = [full.index(p) for p in a]
    assert order == sorted(order) and len(set(order)) == 5  # a subset, kept in source order
    with pytest.raises(CanopyError, match="has only 12 prompts but 13 were asked"):
        load_task_prompts("math", n=13)


def test_fewshot_qa_rendering():
    shots = builtin_exemplars("math")
    text = load_task_prompts("math", n=1, fewshot=2)[0].text
    zero = load_task_prompts("math", n=1)[0].text
    expected = (
        f"Question: {shots[0][0]}\nAnswer: {shots[0][1]}\n\n"
        f"Question: {shots[1][0]}\nAnswer: {shots[1][1]}\n\n"
        f"Question: {zero}\nAnswer:"
    )
    assert text == expected
    assert load_task_prompts("math", n=1, fewshot=2)[0].id == "math-01"  # same id as zero-shot


def test_fewshot_concat_rendering():
    shots = builtin_exemplars("completion")
    zero = load_task_prompts("completion", n=1)[0].text
    text = load_task_prompts("completion", n=1, fewshot=3)[0].text
    blocks = text.split("\n\n")
    assert blocks == [(q + a).rstrip() for q, a in shots[:3]] + [zero]
    with pytest.raises(CanopyError, match="only 4 exemplars exist"):
        load_task_prompts("completion", fewshot=9)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_zero_shot_template_is_identity(task):
    # every built-in task file renders a zero-shot prompt as its text, for base and instruct
    for chat in (False, True):
        assert TASKS[task].render({"prompt": " x \n"}, [], chat=chat) == " x \n"


def test_strip_closing_fence():
    assert (
        strip_closing_fence("Start with:\n```\ndef f(x):\n```") == "Start with:\n```\ndef f(x):\n"
    )
    assert strip_closing_fence("```python\ndef f():\n```  \n") == "```python\ndef f():\n"
    assert strip_closing_fence("no fence here") == "no fence here"
    assert strip_closing_fence("open only\n```") == "open only\n```"  # odd count: not closing
    fenced = [p for p in load_task_prompts("coding") if "```" in p.text]
    assert len(fenced) == 3
    assert all(not p.text.rstrip().endswith("```") and p.text.endswith(":\n") for p in fenced)
    plain = load_task_prompts("coding", n=1)[0].text
    assert plain.startswith("def moving_average") and plain.endswith('"""\n')


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_source_ids(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "alpha"}, {"prompt": "beta", "id": 7}, ""])
    prompts = load_task_prompts("stories", source="jsonl", path=f)
    assert [p.id for p in prompts] == [content_id("stories", "alpha"), "7"]
    assert (
        content_id("stories", "alpha")
        == "stories-" + __import__("hashlib").sha1(b"alpha").hexdigest()[:12]
    )
    # a folder holding <task>.jsonl works too
    _jsonl(tmp_path / "math.jsonl", [{"prompt": "1+1?"}])
    assert load_task_prompts("math", source="jsonl", path=tmp_path)[0].text == "1+1?"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"prompt": "a"}', '{"prompt": "b"'], "line 2: not valid JSON"),
        ([{"prompt": "a"}, {"text": "b"}], "line 2: no 'prompt' field (keys: ['text'])"),
        (
            [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}],
            "line 2: duplicate id (same as line 1)",
        ),
        ([{"prompt": "a"}, {"prompt": "a"}], "line 2: duplicate prompt text (same as line 1)"),
        ([{"prompt": ""}], "line 1: 'prompt' must be a non-empty string"),
        ([{"prompt": "a", "id": [1]}], "line 1: 'id' must be a non-empty string or integer"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        ([""], "holds no prompts"),
    ],
)
def test_hostile_prompt_files(tmp_path, rows, message):
    f = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CanopyError) as exc:
        load_task_prompts("math", source="jsonl", path=f)
    assert message in str(exc.value) and str(f) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(CanopyError, match="does not exist; check the path"):
        load_task_prompts("math", source="jsonl", path=tmp_path / "none.jsonl")


@pytest.mark.skipif(not PAPER.is_dir(), reason=f"paper prompts not found at {PAPER}")
@pytest.mark.parametrize("task", TASK_NAMES)
def test_paper_folder(task):
    zero = load_task_prompts(task, source="paper", path=PAPER)
    few = load_task_prompts(task, source="paper", path=PAPER, fewshot=1)
    assert len(zero) == len(few) == 100
    assert [p.id for p in zero] == [p.id for p in few] == [f"{task}-{i:04d}" for i in range(100)]
    raw = [json.loads(line)["prompt"] for line in (PAPER / f"{task}.jsonl").open()]
    for z, f, r in zip(zero, few, raw, strict=True):
        assert z.text == (strip_closing_fence(r) if task == "coding" else r)
        assert z.text.rstrip() in f.text  # the few-shot version ends with the same prompt
    if task == "coding":
        assert all(r.rstrip().endswith("```") for r in raw)
        assert not any(z.text.rstrip().endswith("```") for z in zero)
    sub = load_task_prompts(task, source="paper", path=PAPER, n=10, sample="random", seed=3)
    assert [p.id for p in sub] == [
        p.id
        for p in load_task_prompts(task, source="paper", path=PAPER, n=10, sample="random", seed=3)
    ]
    assert set(sub) <= set(zero)


def test_paper_folder_missing(tmp_path):
    with pytest.raises(CanopyError, match=r"paper prompt folder .* does not exist"):
        load_task_prompts("math", source="paper", path=tmp_path / "nope")


def test_hf_source_offline_is_a_one_line_error(monkeypatch):
    # datasets is a dependency now; with the hub unreachable the built-in task's hub source
    # says so in one line (the tests run with HF_DATASETS_OFFLINE=1)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CanopyError, match=r"could not load the dataset openai/gsm8k") as exc:
        load_task_prompts("math", source="hf")
    assert "\n" not in str(exc.value)


def test_hf_helpers():
    assert latest_version_split(["v0.1.0", "v0.1.10", "v0.1.2", "train"]) == "v0.1.10"
    with pytest.raises(CanopyError, match="no version-named split"):
        latest_version_split(["train", "test"])
    assert clean_text("stories", "[ WP ] A dragon opens a bakery .") == "A dragon opens a bakery ."
    assert clean_text("coding", "def f():\n    ") == "def f():\n    "


def test_unknown_task_and_source():
    with pytest.raises(CanopyError, match="unknown task 'poetry'"):
        load_task_prompts("poetry")
    with pytest.raises(CanopyError, match="unknown prompt source 'web'"):
        load_task_prompts("math", source="web")
