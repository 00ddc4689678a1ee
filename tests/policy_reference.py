"""An independent float64 numpy implementation of the decoding policy (test oracle).

Written from SPEC section 1 and the documented policy order (temperature, top-k keeping
ties, top-p on the top-k-renormalised distribution, min-p), one row at a time, sharing no
code with ``canopy_entropy.engines.policy_ops``.
"""

from __future__ import annotations

import numpy as np


def reference_logq(
    logits: np.ndarray, temperature: float, top_k=None, top_p=1.0, min_p=0.0
) -> np.ndarray:
    """Renormalised log q over the vocabulary for one row (-inf outside the kept set)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    vocab = z.shape[0]
    order = np.argsort(-z, kind="stable")
    zs = z[order]
    keep = np.ones(vocab, dtype=bool)
    if top_k is not None and top_k < vocab:
        keep &= zs >= zs[top_k - 1]
    if top_p < 1.0:
        w = np.where(keep, np.exp(zs - zs[0]), 0.0)
        p = w / w.sum()
        before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        keep &= before < top_p
        keep[0] = True
    if min_p > 0.0:
        p_rel = np.exp(zs - zs[0])  # p / p_max
        keep &= p_rel >= min_p
    kept = zs[keep]
    lse = kept.max() + np.log(np.exp(kept - kept.max()).sum())
    out = np.full(vocab, -np.inf)
    out[order[keep]] = zs[keep] - lse
    return out


def reference_step(
    logits: np.ndarray, eos_ids, temperature: float, top_k=None, top_p=1.0, min_p=0.0
):
    """(entropy, eos mass, kept mass, logq) of one step, in float64."""
    logq = reference_logq(logits, temperature, top_k, top_p, min_p)
    q = np.exp(logq)
    finite = np.isfinite(logq)
    entropy = -np.sum(q[finite] * logq[finite])
    eos = float(q[list(eos_ids)].sum())
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max()
    lse_all = m + np.log(np.exp(z - m).sum())
    kept = z[finite]
    lse_kept = kept.max() + np.log(np.exp(kept - kept.max()).sum())
    return entropy, eos, float(np.exp(lse_kept - lse_all)), logq
