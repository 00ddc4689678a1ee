"""Paired cluster bootstrap comparison (SPEC section 5) and length matching."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from canopy_entropy.comparison import (
    bootstrap_indices,
    compare_prompts,
    compare_run,
    grouped_midranks,
    grouped_pearson,
    length_bins,
    match_lengths,
    paired_bootstrap,
    pooled_statistics,
)
from canopy_entropy.errors import ConfigError
from canopy_entropy.metrics import compute_metrics, write_metrics
from canopy_entropy.stats.pooling import (
    pool_covariance,
    pool_fisher,
    pool_kendall,
    weighted_mean_with_fallback,
)
from canopy_entropy.store import RunStore
from semantic_fixtures import make_run


def measured(run):
    """The run with its metrics saved (compare reads them, never recomputes them)."""
    write_metrics(run, warn=False)
    return run


def random_prompt_stats(rng: np.random.Generator, p: int) -> dict[str, np.ndarray]:
    n = rng.integers(2, 30, p).astype(np.float64)
    stats = {
        "ce_star": rng.gamma(4.0, 2.0, p),
        "mean_length": rng.gamma(5.0, 4.0, p),
        "entropy_rate": rng.uniform(0.2, 1.5, p),
        "length_entropy": rng.uniform(0.5, 3.0, p),
        "diversity": rng.uniform(0.1, 0.6, p),
        "vendi": rng.uniform(1.0, 9.0, p),
        "pearson": rng.uniform(-1, 1, p),
        "spearman": rng.uniform(-1, 1, p),
        "kendall": rng.uniform(-1, 1, p),
        "covariance": rng.normal(0, 1, p),
        "n_rollouts": n,
    }
    stats["pearson"][0] = np.nan  # a constant side on one prompt: dropped from the pool
    stats["spearman"][1] = 1.0  # clipped before Fisher z
    return stats


def reference_pool(stats: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, float]:
    """SPEC sections 2-3 written out prompt by prompt in plain Python (the slow oracle)."""

    def mean(col):
        vals = [float(stats[col][p]) for p in rows if math.isfinite(stats[col][p])]
        return sum(vals) / len(vals)

    def weighted(col, weight, transform=lambda v: v, back=lambda v: v):
        num = den = 0.0
        fin = []
        for p in rows:
            v = float(stats[col][p])
            if not math.isfinite(v):
                continue
            v = transform(v)
            fin.append(v)
            w = weight(float(stats["n_rollouts"][p]))
            num += w * v
            den += w
        return back(num / den if den > 0 else sum(fin) / len(fin))

    def fisher(v):
        return math.atanh(max(-0.999999, min(0.999999, v)))

    out = {
        c: mean(c)
        for c in ("ce_star", "mean_length", "entropy_rate", "length_entropy", "diversity")
    }
    # Vendi: geometric mean over prompts, exp(mean_p log VS_p)
    out["vendi"] = math.exp(sum(math.log(stats["vendi"][p]) for p in rows) / len(rows))
    out["genppl"] = math.exp(out["ce_star"] / out["mean_length"])
    out["bf"] = math.exp(out["entropy_rate"])
    for col in ("pearson", "spearman"):
        out[col] = weighted(col, lambda n: max(n - 3, 0.0), fisher, math.tanh)
    out["kendall"] = weighted("kendall", lambda n: n * (n - 1) / 2)
    out["covariance"] = weighted("covariance", lambda n: n - 1)
    return out


def test_vectorised_replicates_equal_slow_reference_loop() -> None:
    rng = np.random.default_rng(7)
    a, b = random_prompt_stats(rng, 12), random_prompt_stats(rng, 12)
    rep = paired_bootstrap(a, b, n_boot=60, seed=3, group_key=("fam", "math"))
    idx = bootstrap_indices(12, 60, 3, ("fam", "math"))
    np.testing.assert_array_equal(rep.indices, idx)  # same seed -> same replicates
    for k in range(60):
        want_a, want_b = reference_pool(a, idx[k]), reference_pool(b, idx[k])
        for metric, value in want_a.items():
            assert rep.a_reps[metric][k] == pytest.approx(value, rel=1e-12, abs=1e-14), metric
            assert rep.b_reps[metric][k] == pytest.approx(want_b[metric], rel=1e-12, abs=1e-14)
    full = reference_pool(a, np.arange(12))
    for metric, value in full.items():
        assert float(rep.a[metric]) == pytest.approx(value, rel=1e-12), metric


def test_bootstrap_se_of_pooled_mean_matches_closed_form() -> None:
    # The bootstrap distribution of a mean over P resampled prompts has variance sigma_pop^2/P
    # exactly; with B = 4000 replicates the SE estimate has relative sd 1/sqrt(2B) ~ 1.1%, so
    # a 5% tolerance is over 4 standard deviations.
    rng = np.random.default_rng(11)
    p = 50
    rows = []
    for side, shift in (("base", 0.0), ("instruct", 1.0)):
        ce = rng.gamma(3.0, 2.0, p) + shift
        for i in range(p):
            rows.append({"variant": side, "task": "t", "prompt_id": f"p{i}", "ce_star": ce[i]})
    prompts = pd.DataFrame(rows)
    table, _ = compare_prompts(prompts, by=["task"], n_boot=4000, seed=1)
    row = table.set_index("metric").loc["ce_star"]
    a = prompts[prompts.variant == "base"]["ce_star"].to_numpy()
    b = prompts[prompts.variant == "instruct"]["ce_star"].to_numpy()
    assert row["a"] == pytest.approx(a.mean(), rel=1e-12)
    assert row["a_se"] == pytest.approx(a.std(ddof=0) / math.sqrt(p), rel=0.05)
    assert row["b_se"] == pytest.approx(b.std(ddof=0) / math.sqrt(p), rel=0.05)
    assert row["diff_se"] == pytest.approx((b - a).std(ddof=0) / math.sqrt(p), rel=0.05)
    assert row["pct"] == pytest.approx(100 * (b.mean() - a.mean()) / a.mean(), rel=1e-12)


def test_bca_ratio_interval_agrees_with_scipy() -> None:
    # A small, skewed case where BCa and percentile intervals differ by 3-6 points, so the
    # comparison with scipy's BCa (its own resamples: Monte Carlo noise ~0.6 points at
    # B = 20000) can tell the two methods apart.
    rng = np.random.default_rng(5)
    p = 15
    a = rng.lognormal(1.0, 0.3, p)
    b = a * rng.lognormal(0.0, 1.0, p)
    prompts = pd.DataFrame(
        {
            "variant": ["base"] * p + ["instruct"] * p,
            "prompt_id": [f"q{i}" for i in range(p)] * 2,
            "ce_star": np.r_[a, b],
        }
    )
    table, _ = compare_prompts(prompts, by=[], n_boot=20000, seed=2)
    row = table.set_index("metric").loc["ce_star"]
    res = sps.bootstrap(
        (a, b),
        lambda x, y, axis: y.mean(axis=axis) / x.mean(axis=axis),
        paired=True,
        method="BCa",
        n_resamples=20000,
        rng=np.random.default_rng(9),
    )
    lo, hi = 100 * (res.confidence_interval.low - 1), 100 * (res.confidence_interval.high - 1)
    assert row["ratio_lo"] == pytest.approx(lo, abs=1.5)
    assert row["ratio_hi"] == pytest.approx(hi, abs=1.5)
    assert row["ratio_hi"] - row["pct_hi"] > 3.0  # and it is not the percentile interval


def test_identical_models_differ_by_exactly_zero_in_every_replicate(tmp_path) -> None:
    rng = np.random.default_rng(8)
    a = random_prompt_stats(rng, 9)
    rep = paired_bootstrap(a, {k: v.copy() for k, v in a.items()}, n_boot=300, seed=4)
    for metric in rep.a_reps:
        np.testing.assert_array_equal(rep.a_reps[metric], rep.b_reps[metric])
    run = make_run(tmp_path / "run", copy_of="base", n_prompts=5)
    result = compare_run(measured(run), n_boot=200)
    t = result.table
    assert (t["diff"] == 0).all() and (t["diff_se"] == 0).all()
    assert (t.loc[t.kind == "ratio", "pct"] == 0).all()
    lm = result.length_matched
    assert (lm["n_rollouts_matched"] == lm["n_rollouts_unmatched"]).all()
    np.testing.assert_array_equal(lm["matched"], lm["unmatched"])


def test_full_sample_values_match_independent_computation(tmp_path) -> None:
    run = make_run(tmp_path / "run", n_prompts=5, n_rollouts=7, seed=2)
    result = compare_run(measured(run), n_boot=100)
    table = RunStore(run).read_rollouts().to_pandas()
    sub = table[(table.variant == "instruct") & (table.task == "story")]
    ce, nbar, rbar, pear, spear, kend, cov, ns = [], [], [], [], [], [], [], []
    for _, g in sub.groupby("prompt_id"):
        h = np.array([np.sum(e.astype(np.float64)) for e in g["entropy"]])
        n = g["length"].to_numpy(np.float64)
        r = h / n
        ce.append(h.mean())
        nbar.append(n.mean())
        rbar.append(r.mean())
        pear.append(sps.pearsonr(n, r).statistic)
        spear.append(sps.spearmanr(n, r).statistic)
        kend.append(sps.kendalltau(n, r).statistic)
        cov.append(np.cov(n, r, ddof=1)[0, 1])
        ns.append(len(n))
    ns = np.array(ns, dtype=np.float64)
    z = np.arctanh(np.clip(pear, -0.999999, 0.999999))  # the documented Fisher clip
    got = result.table[result.table.task == "story"].set_index("metric")["b"]
    assert got["ce_star"] == pytest.approx(np.mean(ce), rel=1e-6)
    assert got["genppl"] == pytest.approx(math.exp(np.mean(ce) / np.mean(nbar)), rel=1e-6)
    assert got["bf"] == pytest.approx(math.exp(np.mean(rbar)), rel=1e-6)
    assert got["mean_length"] == pytest.approx(np.mean(nbar), rel=1e-12)
    assert got["pearson"] == pytest.approx(np.tanh(np.sum((ns - 3) * z) / np.sum(ns - 3)), rel=1e-6)
    w = ns * (ns - 1) / 2
    assert got["kendall"] == pytest.approx(np.sum(w * kend) / w.sum(), rel=1e-6)
    assert got["covariance"] == pytest.approx(np.sum((ns - 1) * cov) / np.sum(ns - 1), rel=1e-6)
    zs = np.arctanh(np.clip(spear, -0.999999, 0.999999))
    assert got["spearman"] == pytest.approx(
        np.tanh(np.sum((ns - 3) * zs) / np.sum(ns - 3)), rel=1e-6
    )
    # H(N) is the `canopy metrics` estimator (EOS hazard); the comparison pools it as a mean
    metrics = compute_metrics(run, warn=False).prompts
    sel = metrics[(metrics.variant == "instruct") & (metrics.task == "story")]
    assert got["length_entropy"] == pytest.approx(sel["length_entropy"].mean(), rel=1e-12)
    for ext in ("csv", "md", "tex"):
        assert (run / "tables" / f"compare_entropy.{ext}").exists()
    assert (run / "compare" / "comparison.parquet").exists()
    assert (run / "compare" / "comparison.csv").exists()


def test_prompts_missing_on_one_side_are_dropped_with_a_note(tmp_path) -> None:
    run = make_run(tmp_path / "run", n_prompts=5, drop_prompts={"instruct": ["p1"]})
    result = compare_run(measured(run), n_boot=50, by=("task",))
    assert (result.table["n_prompts"] == 4).all()
    assert any("1 prompts present on only one side" in n for n in result.notes)


def test_grouped_correlations_match_scipy() -> None:
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(6), rng.integers(3, 15, 6))
    x = rng.integers(1, 6, len(g)).astype(np.float64)  # ties
    y = rng.normal(size=len(g))
    y[g == 2] = 1.5  # a constant side -> NaN
    pear, n = grouped_pearson(g, x, y)
    spear, _ = grouped_pearson(g, grouped_midranks(g, x), grouped_midranks(g, y))
    for k in range(6):
        xs, ys = x[g == k], y[g == k]
        assert n[k] == len(xs)
        np.testing.assert_array_equal(grouped_midranks(g, x)[g == k], sps.rankdata(xs))
        if k == 2:
            assert np.isnan(pear[k]) and np.isnan(spear[k])
            continue
        assert pear[k] == pytest.approx(sps.pearsonr(xs, ys).statistic, abs=1e-12)
        assert spear[k] == pytest.approx(sps.spearmanr(xs, ys).statistic, abs=1e-12)


def test_length_matching_keeps_identical_per_bin_counts() -> None:
    rng = np.random.default_rng(6)
    rows = []
    for side, scale in (("a", 20.0), ("b", 60.0)):
        for prompt in range(4):
            for i in range(50):
                rows.append((side, f"p{prompt}", i, int(rng.lognormal(math.log(scale), 0.8)) + 1))
    frame = pd.DataFrame(rows, columns=["side", "prompt_id", "rollout_index", "length"])
    keep = match_lengths(frame, "side", ["prompt_id"], seed=1)
    frame["bin"] = length_bins(frame["length"].to_numpy())
    before = frame.groupby(["prompt_id", "bin", "side"]).size().unstack(fill_value=0)
    after = frame[keep].groupby(["prompt_id", "bin", "side"]).size().unstack(fill_value=0)
    after = after.reindex(before.index, fill_value=0)
    np.testing.assert_array_equal(after["a"], after["b"])
    np.testing.assert_array_equal(after["a"], before.min(axis=1))
    assert 0 < keep.sum() < len(frame)
    np.testing.assert_array_equal(keep, match_lengths(frame, "side", ["prompt_id"], seed=1))
    assert not np.array_equal(keep, match_lengths(frame, "side", ["prompt_id"], seed=2))
    # log-spaced bins: two per octave
    np.testing.assert_array_equal(length_bins(np.array([1, 2, 3, 4, 8])), [0, 2, 3, 4, 6])


def test_bad_options_are_config_errors(tmp_path) -> None:
    run = make_run(tmp_path / "run", n_prompts=3)
    prompts = write_metrics(run, warn=False).prompts
    with pytest.raises(ConfigError, match="matches no variant"):
        compare_prompts(prompts, a="chat")
    with pytest.raises(ConfigError, match="cannot group by"):
        compare_prompts(prompts, by=["nope"])
    with pytest.raises(ConfigError, match="at least 2"):
        compare_prompts(prompts, n_boot=1)
    table, _ = compare_prompts(prompts, a="fam-base", b="fam-instruct", a_key="model", n_boot=20)
    assert set(table["a_label"]) == {"fam-base"}


def test_cli_compare_json_and_one_line_error(tmp_path, monkeypatch, capsys) -> None:
    from canopy_entropy.cli.main import main

    run = make_run(tmp_path / "run", n_prompts=3)
    monkeypatch.setattr(sys, "argv", ["canopy", "compare", str(run), "--bootstrap", "50", "--json"])
    with pytest.raises(SystemExit) as exit_info:  # no saved metrics yet: says what to run
        main()
    assert exit_info.value.code == 2 and "canopy metrics" in capsys.readouterr().err
    measured(run)
    main()
    records = json.loads(capsys.readouterr().out)["comparison"]
    assert {r["metric"] for r in records} >= {"ce_star", "genppl", "bf", "pearson"}
    monkeypatch.setattr(sys, "argv", ["canopy", "compare", str(run), "--a", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "matches no variant" in err and "Traceback" not in err


def test_cli_compare_json_round_trips_the_parquet_bit_for_bit(tmp_path, monkeypatch, capsys):
    from canopy_entropy.jsonvalues import decode_value
    from cli_helpers import run_cli

    run = measured(make_run(tmp_path / "run", n_prompts=4))
    code, out, _ = run_cli(
        ["compare", str(run), "--bootstrap", "40", "--json"], capsys, monkeypatch
    )
    assert code == 0
    records = json.loads(out)["comparison"]
    saved = pd.read_parquet(run / "compare" / "comparison.parquet")
    assert len(records) == len(saved)
    floats = [c for c in saved.columns if saved[c].dtype == np.float64]
    assert "a_se" in floats and "pct_lo" in floats
    for col in floats:
        got = np.array([decode_value(r[col]) for r in records], dtype=np.float64)
        want = saved[col].to_numpy()
        assert np.array_equal(np.isnan(got), np.isnan(want)), col
        ok = ~np.isnan(want)
        assert np.array_equal(got[ok].view(np.int64), want[ok].view(np.int64)), col
    # more than 10 decimals survive (pandas' to_json kept 10)
    assert any(len(repr(r["a_se"]).split(".")[-1]) > 10 for r in records)


def test_rate_diversity_relations_match_regression_oracles() -> None:
    from canopy_entropy.comparison.length_matched import _relation_stats

    rng = np.random.default_rng(12)
    rows = []
    for p in range(3):
        n = rng.integers(5, 200, 30)
        r = rng.uniform(0.2, 1.0, 30) + 0.001 * n
        d = 0.3 * r + 0.02 * np.log(n) + rng.normal(0, 0.05, 30) + p
        rows.append(pd.DataFrame({"prompt_id": f"p{p}", "length": n, "r": r, "d": d}))
    frame = pd.concat(rows, ignore_index=True).assign(model="m", variant="v", family="f", task="t")
    got = _relation_stats(frame, has_d=True)
    z_rd, z_partial, z_nr = [], [], []
    x_all, y_all = [], []
    for _, g in frame.groupby("prompt_id"):
        n, r, d = g["length"].to_numpy(float), g["r"].to_numpy(), g["d"].to_numpy()
        design = np.column_stack([np.ones_like(n), np.log(n)])
        res_r = r - design @ np.linalg.lstsq(design, r, rcond=None)[0]
        res_d = d - design @ np.linalg.lstsq(design, d, rcond=None)[0]
        z_rd.append(np.arctanh(sps.pearsonr(r, d).statistic))
        z_partial.append(np.arctanh(sps.pearsonr(res_r, res_d).statistic))
        z_nr.append(np.arctanh(sps.pearsonr(n, r).statistic))
        x_all.append(r - r.mean())
        y_all.append(d - d.mean())
    x, y = np.concatenate(x_all), np.concatenate(y_all)
    assert got["corr_r_d"] == pytest.approx(np.tanh(np.mean(z_rd)), abs=1e-12)
    assert got["partial_corr_r_d_logN"] == pytest.approx(np.tanh(np.mean(z_partial)), abs=1e-12)
    assert got["rho_pearson_N_r"] == pytest.approx(np.tanh(np.mean(z_nr)), abs=1e-12)
    # within-prompt (fixed-effects) slope of d on r
    assert got["slope_d_on_r"] == pytest.approx(np.linalg.lstsq(x[:, None], y, rcond=None)[0][0])


def test_cli_usage_error_is_not_a_traceback(tmp_path, monkeypatch, capsys) -> None:
    from canopy_entropy.cli.main import main

    monkeypatch.setattr(sys, "argv", ["canopy", "compare", str(tmp_path), "--bogus"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "No such option: --bogus" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_count_matrix_pooling_equals_stats_pooling_on_gathered_arrays(p, b, seed) -> None:
    # small n makes every Fisher weight max(n-3, 0) zero in some rows: the unweighted fallback;
    # NaNs make some rows all-NaN: NaN out
    rng = np.random.default_rng(seed)
    stats = random_prompt_stats(rng, p)
    stats["n_rollouts"] = rng.integers(1, 6, p).astype(np.float64)
    for col in ("kendall", "ce_star", "pearson"):
        stats[col][rng.random(p) < 0.3] = np.nan
    idx = rng.integers(0, p, (b, p))
    got = pooled_statistics(stats, idx)
    n = stats["n_rollouts"][idx]
    np.testing.assert_allclose(got["pearson"], pool_fisher(stats["pearson"][idx], n), rtol=1e-12)
    np.testing.assert_allclose(got["spearman"], pool_fisher(stats["spearman"][idx], n), rtol=1e-12)
    np.testing.assert_allclose(got["kendall"], pool_kendall(stats["kendall"][idx], n), rtol=1e-12)
    np.testing.assert_allclose(
        got["covariance"], pool_covariance(stats["covariance"][idx], n), rtol=1e-12, atol=1e-15
    )
    ce = weighted_mean_with_fallback(stats["ce_star"][idx], np.ones(1))
    np.testing.assert_allclose(got["ce_star"], ce, rtol=1e-12)


def test_pooled_over_tasks_pairs_on_task_and_prompt_id(tmp_path) -> None:
    # prompt ids repeat across tasks: with --by '' a prompt is (family, task, prompt_id)
    run = make_run(tmp_path / "run", n_prompts=3, tasks=("math", "story"))
    pooled = compare_run(measured(run), n_boot=50, by=())
    assert (pooled.table["n_prompts"] == 6).all()
    per_task = compare_run(measured(run), n_boot=50, by=("task",)).table
    ce = per_task[per_task.metric == "ce_star"]["a"].mean()
    assert pooled.table.set_index("metric").loc["ce_star", "a"] == pytest.approx(ce, rel=1e-12)
    lm = pooled.length_matched
    assert (lm["n_prompts"] == 6).all()


def test_cli_compare_human_output_names_what_it_wrote(tmp_path, monkeypatch, capsys):
    from cli_helpers import run_cli

    run = measured(make_run(tmp_path / "run", n_prompts=4))
    code, out, err = run_cli(["compare", str(run), "--bootstrap", "40"], capsys, monkeypatch)
    assert code == 0, err
    text = "".join(out.split())  # the console wraps long paths
    assert "pairedbootstrap" in text and f"wrote{run / 'compare' / 'comparison.parquet'}" in text
