"""Metrics against hand-computed values and an independent per-prompt implementation."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats
from scipy.special import entr

from canopy_entropy.errors import CanopyError
from canopy_entropy.metrics import (
    METRIC_COLUMNS,
    compute_metrics,
    load_metrics_json,
    per_rollout_frame,
    write_metrics,
)
from canopy_entropy.run.manifest import Manifest, ModelRecord, PolicyRecord, write_manifest
from canopy_entropy.store import RunStore, atomic_write_table
from metrics_helpers import make_rollouts

PROMPT_A = [[1.0, 0.5], [0.5, 0.5, 0.5, 0.5], [2.0], [1.0, 1.0, 0.25]]
EOS_A = [[0.25, 0.5], [0.0, 0.25, 0.25, 0.5], [0.5], [0.25, 0.25, 0.5]]


def h2(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p) if 0 < p < 1 else 0.0


@pytest.fixture
def prompt_a() -> pd.Series:
    table = make_rollouts(
        {"a": PROMPT_A},
        eos={"a": EOS_A},
        logprob={"a": [[-2.0] * len(e) for e in PROMPT_A]},
    )
    return compute_metrics(table, h_max=math.log(10), warn=False).prompts.iloc[0]


def test_hand_computed_prompt(prompt_a):
    row = prompt_a
    # H = 1.5, 2, 2, 2.25; N = 2, 4, 1, 3; r = .75, .5, 2, .75
    assert row["ce_star"] == 1.9375
    assert row["mean_length"] == 2.5
    assert row["entropy_rate"] == 1.0
    assert row["genppl"] == pytest.approx(math.exp(1.9375 / 2.5), rel=1e-15)
    assert row["bf"] == pytest.approx(math.e, rel=1e-15)
    assert row["ce_star_surprisal"] == 5.0
    assert row["truncation_rate"] == 0.0
    assert row["pearson"] == pytest.approx(-2.25 / math.sqrt(5 * 1.375), rel=1e-14)
    assert row["spearman"] == pytest.approx(-4.5 / math.sqrt(5 * 4.5), rel=1e-14)  # mid-ranks
    assert row["kendall"] == pytest.approx(-5 / math.sqrt(6 * 5), rel=1e-14)  # tau-b, 1 tie
    assert row["covariance"] == pytest.approx(-0.75, rel=1e-14)
    assert row["within_cov_term"] == pytest.approx(-0.5625, rel=1e-14)
    assert row["rate_length_term"] == 2.5
    assert row["rate_length_term"] + row["within_cov_term"] == pytest.approx(1.9375, rel=1e-15)
    # SPEC identity: ln GenPPL - ln BF = Cov_pop(N, r) / Nbar
    assert math.log(row["genppl"]) - math.log(row["bf"]) == pytest.approx(-0.5625 / 2.5)
    stop = (h2(0.25) + h2(0.5) + (2 * h2(0.25) + h2(0.5)) + h2(0.5) + (2 * h2(0.25) + h2(0.5))) / 4
    assert row["stop_entropy"] == pytest.approx(stop, rel=1e-12)
    assert row["stop_entropy_share"] == pytest.approx(stop / 1.9375, rel=1e-12)
    # no cap known: leftover 0.1875; the fitted P(N > 4) = 1/4 * (1 - 0.5) spreads geometrically
    # (EOS hazard 0.5 above u = 3) over 5, 6, ...; the other 0.0625 stays one outcome
    p_hat = [0.25, 0.25, 0.1875, 0.125]
    law = np.array([*p_hat, *(0.125 * 0.5**j for j in range(1, 200)), 0.0625])
    assert row["length_entropy"] == pytest.approx(entr(law).sum(), rel=1e-12)
    assert row["length_entropy_hist"] == pytest.approx(math.log(4), rel=1e-15)
    assert row["content_entropy"] == pytest.approx(1.9375 - row["length_entropy"], rel=1e-14)
    s2 = 0.296875 / 3
    assert row["ce_star_var_within"] == pytest.approx(s2 / 4, rel=1e-14)
    assert row["ce_star_se"] == pytest.approx(math.sqrt(s2 / 4), rel=1e-14)
    assert row["chebyshev_bound"] == pytest.approx(math.sqrt(s2 / 4 / 0.05), rel=1e-14)
    assert row["truncation_bias_bound"] == 0.0  # the fitted hazard above u is 1: no tail
    assert row["n_rollouts"] == 4 and row["n_prompts"] == 1


def test_truncated_prompt_histogram_and_bias_bound():
    lengths = [1, 3, 4, 6, 6, 6, 2, 5]
    finish = ["eos", "eos", "eos", "length", "length", "length", "eos", "eos"]
    table = make_rollouts({"b": [[0.5] * n for n in lengths]}, finish={"b": finish})
    result = compute_metrics(table, h_max=math.log(10), warn=False)
    row = result.prompts.iloc[0]
    assert row["truncation_rate"] == 3 / 8
    assert row["length_entropy_hist"] == pytest.approx(
        5 / 8 * math.log(8) + 3 / 8 * math.log(8 / 3), rel=1e-14
    )
    assert math.isnan(row["length_entropy"])  # no eos_prob recorded
    assert row["content_entropy"] == pytest.approx(row["ce_star"] - row["length_entropy_hist"])
    # u = 4 (below the longest EOS stop); above u: one stop in 7 steps at risk; P(N > 4) = 1/2
    tail = 0.5 * (6 / 7) ** 2 / (1 / 7)
    assert row["truncation_bias_bound"] == pytest.approx(math.log(10) * tail, rel=1e-12)
    assert any("length cap" in n for n in result.notes[("m", "base", "t")])


def test_hazard_law_with_cut_rollouts_has_a_rest_outcome():
    table = make_rollouts(
        {"c": [[0.5, 0.5], [0.5, 0.5]]},
        eos={"c": [[0.5, 0.5], [0.25, 0.25]]},
        finish={"c": ["eos", "length"]},
    )
    row = compute_metrics(table, warn=False).prompts.iloc[0]
    law = np.array([0.375, 0.375, 0.25])
    assert row["length_entropy"] == pytest.approx(entr(law).sum(), rel=1e-14)


def test_greedy_single_rollout_and_constant_columns():
    table = make_rollouts(
        {
            "greedy": [[0.0, 0.0, 0.0], [0.0] * 5],
            "single": [[0.5, 0.5]],
            "const_n": [[0.5, 1.0], [0.25, 0.25], [1.0, 2.0], [0.5, 0.5], [2.0, 0.0]],
        }
    )
    result = compute_metrics(table, warn=False)
    p = result.prompts.set_index("prompt_id")
    g = p.loc["greedy"]
    assert g["ce_star"] == 0 and g["genppl"] == 1 and g["bf"] == 1 and g["entropy_rate"] == 0
    assert math.isnan(g["pearson"]) and math.isnan(g["spearman"]) and math.isnan(g["kendall"])
    assert g["covariance"] == 0.0  # defined: one side constant
    assert math.isnan(g["stop_entropy_share"])
    s = p.loc["single"]
    assert s["ce_star"] == 1.0 and s["n_rollouts"] == 1
    for col in ("pearson", "spearman", "kendall", "covariance", "ce_star_se"):
        assert math.isnan(s[col]), col
    c = p.loc["const_n"]  # every length is 2: correlations undefined
    assert math.isnan(c["pearson"]) and math.isnan(c["kendall"])
    pooled = result.pooled.iloc[0]
    # all correlations NaN -> pooled NaN; covariance: greedy (0, weight 1) and const_n (0)
    assert math.isnan(pooled["pearson"]) and math.isnan(pooled["kendall"])
    assert pooled["covariance"] == 0.0
    # SE: three prompts; the within part comes from the two prompts with M > 1
    ce = np.array([p.loc[k, "ce_star"] for k in ("const_n", "greedy", "single")])
    h_const = [1.5, 0.5, 3.0, 1.0, 2.0]
    within = (np.var(h_const, ddof=1) / 5 + 0.0 / 2) / 2 / 3
    between = max(np.var(ce, ddof=1) - within * 3, 0) / 3
    assert pooled["ce_star_var_within"] == pytest.approx(within, rel=1e-14)
    assert pooled["ce_star_var_between"] == pytest.approx(between, rel=1e-14)
    assert pooled["ce_star_se"] == pytest.approx(math.sqrt(within + between), rel=1e-14)
    notes = result.notes[("m", "base", "t")]
    assert any("1 prompts have one rollout" in n and "from the 2 prompts" in n for n in notes)


def test_pooling_rules_and_decomposition():
    rng = np.random.default_rng(4)
    prompts = {}
    for k, m in enumerate([3, 3, 12, 25]):
        prompts[f"p{k}"] = [
            rng.choice([0.25, 0.5, 1.0, 1.5], size=rng.integers(1, 9)).tolist() for _ in range(m)
        ]
    result = compute_metrics(make_rollouts(prompts), warn=False)
    p = result.prompts
    pooled = result.pooled.iloc[0]
    n = p["n_rollouts"].to_numpy(float)
    assert pooled["ce_star"] == pytest.approx(p["ce_star"].mean(), rel=1e-15)
    assert pooled["genppl"] == pytest.approx(
        math.exp(p["ce_star"].mean() / p["mean_length"].mean()), rel=1e-14
    )
    assert pooled["bf"] == pytest.approx(math.exp(p["entropy_rate"].mean()), rel=1e-14)
    z = np.arctanh(p["pearson"].to_numpy())
    w = np.maximum(n - 3, 0)
    assert pooled["pearson"] == pytest.approx(math.tanh((w * z).sum() / w.sum()), rel=1e-12)
    wk = n * (n - 1) / 2
    assert pooled["kendall"] == pytest.approx((wk * p["kendall"]).sum() / wk.sum(), rel=1e-12)
    wc = n - 1
    assert pooled["covariance"] == pytest.approx((wc * p["covariance"]).sum() / wc.sum())
    total = pooled["rate_length_term"] + pooled["within_cov_term"] + pooled["between_cov_term"]
    assert total == pytest.approx(pooled["ce_star"], rel=1e-14)
    nb, rb = p["mean_length"].to_numpy(), p["entropy_rate"].to_numpy()
    assert pooled["between_cov_term"] == pytest.approx(np.cov(nb, rb, ddof=0)[0, 1], rel=1e-12)
    # SE by method of moments (SPEC 5)
    s2w = np.array([np.var([sum(e) for e in prompts[k]], ddof=1) for k in sorted(prompts)])
    within = np.mean(s2w / n) / 4
    between = max(np.var(p["ce_star"], ddof=1) - np.mean(s2w / n), 0) / 4
    assert pooled["ce_star_var_within"] == pytest.approx(within, rel=1e-12)
    assert pooled["ce_star_var_between"] == pytest.approx(between, rel=1e-12, abs=1e-15)
    assert pooled["ce_star_se"] == pytest.approx(math.sqrt(within + between), rel=1e-12)


def test_fisher_fallback_when_every_prompt_has_three_rollouts():
    prompts = {
        "x": [[1.0], [0.25, 0.25], [0.5, 0.5, 1.0]],
        "y": [[0.5, 0.5], [1.0], [0.25, 0.25, 0.25]],
    }
    result = compute_metrics(make_rollouts(prompts), warn=False)
    rho = result.prompts["spearman"].to_numpy()
    z = np.arctanh(np.clip(rho, -0.999999, 0.999999))
    assert result.pooled.iloc[0]["spearman"] == pytest.approx(math.tanh(z.mean()), rel=1e-12)


def test_against_independent_per_prompt_implementation():
    """Random data with many ties against pandas groupby + scipy.stats, prompt by prompt."""
    rng = np.random.default_rng(0)
    prompts = {
        f"q{k}": [
            rng.choice([0.0, 0.5, 1.0, 2.0], size=rng.integers(1, 6)).tolist()
            for _ in range(rng.integers(2, 30))
        ]
        for k in range(15)
    }
    result = compute_metrics(make_rollouts(prompts), warn=False, batch_size=7)
    got = result.prompts.set_index("prompt_id")
    for pid, ents in prompts.items():
        H = np.array([sum(e) for e in ents])
        N = np.array([len(e) for e in ents], dtype=float)
        r = H / N
        row = got.loc[pid]
        assert row["ce_star"] == pytest.approx(H.mean(), rel=1e-14, abs=1e-15)
        assert row["entropy_rate"] == pytest.approx(r.mean(), rel=1e-14, abs=1e-15)
        const = np.ptp(N) == 0 or np.ptp(r) == 0
        if const:
            assert math.isnan(row["pearson"]) and math.isnan(row["kendall"])
            continue
        assert row["pearson"] == pytest.approx(stats.pearsonr(N, r)[0], rel=1e-10)
        assert row["spearman"] == pytest.approx(stats.spearmanr(N, r)[0], rel=1e-10)
        assert row["kendall"] == pytest.approx(stats.kendalltau(N, r)[0], rel=1e-10)
        assert row["covariance"] == pytest.approx(np.cov(N, r, ddof=1)[0, 1], rel=1e-10)
        lhs = math.log(row["genppl"]) - math.log(row["bf"])
        assert lhs == pytest.approx(np.cov(N, r, ddof=0)[0, 1] / N.mean(), abs=1e-12)


def test_streaming_batches_give_the_same_numbers(tmp_path):
    from canopy_entropy.reference import FiniteStateLM

    lm = FiniteStateLM.random(3, 5, seed=3, mean_eos=0.2)
    lm.sample_store(tmp_path, 6, 30, seed=1)
    whole = compute_metrics(tmp_path, warn=False, batch_size=100_000).prompts
    streamed = compute_metrics(tmp_path, warn=False, batch_size=13).prompts
    pd.testing.assert_frame_equal(whole, streamed, rtol=1e-13)


def test_per_rollout_frame_and_errors(tmp_path):
    table = make_rollouts({"a": PROMPT_A}, eos={"a": EOS_A})
    frame = per_rollout_frame(table)
    assert frame["H"].tolist() == [1.5, 2.0, 2.0, 2.25]
    assert frame["rate"].tolist() == [0.75, 0.5, 2.0, 0.75]
    assert frame["length"].tolist() == [2, 4, 1, 3]
    assert frame["stop_entropy"].iloc[2] == pytest.approx(math.log(2))
    assert frame["surprisal"].isna().all()
    with pytest.raises(CanopyError, match="appears twice"):
        compute_metrics(pa.concat_tables([table, table]), warn=False)
    with pytest.raises(CanopyError, match="cannot group by"):
        compute_metrics(table, by=("prompt",), warn=False)
    with pytest.raises(CanopyError, match="does not exist"):
        compute_metrics(tmp_path / "nope", warn=False)


def test_json_document_and_write_metrics(tmp_path):
    store = RunStore(tmp_path)
    for variant in ("base", "instruct"):
        t = make_rollouts(
            {"a": PROMPT_A, "b": [[0.5, 0.5], [1.0], [0.5, 0.25, 0.25], [1.0, 1.0], [2.0]]},
            variant=variant,
        )
        store.write_rollouts(variant, t)
    div = pd.DataFrame(
        {
            "model": "m",
            "variant": ["base", "base", "instruct", "instruct"],
            "family": "f",
            "task": "t",
            "prompt_id": ["a", "b", "a", "b"],
            "diversity": [0.2, 0.4, 0.1, 0.3],
            "vendi": [2.0, 8.0, 1.5, 3.0],
            "corr_length_d": [0.5, -0.2, 0.1, 0.3],
            "n_rollouts": [4, 5, 4, 5],
        }
    )
    atomic_write_table(
        tmp_path / "semantic" / "prompt_diversity.parquet",
        pa.Table.from_pandas(div),
        "canopy-prompt-diversity/1",
    )
    result = write_metrics(tmp_path, by=("variant",), warn=False)
    doc = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert [g["key"] for g in doc["groups"]] == [{"variant": "base"}, {"variant": "instruct"}]
    pooled = doc["groups"][0]["pooled"]
    assert set(METRIC_COLUMNS) <= set(pooled)
    assert pooled["diversity"] == pytest.approx(0.3)
    assert pooled["vendi"] == pytest.approx(4.0, rel=1e-15)  # geometric mean sqrt(2 * 8)
    assert result.pooled["vendi"].iloc[1] == pytest.approx(math.sqrt(4.5), rel=1e-15)
    n = np.array([4, 5])
    z = np.arctanh([0.5, -0.2]) * np.maximum(n - 3, 0)
    assert pooled["corr_length_d"] == pytest.approx(math.tanh(z.sum() / 3))
    assert pooled["ce_star_surprisal"] is None  # NaN -> null
    assert [p["prompt_id"] for p in doc["groups"][1]["prompts"]] == ["a", "b"]
    assert doc["groups"][1]["prompts"][0]["diversity"] == 0.1
    json.dumps(doc, allow_nan=False)
    saved = pd.read_parquet(tmp_path / "metrics" / "pooled.parquet")
    pd.testing.assert_frame_equal(saved, result.pooled)
    assert len(pd.read_parquet(tmp_path / "metrics" / "prompts.parquet")) == 4


def test_prompt_split_across_shards_matches_one_table(tmp_path):
    """Shards are reduced in parallel and merged: a prompt spread over shards is one prompt."""
    rng = np.random.default_rng(9)
    ents = [rng.random(rng.integers(1, 30)).round(3).tolist() for _ in range(40)]
    eos = [rng.random(len(e)).round(3).tolist() for e in ents]
    whole = make_rollouts({"a": ents, "b": ents[::-1]}, eos={"a": eos, "b": eos[::-1]})
    store = RunStore(tmp_path)
    for k, (lo, hi) in enumerate([(0, 25), (25, 60), (60, 80)]):
        store.write_rollouts(f"part{k}", whole.slice(lo, hi - lo))
    expected = compute_metrics(whole, warn=False).prompts
    got = compute_metrics(tmp_path, warn=False, batch_size=8).prompts
    pd.testing.assert_frame_equal(got, expected, rtol=1e-13)


def test_rows_without_eos_prob_do_not_disturb_other_prompts():
    """A batch mixing rollouts with and without eos_prob (gather path of the hazard sums)."""
    y = rollouts_table_mixed()
    x_alone = make_rollouts({"x": PROMPT_A}, eos={"x": EOS_A})
    mixed = pa.concat_tables([y.slice(0, 2), x_alone, y.slice(2)])
    got = compute_metrics(mixed, warn=False).prompts.set_index("prompt_id")
    alone = compute_metrics(x_alone, warn=False).prompts.iloc[0]
    assert got.loc["x", "length_entropy"] == alone["length_entropy"]
    assert got.loc["x", "stop_entropy"] == alone["stop_entropy"]
    assert math.isnan(got.loc["y", "length_entropy"])  # one of its rollouts has no eos_prob


def rollouts_table_mixed() -> pa.Table:
    from canopy_entropy.store import rollouts_table

    return rollouts_table(
        run="r",
        model="m",
        variant="base",
        family="f",
        task="t",
        prompt_id="y",
        rollout_index=[0, 1, 2],
        seed=[0, 0, 0],
        finish_reason=["eos"] * 3,
        entropy=[np.ones(3, np.float32), np.ones(2, np.float32), np.ones(4, np.float32)],
        eos_prob=[np.full(3, 0.2), None, np.full(4, 0.1)],
    )


def test_json_tells_an_infinite_bound_from_an_unknown_one(tmp_path):
    """Every rollout cut: nothing is known about the tail (bound inf); no H_max: unknown."""
    store = RunStore(tmp_path)
    for model in ("x", "y"):
        t = make_rollouts({"a": [[0.5] * 3] * 4}, finish={"a": ["length"] * 4}, model=model)
        store.write_rollouts(model, t)
    policy = PolicyRecord(max_new_tokens=3, top_k=10)
    record = ModelRecord("x", "x", "base", "x", "import", policy=policy)
    write_manifest(tmp_path, Manifest(models={"x": record}))
    write_metrics(tmp_path, by=("model",), warn=False)
    text = (tmp_path / "metrics" / "metrics.json").read_text()
    doc = json.loads(text)
    bounds = {g["key"]["model"]: g["pooled"]["truncation_bias_bound"] for g in doc["groups"]}
    assert bounds == {"x": "inf", "y": None}
    assert doc["groups"][0]["prompts"][0]["truncation_bias_bound"] == "inf"
    back = load_metrics_json(tmp_path / "metrics" / "metrics.json")
    x, y = back["groups"]
    assert x["pooled"]["truncation_bias_bound"] == math.inf
    assert math.isnan(y["pooled"]["truncation_bias_bound"])
    assert x["prompts"][0]["truncation_bias_bound"] == math.inf
    assert x["prompts"][0]["prompt_id"] == "a" and x["key"] == {"model": "x"}
    assert x["pooled"]["ce_star"] == 1.5


def test_one_single_rollout_prompt_keeps_the_se_split():
    """Dropping the M = 1 prompt's (unknown) within term; the rest of the split is intact."""
    rng = np.random.default_rng(8)
    prompts = {
        f"p{k}": [rng.choice([0.25, 0.5, 1.0, 1.5], rng.integers(1, 6)).tolist() for _ in range(6)]
        for k in range(5)
    }
    prompts["solo"] = [[0.5, 1.5]]
    pooled = compute_metrics(make_rollouts(prompts), warn=False).pooled.iloc[0]
    s2w_over_m = [np.var([sum(e) for e in prompts[f"p{k}"]], ddof=1) / 6 for k in range(5)]
    ce = [np.mean([sum(e) for e in prompts[k]]) for k in prompts]
    within = np.mean(s2w_over_m) / 6
    between = max(np.var(ce, ddof=1) - np.mean(s2w_over_m), 0) / 6
    assert pooled["ce_star_var_within"] == pytest.approx(within, rel=1e-12)
    assert pooled["ce_star_var_between"] == pytest.approx(between, rel=1e-12)
    assert pooled["ce_star_se"] == pytest.approx(math.sqrt(within + between), rel=1e-12)


def test_greedy_run_gives_no_advice_to_add_prompts():
    greedy = {f"p{k}": [[0.0] * (k + 2)] * 4 for k in range(3)}
    result = compute_metrics(make_rollouts(greedy), warn=False)
    pooled = result.pooled.iloc[0]
    assert pooled["ce_star_se"] == 0 and pooled["ce_star_var_between"] == 0
    notes = result.notes[("m", "base", "t")]
    assert not any("add more" in n for n in notes), notes
    assert any(n.startswith("SE is 0") for n in notes)
    noisy = compute_metrics(make_rollouts({"a": [[0.0], [1.0]], "b": [[0.0], [3.0]]}), warn=False)
    assert any("add more" in n for n in noisy.notes[("m", "base", "t")])


def test_row_midranks_match_scipy_rankdata():
    from scipy.stats import rankdata

    from canopy_entropy.metrics.prompt_stats import _row_midranks

    rng = np.random.default_rng(3)
    for _ in range(50):  # ties, inf padding and a NaN row, as the padded matrices have
        x = rng.integers(0, 4, size=(rng.integers(1, 6), rng.integers(1, 9))).astype(float)
        x[rng.random(x.shape) < 0.2] = np.inf
        if rng.random() < 0.2:
            x[0, 0] = np.nan
        np.testing.assert_array_equal(_row_midranks(x), rankdata(x, axis=1))


def test_binary_entropy_matches_40_digit_arithmetic_at_every_scale():
    """h(p) against mpmath at 40 digits for float32 p from 1e-30 to 1 (the series branch below
    1e-4, log1p above, the ends 0 and 1): within 4 float64 ulps. Forming 1 - p in float64, as
    entr(p) + entr(1 - p) does, is off by up to ~2.6% below p ~ 1e-16 (the -(1-p) log(1-p)
    term, about p, is lost)."""
    mpmath = pytest.importorskip("mpmath")
    from canopy_entropy.metrics import binary_entropy

    rng = np.random.default_rng(7)
    p = np.concatenate(
        [
            (10.0 ** rng.uniform(-30, 0, 4000)).astype(np.float32),
            np.float32([0.0, 1.0, 0.5, 1e-4, np.nextafter(np.float32(1e-4), 1), 0.9999999]),
        ]
    )
    got = binary_entropy(p)
    mpmath.mp.dps = 40

    def exact(x: float) -> float:
        x = mpmath.mpf(x)
        if x in (0, 1):
            return 0.0
        return float(-x * mpmath.log(x) - (1 - x) * mpmath.log1p(-x))

    want = np.array([exact(float(x)) for x in p])
    np.testing.assert_array_less(np.abs(got - want), 4 * np.spacing(np.maximum(want, 1e-300)))
    assert got[-6] == 0.0 and got[-5] == 0.0
    naive = entr(p.astype(np.float64)) + entr(1.0 - p.astype(np.float64))
    tiny = (p > 0) & (p < 1e-17)
    assert np.max(np.abs(naive[tiny] - want[tiny]) / want[tiny]) > 0.01  # what this replaces
