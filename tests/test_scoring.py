"""Scorers against hand-labelled cases; estimators against brute force and scikit-learn."""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import sys
import textwrap
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from canopy_entropy.scoring import (
    BUILTIN_SCORERS,
    CodeExecutionDisabled,
    ScoringError,
    accuracy_by_bin,
    auroc,
    average_precision,
    choice_match,
    exact_match,
    extract_choice,
    extract_number,
    load_scorer,
    majority_vote,
    numeric_match,
    pass_at_k,
    pool_correctness,
    prompt_correctness,
    regex_match,
    score_frame,
    scorer_version,
    uncertainty_link,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the test oracle")

# ---------------------------------------------------------------------------------------
# numeric answers: (response, reference, verdict), labelled by hand
# ---------------------------------------------------------------------------------------
NUMERIC_CASES = [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", 18, True),
    ("#### 1,234", 1234, True),
    ("#### 1,234", "1234", True),
    ("The total is $18.00.", 18, True),
    ("It costs $1,250.50 in all.", Fraction(2501, 2), True),
    ("He ran 42 km.", 42, True),
    ("So the answer is 42.", 42, True),
    ("The answer is 6 because 2 * 3 = 6, and 7 is wrong", 6, True),  # answer phrase wins
    ("Answer: -3", -3, True),
    ("x = −7", -7, True),  # Unicode minus
    ("3 - 5 = -2", -2, True),
    ("3-5", -5, False),  # a binary minus is no sign: the answer read is 5
    ("3-5", 5, True),
    ("\\boxed{\\frac{3}{4}}", 0.75, True),
    ("The result is \\boxed{1{,}000} apples.", 1000, True),
    ("so it is $\\boxed{5 \\text{ dollars}}$", 5, True),
    ("Half: 1/2", 0.5, True),
    ("That makes .5 of the cake", Fraction(1, 2), True),
    ("0.1 + 0.2 = 0.3", 0.3, True),  # exact decimals, not binary floats
    ("The answer is 0.333", Fraction(1, 3), False),  # no rounding tolerance
    ("Percent: 50%", 50, True),
    ("1\\,000 people", 1000, True),
    ("1,2,3", 3, True),  # a list, not a thousands number
    ("#### 72\n\nQuestion: John has 5 apples. #### 5", 72, True),  # the first #### counts
    ("There were 12 eggs, 5 broken, so 7 remain", 7, True),  # last number fallback
    ("There were 12 eggs, 5 broken, so 7 remain", 12, False),
    ("I do not know.", 4, False),
    ("twelve", 12, False),  # words are not read
    ("#### 18\n", "Janet sells 16 - 3 - 4 = 9 eggs ... #### 18", True),  # GSM8K reference
    ("3/0 apples", 3, True),  # a zero denominator: the numerator is read
    ("42.", Decimal("42"), True),
    ("4.20", 4.2, True),
    ("#### -0", 0, True),
]


@pytest.mark.parametrize(("response", "reference", "verdict"), NUMERIC_CASES)
def test_numeric_match_hand_labelled(response, reference, verdict):
    assert numeric_match(response, reference) is verdict


def test_numeric_table_is_large_enough():
    assert len(NUMERIC_CASES) >= 25


def test_extract_number_values_and_key():
    assert extract_number("#### 1,234.50") == Fraction(246900, 200)
    assert extract_number("nothing here") is None
    assert extract_number("\\boxed{}") is None
    assert numeric_match.extract("So $18.00.") == "18"
    assert numeric_match.extract("3/4 of it") == "3/4"


@pytest.mark.parametrize("reference", [True, float("nan"), "no number", None, float("inf")])
def test_numeric_bad_reference_raises(reference):
    with pytest.raises(ScoringError, match="reference"):
        numeric_match("42", reference)


def test_numeric_reference_types():
    assert numeric_match("7", np.int64(7))
    assert numeric_match("0.25", np.float32(0.25))
    assert numeric_match("2/3", Fraction(2, 3))


# ---------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------
OPTIONS = ["London", "Paris", "Berlin", "Rome"]
CHOICE_CASES = [
    ("B", "B", True),
    ("(B)", "B", True),
    ("B.", "B", True),
    ("B) Paris", "B", True),
    ("Answer: B", "B", True),
    ("The answer is (c).", "C", True),
    ("answer: b.", "B", True),
    ("ANSWER: [d]", "D", True),
    ("The correct option is B", "B", True),
    ("Option A is wrong, so the answer is B", "B", True),  # the answer phrase wins
    ("A dog barks. The answer is B", "B", True),  # "A" as an article is no answer
    ("I think (A) or (B)", "A", False),  # a hedge names no option
    ("Paris", "B", True),  # the option's text
    ("It must be paris!", 1, True),  # 0-based index
    ("It must be Paris", "Paris", True),  # reference given as text
    ("Paris, not London", "B", False),  # two options named
    ("The answer is (E)", "B", False),  # E is not an option
    ("Berlin", "2", True),  # HellaSwag stores the label as "2"
    ("the answer is a city in France", "B", False),
    ("A dog barks loudly.", "A", False),  # an opening article is no letter
    ("", "A", False),
]


@pytest.mark.parametrize(("response", "reference", "verdict"), CHOICE_CASES)
def test_choice_match_hand_labelled(response, reference, verdict):
    assert choice_match(response, reference, options=OPTIONS) is verdict


def test_choice_without_options_and_nested_texts():
    assert choice_match("Answer: (H)", "H")
    assert not choice_match("Paris", "B")  # no options: a text cannot be read
    nested = ["red", "dark red", "blue"]
    assert extract_choice("It is dark red.", nested) == "B"  # the longer text contains the other
    assert extract_choice("red or blue", nested) is None


@pytest.mark.parametrize("reference", ["Z", 7, "Madrid", True])
def test_choice_bad_reference_raises(reference):
    with pytest.raises(ScoringError, match="multiple-choice reference"):
        choice_match("A", reference, options=OPTIONS)


# ---------------------------------------------------------------------------------------
# exact and regex match
# ---------------------------------------------------------------------------------------
EXACT_CASES = [
    ("  Paris ", "paris", {}, True),
    ("New   York\n", "new york", {}, True),
    ("Paris", "paris", {"ignore_case": False}, False),
    ("Paris!", "Paris", {}, False),
    ("Paris!", "Paris", {"ignore_punctuation": True}, True),
    ("ﬁne", "fine", {}, True),  # NFKC folds the ligature
    ("Lyon", ["Paris", "Lyon"], {}, True),
    ("Nice", ["Paris", "Lyon"], {}, False),
]


@pytest.mark.parametrize(("response", "reference", "opts", "verdict"), EXACT_CASES)
def test_exact_match_hand_labelled(response, reference, opts, verdict):
    assert exact_match(response, reference, **opts) is verdict


REGEX_CASES = [
    ("The capital is Paris.", r"\bParis\b", {}, True),
    ("Parisian food", r"\bParis\b", {}, False),
    ("PARIS", r"paris", {"flags": 2}, True),  # re.IGNORECASE
    ("Final: 12. Final: 13", "13", {"pattern": r"Final: (\d+)"}, True),  # the last match
    ("Final: 12. Final: 13", "12", {"pattern": r"Final: (\d+)"}, False),
    ("no final line", "12", {"pattern": r"Final: (\d+)"}, False),
    ("ANSWER=yes", "YES", {"pattern": r"ANSWER=\w+"}, False),  # group 0: the whole match
    ("ANSWER=yes", "answer=yes", {"pattern": r"ANSWER=\w+"}, True),
]


@pytest.mark.parametrize(("response", "reference", "opts", "verdict"), REGEX_CASES)
def test_regex_match_hand_labelled(response, reference, opts, verdict):
    assert regex_match(response, reference, **opts) is verdict


def test_bad_text_references_raise():
    with pytest.raises(ScoringError, match="invalid regular expression"):
        regex_match("x", "(")
    with pytest.raises(ScoringError, match="not a text"):
        exact_match("x", [])


# ---------------------------------------------------------------------------------------
# custom scorers and versions
# ---------------------------------------------------------------------------------------
@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    """A module ``my_scorers`` on sys.path; returns a function that rewrites it."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(body: str) -> None:
        (tmp_path / "my_scorers.py").write_text(textwrap.dedent(body))
        importlib.invalidate_caches()
        sys.modules.pop("my_scorers", None)

    write(
        """
        def loose(response, reference):
            return reference.lower() in response.lower()

        class Grader:
            @staticmethod
            def score(response, reference):
                return 0.5

        NOT_A_FUNCTION = 3

        def one_arg(response):
            return True
        """
    )
    yield write
    sys.modules.pop("my_scorers", None)


def test_load_scorer_builtin_and_entry_point(scorer_module):
    assert load_scorer("numeric_match") is numeric_match
    assert set(BUILTIN_SCORERS) >= {"numeric_match", "choice_match", "code_passes"}
    loose = load_scorer("my_scorers:loose")
    assert loose("It is PARIS", "paris") is True
    assert load_scorer("my_scorers:Grader.score")("x", "y") == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("numeric", "unknown scorer 'numeric'"),
        ("my_scorers:", "not of the form 'module:function'"),
        (":loose", "not of the form 'module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("my_scorers:missing", "has no 'missing'"),
        ("my_scorers:NOT_A_FUNCTION", "is a int, not a function"),
        ("my_scorers:one_arg", r"cannot be called as f\(response, reference\)"),
        ("", "is not a name"),
    ],
)
def test_load_scorer_errors_are_one_line(scorer_module, spec, message):
    with pytest.raises(ScoringError, match=message) as info:
        load_scorer(spec)
    assert "\n" not in str(info.value)


def test_load_scorer_broken_module(scorer_module):
    scorer_module("def loose(response, reference)\n    return True\n")
    with pytest.raises(ScoringError, match="SyntaxError"):
        load_scorer("my_scorers:loose")


def test_scorer_version_tracks_source_and_options(scorer_module):
    v1 = scorer_version(load_scorer("my_scorers:loose"))
    assert v1.startswith("my_scorers:loose@")
    assert scorer_version(load_scorer("my_scorers:loose")) == v1  # stable
    scorer_module("def loose(response, reference):\n    return reference in response\n")
    assert scorer_version(load_scorer("my_scorers:loose")) != v1  # the logic changed
    base = scorer_version(exact_match)
    opt = scorer_version(exact_match, ignore_case=False)
    assert opt != base and opt.startswith(base) and '"ignore_case": false' in opt
    assert scorer_version(functools.partial(exact_match, ignore_case=False)) == opt
    # running the code is not part of its verdict
    assert "execute_code" not in scorer_version(BUILTIN_SCORERS["code_passes"], execute_code=True)


def test_scorer_version_declared_attribute():
    def fn(response, reference):
        return True

    fn.__canopy_version__ = "v7"
    assert scorer_version(fn).endswith("@v7")


# ---------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------
def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n rollouts (the first c correct) with a correct rollout."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = float(brute_pass_at_k(n, c, k))
                assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-13, abs=1e-15)


def test_pass_at_k_vectorised_and_large_n():
    n = np.array([8, 8, 5, 2000, 2000])
    c = np.array([0, 3, 5, 1, 3])
    got = pass_at_k(n, c, 2)
    exact = [1 - Fraction(math.comb(a - b, 2), math.comb(a, 2)) for a, b in zip(n, c, strict=True)]
    np.testing.assert_allclose(got, [float(x) for x in exact], rtol=1e-13)
    # a tiny probability keeps its relative precision (no 1 - (1 - eps) cancellation)
    tiny = 1 - Fraction(math.comb(10**6 - 1, 1), math.comb(10**6, 1))
    assert pass_at_k(10**6, 1, 1) == pytest.approx(float(tiny), rel=1e-12)
    assert pass_at_k(1, 0, 1) == 0.0 and math.copysign(1, pass_at_k(5, 0, 2)) == 1.0


@pytest.mark.parametrize(
    ("n", "c", "k"), [(3, 4, 1), (3, -1, 1), (3, 1, 4), (3, 1, 0), (3, 1.5, 1)]
)
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ScoringError):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------
# AUROC / AUPRC against scikit-learn and Mann-Whitney
# ---------------------------------------------------------------------------------------
def mann_whitney_auc(u, bad) -> float:
    pos, neg = u[bad], u[~bad]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_auprc_match_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    n = 300
    u = rng.normal(size=n)
    if tied:
        u = np.round(u * 2) / 2  # a handful of distinct values: many ties
    bad = rng.random(n) < 1 / (1 + np.exp(-u))
    assert auroc(u, bad) == pytest.approx(sklearn_metrics.roc_auc_score(bad, u), abs=1e-12)
    assert auroc(u, bad) == pytest.approx(mann_whitney_auc(u, bad), abs=1e-12)
    ap = sklearn_metrics.average_precision_score(bad, u)
    assert average_precision(u, bad) == pytest.approx(ap, abs=1e-12)
    w = rng.integers(0, 4, size=n).astype(float)
    assert auroc(u, bad, sample_weight=w) == pytest.approx(
        sklearn_metrics.roc_auc_score(bad, u, sample_weight=w), abs=1e-12
    )
    assert average_precision(u, bad, sample_weight=w) == pytest.approx(
        sklearn_metrics.average_precision_score(bad, u, sample_weight=w), abs=1e-12
    )


def test_auroc_weights_for_all_bootstrap_replicates_at_once():
    rng = np.random.default_rng(5)
    code = np.repeat(np.arange(6), 5)  # 6 prompts x 5 rollouts
    u = rng.normal(size=30).round(1)
    bad = rng.random(30) < 0.4
    counts = rng.multinomial(6, np.full(6, 1 / 6), size=8).astype(float)  # 8 replicates
    weights = counts[:, code]
    got_roc, got_ap = auroc(u, bad, weights), average_precision(u, bad, weights)
    assert got_roc.shape == got_ap.shape == (8,)
    for r in range(8):
        rows = np.repeat(np.arange(30), weights[r].astype(int))  # the resampled rollouts
        if len(set(bad[rows])) < 2:
            assert np.isnan(got_roc[r])
            continue
        assert got_roc[r] == pytest.approx(mann_whitney_auc(u[rows], bad[rows]), abs=1e-12)
        expected_ap = sklearn_metrics.average_precision_score(bad[rows], u[rows])
        assert got_ap[r] == pytest.approx(expected_ap, abs=1e-12)


def test_auroc_one_class_is_nan_and_bad_input_raises():
    assert np.isnan(auroc([0.1, 0.2], [0, 0]))
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))
    assert np.isnan(average_precision([0.1, 0.2], [0, 0]))
    assert average_precision([0.1, 0.2], [1, 1]) == 1.0
    with pytest.raises(ScoringError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ScoringError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])


# ---------------------------------------------------------------------------------------
# per-prompt and pooled correctness, majority vote
# ---------------------------------------------------------------------------------------
def _rollouts(rng, n_prompts=5, m=6, models=("m1",)):
    rows = []
    for model in models:
        for p in range(n_prompts):
            for i in range(m):
                rows.append(
                    {
                        "model": model,
                        "variant": "base",
                        "family": "f",
                        "task": "math",
                        "prompt_id": f"p{p}",
                        "rollout_index": i,
                        "correct": bool(rng.random() < (p + 1) / (n_prompts + 1)),
                        "rate": float(rng.gamma(2.0)),
                        "H": float(rng.gamma(5.0)),
                    }
                )
    return pd.DataFrame(rows)


def test_prompt_correctness_against_loops():
    rng = np.random.default_rng(3)
    frame = _rollouts(rng).sample(frac=1.0, random_state=1)  # order must not matter
    frame["score"] = frame["correct"].astype(float) * 0.75 + 0.25 * rng.random(len(frame))
    out = prompt_correctness(frame, ks=(1, 3, 6))
    for _, row in out.iterrows():
        mine = frame[frame["prompt_id"] == row["prompt_id"]]
        n, c = len(mine), int(mine["correct"].sum())
        assert (row["n_rollouts"], row["n_correct"]) == (n, c)
        assert row["accuracy"] == pytest.approx(c / n)
        assert row["mean_score"] == pytest.approx(mine["score"].mean())
        for k in (1, 3, 6):
            assert row[f"pass_at_{k}"] == pytest.approx(float(brute_pass_at_k(n, c, k)))
    pooled = pool_correctness(out)
    assert pooled["n_prompts"].tolist() == [5]
    assert pooled["pass_at_3"].iloc[0] == pytest.approx(out["pass_at_3"].mean())
    assert pooled["accuracy"].iloc[0] == pytest.approx(out["accuracy"].mean())


def test_pass_at_k_beyond_the_rollouts_warns():
    frame = _rollouts(np.random.default_rng(0), m=3)
    with pytest.warns(UserWarning, match=r"pass@5 is undefined for 5 of 5 prompts"):
        out = prompt_correctness(frame, ks=(5,))
    assert out["pass_at_5"].isna().all()


def test_majority_vote_hand_cases():
    codes = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    answers = ["7", "7", "8", "7", "8", "7", "8", None, None, "5", None, None]
    correct = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0], bool)
    # 0: "7" wins 2-1 and is right; 1: a 2-2 tie of a right and a wrong answer = 0.5;
    # 2: no answers at all = 0; 3: the only answer is wrong (blanks do not vote)
    np.testing.assert_array_equal(majority_vote(codes, answers, correct, 4), [1, 0.5, 0, 0])


def test_majority_column_from_answers():
    frame = _rollouts(np.random.default_rng(0), n_prompts=2, m=3)
    frame["answer"] = ["1", "1", "2", "3", "4", "4"]
    frame["correct"] = [False, False, True, True, False, False]
    out = prompt_correctness(frame)
    assert out["majority"].tolist() == [0.0, 0.0]
    assert out["accuracy"].tolist() == pytest.approx([1 / 3, 1 / 3])


# ---------------------------------------------------------------------------------------
# the uncertainty link
# ---------------------------------------------------------------------------------------
def test_uncertainty_link_pools_all_rollouts_of_a_group():
    frame = _rollouts(np.random.default_rng(4), n_prompts=8, m=10, models=("m1", "m2"))
    out = uncertainty_link(frame)
    assert set(out["measure"]) == {"rate", "H"}  # the defaults present in the frame
    for _, row in out.iterrows():
        g = frame[frame["model"] == row["model"]]
        bad = ~g["correct"].to_numpy()
        u = g[row["measure"]].to_numpy()
        assert row["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(bad, u), abs=1e-12)
        expected = sklearn_metrics.average_precision_score(bad, u)
        assert row["auprc"] == pytest.approx(expected, abs=1e-12)
        assert row["n_rollouts"] == 80 and row["n_incorrect"] == bad.sum()
        assert row["incorrect_rate"] == pytest.approx(bad.mean())


def test_uncertainty_link_missing_values_warn():
    frame = _rollouts(np.random.default_rng(4))
    frame["surprisal"] = np.nan
    frame.loc[:4, "surprisal"] = 1.0
    with pytest.warns(UserWarning, match="'surprisal' is missing for 25 of 30 rollouts"):
        out = uncertainty_link(frame, ["surprisal"])
    assert out["n_rollouts"].tolist() == [5]
    with pytest.raises(ScoringError, match="lacks columns"):
        uncertainty_link(frame, ["rse"])


def test_accuracy_by_decile():
    rng = np.random.default_rng(9)
    frame = _rollouts(rng, n_prompts=10, m=10)
    frame["rate"] = rng.permutation(100) / 10.0  # 100 distinct values: 10 per decile
    out = accuracy_by_bin(frame, "rate")
    assert out["bin"].tolist() == list(range(10)) and (out["n_rollouts"] == 10).all()
    order = frame.sort_values("rate")
    for b in range(10):
        chunk = order.iloc[10 * b : 10 * b + 10]
        row = out.iloc[b]
        assert row["accuracy"] == pytest.approx(chunk["correct"].mean())
        assert (row["lo"], row["hi"]) == (chunk["rate"].min(), chunk["rate"].max())


def test_accuracy_by_bin_keeps_ties_together():
    frame = _rollouts(np.random.default_rng(2), n_prompts=2, m=5)
    frame["rate"] = [0.0] * 6 + [1.0, 2.0, 3.0, 4.0]
    out = accuracy_by_bin(frame, "rate", n_bins=4)
    # quartile edges of [0]*6 + [1, 2, 3, 4] are 0, 0 and 1.75: the six zeros share the bin
    # [0, 1.75) with the 1; the first two bins are empty and omitted
    assert out["bin"].tolist() == [2, 3]
    assert out["n_rollouts"].tolist() == [7, 3]
    assert out[["lo", "hi"]].to_numpy().tolist() == [[0.0, 1.0], [2.0, 4.0]]
    correct = frame["correct"].to_numpy()
    assert out["accuracy"].tolist() == pytest.approx([correct[:7].mean(), correct[7:].mean()])


# ---------------------------------------------------------------------------------------
# score_frame
# ---------------------------------------------------------------------------------------
def test_score_frame_columns_dedup_and_version():
    calls = []

    def counting(response, reference):
        calls.append((response, reference))
        return numeric_match(response, reference)

    counting.extract = numeric_match.extract
    frame = pd.DataFrame(
        {
            "prompt_id": ["a", "a", "a", "b"],
            "text": ["#### 5", "#### 5", "so 6", "#### 5"],
            "reference": [5, 5, 5, 6],
        }
    )
    out = score_frame(frame, counting)
    assert out["correct"].tolist() == [True, True, False, False]
    assert out["score"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out["answer"].tolist() == ["5", "5", "6", "5"]
    assert len(calls) == 3  # the repeated (response, reference) pair is scored once
    assert out["scorer_version"].nunique() == 1
    assert out.attrs["scorer_version"] == out["scorer_version"].iloc[0] == scorer_version(counting)
    assert "correct" not in frame.columns  # the input is left alone


def test_score_frame_by_name_with_option_columns():
    frame = pd.DataFrame(
        {
            "text": ["Answer: B", "Paris", "(A)"],
            "label": [1, "B", 0],
            "choices": [OPTIONS, OPTIONS, ["yes", "no"]],
        }
    )
    out = score_frame(frame, "choice_match", "label", option_cols={"options": "choices"})
    assert out["correct"].tolist() == [True, True, True]
    assert out["answer"].tolist() == ["B", "B", "A"]


def test_score_frame_threshold_for_partial_scores():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "reference": [0.2, 0.5, 1.0]})
    out = score_frame(frame, _echo_score, threshold=0.5)
    assert out["score"].tolist() == [0.2, 0.5, 1.0]
    assert out["correct"].tolist() == [False, True, True]
    assert out["answer"].isna().all()  # no extractor: no answers to vote on


def _echo_score(response, reference):
    return reference


@pytest.mark.parametrize(
    ("frame", "scorer", "message"),
    [
        (pd.DataFrame({"text": ["1"]}), numeric_match, r"no columns \['reference'\]"),
        (pd.DataFrame({"text": [None], "reference": [1]}), numeric_match, "'text' is empty"),
        (pd.DataFrame({"text": ["1"], "reference": [np.nan]}), numeric_match, "'reference' is"),
        (pd.DataFrame({"text": ["1"], "reference": ["x"]}), numeric_match, "row 0: numeric"),
        (pd.DataFrame({"text": ["1"], "reference": [2.0]}), _echo_score, "returned 2.0"),
        (pd.DataFrame({"text": ["1"], "reference": [0]}), lambda r, s: 1 / s, "ZeroDivision"),
    ],
)
def test_score_frame_errors(frame, scorer, message):
    with pytest.raises(ScoringError, match=message):
        score_frame(frame, scorer)


def test_score_frame_code_scorer_needs_opt_in():
    frame = pd.DataFrame({"text": ["x = 1"], "reference": ["assert x == 1"]})
    with pytest.raises(CodeExecutionDisabled, match=r"\[scoring\] execute_code = true"):
        score_frame(frame, "code_passes")
