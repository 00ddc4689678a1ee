"""Independent recomputation of SPEC section-1 step fields by teacher forcing with transformers.

For tokens an engine generated, one forward pass over prompt + tokens gives every step's full
logits; the policy is applied in float64 with vLLM's order of operations (temperature, min-p,
top-k keeping ties at the k-th value, top-p dropping the low tail whose ascending cumulative
mass is <= 1 - p, always keeping the top token), then entropy, EOS mass and sampled log-prob.
"""

from __future__ import annotations

import numpy as np


def policy_logprobs(logits, temperature: float, top_k, top_p: float, min_p: float):
    """Log-probs [steps, V] (float64, -inf outside the kept set) of the sampled policy."""
    import torch

    x = logits.to(torch.float64) / temperature
    if min_p > 0:
        p = torch.softmax(x, -1)
        x = x.masked_fill(p < min_p * p.max(-1, keepdim=True).values, -torch.inf)
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -torch.inf)
    if top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=False)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), -torch.inf)
    return torch.log_softmax(x, -1)


def teacher_forced_fields(model, prompt_ids, token_ids, policy, eos_ids) -> dict[str, np.ndarray]:
    """entropy, eos_prob, logprob per step for ``token_ids`` following ``prompt_ids``."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].to(torch.float64)
    n = len(token_ids)
    step_logits = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + n]
    lp = policy_logprobs(step_logits, policy.temperature, policy.top_k, policy.top_p, policy.min_p)
    p = lp.exp()
    ent = -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)
    eos = p[:, list(eos_ids)].sum(-1)
    sampled = lp[torch.arange(n), torch.tensor(list(token_ids))]
    return {
        "entropy": ent.numpy(),
        "eos_prob": eos.numpy(),
        "logprob": sampled.numpy(),
        "argmax": step_logits.argmax(-1).numpy(),
    }
