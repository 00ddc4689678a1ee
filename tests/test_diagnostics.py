"""Teacher-forced token diagnostics (SPEC section 10): closed forms, brute force, ``canopy score``."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from _teacher_forcing import policy_logprobs as reference_policy_logprobs
from canopy_entropy.diagnostics import (
    ANSWERS_SCHEMA_VERSION,
    TOKENS_SCHEMA_VERSION,
    DiagnosticsError,
    ReferenceAnswer,
    rows_per_chunk,
    score_run,
    token_diagnostics,
)
from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.errors import CanopyError
from canopy_entropy.store import read_table
from cli_helpers import run_cli


def brute(logp_rows: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """SPEC section 10 in float64, one position at a time, straight from the definitions."""
    out = {k: [] for k in ("p", "logp", "entropy", "rank", "expected_rank", "relative_rank")}
    for row, t in zip(np.asarray(logp_rows, np.float64), targets, strict=True):
        m = row[np.isfinite(row)].max()
        lp = row - (m + math.log(np.exp(row[np.isfinite(row)] - m).sum()))
        p = np.exp(lp)
        nz = p > 0
        rank = int(np.sum(p >= p[t]))
        desc = np.sort(p)[::-1]
        expected = float(sum((k + 1) * desc[k] for k in range(len(desc))))
        out["p"].append(p[t])
        out["logp"].append(lp[t])
        out["entropy"].append(-np.sum(p[nz] * lp[nz]))
        out["rank"].append(rank)
        out["expected_rank"].append(expected)
        out["relative_rank"].append(math.log(rank / expected))
    return {k: np.array(v) for k, v in out.items()}


def assert_matches(got: dict, want: dict, tol: float = 1e-5) -> None:
    np.testing.assert_array_equal(np.asarray(got["rank"]), want["rank"])
    for name in ("p", "entropy", "expected_rank", "relative_rank"):
        np.testing.assert_allclose(
            np.asarray(got[name]), want[name], rtol=tol, atol=tol, err_msg=name
        )
    finite = np.isfinite(want["logp"])
    np.testing.assert_allclose(
        np.asarray(got["logp"])[finite], want["logp"][finite], rtol=tol, atol=tol
    )
    assert np.all(np.isneginf(np.asarray(got["logp"])[~finite]))


# -- token_diagnostics: closed forms -----------------------------------------------------------


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("k", [1, 2, 7, 100])
def test_uniform_over_k_has_expected_rank_k_plus_1_over_2(k, as_torch):
    vocab = 150
    row = np.full(vocab, -np.inf)
    row[:k] = -math.log(k)
    lp = np.stack([row, row])
    targets = np.array([k - 1, vocab - 1])  # inside the support, and (k < vocab) outside it
    d = token_diagnostics(torch.from_numpy(lp) if as_torch else lp, targets)
    np.testing.assert_allclose(d.expected_rank, (k + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(d.entropy, math.log(k), atol=1e-6)
    assert d.rank[0] == k
    np.testing.assert_allclose(d.p[0], 1 / k, rtol=1e-6)
    np.testing.assert_allclose(d.relative_rank[0], math.log(2 * k / (k + 1)), atol=1e-6)
    if k < vocab:  # probability 0: log p = -inf, every token has p >= 0
        assert d.p[1] == 0 and np.isneginf(d.logp[1]) and d.rank[1] == vocab


def test_point_mass_has_expected_rank_one_and_zero_entropy():
    lp = np.full((1, 50), -np.inf, dtype=np.float32)
    lp[0, 17] = 0.0
    d = token_diagnostics(lp, [17])
    assert d.expected_rank[0] == 1.0 and d.rank[0] == 1 and d.p[0] == 1.0
    assert d.entropy[0] == 0.0 and not np.signbit(d.entropy[0])
    assert d.relative_rank[0] == 0.0


def test_ties_are_counted_in_the_rank_and_do_not_move_the_expected_rank():
    lp = np.log(np.array([[0.4, 0.2, 0.2, 0.2], [0.2, 0.2, 0.4, 0.2]]))
    d = token_diagnostics(lp, [2, 2])
    # sum_k k p_(k) = 0.4 + 2*0.2 + 3*0.2 + 4*0.2 whatever the order of the ties
    np.testing.assert_allclose(d.expected_rank, [2.2, 2.2], rtol=1e-6)
    assert d.rank.tolist() == [4, 1]  # |{i : p_i >= 0.2}| = 4; the 0.4 token is alone
    np.testing.assert_allclose(d.relative_rank, np.log([4 / 2.2, 1 / 2.2]), rtol=1e-6)


# -- token_diagnostics: brute force ------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_random_logits_match_a_float64_loop_in_any_chunking(scale):
    rng = np.random.default_rng(int(scale * 10))
    logits = (rng.standard_normal((37, 1000)) * scale).astype(np.float32)
    logits[:, 5] = logits[:, 6]  # exact ties somewhere
    targets = rng.integers(0, 1000, 37)
    targets[:3] = logits[:3].argmax(-1)
    targets[3] = 5
    want = brute(logits, targets)
    one_chunk = token_diagnostics(logits, targets)  # logits, unnormalised: renormalised
    assert_matches(one_chunk.columns(), want)
    budget = 5 * 1000 * 24  # five rows per chunk: 8 chunks, the last one partial
    assert rows_per_chunk(1000, budget) == 5
    chunked = token_diagnostics(
        torch.from_numpy(logits), torch.from_numpy(targets), chunk_bytes=budget
    )
    np.testing.assert_array_equal(chunked.rank, one_chunk.rank)
    for name, value in one_chunk.columns().items():  # equal up to float32 summation order
        np.testing.assert_allclose(getattr(chunked, name), value, rtol=1e-6, err_msg=name)


def test_a_150k_vocabulary_keeps_float32_expected_ranks_within_1e5():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((4, 150_000)) * np.array([[0.5], [2.0], [4.0], [8.0]])).astype(
        np.float32
    )
    targets = rng.integers(0, 150_000, 4)
    want = brute(logits, targets)
    assert_matches(token_diagnostics(logits, targets, chunk_bytes=3 * 150_000 * 24).columns(), want)


def test_half_precision_input_is_computed_in_float32():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.standard_normal((6, 300)).astype(np.float32) * 4).to(
        torch.bfloat16
    )
    targets = rng.integers(0, 300, 6)
    assert_matches(
        token_diagnostics(logits, targets).columns(), brute(logits.float().numpy(), targets)
    )


@pytest.mark.parametrize(
    ("logprobs", "targets", "message"),
    [
        (np.zeros(4), [0], "2 dimension"),
        (np.zeros((2, 4)), [0], "2 positions but targets has 1"),
        (np.zeros((2, 4)), [0, 4], "must lie in [0, 4)"),
        (np.zeros((2, 4)), [0, -1], "must lie in [0, 4)"),
        (np.zeros((2, 4)), [0.0, 1.0], "integer token ids"),
        (np.zeros((2, 4), dtype=np.int64), [0, 1], "floating point"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), [0, 0], "no finite log-probability"),
        (np.array([[0.0, 0.0], [-np.inf, -np.inf]]), [0, 0], "no finite log-probability"),
        (np.array([[0.0, np.inf], [0.0, 0.0]]), [0, 0], "no finite log-probability"),
    ],
)
def test_bad_inputs_raise_one_line_errors(logprobs, targets, message):
    with pytest.raises(DiagnosticsError) as info:
        token_diagnostics(logprobs, np.asarray(targets))
    assert message in str(info.value) and "\n" not in str(info.value)


# -- teacher forcing on the tiny model ---------------------------------------------------------

ANSWERS = [
    ReferenceAnswer("q1", "math", "Question: What is 12 times 7?", " Answer: 84"),
    ReferenceAnswer("q2", "story", "The quick brown fox", " jumps over the lazy dog."),
    ReferenceAnswer("q3", "math", "How many apples", " are left if you eat three of seven?"),
    ReferenceAnswer("c1", "coding", "def add(a, b):", "\n    return a + b\n"),
    ReferenceAnswer("s1", "story", "Once", " upon a time"),
]
POLICY = DecodingPolicy(temperature=0.7, top_k=20)


def independent_prompt_ids(tokenizer, text: str, variant: str) -> list[int]:
    """Prompt ids built by hand: BOS + raw text, or the tiny model's chat template spelled out."""
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    if variant == "base":
        return [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [bos, start, *enc(f"user\n{text}"), end, *enc("\n"), start, *enc("assistant\n")]


@pytest.fixture(scope="module")
def scored(tiny_model, tmp_path_factory):
    """The tiny model scored as base and as instruct (policy columns on), batches of 2."""
    run = tmp_path_factory.mktemp("score") / "run"
    for variant in ("base", "instruct"):
        score_run(run, model=str(tiny_model), answers=ANSWERS, variant=variant, device="cpu",
                  model_label=f"tiny-{variant}", family="tiny", batch_size=2, policy=POLICY)  # fmt: skip
    return run


def test_every_column_matches_a_per_position_float64_recomputation(scored, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokens = read_table(
        scored / "diagnostics" / "tokens.parquet", TOKENS_SCHEMA_VERSION
    ).to_pandas()
    assert len(tokens) == 2 * len(ANSWERS)
    for row in tokens.itertuples(index=False):
        answer = next(a for a in ANSWERS if a.id == row.prompt_id)
        prompt_ids = independent_prompt_ids(tok, answer.prompt, row.variant)
        answer_ids = tok(answer.answer, add_special_tokens=False)["input_ids"]
        assert row.token_ids.tolist() == answer_ids and row.n_tokens == len(answer_ids)
        logits = []
        with torch.no_grad():  # a plain forward pass per position, no batch, no padding
            for t in range(len(answer_ids)):
                ids = torch.tensor([prompt_ids + answer_ids[:t]])
                logits.append(model(input_ids=ids).logits[0, -1].double().numpy())
        logits = np.stack(logits)
        assert_matches({c: getattr(row, c) for c in ("p", "logp", "entropy", "rank",
                        "expected_rank", "relative_rank")}, brute(logits, answer_ids))  # fmt: skip
        policy_lp = reference_policy_logprobs(torch.from_numpy(logits), 0.7, 20, 1.0, 0.0).numpy()
        got = {c: getattr(row, f"policy_{c}") for c in ("p", "logp", "entropy", "rank",
               "expected_rank", "relative_rank")}  # fmt: skip
        assert_matches(got, brute(policy_lp, answer_ids))


def test_answer_summaries_are_the_means_of_the_stored_tokens(scored):
    tokens = read_table(
        scored / "diagnostics" / "tokens.parquet", TOKENS_SCHEMA_VERSION
    ).to_pandas()
    answers = read_table(
        scored / "diagnostics" / "answers.parquet", ANSWERS_SCHEMA_VERSION
    ).to_pandas()
    merged = answers.merge(tokens, on=["model", "variant", "family", "task", "prompt_id"])
    assert len(merged) == 2 * len(ANSWERS)
    for row in merged.itertuples(index=False):
        logp, rank, expected = (
            np.asarray(v, np.float64) for v in (row.logp, row.rank, row.expected_rank)
        )
        assert row.mean_nll == pytest.approx(-sum(logp) / len(logp), rel=1e-6)
        assert row.mean_entropy == pytest.approx(
            float(np.mean(np.asarray(row.entropy, np.float64))), rel=1e-6
        )
        assert row.mean_relative_rank == pytest.approx(
            float(np.mean(np.log(rank / expected))), abs=1e-5
        )
        assert row.share_above_expected == pytest.approx(float(np.mean(rank > expected)))
        excluded = np.asarray(row.policy_p) == 0
        assert row.policy_excluded_share == pytest.approx(float(excluded.mean()))
        assert math.isinf(row.policy_mean_nll) == bool(excluded.any())
    assert set(answers["family"]) == {"tiny"} and set(answers["variant"]) == {"base", "instruct"}
    record = json.loads((scored / "diagnostics" / "models.json").read_text())
    assert record["tiny-instruct"]["policy"] == {
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 1.0,
        "min_p": 0.0,
    }


def test_rescoring_a_label_replaces_its_rows_and_keeps_the_others(scored, tiny_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scored, run)  # the shared fixture stays as it was
    score_run(run, model=str(tiny_model), answers=ANSWERS[:2], variant="base", device="cpu",
              model_label="tiny-base", family="tiny", policy=POLICY)  # fmt: skip
    answers = read_table(
        run / "diagnostics" / "answers.parquet", ANSWERS_SCHEMA_VERSION
    ).to_pandas()
    assert sorted(answers[answers["model"] == "tiny-base"]["prompt_id"]) == ["q1", "q2"]
    assert (answers["model"] == "tiny-instruct").sum() == len(ANSWERS)
    with pytest.raises(CanopyError, match="scored with or without a sampling policy"):
        score_run(run, model=str(tiny_model), answers=ANSWERS[:1], device="cpu", model_label="x")


def test_batching_and_chunking_do_not_change_the_numbers(tiny_model, tmp_path):
    """Batch 1 with one row per output chunk equals batch 5 with one big chunk (bit for bit up to
    float32 rounding of the padded forward pass)."""
    runs = {}
    for name, batch, budget in (("a", 1, 1), ("b", 5, 1 << 30)):
        runs[name] = score_run(tmp_path / name, model=str(tiny_model), answers=ANSWERS, device="cpu",
                               batch_size=batch, chunk_bytes=budget).answers  # fmt: skip
    cols = ["mean_nll", "mean_entropy", "mean_relative_rank", "share_above_expected"]
    np.testing.assert_allclose(runs["a"][cols].to_numpy(), runs["b"][cols].to_numpy(), rtol=1e-5)


# -- the command line --------------------------------------------------------------------------


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_cli_scores_end_to_end_and_prints_per_answer_and_pooled_tables(
    tiny_model, tmp_path, capsys, monkeypatch
):
    rows = [{"prompt": a.prompt, "answer": a.answer, "id": a.id, "task": a.task} for a in ANSWERS]
    answers = write_jsonl(tmp_path / "answers.jsonl", rows)
    code, out, err = run_cli(["score", "--model", str(tiny_model), "--answers", answers, "--run",
                              str(tmp_path / "run"), "--variant", "instruct", "--device", "cpu",
                              "--top-k", "20", "--batch-size", "3"], capsys, monkeypatch)  # fmt: skip
    assert code == 0, err
    table = read_table(
        tmp_path / "run" / "diagnostics" / "answers.parquet", ANSWERS_SCHEMA_VERSION
    ).to_pandas()
    assert sorted(table["prompt_id"]) == sorted(a.id for a in ANSWERS)
    pooled = table.groupby("task")["mean_nll"].mean()
    assert "per answer" in out and "pooled" in out and "(all)" in out
    for task, value in pooled.items():  # the printed pooled NLL per task is the mean over answers
        line = next(s for s in out.splitlines() if s.strip().startswith(task) and "answers" not in s
                    and s.split()[1] == str((table["task"] == task).sum()))  # fmt: skip
        assert f"{value:.3f}" in line
    assert "tokens" in err and "Traceback" not in err


LONG = "The quick brown fox jumps over the lazy dog. " * 80


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"prompt": "a", "answer": "b"}, {"prompt": "c"}], [], "line 2: no 'answer' field"),
        ([{"prompt": "a", "answer": "  "}], [], "line 1: 'answer' must be a non-empty string"),
        ([{"prompt": "a", "answer": 3}], [], "'answer' must be a non-empty string"),
        ([{"answer": "b"}], [], "no 'prompt' field"),
        ([{"prompt": "a", "answer": "b", "id": "x"}, {"prompt": "c", "answer": "d", "id": "x"}], [],
         "duplicate id"),
        ([{"prompt": "a", "answer": LONG, "id": "long"}], [], "more than the model's context of 512"),
        ([{"prompt": "a", "answer": "b"}], ["--variant", "chat"], "unknown variant 'chat'"),
        ([{"prompt": "a", "answer": "b"}], ["--top-p", "0"], "top_p must be in (0, 1]"),
        ([{"prompt": "a", "answer": "b"}], ["--batch-size", "0"], "batch size must be >= 1"),
    ],
)  # fmt: skip
def test_cli_hostile_inputs_are_one_line_errors(
    rows, extra, message, tiny_model, tmp_path, capsys, monkeypatch
):
    answers = write_jsonl(tmp_path / "answers.jsonl", rows)
    code, _, err = run_cli(["score", "--model", str(tiny_model), "--answers", answers, "--run",
                              str(tmp_path / "run"), "--device", "cpu", *extra], capsys, monkeypatch)  # fmt: skip
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in " ".join(err.split()), (
        err
    )
    assert not (tmp_path / "run" / "diagnostics").exists()  # nothing half written


def test_cli_refuses_a_missing_answers_file(tiny_model, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["score", "--model", str(tiny_model), "--answers", str(tmp_path / "no.jsonl"),
                            "--run", str(tmp_path / "run")], capsys, monkeypatch)  # fmt: skip
    assert code == 2 and "does not exist" in err


# -- the figure --------------------------------------------------------------------------------


def test_calibration_figure_draws_every_token_with_its_relative_rank(scored):
    from canopy_entropy.plots.fig_diagnostics import fig_token_calibration

    tokens = read_table(
        scored / "diagnostics" / "tokens.parquet", TOKENS_SCHEMA_VERSION
    ).to_pandas()
    fig = fig_token_calibration(tokens)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["tiny-base", "tiny-instruct"]
    for ax in panels:
        rows = tokens[tokens["model"] == ax.get_title()]
        want = np.column_stack(
            [np.concatenate(rows[c].to_numpy()) for c in ("entropy", "p", "relative_rank")]
        )
        (coll,) = ax.collections
        got = np.column_stack([np.asarray(coll.get_offsets()), np.asarray(coll.get_array())])
        key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
        np.testing.assert_allclose(key(got), key(want.astype(np.float64)), rtol=1e-6)
    norm = panels[0].collections[0].norm
    all_rel = np.concatenate(tokens["relative_rank"].to_numpy())
    assert norm.vmin == pytest.approx(all_rel.min()) and norm.vmax == pytest.approx(all_rel.max())


def test_calibration_figure_accepts_one_row_per_token_and_names_missing_columns():
    from canopy_entropy.plots.fig_diagnostics import fig_token_calibration

    frame = pd.DataFrame({"model": ["m"] * 3, "p": [0.9, 0.1, 0.5], "entropy": [0.1, 2.0, 1.0],
                          "relative_rank": [-0.5, 1.5, 0.0]})  # fmt: skip
    fig = fig_token_calibration(frame)
    norm = fig.axes[0].collections[0].norm
    assert norm.vcenter == 0.0 and norm(0.0) == pytest.approx(0.5)  # diverging around 0
    with pytest.raises(CanopyError, match="lacks \\['policy_p'"):
        fig_token_calibration(frame, prefix="policy_")


# -- paired comparison -------------------------------------------------------------------------


def test_paired_bootstrap_of_two_models_matches_an_explicit_resampling_loop(scored):
    from canopy_entropy.comparison import bootstrap_indices
    from canopy_entropy.diagnostics import compare_answers

    answers = read_table(
        scored / "diagnostics" / "answers.parquet", ANSWERS_SCHEMA_VERSION
    ).to_pandas()
    answers = answers[answers["prompt_id"] != "q3"]
    answers = pd.concat([answers, answers[(answers["model"] == "tiny-instruct")].iloc[[0]]
                         .assign(prompt_id="lonely")])  # fmt: skip
    with pytest.warns(UserWarning, match="1 answers have no partner"):
        table = compare_answers(answers, "tiny-base", "tiny-instruct", n_boot=300, seed=4)
    base, inst = (
        answers[answers["model"] == m].set_index(["task", "prompt_id"])
        for m in ("tiny-base", "tiny-instruct")
    )
    for task in ("math", "story", "(all)"):
        keys = sorted(k for k in base.index if k in inst.index and task in (k[0], "(all)"))
        for stat in ("mean_nll", "mean_relative_rank", "share_above_expected"):
            va = base.loc[keys, stat].to_numpy()
            vb = inst.loc[keys, stat].to_numpy()
            idx = bootstrap_indices(len(keys), 300, 4, ("tiny-base", "tiny-instruct", task))
            reps = np.array([np.mean(vb[i] - va[i]) for i in idx])
            row = table[(table["task"] == task) & (table["statistic"] == stat)].iloc[0]
            assert row["prompts"] == len(keys)
            assert row["diff"] == pytest.approx(vb.mean() - va.mean())
            assert row["se"] == pytest.approx(np.std(reps, ddof=1), rel=1e-9)
            assert (row["ci_lo"], row["ci_hi"]) == pytest.approx(
                tuple(np.quantile(reps, [0.025, 0.975]))
            )
    with pytest.raises(CanopyError, match="no scored answers of model 'nope'"):
        compare_answers(answers, "tiny-base", "nope")


def test_a_model_whose_logits_are_not_its_output_layer_is_refused(tiny_model, tmp_path):
    """The chunked output layer is checked against the model's own logits at the last position:
    a logit transform the head does not know (here a soft cap the Llama forward never applies)
    is a one-line error, not silently different numbers."""
    from canopy_entropy.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model), device="cpu")
    engine.model.config.final_logit_softcapping = 1.0
    with pytest.raises(CanopyError, match="not supported by 'score'"):
        score_run(
            tmp_path / "run", model=str(tiny_model), answers=ANSWERS[:1], engine_instance=engine
        )
    assert not (tmp_path / "run").exists()
