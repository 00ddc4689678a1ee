"""Config of the opt-in analysis stages (semantic-entropy, reward) and the regression's
reference levels: what enables them, what they are given, one-line errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from canopy_entropy.config import DEFAULT_STAGES, STAGES, load_config, parse_config
from canopy_entropy.errors import ConfigError
from cli_helpers import run_cli

BASE = """\
name = "t"
tasks = ["math", "completion"]

[[models]]
model = "m-base"
variant = "base"
family = "m"

[[models]]
model = "m-it"
variant = "instruct"
family = "m"
"""


def _cfg(extra: str, top: str = ""):
    return parse_config(top + BASE + extra, check_models=False)


def test_opt_in_stages_are_off_by_default_and_enabled_by_their_section():
    assert _cfg("").stages == list(DEFAULT_STAGES)
    assert "semantic-entropy" not in DEFAULT_STAGES and "reward" not in DEFAULT_STAGES
    cfg = _cfg('[semantic_entropy]\nenabled = true\n[reward]\nenabled = true\nmodel = "rm"\n')
    assert cfg.stages == list(STAGES)  # in run order
    listed = _cfg("", top='stages = ["generate", "metrics", "semantic-entropy"]\n')
    assert listed.stages == ["generate", "semantic-entropy", "metrics"]


def test_stage_options_follow_the_config(tmp_path):
    from canopy_entropy.runner.stages import stage_named

    (tmp_path / "j.txt").write_text("{question} {response_a} {response_b}")
    text = BASE + (
        '[semantic_entropy]\nenabled = true\njudge = "judge-x"\nm = 6\nseed = 3\n'
        'judge_prompts = { math = "j.txt" }\nengine_options = { device = "cpu" }\n'
        '[reward]\nenabled = true\nmodel = "rm"\nkeep = 0.5\ndevice = "cpu"\n'
        '[regress]\nreference = { task = "completion" }\n'
        'options = { mean = "D ~ R_sc + task", precision = "~ 1" }\n'
        "[compare]\nbootstrap = 10\n"
    )
    path = tmp_path / "c.toml"
    path.write_text(text)
    cfg = load_config(path, check_models=False)
    rse = stage_named("semantic-entropy").options(cfg)
    assert rse == {"judge": "judge-x", "engine": "hf", "m": 6, "seed": 3, "max_new_tokens": 16,
                   "judge_prompts": {"math": str((tmp_path / "j.txt").resolve())},
                   "engine_options": {"device": "cpu"}}  # fmt: skip
    reward = stage_named("reward").options(cfg)
    assert reward["model"] == "rm" and reward["keep"] == 0.5 and reward["device"] == "cpu"
    assert reward["compare"]["n_boot"] == 10
    assert reward["regress"] == {"mean": "D ~ R_sc + task", "precision": "~ 1",
                                 "reference": {"task": "completion"}}  # fmt: skip
    assert stage_named("regress").options(cfg)["reference"] == {"task": "completion"}
    # the resolved config parses back to the same settings
    from canopy_entropy.config import resolved_config_toml

    again = parse_config(resolved_config_toml(cfg), check_models=False)
    assert again.semantic_entropy == cfg.semantic_entropy and again.reward == cfg.reward
    assert again.regress == cfg.regress and again.stages == cfg.stages


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[regress]\nreference = { task = "completoin" }\n',
         "regress.reference.task = 'completoin' is not a task of this study; did you mean "
         "'completion'?"),
        ('[regress]\nreference = { tsk = "math" }\n', "unknown factor 'tsk'"),
        ('[regress]\nreference = { task = "math" }\noptions = { reference = { task = "math" } }\n',
         "set the reference levels once"),
        ("[semantic_entropy]\nenabeld = true\n",
         "unknown key 'enabeld' in [semantic_entropy]; did you mean 'enabled'?"),
        ('[semantic_entropy]\nengine_options = { devise = "cpu" }\n',
         "engine 'hf' has no option 'devise'; did you mean 'device'?"),
        ('[semantic_entropy]\njudge_prompts = { stories = "x.txt" }\n',
         "judge_prompts names task 'stories', which is not in tasks"),
        ("[semantic_entropy]\nm = 1\n", "semantic_entropy.m = 1 must be >= 2"),
        ("[reward]\nenabled = true\n", "the reward stage needs [reward] model"),
        ('[reward]\nmodel = "rm"\nkeep = 0\n', "reward.keep = 0.0 must be in (0, 1]"),
        ('[reward]\nmodle = "rm"\n', "unknown key 'modle' in [reward]; did you mean 'model'?"),
    ],
)  # fmt: skip
def test_bad_analysis_settings_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError) as info:
        _cfg(extra)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_misspelled_reference_level_exits_2_without_traceback(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(BASE + '[regress]\nreference = { task = "completoin" }\n')
    monkeypatch.setattr("canopy_entropy.config.parse.check_model_available", lambda *a: None)
    code, _, err = run_cli(["run", str(path), "--check"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err and "did you mean 'completion'" in err


def _panel() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    rows = []
    for task, shift in (("coding", 0.4), ("completion", 0.0), ("math", -0.6)):
        for i in range(12):
            for variant in ("base", "instruct"):
                r = rng.normal()
                mu = 1 / (1 + np.exp(-(0.2 + shift + 0.5 * r)))
                rows.append({"task": task, "prompt": f"{task}/{i}", "prompt_id": str(i),
                             "family": "f", "variant": variant, "model": variant,
                             "D": float(np.clip(rng.beta(mu * 30, (1 - mu) * 30), 1e-3, 1 - 1e-3)),
                             "R_sc": r})  # fmt: skip
    return pd.DataFrame(rows)


def test_paper_reference_gives_completion_referenced_terms():
    """configs/paper.toml's reference: task terms against completion; the same fit as the
    alphabetical one, reparametrised (b_math(completion) = -b_completion(math), and the
    intercepts differ by that coefficient)."""
    from pathlib import Path

    from canopy_entropy.runner.stages import stage_named
    from canopy_entropy.stats.regression import regress

    paper = load_config(Path(__file__).parents[1] / "configs" / "paper.toml", check_models=False)
    ref = stage_named("regress").options(paper)["reference"]
    assert ref == {"task": "completion"}
    panel = _panel()
    spec = {"mean": "D ~ R_sc + task", "precision": "~ 1", "diagnostics": False}
    paper_fit = regress(panel, reference=ref, **spec).summary
    alpha_fit = regress(panel, **spec).summary  # the CLI default: first task alphabetically
    assert paper_fit["reference"] == {"variant": "base", "task": "completion"}
    assert alpha_fit["reference"] == {"variant": "base", "task": "coding"}
    assert set(paper_fit["mean"]) == {"(Intercept)", "R_sc", "taskcoding", "taskmath"}
    assert set(alpha_fit["mean"]) == {"(Intercept)", "R_sc", "taskcompletion", "taskmath"}
    b, c = paper_fit["mean"], alpha_fit["mean"]
    assert c["taskcompletion"]["estimate"] == pytest.approx(-b["taskcoding"]["estimate"], abs=1e-4)
    assert c["taskmath"]["estimate"] == pytest.approx(
        b["taskmath"]["estimate"] - b["taskcoding"]["estimate"], abs=1e-4
    )
    assert c["(Intercept)"]["estimate"] == pytest.approx(
        b["(Intercept)"]["estimate"] + b["taskcoding"]["estimate"], abs=1e-4
    )
    assert c["R_sc"]["estimate"] == pytest.approx(b["R_sc"]["estimate"], abs=1e-4)
    assert paper_fit["loglik"] == pytest.approx(alpha_fit["loglik"], abs=1e-6)
