"""Reward-model filtering: scores of a tiny random reward model, the top-share selection, the
kept set's metrics and the cache, against independent computations."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.run.layout import PROMPT_KEYS, ROLLOUT_KEYS


def _reward_model(path: Path, chat: bool = True) -> Path:
    """A 2-layer random Llama with a one-output score head and the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from canopy_entropy.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    if not chat:
        tok.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a score head large enough that rollouts get distinct scores
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    return _reward_model(tmp_path_factory.mktemp("reward") / "rm")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, run_two_tasks, reward_model):
    """A copy of the two-task run, reward-filtered once (keep 0.7)."""
    from canopy_entropy.reward import reward_run

    run = tmp_path_factory.mktemp("reward_run") / "run"
    shutil.copytree(run_two_tasks, run)
    result = reward_run(
        run, str(reward_model), keep=0.7, device="cpu",
        compare={"n_boot": 50, "seed": 0, "by": ("family", "task")},
        regress={"mean": "D ~ R_sc * variant + task", "precision": "~ 1"},
    )  # fmt: skip
    return run, result


def _direct_scores(model_dir: Path, run: Path) -> pd.DataFrame:
    """Each rollout scored alone (no batching, no padding), the text built by hand."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from canopy_entropy.store import RunStore

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    store = RunStore(run)
    rows = store.read_rollouts(columns=[*ROLLOUT_KEYS, "text"]).to_pandas()
    prompts = store.read_prompts().to_pandas()[[*PROMPT_KEYS, "text"]]
    rows = rows.merge(prompts.rename(columns={"text": "q"}), on=list(PROMPT_KEYS))
    out = []
    for q, a in zip(rows["q"], rows["text"], strict=True):
        if tok.chat_template:
            text = f"<|bos|><|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:  # plain text after the BOS token
            ids = [tok.bos_token_id, *tok(f"User: {q}\n\nAssistant: {a}",
                                          add_special_tokens=False)["input_ids"]]  # fmt: skip
        ids = torch.tensor([ids])
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0]))
    rows["direct"] = out
    return rows[[*ROLLOUT_KEYS, "direct"]]


def test_scores_match_unbatched_forward_passes(scored_run, reward_model):
    run, result = scored_run
    direct = _direct_scores(reward_model, run)
    merged = result.selection.merge(direct, on=list(ROLLOUT_KEYS))
    assert len(merged) == len(direct) == 64
    np.testing.assert_allclose(merged["score"], merged["direct"], rtol=1e-4, atol=1e-5)
    assert merged["score"].nunique() > 48  # mostly distinct (identical texts tie)


def test_kept_set_is_the_independent_argsort_ceil_selection(scored_run):
    _, result = scored_run
    sel = result.selection
    expected = []
    for _, g in sel.groupby(list(PROMPT_KEYS)):
        k = math.ceil(0.7 * len(g) - 1e-12)
        best = np.argsort(-g["score"].to_numpy(), kind="stable")[:k]
        expected += [tuple(r) for r in g.iloc[best][list(ROLLOUT_KEYS)].itertuples(index=False)]
    got = [tuple(r) for r in sel[sel["kept"]][list(ROLLOUT_KEYS)].itertuples(index=False)]
    assert sorted(got) == sorted(expected)
    assert len(got) == 16 * 3  # 16 prompts x ceil(0.7 * 4)


def test_filtered_metrics_equal_metrics_of_hand_filtered_rows(scored_run):
    from canopy_entropy.metrics import compute_metrics
    from canopy_entropy.run.manifest import read_manifest
    from canopy_entropy.store import RunStore

    run, result = scored_run
    table = RunStore(run).read_rollouts().to_pandas()
    keep = result.selection[result.selection["kept"]][list(ROLLOUT_KEYS)]
    rows = table.merge(keep, on=list(ROLLOUT_KEYS), how="inner")
    assert len(rows) == 48
    direct = compute_metrics(rows, warn=False, manifest=read_manifest(run))
    cols = ["ce_star", "genppl", "bf", "mean_length", "pearson", "length_entropy", "n_rollouts"]
    got = result.metrics.prompts.set_index(list(PROMPT_KEYS))[cols].sort_index()
    want = direct.prompts.set_index(list(PROMPT_KEYS))[cols].sort_index()
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12)
    # and the mean over kept rollouts by hand (CE* = mean H of a prompt's rollouts)
    h = rows.assign(H=[float(np.sum(e, dtype=np.float64)) for e in rows["entropy"]])
    by_hand = h.groupby(list(PROMPT_KEYS))["H"].mean().sort_index()
    np.testing.assert_allclose(got["ce_star"].to_numpy(), by_hand.to_numpy(), rtol=1e-9)
    assert (got["n_rollouts"] == 3).all()


def test_kept_diversity_equals_diversity_of_the_kept_embeddings(scored_run):
    from canopy_entropy.semantic.diversity import rollout_diversity, vendi_score
    from canopy_entropy.semantic.embed import EMBED_SCHEMA_VERSION
    from canopy_entropy.store import read_table

    run, result = scored_run
    prompts = result.metrics.prompts
    kept = result.selection[result.selection["kept"]]
    # one prompt, recomputed from the embedding files by hand
    key = kept.iloc[0]
    shard = [p for p in (run / "semantic" / "embeddings").glob("*.parquet")
             if key["model"] in p.name and key["task"] in p.name]  # fmt: skip
    assert len(shard) == 1
    emb = read_table(shard[0], EMBED_SCHEMA_VERSION).to_pandas()
    mine = kept[(kept["model"] == key["model"]) & (kept["task"] == key["task"])
                & (kept["prompt_id"] == key["prompt_id"])]  # fmt: skip
    vecs = np.stack(
        emb.set_index(["prompt_id", "rollout_index"])
        .loc[list(zip(mine["prompt_id"], mine["rollout_index"], strict=True)), "embedding"]
        .to_numpy()
    )
    row = prompts[(prompts["model"] == key["model"]) & (prompts["task"] == key["task"])
                  & (prompts["prompt_id"] == key["prompt_id"])]  # fmt: skip
    assert float(row["diversity"].iloc[0]) == pytest.approx(rollout_diversity(vecs).mean())
    assert float(row["vendi"].iloc[0]) == pytest.approx(vendi_score(vecs))


def test_view_folder_holds_kept_analyses_and_raw_vs_kept(scored_run):
    from canopy_entropy.comparison import CompareResult
    from canopy_entropy.metrics import current_metrics
    from canopy_entropy.stats.regression import RegressionResult

    run, result = scored_run
    view = run / "reward"
    assert current_metrics(view).prompts["n_rollouts"].eq(3).all()  # a current, readable result
    assert not CompareResult.load(view).table.empty
    assert RegressionResult.load(view).summary["nobs"] == 16
    raw = current_metrics(run).pooled.set_index(["model", "variant", "task"])
    kept = result.metrics.pooled.set_index(["model", "variant", "task"])
    t = result.raw_vs_kept
    row = t[(t["metric"] == "ce_star")].iloc[0]
    k = (row["model"], row["variant"], row["task"])
    assert row["raw"] == pytest.approx(raw.loc[k, "ce_star"])
    assert row["kept"] == pytest.approx(kept.loc[k, "ce_star"])
    assert row["diff"] == pytest.approx(kept.loc[k, "ce_star"] - raw.loc[k, "ce_star"])
    assert set(t["metric"]) >= {"ce_star", "genppl", "bf", "diversity", "vendi"}
    summary = result.summary()
    assert summary["n_kept"] == 48 and summary["n_rollouts"] == 64 and summary["n_scored"] == 64


def test_second_run_reuses_every_cached_score(scored_run, reward_model, monkeypatch):
    from canopy_entropy.reward import RewardScorer, score_run

    run, first = scored_run
    calls = []
    real = RewardScorer.score
    monkeypatch.setattr(RewardScorer, "score",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))  # fmt: skip
    again = score_run(run, str(reward_model), device="cpu")
    assert again.n_cached == 64 and again.n_scored == 0 and calls == []
    pd.testing.assert_series_equal(
        again.scores["score"], first.selection["score"], check_names=False
    )


def test_fallback_format_without_chat_template(tmp_path, run_two_tasks):
    from canopy_entropy.reward import RewardScorer, score_run

    model_dir = _reward_model(tmp_path / "plain", chat=False)
    run = tmp_path / "run"
    shutil.copytree(run_two_tasks, run, ignore=shutil.ignore_patterns("reward"))
    scorer = RewardScorer(str(model_dir), device="cpu")
    assert scorer.format("Q?", "A.") == "User: Q?\n\nAssistant: A."
    result = score_run(run, scorer)
    assert any("no chat template" in n for n in result.notes)
    direct = _direct_scores(model_dir, run)
    merged = result.scores.merge(direct, on=list(ROLLOUT_KEYS))
    np.testing.assert_allclose(merged["score"], merged["direct"], rtol=1e-4, atol=1e-5)


def test_select_top_edges():
    from canopy_entropy.reward import kept_count, select_top

    assert list(kept_count(np.array([1, 3, 4, 10, 100]), 0.7)) == [1, 3, 3, 7, 70]
    frame = pd.DataFrame({"model": "m", "variant": "base", "family": "f", "task": "math",
                          "prompt_id": "p", "rollout_index": [0, 1, 2, 3],
                          "score": [1.0, 2.0, 2.0, 0.5]})  # fmt: skip
    sel = select_top(frame, 0.5)  # a tie at the top: the lower rollout index ranks first
    assert list(sel["rank"]) == [2, 0, 1, 3] and list(sel["kept"]) == [False, True, True, False]
    assert select_top(frame, 1.0)["kept"].all()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="keep must be a fraction"):
            select_top(frame, bad)


def test_a_classifier_with_two_labels_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from canopy_entropy.reward import RewardScorer
    from canopy_entropy.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      num_labels=2, pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(ConfigError, match="num_labels = 1"):
        RewardScorer(str(tmp_path / "two"), device="cpu")
    with pytest.raises(CanopyError, match="does not exist; fix the path"):
        RewardScorer(str(tmp_path / "missing"), device="cpu")


def test_cli_reward_writes_the_view_and_refuses_a_bad_keep(scored_run, reward_model, tmp_path,
                                                           capsys, monkeypatch):  # fmt: skip
    from cli_helpers import run_cli

    run, _ = scored_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    args = ["reward", str(copy), "--model", str(reward_model), "--device", "cpu"]
    code, out, err = run_cli([*args, "--keep", "0.5", "--bootstrap", "20"], capsys, monkeypatch)
    assert code == 0, err
    assert "64 rollouts (0 scored, 64 from the cache); kept 32" in " ".join(out.split())
    from canopy_entropy.metrics import current_metrics

    assert current_metrics(copy / "reward").prompts["n_rollouts"].eq(2).all()
    # the kept set is fitted with the run's own regression specification
    from canopy_entropy.stats.regression import RegressionResult

    raw_spec = RegressionResult.load(copy).summary["formula"]
    assert RegressionResult.load(copy / "reward").summary["formula"] == raw_spec
    code, _, err = run_cli([*args, "--keep", "1.5"], capsys, monkeypatch)
    assert code == 2 and "keep must be a fraction in (0, 1]" in err and "Traceback" not in err


def test_report_shows_the_optional_analyses_in_words(scored_run, tmp_path):
    """Reward, robustness and RSE sections: values recomputed here, labels instead of names."""
    import json
    import re

    import pyarrow as pa

    from canopy_entropy.report.build import render_report
    from canopy_entropy.report.html import fmt
    from canopy_entropy.semantic.rse import DEFAULT_JUDGE, RSE_COLUMNS, RSE_SCHEMA_VERSION
    from canopy_entropy.stats.regression import regress_model_run
    from canopy_entropy.store import atomic_write_table

    run, result = scored_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    regress_model_run(copy, "quadratic")
    # a relaxed-semantic-entropy table as the semantic-entropy command writes it
    keys = result.metrics.prompts[list(PROMPT_KEYS)].copy()
    rng = np.random.default_rng(0)
    keys["rse_clusters"] = rng.integers(1, 4, len(keys)).astype(np.int32)
    keys["rse"] = rng.uniform(0, 1, len(keys))
    keys["rse_normalized"] = keys["rse"] / np.log(3)
    keys["rse_m"], keys["rse_failures"] = np.int32(3), np.int32(0)
    atomic_write_table(copy / "semantic" / "rse.parquet",
                       pa.Table.from_pandas(keys[[*PROMPT_KEYS, *RSE_COLUMNS]], preserve_index=False),
                       RSE_SCHEMA_VERSION)  # fmt: skip
    (copy / "semantic" / "rse.json").write_text(json.dumps(
        {"judge": f"hf:{DEFAULT_JUDGE}", "m": 3, "calls": 96, "seconds_judging": 48.0,
         "pairs_cached": 0, "notes": []}))  # fmt: skip
    html = render_report(copy)
    for title in ("Relaxed semantic entropy", "Robustness fits", "Reward-filtered vs raw"):
        assert f"<h2>{title}</h2>" in html
    assert html.index("Reward-filtered vs raw") < html.index("<h2>Figures</h2>")
    text = re.sub(r"<[^>]+>", " ", html)
    # RSE: the per-group mean, the throughput, the weak-judge warning
    g = keys.groupby(["model", "variant", "task"])["rse"].mean()
    assert fmt(float(g.iloc[0])) in text
    assert "Weak judge." in text and "2.0" in text  # 96 calls in 48 s
    # the quadratic check's likelihood-ratio test, as stored
    doc = json.loads((copy / "regression" / "quadratic" / "result.json").read_text())
    assert fmt(doc["lrt"]["statistic"]) in text and fmt(doc["lrt"]["p_value"]) in text
    assert "instruct (vs base) × entropy rate² (centred)" in text
    # reward: raw and kept CE* of a group, and words instead of column names
    t = result.raw_vs_kept[result.raw_vs_kept["metric"] == "ce_star"].iloc[0]
    assert fmt(float(t["raw"])) in text and fmt(float(t["kept"])) in text
    section = text[text.index("Reward-filtered vs raw  ") :]
    for raw_name in ("ce_star", "genppl", "raw_vs_kept", "R_sc", "diff_se"):
        assert raw_name not in section.split("Figures")[0]


def test_runner_runs_the_opt_in_stages_from_the_config(run_two_tasks, reward_model, tiny_model,
                                                       tmp_path):  # fmt: skip
    """[semantic_entropy] and [reward] enabled: canopy run adds both stages, in order, and a
    rerun reuses the verdict and score caches (the stages are up to date)."""
    import torch

    from canopy_entropy.config import load_config
    from canopy_entropy.runner import run_experiment

    run = tmp_path / "run"
    shutil.copytree(run_two_tasks, run, ignore=shutil.ignore_patterns("reward"))
    text = (run_two_tasks.parent / "study.toml").read_text() + (
        f'\n[semantic_entropy]\nenabled = true\njudge = "{tiny_model}"\nm = 2\n'
        'engine_options = { device = "cpu" }\n'
        f'\n[reward]\nenabled = true\nmodel = "{reward_model}"\ndevice = "cpu"\n'
    )
    config = tmp_path / "study.toml"
    config.write_text(text)
    cfg = load_config(config)
    assert cfg.stages.index("semantic-entropy") < cfg.stages.index("metrics")
    stages = ["generate", "semantic-entropy", "metrics", "reward"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = {r.name: r for r in run_experiment(cfg, run, stages=stages)}
        again = {r.name: r for r in run_experiment(cfg, run, stages=stages)}
    finally:
        torch.set_num_threads(threads)
    assert first["semantic-entropy"].status == "done", first["semantic-entropy"]
    assert first["reward"].status == "done", first["reward"]
    assert (run / "semantic" / "rse.parquet").exists() and (
        run / "reward" / "summary.json"
    ).exists()
    assert (
        again["semantic-entropy"].detail == "up to date" and again["reward"].detail == "up to date"
    )


def test_scoring_resumes_after_a_kill(scored_run, reward_model, tmp_path, monkeypatch):
    """The cache is saved every SAVE_EVERY rollouts: after a kill in the third chunk a rerun
    scores only the rest, and every score equals the uninterrupted run's."""
    from canopy_entropy.reward import RewardScorer, score_run
    from canopy_entropy.reward import score as score_module

    run, first = scored_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("reward"))
    monkeypatch.setattr(score_module, "SAVE_EVERY", 16)
    real, calls = RewardScorer.score, []

    def dying(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(RewardScorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        score_run(copy, str(reward_model), device="cpu")
    monkeypatch.setattr(RewardScorer, "score", real)
    again = score_run(copy, str(reward_model), device="cpu")
    assert (again.n_cached, again.n_scored) == (32, 32)
    # float32 noise only: the chunks pad differently from one batch of all 64
    np.testing.assert_allclose(
        again.scores["score"], first.selection["score"], rtol=1e-4, atol=1e-5
    )
