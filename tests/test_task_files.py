"""Task files: parsing, datasets-backed sources, templates, exemplars, one-line errors, the
``canopy tasks`` command, and a new task from a local JSONL file run end to end through the
CLI with its scores checked against independent computations."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from canopy_entropy.errors import CanopyError
from canopy_entropy.tasks import TASK_NAMES, TASKS, load_task_prompts, read_task_file
from cli_helpers import run_cli

ROWS = [
    {"id": "q1", "country": "France", "answer": "Paris"},
    {"id": "q2", "country": "Japan", "answer": "Tokyo"},
    {"id": "q3", "country": "Peru", "answer": "Lima"},
    {"id": "q4", "country": "Kenya", "answer": "Nairobi"},
    {"id": "q5", "country": "Norway", "answer": "Oslo"},
]
TASK = """\
description = "capital cities"
stop = ["\\n"]
scorer = "exact_match"

[source]
file = "rows.jsonl"
id = "id"
reference = "answer"

[template]
raw = "Q: capital of {{ country }}?\\nA:"
chat = "What is the capital of {{ country }}? One word."
"""


def _write(folder: Path, task: str = TASK, rows=ROWS, name: str = "capitals.toml") -> Path:
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / name
    path.write_text(task)
    return path


def test_builtin_task_files():
    assert tuple(TASKS) == TASK_NAMES
    for name, spec in TASKS.items():
        assert spec.builtin and Path(spec.path).name == f"{name}.toml" and Path(spec.file).is_file()
        assert spec.hub is not None and spec.scorer is None
    assert TASKS["math"].hub.dataset == "openai/gsm8k" and TASKS["coding"].hub.split is None


def test_file_task_prompts(tmp_path):
    spec = read_task_file(_write(tmp_path))
    assert (spec.name, spec.stop, spec.scorer, spec.reference) == (
        "capitals", ("\n",), "exact_match", "answer")  # fmt: skip
    prompts = load_task_prompts("capitals", spec=spec)
    assert [p.id for p in prompts] == [r["id"] for r in ROWS]
    assert [p.text for p in prompts] == [f"Q: capital of {r['country']}?\nA:" for r in ROWS]
    assert prompts[1].text_for("instruct") == "What is the capital of Japan? One word."
    assert prompts[1].text_for("base") == prompts[1].text
    assert [p.reference for p in prompts] == [r["answer"] for r in ROWS]
    # a seeded random subset, as for the built-in tasks
    sub = load_task_prompts("capitals", n=2, sample="random", seed=3, spec=spec)
    keep = np.sort(np.random.default_rng(3).choice(5, size=2, replace=False))
    assert sub == [prompts[i] for i in keep]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parquet_and_csv_sources_match_jsonl(tmp_path, fmt):
    jsonl = load_task_prompts("capitals", spec=read_task_file(_write(tmp_path)))
    frame = pd.DataFrame(ROWS)
    data = tmp_path / f"rows.{fmt}"
    frame.to_parquet(data) if fmt == "parquet" else frame.to_csv(data, index=False)
    path = tmp_path / f"t_{fmt}.toml"
    path.write_text(TASK.replace('"rows.jsonl"', f'"rows.{fmt}"').replace("capital", "capital"))
    other = load_task_prompts("t", spec=read_task_file(path))
    assert [(p.id, p.text, p.reference) for p in other] == [
        (p.id, p.text, p.reference) for p in jsonl
    ]


def test_fewshot_fixed_and_drawn(tmp_path):
    fixed = TASK + (
        "\n[fewshot]\nk = 1\nexemplars = [{country = 'Chile', answer = 'Santiago'}]\n"
    ).replace("[template]", "[template]")
    fixed = fixed.replace(
        'raw = "Q: capital of {{ country }}?\\nA:"',
        'raw = "{% for ex in fewshot %}Q: {{ ex.country }}\\nA: {{ ex.answer }}\\n{% endfor %}'
        'Q: {{ country }}\\nA:"',
    )
    prompts = load_task_prompts("c", spec=read_task_file(_write(tmp_path, fixed)))
    assert prompts[0].text == "Q: Chile\nA: Santiago\nQ: France\nA:"
    # drawn from the prompt split with a seed: the exemplar rows leave the prompt set
    drawn = fixed.replace("exemplars = [{country = 'Chile', answer = 'Santiago'}]", "seed = 5")
    drawn = drawn.replace("k = 1", "k = 2\nsplit = 'train'")
    prompts = load_task_prompts("c", spec=read_task_file(_write(tmp_path, drawn)))
    picked = sorted(np.random.default_rng(5).choice(5, size=2, replace=False))
    shots = "".join(f"Q: {ROWS[i]['country']}\nA: {ROWS[i]['answer']}\n" for i in picked)
    rest = [r for i, r in enumerate(ROWS) if i not in picked]
    assert [p.id for p in prompts] == [r["id"] for r in rest]
    assert [p.text for p in prompts] == [f"{shots}Q: {r['country']}\nA:" for r in rest]


@pytest.mark.parametrize(
    ("edit", "rows", "message"),
    [
        (
            ("reference =", "refrence ="),
            ROWS,
            "unknown key 'refrence' in [source]; did you mean 'reference'?",
        ),
        (("{{ country }}?", "{{ contry }}?"), ROWS, "the template column 'contry' is not in"),
        (('reference = "answer"', 'reference = "gold"'), ROWS, "the reference column 'gold'"),
        (("", ""), [], "has no rows; add rows or pick another split"),
        (('scorer = "exact_match"', 'scorer = "exact_mach"'), ROWS, "unknown scorer 'exact_mach'"),
        (('raw = "Q', 'rw = "Q'), ROWS, "unknown key 'rw' in [template]; did you mean 'raw'?"),
        (("{{ country }}?", "{{ country ?"), ROWS, "template syntax error"),
        (
            ('scorer = "exact_match"', 'scorer = "exact_match"\nfewshot = {k = 2}'),
            ROWS,
            "fewshot.k = 2 needs",
        ),
    ],
)
def test_task_file_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, edit, rows, message):
    path = _write(tmp_path, TASK.replace(*edit, 1), rows)
    code, out, err = run_cli(["tasks", "show", str(path)], capsys, monkeypatch)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_empty_split_and_duplicate_ids(tmp_path):
    path = _write(tmp_path)
    (tmp_path / "rows.jsonl").write_text("")
    with pytest.raises(CanopyError, match=r"split 'train' of file .* has no rows"):
        load_task_prompts("c", spec=read_task_file(path))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2] * 2))
    with pytest.raises(CanopyError, match="rows 0 and 2 have the same id 'q1'"):
        load_task_prompts("c", spec=read_task_file(path))


def test_tasks_command_lists_and_shows(tmp_path, capsys, monkeypatch):
    code, out, _ = run_cli(["tasks"], capsys, monkeypatch)
    assert code == 0 and all(t in out for t in TASK_NAMES) and "openai/gsm8k" not in out
    code, out, _ = run_cli(["tasks", "show", "math"], capsys, monkeypatch)
    first = load_task_prompts("math", n=1)[0].text
    assert code == 0 and out.count(first) == 2  # base and instruct see the same text
    code, out, _ = run_cli(["tasks", "show", str(_write(tmp_path)), "--index", "1"], capsys,
                           monkeypatch)  # fmt: skip
    assert code == 0 and "Q: capital of Japan?\nA:" in out and "One word." in out
    assert "reference: 'Tokyo'" in out


def test_config_refers_to_task_file_and_table(tmp_path):
    from canopy_entropy.config import parse_config, resolved_config_toml

    _write(tmp_path)
    (tmp_path / "sub").mkdir()
    table = TASK.replace("[source]", "[task.inline.source]").replace("[template]",
                                                                   "[task.inline.template]")  # fmt: skip
    head, rest = table.split("[task.inline.source]", 1)
    text = (
        'tasks = ["capitals.toml", "inline"]\n'
        '[[models]]\nmodel = "x/y"\n[task.inline]\n' + head + "[task.inline.source]" + rest
    )
    cfg = parse_config(text, base_dir=tmp_path, check_models=False)
    assert cfg.tasks == ["capitals", "inline"]
    assert cfg.task_spec("inline").file == str((tmp_path / "rows.jsonl").resolve())
    assert cfg.stop_strings() == ["\n"]  # the tasks' stop strings join [generation] stop
    again = parse_config(resolved_config_toml(cfg), check_models=False)
    assert again.tasks == cfg.tasks and again.task_spec("capitals") == cfg.task_spec("capitals")


def test_config_refuses_mixed_stops_and_unlisted_tables(tmp_path):
    from canopy_entropy.config import parse_config
    from canopy_entropy.errors import ConfigError

    _write(tmp_path)
    with pytest.raises(ConfigError, match="different stop strings"):
        parse_config('tasks = ["math", "capitals.toml"]\n[[models]]\nmodel = "x/y"\n',
                     base_dir=tmp_path, check_models=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"\[task.extra\] is defined but 'extra' is not in tasks"):
        parse_config('tasks = ["math"]\n[[models]]\nmodel = "x/y"\n[task.extra]\n'
                     'template = {raw = "x"}\nsource = {file = "rows.jsonl"}\n',
                     base_dir=tmp_path, check_models=False)  # fmt: skip
    with pytest.raises(ConfigError, match="apply to built-in tasks"):
        parse_config('tasks = ["capitals.toml"]\n[[models]]\nmodel = "x/y"\n'
                     '[prompts]\nsource = "jsonl"\npath = "rows.jsonl"\n',
                     base_dir=tmp_path, check_models=False)  # fmt: skip


def test_code_scorer_needs_the_opt_in(tmp_path):
    from canopy_entropy.scoring import CodeExecutionDisabled, code_passes
    from canopy_entropy.scoring.run import task_scorer

    spec = read_task_file(_write(tmp_path, TASK.replace('"exact_match"', '"code_passes"')))
    with pytest.raises(CodeExecutionDisabled, match=r"\[scoring\] execute_code = true"):
        task_scorer(spec, execute_code=False)
    scorer = task_scorer(spec, execute_code=True)
    assert scorer.func is code_passes and scorer.keywords == {"execute_code": True}


# ---------------------------------------------------------------------------------------
# the done-when demo: a new task from a local JSONL file, run through `canopy run`
# ---------------------------------------------------------------------------------------
# the tiny random model writes random characters: a one-letter regex per prompt makes some
# rollouts right and some wrong
DEMO_ROWS = [{"id": f"p{i}", "word": w, "answer": a}
             for i, (w, a) in enumerate(zip("abcdefgh", "eatonsir", strict=True))]  # fmt: skip
DEMO_TASK = """\
description = "does the reply contain the letter?"
scorer = "regex_match"

[source]
file = "letters.jsonl"
id = "id"
reference = "answer"

[template]
raw = "Write a word with {{ word }}:"
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("demo")
    (root / "letters.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DEMO_ROWS))
    (root / "letters.toml").write_text(DEMO_TASK)
    models = "".join(
        f'[[models]]\nmodel = "{tiny_model}"\nvariant = "{v}"\nfamily = "tiny"\n'
        f'label = "tiny-{v}"\n\n'
        for v in ("base", "instruct")
    )
    (root / "study.toml").write_text(
        'name = "letters"\ntasks = ["letters.toml"]\n'
        'stages = ["generate", "metrics", "score", "compare"]\n\n'
        f"{models}[generation]\nrollouts = 5\nmax_new_tokens = 8\nseed = 3\n\n"
        '[engine]\ndevice = "cpu"\ndtype = "float32"\n\n[compare]\nbootstrap = 50\n'
    )
    return root


def _cli_run(root: Path, capsys, monkeypatch, *extra: str) -> tuple[int, str]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["run", str(root / "study.toml"), "--out", str(root / "run"), *extra]
        code, out, err = run_cli(args, capsys, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    return code, out + err


def _brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_demo_task_end_to_end(demo_run, capsys, monkeypatch):
    from canopy_entropy.plots.make import make_figures
    from canopy_entropy.report.build import render_report
    from canopy_entropy.run import freshness
    from canopy_entropy.store import RunStore

    code, text = _cli_run(demo_run, capsys, monkeypatch)
    assert code == 0, text
    run = demo_run / "run"
    scores = pd.read_parquet(run / "scores" / "rollouts.parquet")
    texts = RunStore(run).read_rollouts(columns=["model", "prompt_id", "rollout_index", "text"])
    joined = scores.merge(texts.to_pandas(), on=["model", "prompt_id", "rollout_index"])
    assert len(joined) == len(scores) == 2 * 8 * 5
    ref = dict(zip([r["id"] for r in DEMO_ROWS], [r["answer"] for r in DEMO_ROWS], strict=True))
    # the stored verdicts are re.search(reference, text), recomputed here
    want = [
        re.search(ref[p], t) is not None for p, t in zip(joined.prompt_id, joined.text, strict=True)
    ]
    assert joined["correct"].tolist() == want and 0 < np.mean(want) < 1
    assert (
        joined["scorer_version"].str.startswith("canopy_entropy.scoring.answers:regex_match@").all()
    )

    # accuracy and pass@k per prompt (brute-force enumeration), pooled as means over prompts
    prompts = pd.read_parquet(run / "scores" / "prompts.parquet")
    for row in prompts.itertuples():
        outcomes = scores[(scores.model == row.model) & (scores.prompt_id == row.prompt_id)]
        flags = outcomes.sort_values("rollout_index")["correct"].tolist()
        assert row.accuracy == pytest.approx(np.mean(flags))
        assert row.pass_at_5 == pytest.approx(_brute_pass_at_k(flags, 5))
    pooled = pd.read_parquet(run / "scores" / "pooled.parquet")
    for row in pooled.itertuples():
        sub = prompts[prompts.model == row.model]
        assert row.accuracy == pytest.approx(sub.accuracy.mean())

    # AUROC / AUPRC of the entropy rate and surprisal for an incorrect rollout: scikit-learn
    metrics = pd.read_parquet(run / "metrics" / "rollouts.parquet")
    full = scores.merge(metrics, on=["model", "variant", "family", "task", "prompt_id",
                                     "rollout_index"])  # fmt: skip
    link = pd.read_parquet(run / "scores" / "uncertainty_link.parquet")
    for row in link.itertuples():
        g = full[full.model == row.model]
        u = g[{"rate": "r"}.get(row.measure, row.measure)]  # the saved table calls the rate r
        assert row.auroc == pytest.approx(roc_auc_score(~g["correct"], u))
        assert row.auprc == pytest.approx(average_precision_score(~g["correct"], u))
    assert set(link.measure) == {"rate", "H", "surprisal"}

    # the comparison bootstraps accuracy like any metric; figures and report section exist
    comp = pd.read_parquet(run / "compare" / "comparison.parquet")
    acc = comp[comp.metric == "accuracy"].iloc[0]
    base, inst = (prompts[prompts.variant == v].accuracy.mean() for v in ("base", "instruct"))
    assert (acc.a, acc.b) == (pytest.approx(base), pytest.approx(inst))
    for measure, col in (("rate", "r"), ("surprisal", "surprisal")):
        row = comp[comp.metric == f"auroc_{measure}"].iloc[0]
        sides = [full[full.variant == v] for v in ("base", "instruct")]
        want = [roc_auc_score(~g["correct"], g[col]) for g in sides]
        assert (row.a, row.b) == (pytest.approx(want[0]), pytest.approx(want[1]))
        assert row["diff_lo"] <= row["diff"] <= row["diff_hi"] and row["diff_se"] > 0
    names = ["fig8_accuracy_vs_rate", "fig8_auroc"]
    assert sorted(p.name for p in make_figures(run, names=names, formats=["png"])) == [
        f"{n}.png" for n in names]  # fmt: skip
    html = render_report(run)
    assert "Correctness and uncertainty" in html and f"{pooled.accuracy.iloc[0]:.1%}" in html

    # a re-run with nothing changed redoes nothing; a changed scorer re-scores only the scores
    markers = {s: freshness.read_marker(run, s) for s in ("metrics", "score")}
    code, text = _cli_run(demo_run, capsys, monkeypatch, "--stages", "generate,metrics,score")
    assert code == 0 and {s: freshness.read_marker(run, s) for s in markers} == markers
    (demo_run / "letters.toml").write_text(
        DEMO_TASK.replace('scorer = "regex_match"', "[scorer]\nname = 'regex_match'\n"
                                                    "options = {flags = 2}")  # re.IGNORECASE
    )  # fmt: skip
    code, text = _cli_run(demo_run, capsys, monkeypatch, "--stages", "generate,metrics,score")
    assert code == 0, text
    assert freshness.read_marker(run, "metrics") == markers["metrics"]  # not recomputed
    assert freshness.read_marker(run, "score") != markers["score"]
    rescored = pd.read_parquet(run / "scores" / "rollouts.parquet")
    assert rescored["scorer_version"].str.endswith('+{"flags": 2}').all()
    joined = rescored.merge(texts.to_pandas(), on=["model", "prompt_id", "rollout_index"])
    want = [
        re.search(ref[p], t, re.I) is not None
        for p, t in zip(joined.prompt_id, joined.text, strict=True)
    ]
    assert joined["correct"].tolist() == want


def test_scores_are_cached_per_scorer_version(demo_run, tmp_path, capsys, monkeypatch):
    """A custom ``module:function`` scorer is called once per distinct (response, reference);
    a second scoring with the same version calls it not at all; a new version re-scores."""
    from canopy_entropy.scoring.run import score_rollouts

    if not (demo_run / "run" / "rollouts").is_dir():  # run on its own: generate first
        assert _cli_run(demo_run, capsys, monkeypatch, "--stages", "generate")[0] == 0

    (tmp_path / "counting_scorer.py").write_text(
        "CALLS = []\n\ndef contains(response, reference):\n"
        "    CALLS.append(response)\n    return reference in response\n\n"
        'contains.__canopy_version__ = "1"\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import counting_scorer

    task = DEMO_TASK.replace('"regex_match"', '"counting_scorer:contains"')
    task = task.replace('"letters.jsonl"', json.dumps(str(demo_run / "letters.jsonl")))
    (tmp_path / "letters.toml").write_text(task)
    spec = read_task_file(tmp_path / "letters.toml")
    run = demo_run / "run"
    first = score_rollouts(run, {"letters": spec}, {})
    distinct = len(set(zip(first.prompt_id, first.text_hash, strict=True)))
    assert len(counting_scorer.CALLS) == distinct
    assert first["scorer_version"].eq("counting_scorer:contains@1").all()
    again = score_rollouts(run, {"letters": spec}, {})
    assert len(counting_scorer.CALLS) == distinct  # all from the cache
    pd.testing.assert_frame_equal(first, again)
    counting_scorer.contains.__canopy_version__ = "2"
    score_rollouts(run, {"letters": spec}, {})
    assert len(counting_scorer.CALLS) == 2 * distinct
