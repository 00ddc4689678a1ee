"""``canopy regress --model`` (lmm, quadratic, vendi, rse) and RSE carried through metrics and
compare: on small real runs of the reference model."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from canopy_entropy.comparison import compare_run
from canopy_entropy.metrics import current_metrics, write_metrics
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.run.layout import PROMPT_KEYS
from canopy_entropy.semantic.rse import RSE_SCHEMA_VERSION
from canopy_entropy.store import atomic_write_table

KEYS = list(PROMPT_KEYS)


def _two_variant_run(run, n_prompts=12, m=8):
    """A run with a base and an instruct model of one family on the same prompts."""
    for variant, seed, eos in (("base", 1, 0.15), ("instruct", 2, 0.3)):
        lm = FiniteStateLM.random(3, 5, seed=seed, mean_eos=eos)
        lm.sample_store(run, n_prompts, m, seed=seed, model=f"fsm-{variant}", variant=variant,
                        prompt_seed=7, max_new_tokens=40)  # fmt: skip
    return run


def _write_rse(run, seed=0, drop=0):
    """A semantic/rse.parquet for every prompt of the run (random cluster counts)."""
    prompts = current_metrics(run).prompts if (run / "metrics").exists() else None
    if prompts is None:
        prompts = write_metrics(run, warn=False).prompts
    rng = np.random.default_rng(seed)
    table = prompts[KEYS].iloc[drop:].reset_index(drop=True).copy()
    m = 6
    clusters = rng.integers(1, m + 1, len(table))
    table["rse"] = np.log(clusters)  # equal-size clusters: RSE = log k
    table["rse_normalized"] = np.log(clusters) / np.log(m)
    table["rse_clusters"] = clusters.astype(np.int32)
    table["rse_m"] = np.int32(m)
    table["rse_failures"] = np.int32(0)
    atomic_write_table(run / "semantic" / "rse.parquet",
                       pa.Table.from_pandas(table, preserve_index=False), RSE_SCHEMA_VERSION)  # fmt: skip
    return table


def test_rse_flows_through_metrics_and_compare(tmp_path):
    run = _two_variant_run(tmp_path / "run")
    before = write_metrics(run, warn=False)
    assert "rse" not in before.prompts.columns
    rse = _write_rse(run, drop=1)  # one prompt without RSE
    assert not before.is_fresh(run)  # rse.parquet is an input of the metrics
    metrics = write_metrics(run, warn=False)
    merged = metrics.prompts.merge(rse, on=KEYS, how="left", suffixes=("", "_file"))
    for col in ("rse", "rse_normalized", "rse_clusters"):
        np.testing.assert_array_equal(merged[col].to_numpy(float), merged[f"{col}_file"].to_numpy(float))
    assert merged["rse"].isna().sum() == 1
    for _, row in metrics.pooled.iterrows():
        sel = metrics.prompts[metrics.prompts["model"] == row["model"]]
        assert row["rse"] == pytest.approx(np.nanmean(sel["rse"]), rel=1e-12)
        assert row["rse_normalized"] == pytest.approx(np.nanmean(sel["rse_normalized"]), rel=1e-12)
    comp = compare_run(run, n_boot=200, seed=0).table
    for metric in ("rse", "rse_normalized"):
        r = comp[comp["metric"] == metric].iloc[0]
        pairs = metrics.prompts.pivot_table(index="prompt_id", columns="variant", values=metric)
        # each side pools its finite per-prompt values (SPEC section 3: a NaN has weight 0)
        assert r["kind"] == "ratio"
        assert r["a"] == pytest.approx(pairs["base"].mean(), rel=1e-12)
        assert r["b"] == pytest.approx(pairs["instruct"].mean(), rel=1e-12)
        assert r["pct"] == pytest.approx(100 * (r["b"] - r["a"]) / r["a"], rel=1e-9)


def test_rse_judged_on_more_rollouts_than_the_prompt_has_is_left_out(tmp_path):
    run = _two_variant_run(tmp_path / "run", m=5)
    write_metrics(run, warn=False)
    _write_rse(run)  # rse_m = 6 > 5 rollouts per prompt: computed from other rollouts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = write_metrics(run, warn=False)
    assert metrics.prompts["rse"].isna().all()
    assert any("relaxed semantic entropy" in str(w.message) for w in caught)
