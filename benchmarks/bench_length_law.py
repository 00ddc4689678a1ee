"""Study: bias and RMSE of H(min(N, T)) estimators on the exact reference model (< 2 min).

Target: the exact entropy of the observed length ``min(N, T)`` with "cut at T" as its own
outcome (``FiniteStateLM.exact(pi0, T).length_entropy``; ``T = inf``: H(N)). Estimators, per
prompt, from the same M rollouts:

* ``hist``: plug-in entropy of the empirical law of (length, cut);
* ``hazard``: EOS-hazard law ``p_hat`` on ``{1..T}``, leftover mass on "cut" (one outcome);
* ``hazard+tail``: as ``hazard``, but when every rollout ended by EOS the whole leftover is
  spread over ``(n_max, T]`` by a truncated geometric law (hazard q: EOS probability summed
  over the steps at risk above the 75th-percentile length u, per step), rest on "cut";
* ``hazard+fit``: the spread mass is at most the fitted ``P(N > n_max)`` (vanishes as M
  grows), the rest of the leftover on "cut"; ``canopy_entropy.metrics`` reports this one;
* ``old``: the previous rule (law renormalised to 1, geometric tail beyond n_max, even beyond T).

    PYTHONPATH=src python benchmarks/bench_length_law.py [--reps 40] [--prompts 10]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.special import entr

from canopy_entropy.metrics import binary_entropy
from canopy_entropy.metrics.prompt_stats import _fit_tail
from canopy_entropy.reference import FiniteStateLM
from canopy_entropy.stats.length_law import (
    capped_length_entropy,
    eos_length_entropy,
    eos_tail_hazard,
    hazard_law,
)

CAPS = (15, 40, math.inf)  # ~10% cut, ~0.2% cut, no cap
MS = (5, 20, 50, 400)


def estimates(draw: dict, P: int, M: int, cap: float) -> dict[str, np.ndarray]:
    """Every estimator's H per prompt from one sampled set of P x M rollouts."""
    length = np.diff(draw["offsets"])
    prompt = draw["prompt"]
    cut = draw["finish_reason"] == "length"
    width = int(length.max())
    step = np.arange(len(draw["eos_prob"])) - np.repeat(draw["offsets"][:-1], length)
    cell = np.repeat(prompt, length) * width + step
    sums = np.bincount(cell, draw["eos_prob"].astype(np.float64), P * width).reshape(P, width)
    m = np.full(P, float(M))
    p_hat = hazard_law(list(sums), m)
    sorted_len = np.sort(length.reshape(P, M), axis=1).astype(np.float64)
    caps = np.full(P, cap if math.isfinite(cap) else float(width))
    fit = _fit_tail(length.astype(np.float64), cut, prompt, m, caps, sorted_len)
    all_eos = np.bincount(prompt, cut, P) == 0
    n_max = sorted_len[:, -1]
    q_lam = eos_tail_hazard(p_hat, m, fit.u, fit.exposure)
    key = prompt * (2 * width + 2) + 2 * length + cut
    uniq, counts = np.unique(key, return_counts=True)
    hist = np.bincount(uniq // (2 * width + 2), entr(counts / M), P)
    # the previous estimator: renormalise, then a geometric tail of mass P_emp(N > n_max) beyond
    law = np.concatenate([p_hat, np.clip(1 - p_hat.sum(1), 0, None)[:, None]], axis=1)
    law[:, -1] = np.where(all_eos, 0.0, law[:, -1])
    body = entr(law / law.sum(1, keepdims=True)).sum(1)
    h = fit.hazard
    ok = all_eos & (fit.exposure > 0) & (h > 0) & (h < 1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        a = np.where(ok, fit.surv_u * (1 - h) ** (fit.n_max - fit.u), 0.0)
        geo = np.where(ok, binary_entropy(h) / np.where(ok, h, 1.0), 0.0)
    T, zero = np.full(P, cap), np.zeros(P)
    old = (1 - a) * body + binary_entropy(a) + a * geo
    return {
        "hist": hist,
        "hazard": capped_length_entropy(p_hat, n_max, T, q_lam, zero),
        "hazard+tail": capped_length_entropy(p_hat, n_max, T, q_lam, np.where(all_eos, 1.0, 0)),
        "hazard+fit": eos_length_entropy(
            p_hat, m, n_max, T, fit.u, fit.surv_u, fit.exposure, all_eos
        ),
        "old": old,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=10)
    args = ap.parse_args()
    lm = FiniteStateLM.random(4, 6, seed=1, mean_eos=0.12)
    initials = lm.prompt_initials(args.prompts, 7)
    t0 = time.perf_counter()
    names = ("hist", "hazard", "hazard+tail", "hazard+fit", "old")
    print(
        f"reference FSM (4 states, 6 tokens, mean length {lm.exact(initials[0]).mean_length:.1f});"
        f" {args.prompts} prompts x {args.reps} repetitions per cell; bias / RMSE in nats"
    )
    print(f"{'T':>4} {'cut%':>5} {'M':>4} " + " ".join(f"{n:>20}" for n in names))
    for cap in CAPS:
        t = None if math.isinf(cap) else int(cap)
        exact = np.array([lm.exact(p, t).length_entropy for p in initials])
        cut_share = np.mean([lm.exact(p, t).truncation_prob for p in initials])
        for M in MS:
            err = {n: [] for n in names}
            for rep in range(args.reps):
                draw = lm.sample(initials, M, seed=10_000 * M + rep, max_new_tokens=t)
                for n, v in estimates(draw, args.prompts, M, cap).items():
                    err[n].append(v - exact)
            cells = []
            for n in names:
                e = np.concatenate(err[n])
                se = e.std(ddof=1) / math.sqrt(e.size)
                cells.append(f"{e.mean():+.3f}±{se:.3f}/{math.sqrt(np.mean(e**2)):.3f}")
            print(f"{cap:>4} {100 * cut_share:5.1f} {M:>4} " + " ".join(f"{c:>20}" for c in cells))
    print(f"({time.perf_counter() - t0:.0f} s; bias ± its SE / RMSE, per prompt)")


if __name__ == "__main__":
    main()
