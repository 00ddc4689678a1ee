"""A small synthetic run folder with every stage's outputs, in the run-folder contract layout.

Rollouts go through ``rollouts_table`` + ``RunStore`` (real shards); the metrics, semantic,
compare and regression files are written in the documented layout with plausible values, so
figures and the report can be tested before (and independently of) those stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.run.manifest import Manifest, PolicyRecord, SeedScheme, write_manifest
from canopy_entropy.store import RunStore, atomic_write_json, atomic_write_table, rollouts_table

FAMILIES = ("fam-a", "fam-b")
VARIANTS = ("base", "instruct")
TASKS = ("math", "story")
EVIL = "<script>alert('x')</script>&"
STAGES = ("rollouts", "metrics", "semantic", "compare", "regression")


def model_name(family: str, variant: str) -> str:
    name = f"{family}-{variant}"
    return name + EVIL if (family, variant) == ("fam-b", "instruct") else name


def build_run(
    root: Path,
    *,
    prompts: int = 6,
    rollouts: int = 10,
    max_new_tokens: int = 60,
    stages: tuple[str, ...] = STAGES,
    seed: int = 0,
) -> Path:
    """Write a run folder under ``root`` with the requested stages; returns its path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    store = RunStore(root)
    policy = PolicyRecord(temperature=1.0, top_k=100, top_p=1.0, max_new_tokens=max_new_tokens)
    seeds = SeedScheme(kind="counter-hash", run_seed=seed, description=EVIL)
    write_manifest(root, Manifest(run="fixture", policy=policy, seed_scheme=seeds))
    (root / "config.toml").write_text(f'[policy]\ntemperature = 1.0\nnote = "{EVIL}"\n')
    per_rollout = []
    for family in FAMILIES:
        for variant in VARIANTS:
            model = model_name(family, variant)
            for t_i, task in enumerate(TASKS):
                scale = 10 + 15 * t_i + (8 if variant == "instruct" else 0)
                pids, idx, seeds, fins, ents, eos = [], [], [], [], [], []
                for p in range(prompts):
                    pid = f"p{p}" if p else "p0<b>"
                    for r in range(rollouts):
                        n = int(min(1 + rng.geometric(1 / scale), max_new_tokens))
                        level = 1.5 if variant == "base" else 0.8
                        h = rng.gamma(2.0, level / 2, size=n).astype(np.float32)
                        lam = rng.uniform(0, 0.2, size=n).astype(np.float32)
                        pids.append(pid)
                        idx.append(r)
                        seeds.append(1000 * p + r)
                        fins.append("length" if n == max_new_tokens else "eos")
                        ents.append(h)
                        eos.append(lam)
                        per_rollout.append((model, variant, family, task, pid, n, float(h.sum())))
                if "rollouts" in stages:
                    table = rollouts_table(
                        run="fixture",
                        model=model,
                        variant=variant,
                        family=family,
                        task=task,
                        prompt_id=pids,
                        rollout_index=idx,
                        seed=seeds,
                        finish_reason=fins,
                        entropy=ents,
                        eos_prob=eos,
                        text=[f"text {i}" for i in idx],
                    )
                    store.write_rollouts(f"{family}-{variant}-{task}", table)
    df = pd.DataFrame(
        per_rollout, columns=["model", "variant", "family", "task", "prompt_id", "N", "H"]
    )
    df["r"] = df["H"] / df["N"]
    keys = ["model", "variant", "family", "task"]
    if "metrics" in stages:
        _write_metrics(root, df, keys, max_new_tokens, rng)
    if "semantic" in stages:
        _write_semantic(root, df, keys, rng)
    if "compare" in stages:
        _write_compare(root, rng)
    if "regression" in stages:
        _write_regression(root, df, keys, rng)
    return root


def _write_metrics(root, df, keys, max_new_tokens, rng) -> None:
    rows = []
    for key, g in df.groupby([*keys, "prompt_id"]):
        n, r = g["N"].to_numpy(float), g["r"].to_numpy(float)
        cov = float(np.mean((n - n.mean()) * (r - r.mean())))
        rows.append(
            dict(
                zip([*keys, "prompt_id"], key, strict=True),
                ce_star=g["H"].mean(),
                mean_length=n.mean(),
                entropy_rate=r.mean(),
                genppl=np.exp(g["H"].mean() / n.mean()),
                bf=np.exp(r.mean()),
                pearson=np.corrcoef(n, r)[0, 1] if n.std() > 0 else np.nan,
                truncation_rate=float(np.mean(n == max_new_tokens)),
                covariance_pop=cov,
                n_rollouts=len(g),
            )
        )
    prompts = pd.DataFrame(rows)
    pooled = []
    for key, g in prompts.groupby(keys):
        nb, rb = g["mean_length"].to_numpy(), g["entropy_rate"].to_numpy()
        ce = g["ce_star"].mean()
        pooled.append(
            dict(
                zip(keys, key, strict=True),
                ce_star=ce,
                mean_length=nb.mean(),
                genppl=np.exp(ce / nb.mean()),
                entropy_rate=rb.mean(),
                bf=np.exp(rb.mean()),
                pearson=np.nanmean(g["pearson"]),
                truncation_rate=g["truncation_rate"].mean(),
                rate_length_term=nb.mean() * rb.mean(),
                within_cov_term=g["covariance_pop"].mean(),
                between_cov_term=float(np.mean((nb - nb.mean()) * (rb - rb.mean()))),
                stop_entropy_share=rng.uniform(0.05, 0.3),
                ce_star_se=0.1 * ce,
                ce_star_var_between=0.5,
                ce_star_var_within=2.0,
                chebyshev_bound=0.45 * ce,
                truncation_bias_bound=0.01,
                n_rollouts=int(g["n_rollouts"].sum()),
                n_prompts=len(g),
            )
        )
    pooled = pd.DataFrame(pooled)
    atomic_write_table(
        root / "metrics" / "prompts.parquet",
        pa.Table.from_pandas(prompts, preserve_index=False),
        "canopy-metrics/1",
    )
    atomic_write_table(
        root / "metrics" / "pooled.parquet",
        pa.Table.from_pandas(pooled, preserve_index=False),
        "canopy-metrics/1",
    )
    groups = []
    for rec in pooled.to_dict("records"):
        key = {k: rec.pop(k) for k in keys}
        sel = (prompts[keys] == pd.Series(key)).all(axis=1)
        groups.append(
            {
                "key": key,
                "pooled": rec,
                "prompts": prompts[sel].drop(columns=keys).to_dict("records"),
            }
        )
    atomic_write_json(root / "metrics" / "metrics.json", {"groups": groups})


def _write_semantic(root, df, keys, rng) -> None:
    div = df.groupby([*keys, "prompt_id"], as_index=False).agg(rate=("r", "mean"))
    div["diversity"] = np.clip(0.1 + 0.2 * div["rate"] + rng.normal(0, 0.03, len(div)), 0, 1)
    div["vendi"] = 1 + 5 * div["diversity"]
    for c in ("diversity_len_t1", "diversity_len_t2", "diversity_len_t3", "corr_length_d"):
        div[c] = rng.uniform(0, 1, len(div))
    atomic_write_table(
        root / "semantic" / "prompt_diversity.parquet",
        pa.Table.from_pandas(div.drop(columns="rate"), preserve_index=False),
        "canopy-semantic/1",
    )


def _write_compare(root, rng) -> None:
    rows = []
    metrics = [
        ("ce_star", "ratio"),
        ("genppl", "ratio"),
        ("bf", "ratio"),
        ("entropy_rate", "ratio"),
        ("diversity", "ratio"),
        ("pearson", "correlation"),
    ]
    for family in FAMILIES:
        for task in TASKS:
            for metric, kind in metrics:
                a, b = rng.uniform(1, 3), rng.uniform(0.5, 2.5)
                if kind == "correlation":
                    a, b = rng.uniform(-0.5, 0), rng.uniform(0, 0.5)
                diff = b - a
                pct = 100 * diff / abs(a) if kind == "ratio" else np.nan
                rows.append(
                    dict(
                        family=family,
                        task=task,
                        metric=metric,
                        kind=kind,
                        a=a,
                        b=b,
                        a_se=0.1,
                        b_se=0.1,
                        diff=diff,
                        diff_se=0.14,
                        diff_lo=diff - 0.3,
                        diff_hi=diff + 0.3,
                        pct=pct,
                        pct_se=5.0,
                        pct_lo=pct - 10,
                        pct_hi=pct + 12,
                        ratio_lo=pct - 9,
                        ratio_hi=pct + 13,
                        n_prompts=6,
                        a_label="base",
                        b_label="instruct",
                    )
                )
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    atomic_write_table(root / "compare" / "comparison.parquet", table, "canopy-compare/1")


def _write_regression(root, df, keys, rng) -> None:
    panel = df.groupby([*keys, "prompt_id"], as_index=False).agg(
        Rbar=("r", "mean"), Nbar=("N", "mean")
    )
    panel["R_sc"] = (panel["Rbar"] - panel["Rbar"].mean()) / panel["Rbar"].std()
    panel["D"] = np.clip(0.3 + 0.05 * panel["R_sc"] + rng.normal(0, 0.02, len(panel)), 0, 1)
    atomic_write_table(
        root / "regression" / "panel.parquet",
        pa.Table.from_pandas(panel, preserve_index=False),
        "canopy-regress/1",
    )
    grid = np.linspace(-2, 2, 25)
    curves = pd.DataFrame(
        [
            dict(
                task=t,
                variant=v,
                R_sc=x,
                D=1 / (1 + np.exp(-(-0.8 + (0.3 if v == "base" else 0.8) * x))),
            )
            for t in TASKS
            for v in VARIANTS
            for x in grid
        ]
    )
    atomic_write_table(
        root / "regression" / "curves.parquet",
        pa.Table.from_pandas(curves, preserve_index=False),
        "canopy-regress/1",
    )
    terms = [
        "(Intercept)",
        "R_sc",
        "variantinstruct",
        "taskstory",
        "R_sc:variantinstruct",
        "ns(invN_sc, df = 4)1",
    ]
    mean = {
        t: {"estimate": float(e), "se": 0.1, "z": float(e) / 0.1, "p": 0.05}
        for t, e in zip(terms, [-0.8, 0.71, 0.2, -0.1, 1.18, 0.05], strict=True)
    }
    result = {
        "mean": mean,
        "precision": {"(Intercept)": {"estimate": 3.0, "se": 0.2, "z": 15.0, "p": 0.0}},
        "re_sd": {"prompt": 0.3, "family": 0.1},
        "loglik": 812.5,
        "aic": -1601.0,
        "nobs": len(panel),
        "slope_ratio": {"estimate": 2.66, "se": 0.4, "lo": 1.876, "hi": 3.444},
        "ngroups": {"prompt": 12, "family": 2},
        "converged": True,
        "convergence": {
            "max_abs_gradient": 1e-6,
            "hessian_positive_definite": True,
            "message": "ok",
            "iterations": 31,
        },
    }
    atomic_write_json(root / "regression" / "result.json", result)
    # the layout of canopy_entropy.stats.dharma (canopy regress --diagnostics)
    tests = {
        side: {
            "ks": {"statistic": 0.08, "p": ks},
            "dispersion": {"ratio": 1.02, "p": disp},
            "outliers": {
                "outliers": 0,
                "n": len(panel),
                "expected_rate": 0.008,
                "rate": 0.0,
                "p": 1.0,
            },
        }
        for side, ks, disp in (("conditional", 0.41, 0.77), ("unconditional", 0.35, 0.6))
    }
    atomic_write_json(root / "regression" / "diagnostics.json", {"nsim": 250, "seed": 0, **tests})
    diag = pd.DataFrame({"observed": panel["D"]})
    for side in ("conditional", "unconditional"):
        diag[f"residual_{side}"] = rng.uniform(0, 1, len(diag))
        diag[f"predicted_{side}"] = panel["D"] + rng.normal(0, 0.01, len(diag))
    atomic_write_table(
        root / "regression" / "diagnostics.parquet",
        pa.Table.from_pandas(diag, preserve_index=False),
        "canopy-regress/1",
    )


def as_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


_RENDERED: dict[str, Path] = {}


def rendered_run() -> Path:
    """A full fixture run with figures and report built once per test session (shared)."""
    if "run" not in _RENDERED:
        import atexit
        import shutil
        import tempfile

        from canopy_entropy.report import build_report

        tmp = Path(tempfile.mkdtemp(prefix="canopy-plots-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        run = build_run(tmp / "run")
        build_report(run)
        _RENDERED["run"] = run
    return _RENDERED["run"]
