"""Per-step decoding-policy math in torch, next to the logits (docs/metrics.md section 1).

One sampling step turns a batch of logits ``[B, V]`` into the per-step fields of docs/metrics.md section 1: the
sampled token, the entropy of the renormalised kept distribution, the EOS mass, the sampled
token's log-probability and the kept mass ``Z``. Everything is computed in float32 (float64
for the sampling CDF) whatever the model's dtype, and only ``[B]``-sized results leave.

Policy order (the transformers order): temperature, then top-k (ties with the k-th value
are kept), then top-p on the top-k-renormalised distribution (keep a token while the mass
strictly before it, in descending order, is below ``top_p``), then min-p (keep tokens with
``p >= min_p * p_max``). Temperature 0 is greedy: the first argmax, entropy 0, logprob 0.

Randomness is counter based: the uniform of rollout ``seed`` at step ``t`` is the ``t``-th
output of splitmix64 seeded with ``seed``, computed with vectorised int64 ops, so a rollout
does not depend on batch composition, batch size or resume point. The token is drawn by
inverse CDF over the kept tokens (in descending-probability order when sorted, vocabulary
order otherwise).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from canopy_entropy.engines.base import DecodingPolicy

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def splitmix64(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """The ``step``-th splitmix64 output for each seed, as int64 bits (wrapping arithmetic)."""
    z = seeds + (torch.as_tensor(step, dtype=torch.int64, device=seeds.device) + 1) * _GAMMA
    z = (z ^ _lsr(z, 30)) * _MIX1
    z = (z ^ _lsr(z, 27)) * _MIX2
    return z ^ _lsr(z, 31)


def step_uniforms(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 bits) for each rollout seed at ``step``."""
    return _lsr(splitmix64(seeds, step), 11).to(torch.float64) * (1.0 / (1 << 53))


def step_uniforms_numpy(seeds: np.ndarray, step: int) -> np.ndarray:
    """Reference implementation of ``step_uniforms`` with Python integers (for tests)."""
    out = np.empty(len(seeds), dtype=np.float64)
    for i, s in enumerate(np.asarray(seeds, dtype=np.int64).tolist()):
        z = (s + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out[i] = (z >> 11) / float(1 << 53)
    return out


class StepStats(NamedTuple):
    """Per-step fields (docs/metrics.md section 1) of one step for a batch of rollouts (all ``[B]`` tensors)."""

    token: torch.Tensor  # int64
    entropy: torch.Tensor  # float32
    eos_prob: torch.Tensor  # float32
    logprob: torch.Tensor  # float32
    kept_mass: torch.Tensor  # float32


class _Kept(NamedTuple):
    """The kept distribution over candidate columns (sorted or in vocabulary order)."""

    logq: torch.Tensor  # [B, C] float32, -inf outside the kept set
    index: torch.Tensor | None  # [B, C] vocabulary ids of the columns (None: identity)
    log_kept_mass: torch.Tensor  # [B] float32


def _kept_distribution(logits: torch.Tensor, policy: DecodingPolicy) -> _Kept:
    """Apply temperature and truncations; return log q over candidate columns."""
    z = logits.float() / float(policy.temperature)
    vocab = z.shape[-1]
    lse_full = torch.logsumexp(z, dim=-1)
    top_k = policy.top_k if policy.top_k is not None and policy.top_k < vocab else None
    index: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    if top_k is not None:
        vals, index = torch.topk(z, top_k, dim=-1, sorted=False)
        # Canonical order (value descending, ties by id), as a stable full sort would give.
        index, perm = torch.sort(index, dim=-1)
        vals, perm = torch.sort(vals.gather(1, perm), dim=-1, descending=True, stable=True)
        index = index.gather(1, perm)
        kth = vals[:, -1:]
        if bool(((z >= kth).sum(dim=-1) > top_k).any()):
            # Ties with the k-th value: all of them are kept (as transformers does).
            vals, index = torch.sort(z, dim=-1, descending=True, stable=True)
            keep = vals >= kth
    elif policy.top_p < 1.0 or policy.min_p > 0.0:
        vals, index = torch.sort(z, dim=-1, descending=True, stable=True)
    else:
        vals = z
    if keep is None:
        keep = torch.isfinite(vals)
    if policy.top_p < 1.0:
        probs = torch.softmax(torch.where(keep, vals, -math.inf), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep = keep & (mass_before < policy.top_p)
        keep[:, 0] = True
    if policy.min_p > 0.0:
        # p >= min_p * p_max  <=>  z >= z_max + log(min_p), whatever the renormalisation.
        keep = keep & (vals >= vals[:, :1] + math.log(policy.min_p))
    masked = torch.where(keep, vals, -math.inf)
    lse_kept = torch.logsumexp(masked, dim=-1, keepdim=True)
    logq = masked - lse_kept
    return _Kept(logq, index, lse_kept[:, 0] - lse_full)


def _eos_mass(kept: _Kept, eos_ids: torch.Tensor) -> torch.Tensor:
    q = torch.exp(kept.logq)
    if kept.index is None:
        return q[:, eos_ids].sum(dim=-1)
    if kept.index.shape[-1] <= 4096:
        is_eos = (kept.index.unsqueeze(-1) == eos_ids).any(dim=-1)
        return torch.where(is_eos, q, 0.0).sum(dim=-1)
    full = torch.zeros_like(q).scatter_(1, kept.index, q)
    return full[:, eos_ids].sum(dim=-1)


def step_stats(
    logits: torch.Tensor,
    policy: DecodingPolicy,
    eos_ids: torch.Tensor,
    uniforms: torch.Tensor,
) -> StepStats:
    """Sample one step for a batch and return the per-step fields of docs/metrics.md section 1.

    ``logits`` is ``[B, V]`` (any float dtype), ``eos_ids`` an int64 tensor of every EOS id,
    ``uniforms`` ``[B]`` values in [0, 1) (e.g. from ``step_uniforms``).
    """
    batch = logits.shape[0]
    if policy.temperature == 0:
        token = torch.argmax(logits.float(), dim=-1)
        is_eos = (token.unsqueeze(-1) == eos_ids).any(dim=-1)
        zeros = torch.zeros(batch, dtype=torch.float32, device=logits.device)
        return StepStats(token, zeros, is_eos.float(), zeros.clone(), zeros + 1.0)
    kept = _kept_distribution(logits, policy)
    q = torch.exp(kept.logq)
    entropy = -torch.where(q > 0, q * kept.logq, 0.0).sum(dim=-1)
    cdf = torch.cumsum(q.double(), dim=-1)
    target = uniforms.double().unsqueeze(-1) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True)
    # Rounding can push the target past the last kept column: take the last kept one.
    cols = q.shape[-1]
    last_kept = (cols - 1) - torch.argmax(torch.flip(q > 0, dims=[-1]).int(), dim=-1, keepdim=True)
    pos = torch.minimum(pos, last_kept)
    logprob = kept.logq.gather(1, pos)[:, 0]
    token = pos[:, 0] if kept.index is None else kept.index.gather(1, pos)[:, 0]
    return StepStats(
        token,
        entropy,
        _eos_mass(kept, eos_ids),
        logprob,
        torch.exp(kept.log_kept_mass),
    )


def policy_logprobs(logits: torch.Tensor, policy: DecodingPolicy) -> torch.Tensor:
    """The policy's full renormalised log-probs ``[B, V]`` (-inf outside the kept set).

    Used for teacher-forced verification and cross-engine checks; temperature 0 gives the
    point mass on the first argmax.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    if policy.temperature == 0:
        out = torch.full(logits.shape, -math.inf, dtype=torch.float32, device=logits.device)
        out.scatter_(1, torch.argmax(logits.float(), dim=-1, keepdim=True), 0.0)
        return out
    kept = _kept_distribution(logits, policy)
    if kept.index is None:
        return kept.logq
    out = torch.full(logits.shape, -math.inf, dtype=torch.float32, device=logits.device)
    return out.scatter_(1, kept.index, kept.logq)
