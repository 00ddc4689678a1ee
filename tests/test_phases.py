"""Phase splits ([analysis] phase_markers) against a brute-force per-rollout Python
computation on a real tiny-model run, the metrics stage writing them, and the chat
template's enable_thinking reaching the template."""

from __future__ import annotations

import collections
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from canopy_entropy.errors import CanopyError
from canopy_entropy.metrics import MetricsResult
from canopy_entropy.metrics.phases import compute_phases, first_match_end, read_phases
from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.store import RunStore
from cli_helpers import run_cli

KEYS = list(PROMPT_KEYS)


def _rows(run: Path) -> list[dict]:
    cols = [*KEYS, "rollout_index", "token_ids", "entropy"]
    return RunStore(run).read_rollouts(columns=cols).to_pylist()


def _sequences(tok, markers) -> list[list[int]]:
    """The marker alone and after ' ', '\\n', 'a' (what the module documents), by hand."""
    out = []
    for m in markers:
        out.append(tok.encode(m, add_special_tokens=False))
        for p in (" ", "\n", "a"):
            head = tok.encode(p, add_special_tokens=False)
            ids = tok.encode(p + m, add_special_tokens=False)
            if ids[: len(head)] == head and len(ids) > len(head):
                out.append(ids[len(head) :])
    return out


def _brute_split(ids: list[int], seqs, tok, markers) -> tuple[int, str]:
    for end in range(1, len(ids) + 1):  # the earliest end of any sequence
        if any(len(s) <= end and ids[end - len(s) : end] == s for s in seqs):
            return end, "tokens"
    for k in range(1, len(ids) + 1):  # the first decoded prefix holding a marker
        if any(m in tok.decode(ids[:k], skip_special_tokens=False) for m in markers):
            return k, "text"
    return len(ids), "none"


def _pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _wmean(values, weights) -> float:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if math.isfinite(v)]
    if not pairs:
        return math.nan
    total = sum(w for _, w in pairs)
    if total == 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs) / total


def brute_force(run: Path, markers, tok):
    """Per rollout, per prompt and pooled phase statistics with plain Python loops."""
    seqs = _sequences(tok, markers)
    per_rollout, prompts = {}, collections.defaultdict(list)
    for row in _rows(run):
        ids, ent = row["token_ids"], row["entropy"]
        split, how = _brute_split(ids, seqs, tok, markers)
        key = tuple(row[k] for k in KEYS)
        rec = {"split": split, "matched_by": how, "whole": (sum(ent), len(ent)),
               "reasoning": (sum(ent[:split]), split),
               "answer": (sum(ent[split:]), len(ent) - split)}  # fmt: skip
        per_rollout[(*key, row["rollout_index"])] = rec
        prompts[key].append(rec)
    prompt_rows = []
    for key, recs in prompts.items():
        for phase in ("whole", "reasoning", "answer"):
            H = [r[phase][0] for r in recs]
            N = [r[phase][1] for r in recs]
            rates = [(h / n, n) for h, n in zip(H, N, strict=True) if n > 0]
            prompt_rows.append({
                **dict(zip(KEYS, key, strict=True)), "phase": phase,
                "ce_star": float(np.mean(H)), "mean_length": float(np.mean(N)),
                "entropy_rate": float(np.mean([r for r, _ in rates])) if rates else math.nan,
                "pearson": _pearson([n for _, n in rates], [r for r, _ in rates]),
                "n_with_phase": len(rates),
            })  # fmt: skip
    frame = pd.DataFrame(prompt_rows)
    pooled = {}
    for (model, task, phase), g in frame.groupby(["model", "task", "phase"]):
        ce, nbar = g["ce_star"].mean(), g["mean_length"].mean()
        rate = _wmean(g["entropy_rate"], [1.0] * len(g))
        z = np.arctanh(np.clip(g["pearson"], -0.999999, 0.999999))
        rho = math.tanh(_wmean(z, np.maximum(g["n_with_phase"] - 3.0, 0.0)))
        pooled[(model, task, phase)] = {"ce_star": ce, "mean_length": nbar, "entropy_rate": rate,
                                        "genppl": math.exp(ce / nbar) if nbar else math.nan,
                                        "bf": math.exp(rate), "pearson": rho}  # fmt: skip
    return per_rollout, frame, pooled


@pytest.fixture(scope="module")
def markers(run_two_tasks, tiny_model):
    """A marker that occurs as tokens in some rollouts, and one that occurs in the decoded text
    of some rollouts without its token sequence (both found in the run's own rollouts)."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = _rows(run_two_tasks)
    counts = collections.Counter()
    for row in rows:
        ids = row["token_ids"]
        counts.update(set(itertools.pairwise(ids)))
    usable = [
        tok.decode([a, b])
        for (a, b), n in counts.most_common()
        if n >= 4 and "\ufffd" not in tok.decode([a, b])
        and tok.encode(tok.decode([a, b]), add_special_tokens=False) == [a, b]
    ]  # fmt: skip
    token_marker = usable[0] if usable else None
    text_marker = None
    for text in usable[1:]:
        inner = text[1:]  # drops a character: may split a token in two
        if len(inner) < 2:
            continue
        chosen = [token_marker, inner]
        seqs = _sequences(tok, chosen)
        hows = {_brute_split(r["token_ids"], seqs, tok, chosen)[1] for r in rows}
        if {"tokens", "text", "none"} <= hows:
            text_marker = inner
            break
    assert token_marker and text_marker, "the tiny run holds no usable marker"
    return tok, token_marker, text_marker


def test_phase_split_matches_brute_force(run_two_tasks, markers):
    tok, token_marker, text_marker = markers
    chosen = [token_marker, text_marker]
    result = compute_phases(run_two_tasks, chosen, by=("model", "task"))
    per_rollout, prompt_frame, pooled = brute_force(run_two_tasks, chosen, tok)
    hows = collections.Counter(r["matched_by"] for r in per_rollout.values())
    assert hows["tokens"] > 0 and hows["text"] > 0 and hows["none"] > 0, hows
    assert len(result.rollouts) == len(per_rollout)
    for rec in result.rollouts.to_dict("records"):
        want = per_rollout[(*[rec[k] for k in KEYS], rec["rollout_index"])]
        assert (rec["split"], rec["matched_by"]) == (want["split"], want["matched_by"])
        assert rec["H_reasoning"] == pytest.approx(want["reasoning"][0], rel=1e-9, abs=1e-9)
        assert rec["H_answer"] == pytest.approx(want["answer"][0], rel=1e-9, abs=1e-9)
        assert rec["length_answer"] == want["answer"][1]
    got = result.prompts.merge(prompt_frame, on=[*KEYS, "phase"], suffixes=("", "_bf"))
    assert len(got) == len(prompt_frame) == 3 * 16
    for col in ("ce_star", "mean_length", "entropy_rate", "pearson", "n_with_phase"):
        np.testing.assert_allclose(got[col], got[f"{col}_bf"], rtol=1e-9, atol=1e-12)
    for rec in result.pooled.to_dict("records"):
        want = pooled[(rec["model"], rec["task"], rec["phase"])]
        for col, value in want.items():
            assert rec[col] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), col
    assert any("tokenised differently" in n for n in result.notes)


def test_whole_phase_is_the_metrics_stage(run_two_tasks, markers):
    _, token_marker, _ = markers
    result = compute_phases(run_two_tasks, [token_marker])
    whole = result.prompts[result.prompts["phase"] == "whole"]
    saved = MetricsResult.load(run_two_tasks).prompts
    both = whole.merge(saved, on=KEYS, suffixes=("", "_m"))
    assert len(both) == len(saved)
    for col in ("ce_star", "mean_length", "entropy_rate", "pearson", "genppl", "bf"):
        np.testing.assert_array_equal(both[col], both[f"{col}_m"])


def test_first_match_end_stays_inside_each_rollout():
    tokens = np.array([5, 7, 5, 7, 1, 5, 9, 5], dtype=np.int64)  # rows [5 7] [5 7 1 5] [9 5]
    offsets = np.array([0, 2, 6, 8])
    seqs = [np.array([7, 1]), np.array([5])]
    np.testing.assert_array_equal(first_match_end(tokens, offsets, seqs), [1, 1, 2])
    # [5, 9] spans the boundary between row 1 and row 2: no match there
    np.testing.assert_array_equal(
        first_match_end(tokens, offsets, [np.array([5, 9])]), [-1, -1, -1]
    )


def test_metrics_stage_writes_phases_and_the_report_shows_them(
    run_two_tasks, markers, tmp_path, capsys, monkeypatch
):
    from canopy_entropy.config import load_config
    from canopy_entropy.report.studies import phases_section
    from canopy_entropy.runner import run_experiment

    _, token_marker, _ = markers
    run = Path(shutil.copytree(run_two_tasks, tmp_path / "run"))
    cfg = load_config(run / "config.toml")
    cfg.analysis.phase_markers = [token_marker]  # [analysis] phase_markers = [...]
    results = run_experiment(cfg, run, stages=["metrics"])
    assert [r.status for r in results if r.name == "metrics"] == ["done"]
    pooled, saved_markers = read_phases(run)
    assert saved_markers == (token_marker,)
    direct = compute_phases(run, [token_marker]).pooled
    pd.testing.assert_frame_equal(pooled, direct, check_dtype=False)
    html = phases_section(run)
    for value in direct["ce_star"]:
        assert f'data-sort="{float(value)!r}"' in html
    with pytest.raises(CanopyError, match="no phase markers"):
        compute_phases(run, [])
    capsys.readouterr()  # the stage table printed above
    code, out, err = run_cli(["phases", str(run), "--json"], capsys, monkeypatch)  # config's
    assert code == 0, err
    doc = json.loads(out)
    assert doc["markers"] == [token_marker]
    np.testing.assert_array_equal([r["ce_star"] for r in doc["phases"]], direct["ce_star"])


THINK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% else %}"
    "<think>\n\n</think>\n\n{% endif %}"
)


def test_enable_thinking_reaches_the_chat_template(tiny_model, tmp_path):
    from canopy_entropy.engines.base import DecodingPolicy
    from canopy_entropy.engines.hf import HFEngine
    from canopy_entropy.generate import generate_run
    from canopy_entropy.prompting import render_prompt
    from canopy_entropy.run.manifest import read_manifest
    from canopy_entropy.tasks.base import Prompt

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (model / "chat_template.jinja").write_text(THINK_TEMPLATE)
    engine = HFEngine(str(model), device="cpu")
    try:
        on, _ = render_prompt(engine.tokenizer, "hi", "instruct", enable_thinking=True)
        off, _ = render_prompt(engine.tokenizer, "hi", "instruct")
        assert on.endswith("assistant\n<think>\n") and off.endswith("<think>\n\n</think>\n\n")
        for label, thinking in (("think", True), ("plain", False)):
            generate_run(
                tmp_path / "run", model=str(model), prompts=[Prompt("p1", "hi", "math")],
                rollouts=2, policy=DecodingPolicy(max_new_tokens=4), variant="instruct",
                model_label=label, engine_instance=engine, enable_thinking=thinking,
                series="sft" if thinking else None, step=5 if thinking else None,
            )  # fmt: skip
    finally:
        engine.close()
    rendered = RunStore(tmp_path / "run").read_prompts().to_pandas().set_index("model")["rendered"]
    assert rendered["think"] == on and rendered["plain"] == off
    records = read_manifest(tmp_path / "run").models
    assert (records["think"].enable_thinking, records["think"].series, records["think"].step) == (
        True, "sft", 5)  # fmt: skip
    assert (records["plain"].enable_thinking, records["plain"].series) == (False, None)


def test_thinking_off_keeps_old_run_folders_continuable():
    from canopy_entropy.config import parse_config
    from canopy_entropy.config.write import config_dict, generation_fingerprint

    text = 'name = "s"\n[[models]]\nmodel = "gemma3-270m"\nvariant = "instruct"\n'
    new = config_dict(parse_config(text, check_models=False))
    old = {**new, "generation": {k: v for k, v in new["generation"].items()
                                 if k != "enable_thinking"},
           "models": [{k: v for k, v in m.items() if k not in ("series", "step")}
                      for m in new["models"]]}  # fmt: skip
    assert generation_fingerprint(old) == generation_fingerprint(new)
    on = config_dict(parse_config(text + "enable_thinking = true\n", check_models=False))
    assert generation_fingerprint(on)["models"][0]["enable_thinking"] is True
    assert generation_fingerprint(on) != generation_fingerprint(new)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[models]]\nmodel = "gemma3-270m"\nenable_thinking = true\n', "on a base model"),
        ('[generation]\nenable_thinking = true\n[[models]]\nmodel = "gemma3-270m"\n',
         "no model is an instruct model"),
        ('[engine]\nname = "openai"\noptions = { chat = true }\n[[models]]\nmodel = '
         '"gemma3-270m"\nvariant = "instruct"\nenable_thinking = true\n', "chat = true sends"),
    ],
)  # fmt: skip
def test_thinking_where_it_would_do_nothing_is_a_config_error(body, message):
    from canopy_entropy.config import parse_config
    from canopy_entropy.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config('name = "s"\n' + body, check_models=False)


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        ('phase_markers = [""]', "must be a non-empty string"),
        ('phase_markers = ["</think>", "</think>"]', "lists a marker twice"),
        ('phase_marker = ["</think>"]', "did you mean 'phase_markers'"),
        ('phase_markers = "</think>"', "must be"),
    ],
)
def test_analysis_section_is_validated(analysis, message):
    from canopy_entropy.config import parse_config
    from canopy_entropy.errors import ConfigError

    head = 'name = "s"\n[[models]]\nmodel = "gemma3-270m"\n[analysis]\n'
    with pytest.raises(ConfigError, match=message):
        parse_config(head + analysis + "\n", check_models=False)
    ok = parse_config(head + 'phase_markers = ["</think>", "Answer:"]\n', check_models=False)
    assert ok.analysis.phase_markers == ["</think>", "Answer:"]


def test_generate_cli_refuses_thinking_on_base_and_half_a_checkpoint(tmp_path, capsys, monkeypatch):
    from cli_helpers import run_cli

    base = ["generate", "--model", "gemma3-270m", "--prompts", str(tmp_path / "p.jsonl"),
            "--run", str(tmp_path / "run")]  # fmt: skip
    code, _, err = run_cli([*base, "--variant", "base", "--enable-thinking"], capsys, monkeypatch)
    assert code == 2 and "--enable-thinking changes the chat template" in err
    code, _, err = run_cli([*base, "--variant", "base", "--step", "3"], capsys, monkeypatch)
    assert code == 2 and "--series NAME and --step N" in err
