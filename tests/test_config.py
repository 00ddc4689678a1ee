"""Experiment config: hostile configs give one-line errors naming line, key and fix (via the CLI)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from canopy_entropy.config import (
    DEFAULT_STAGES,
    EmbedConfig,
    GenerationConfig,
    ModelSpec,
    PromptsConfig,
    demo_config_path,
    load_config,
    parse_config,
    resolved_config_toml,
)
from canopy_entropy.errors import ConfigError
from cli_helpers import run_cli

REPO = Path(__file__).parents[1]

GOOD = """\
name = "t"
tasks = ["math"]

[[models]]
model = "{model}"
variant = "base"

[generation]
rollouts = 2
"""


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    return d


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


HOSTILE = [
    # (transform of the good config, expected message fragment, expected line or None)
    (
        lambda t: t.replace("rollouts = 2", "rollouts = 2\ntemprature = 0.7"),
        "unknown key 'temprature' in [generation]; did you mean 'temperature'?",
        10,
    ),
    (
        lambda t: t.replace('tasks = ["math"]', 'taks = ["math"]'),
        "unknown key 'taks' in the top level; did you mean 'tasks'?",
        2,
    ),
    (
        lambda t: t.replace('variant = "base"', 'variant = "chat"'),
        "models[0].variant = 'chat'; use 'base' or 'instruct'",
        6,
    ),
    (lambda t: t.replace('tasks = ["math"]', 'tasks = ["maths"]'), "unknown task 'maths'", 2),
    (lambda t: t + '[engine]\nname = "vllmm"\n', "unknown engine 'vllmm'", 11),
    (
        lambda t: t.replace("rollouts = 2", "rollouts = 0"),
        "generation.rollouts = 0 must be >= 1",
        9,
    ),
    (
        lambda t: t.replace("rollouts = 2", 'rollouts = "ten"'),
        "generation.rollouts must be an integer, got 'ten'",
        9,
    ),
    (
        lambda t: t.replace("rollouts = 2", "top_p = 1.5"),
        "generation.top_p = 1.5 must be in (0, 1]",
        9,
    ),
    (lambda t: t.replace("rollouts = 2", "temperature = -1"), "must be >= 0 (0 = greedy)", 9),
    (lambda t: t.replace("rollouts = 2", "rollouts = [2"), "not valid TOML", None),
    (lambda t: t + '[prompts]\nsource = "jsonl"\n', "prompt source 'jsonl' needs prompts.path", 10),
    (lambda t: t + '[prompts]\nsource = "web"\n', "unknown prompt source 'web'", 11),
    (lambda t: t + "[prompts]\nn = 0\n", "prompts.n = 0 must be an integer >= 1 or 'all'", 11),
    (lambda t: t + '[[models]]\nmodel = "{model}"\n', "same label", None),
    (lambda t: t.replace("[[models]]", "[[modelz]]"), "unknown key 'modelz'", None),
    (lambda t: t + '[compare]\nby = ["task", "size"]\n', "compare.by = 'size' is not one of", 11),
    (lambda t: t + "[embed]\nbatch_size = 0\n", "embed.batch_size = 0 must be >= 1", 11),
    (
        lambda t: t + '[compare]\non = "model"\na = "nobody"\n',
        "compare.a = 'nobody' must be one of ['model'] (model labels)",
        12,
    ),
    (lambda t: t + '[compare]\non = "family"\n', "compare.on = 'family' must be", 11),
    # options tables: a misspelled or unknown option is an error, never a silent default
    (
        lambda t: t + '[regress]\noptions = { nsims = 10, meen = "D ~ R_sc" }\n',
        "unknown option 'nsims' in [regress] options; did you mean 'nsim'?",
        11,
    ),
    (
        lambda t: t + '[regress]\noptions = { nsim = "ten" }\n',
        "[regress] options.nsim must be an integer, got 'ten'",
        11,
    ),
    (
        lambda t: t + "[compare]\noptions = { bootstraps = 10 }\n",
        "unknown option 'bootstraps' in [compare] options; valid options: none",
        11,
    ),
    (
        lambda t: t + '[embed]\noptions = { devise = "cpu" }\n',
        "did you mean 'device'?",
        11,
    ),
    (
        lambda t: t + "[engine]\noptions = { batch_sise = 4 }\n",
        "engine 'hf' has no option 'batch_sise'; did you mean 'batch_size'?",
        11,
    ),
    (
        lambda t: t.replace(
            'variant = "base"', 'variant = "base"\nengine_options = { revison = "x" }'
        ),
        "models[0].engine_options: engine 'hf' has no option 'revison'; did you mean 'revision'?",
        7,
    ),
    (
        lambda t: t + "[plots]\nformats = ['png', 'gif']\n",
        "plots.formats = 'gif' is not one of",
        11,
    ),
    # nonsense values
    (lambda t: t.replace("rollouts = 2", "temperature = inf"), "must be a finite number", 9),
    (lambda t: t.replace("rollouts = 2", "top_p = nan"), "must be a finite number", 9),
    (lambda t: t.replace("rollouts = 2", 'stop = [""]'), "must not contain an empty string", 9),
    (
        lambda t: t.replace("rollouts = 2", "seed = 1180591620717411303424"),
        "generation.seed = 1180591620717411303424 must be in [0, 2**63)",
        9,
    ),
    (lambda t: t.replace("rollouts = 2", "seed = -3"), "must be in [0, 2**63)", 9),
    (
        lambda t: t + '[compare]\na = "base"\nb = "base"\n',
        "compare.a and compare.b are both 'base'",
        12,
    ),
]


@pytest.mark.parametrize(("edit", "message", "line"), HOSTILE)
def test_hostile_config_gives_one_line_error(
    tmp_path, model_dir, capsys, monkeypatch, edit, message, line
):
    text = edit(GOOD).replace("{model}", str(model_dir))
    path = _write(tmp_path, text)
    code, out, err = run_cli(
        ["run", str(path), "--out", str(tmp_path / "run")], capsys, monkeypatch
    )
    assert code == 2, (out, err)
    assert "Traceback" not in err + out
    lines = [x for x in err.strip().splitlines() if x.strip()]
    joined = " ".join(x.strip() for x in lines)
    assert joined.startswith("error: "), err
    assert message in joined, joined
    if line is not None:
        assert f"exp.toml line {line}:" in joined, joined
    assert not (tmp_path / "run").exists()  # nothing written for a bad config


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("./missing-model", "does not exist; fix the path"),
        ("no-such-model", "is not a local folder, an offline alias"),
        ("someorg/not-cached-model", "not in the local Hugging Face cache and the hub is offline"),
    ],
)
def test_model_that_cannot_be_found(tmp_path, capsys, monkeypatch, model, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = _write(tmp_path, GOOD.replace("{model}", model))
    code, _, err = run_cli(["run", str(path)], capsys, monkeypatch)
    assert code == 2
    assert "Traceback" not in err
    assert message in " ".join(err.split()), err
    assert "exp.toml line 5:" in " ".join(err.split())


def test_missing_config_file(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["run", str(tmp_path / "nope.toml")], capsys, monkeypatch)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_defaults_and_paths(tmp_path, model_dir):
    (tmp_path / "prompts").mkdir()
    text = GOOD.replace("{model}", "./model") + '[prompts]\nsource = "jsonl"\npath = "prompts"\n'
    cfg = load_config(_write(tmp_path, text))
    assert cfg.models[0] == ModelSpec(
        model=str(model_dir.resolve()), variant="base", family="model", label="model"
    )
    assert cfg.prompts.path == str((tmp_path / "prompts").resolve())  # relative to the file
    assert cfg.generation == dataclasses.replace(GenerationConfig(), rollouts=2)
    assert cfg.embed == EmbedConfig()
    assert cfg.stages == list(DEFAULT_STAGES)
    assert cfg.prompts_for("math") is cfg.prompts


def test_per_task_prompt_overrides(tmp_path, model_dir):
    text = GOOD.replace('["math"]', '["math", "coding"]').replace("{model}", str(model_dir))
    text += "[prompts]\nn = 5\n[prompts.coding]\nfewshot = 2\n"
    cfg = load_config(_write(tmp_path, text))
    assert cfg.prompts_for("math") == PromptsConfig(n=5)
    assert cfg.prompts_for("coding") == PromptsConfig(n=5, fewshot=2)
    with pytest.raises(
        ConfigError, match=r"\[prompts.stories\] is set but 'stories' is not in tasks"
    ):
        parse_config(text + "[prompts.stories]\nn = 1\n", "x.toml", tmp_path)


def test_resolved_config_round_trips(tmp_path, model_dir):
    text = (
        GOOD.replace("{model}", str(model_dir)) + "[prompts]\nn = 'all'\n[prompts.math]\nseed = 3\n"
    )
    cfg = load_config(_write(tmp_path, text))
    resolved = resolved_config_toml(cfg)
    again = parse_config(resolved, "resolved.toml", tmp_path)
    assert dataclasses.replace(again, source=cfg.source) == cfg
    # every field is explicit in the resolved file
    for f in dataclasses.fields(GenerationConfig):
        assert re.search(rf"^{f.name} = ", resolved, re.M), f.name


def test_packaged_demo_is_identical_to_repo_copy():
    assert demo_config_path().read_bytes() == (REPO / "configs" / "demo.toml").read_bytes()


def test_demo_config_contents():
    cfg = load_config(demo_config_path(), check_models=False)
    assert [(m.model, m.variant, m.family) for m in cfg.models] == [
        ("gemma3-270m", "base", "gemma3-270m"),
        ("smollm2-135m-instruct", "instruct", "smollm2-135m"),
    ]
    assert cfg.tasks == ["math", "coding", "completion", "stories"]
    assert cfg.prompts.source == "builtin" and cfg.engine.device == "cpu"


def test_paper_config_contents():
    cfg = load_config(REPO / "configs" / "paper.toml", check_models=False)
    assert [m.model for m in cfg.models] == [
        "Qwen/Qwen3-8B-Base",
        "Qwen/Qwen3-8B",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-8B-Instruct",
        "google/gemma-3-12b-pt",
        "google/gemma-3-12b-it",
    ]
    assert [m.variant for m in cfg.models] == ["base", "instruct"] * 3
    assert len({m.family for m in cfg.models}) == 3
    g = cfg.generation
    assert (g.rollouts, g.temperature, g.top_k, g.top_p, g.max_new_tokens) == (
        100,
        1.0,
        100,
        1.0,
        4000,
    )
    assert cfg.engine.name == "vllm" and cfg.prompts.n == 100 and cfg.prompts.source == "paper"
    assert Path(cfg.prompts.path) == (REPO.parent / "shared" / "data" / "paper-prompts").resolve()


def test_every_config_key_is_documented():
    doc = (REPO / "docs" / "running.md").read_text()
    for cls in (GenerationConfig, PromptsConfig, EmbedConfig, ModelSpec):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"{cls.__name__}.{f.name} missing from docs/running.md"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a"}', '{"prompt": "b"'], "bad.jsonl line 2: not valid JSON"),
        (['{"prompt": "a"}', '{"question": "b"}'], "bad.jsonl line 2: no 'prompt' field"),
        (
            ['{"prompt": "a", "id": 1}', '{"prompt": "b", "id": 1}'],
            "line 2: duplicate id (same as line 1)",
        ),
    ],
)
def test_hostile_prompt_file_via_cli(tmp_path, model_dir, capsys, monkeypatch, lines, message):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    text = (
        GOOD.replace("{model}", str(model_dir))
        + '[prompts]\nsource = "jsonl"\npath = "bad.jsonl"\n'
    )
    path = _write(tmp_path, text)
    code, _, err = run_cli(["run", str(path), "--out", str(tmp_path / "run")], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert message in " ".join(err.split())
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_stage_options_are_parameters_of_the_stage_functions():
    """config.STAGE_OPTIONS and the runner's stage table say the same thing as the functions."""
    import inspect

    from canopy_entropy.config import STAGE_OPTIONS
    from canopy_entropy.runner import STAGE_TABLE, stage_function

    for stage in STAGE_TABLE:
        params = inspect.signature(stage_function(stage)).parameters
        for name in STAGE_OPTIONS.get(stage.name, {}):
            assert name in params, (stage.name, name)
        cfg = load_config(demo_config_path(), check_models=False)
        for name in stage.options(cfg):
            assert name in params, (stage.name, name)


def test_check_accepts_valid_configs_and_writes_nothing(tmp_path, capsys, monkeypatch):
    for path in [demo_config_path(), REPO / "configs" / "paper.toml"]:
        args = ["run", str(path), "--check", "--out", str(tmp_path / "run")]
        if path.name == "paper.toml":
            (tmp_path / "p").mkdir(exist_ok=True)
            for task in ("math", "coding", "completion", "stories"):
                lines = [f'{{"prompt": "Say hi {i}."}}\n' for i in range(100)]
                (tmp_path / "p" / f"{task}.jsonl").write_text("".join(lines))
            args += ["--prompts-dir", str(tmp_path / "p")]
            monkeypatch.setattr(
                "canopy_entropy.config.parse.check_model_available", lambda *a: None
            )
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err
        text = " ".join(out.split())
        assert "is valid; the run would do:" in text and "stage report:" in text
        assert not (tmp_path / "run").exists()
    assert "model gemma3-270m (base, family gemma3-270m)" in " ".join(
        run_cli(["run", "--check", "--out", str(tmp_path / "r")], capsys, monkeypatch)[1].split()
    )


@pytest.mark.parametrize(("edit", "message", "line"), HOSTILE[-14:])
def test_check_rejects_invalid_configs(
    tmp_path, model_dir, capsys, monkeypatch, edit, message, line
):
    path = _write(tmp_path, edit(GOOD).replace("{model}", str(model_dir)))
    code, _, err = run_cli(["run", str(path), "--check"], capsys, monkeypatch)
    assert code == 2 and message in " ".join(err.split()), err
