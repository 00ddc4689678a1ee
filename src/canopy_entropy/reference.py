"""An exact reference "language": a finite-state stochastic generator with an EOS probability
per state, whose CE* = H(N, Y), H(N), E[N], length law and entropy rate are known in closed
form (linear algebra / dynamic programming), plus a seeded vectorised sampler that writes its
rollouts in the store format. Tests and synthetic runs use it as ground truth.

Model: states ``s = 0..S-1``; in state ``s`` the step emits EOS with probability ``e_s``,
otherwise content token ``v`` with probability ``(1 - e_s) c_s(v)`` and moves to the state
``next[s, v]``. Because the token sequence determines the state path, ``H(N, Y | X)`` is the
expected sum of the per-step entropies ``H_s = h(e_s) + (1 - e_s) H(c_s)`` along the path.
A prompt is an initial state distribution ``pi_0``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.special import entr

from canopy_entropy.run.manifest import ModelRecord, PolicyRecord, SeedScheme, update_manifest
from canopy_entropy.store import ROLLOUT_SCHEMA, RunStore, slug

TAIL_TOL = 1e-15


@dataclass
class ExactValues:
    """Closed-form values for one prompt (initial distribution) and length cap."""

    ce_star: float
    mean_length: float
    length_entropy: float
    entropy_rate: float
    length_pmf: np.ndarray  # P(N = n) for n = 1..len; with a cap T, plus P(no EOS by T) last
    truncation_prob: float
    stop_entropy: float

    @property
    def genppl(self) -> float:
        return math.exp(self.ce_star / self.mean_length)

    @property
    def bf(self) -> float:
        return math.exp(self.entropy_rate)

    @property
    def content_entropy(self) -> float:
        return self.ce_star - self.length_entropy


class FiniteStateLM:
    """Finite-state language with per-state EOS probability; exact values and a sampler."""

    def __init__(self, eos_prob: np.ndarray, emission: np.ndarray, next_state: np.ndarray):
        self.eos_prob = np.asarray(eos_prob, dtype=np.float64)
        self.emission = np.asarray(emission, dtype=np.float64)
        self.next_state = np.asarray(next_state, dtype=np.int64)
        S, V = self.emission.shape
        if self.eos_prob.shape != (S,) or self.next_state.shape != (S, V):
            raise ValueError("eos_prob must be [S], emission and next_state [S, V]")
        if not np.all((self.eos_prob > 0) & (self.eos_prob <= 1)):
            raise ValueError("every state needs an EOS probability in (0, 1] so rollouts end")
        if not np.allclose(self.emission.sum(axis=1), 1.0):
            raise ValueError("emission rows must sum to 1")
        self.n_states, self.vocab = S, V
        self.eos_id = V
        # one-step outcome law per state: [EOS, token 0..V-1]
        self.step_prob = np.concatenate(
            [self.eos_prob[:, None], (1.0 - self.eos_prob)[:, None] * self.emission], axis=1
        )
        self.step_entropy = entr(self.step_prob).sum(axis=1)
        self.stop_part = entr(self.eos_prob) + entr(1.0 - self.eos_prob)
        Q = np.zeros((S, S))
        for s in range(S):
            np.add.at(Q[s], self.next_state[s], (1.0 - self.eos_prob[s]) * self.emission[s])
        self.Q = Q

    @classmethod
    def random(
        cls, n_states: int = 4, vocab: int = 6, seed: int = 0, mean_eos: float = 0.1
    ) -> FiniteStateLM:
        """A random model: Dirichlet emissions, random transitions, EOS probabilities around
        ``mean_eos`` (so lengths are about 1/mean_eos)."""
        rng = np.random.default_rng(seed)
        emission = rng.dirichlet(np.full(vocab, 0.6), size=n_states)
        next_state = rng.integers(0, n_states, size=(n_states, vocab))
        eos = np.clip(mean_eos * rng.uniform(0.3, 1.7, size=n_states), 1e-4, 1.0)
        return cls(eos, emission, next_state)

    # -- exact values ----------------------------------------------------------------------
    def _alive(self, initial: np.ndarray, cap: int | None) -> np.ndarray:
        """A_t = pi_0 Q^(t-1), t = 1..L: state law of rollouts still running at step t."""
        rows = [np.asarray(initial, dtype=np.float64)]
        limit = cap if cap is not None else 10**7
        while len(rows) < limit:
            nxt = rows[-1] @ self.Q
            if cap is None and nxt.sum() < TAIL_TOL:
                break
            rows.append(nxt)
        return np.array(rows)

    def exact(self, initial: np.ndarray | None = None, max_new_tokens: int | None = None):
        """Exact CE*, E[N], H(N), E[H/N], length law for one prompt; with a cap T the values are
        those of the truncated rollouts (the target_T of docs/metrics.md section 6)."""
        pi0 = (
            np.full(self.n_states, 1.0 / self.n_states)
            if initial is None
            else np.asarray(initial, dtype=np.float64)
        )
        A = self._alive(pi0, max_new_tokens)  # [L, S]
        L = len(A)
        e = self.eos_prob
        pmf = A @ e  # P(N = n), n = 1..L
        alive_mass = A.sum(axis=1)
        trunc = float(A[-1] @ (1.0 - e)) if max_new_tokens is not None else 0.0
        law = np.append(pmf, trunc) if max_new_tokens is not None else pmf
        ce = float((A @ self.step_entropy).sum())
        stop = float((A @ self.stop_part).sum())
        mean_len = float(alive_mass.sum())
        # E[H 1{N = n}] = sum_{t <= n} (A_t * H) . Q^(n-t) e  (a convolution over t)
        B = np.empty((L, self.n_states))
        B[0] = e
        for k in range(1, L):
            B[k] = self.Q @ B[k - 1]
        W = A * self.step_entropy  # [L, S]
        C = W @ B.T  # C[t, k] = W_t . B_k
        n_idx = np.add.outer(np.arange(L), np.arange(L))  # (t-1) + k = n - 1
        eh = np.bincount(n_idx.ravel(), C.ravel(), minlength=2 * L)[:L]
        rate = float((eh / np.arange(1, L + 1)).sum())
        if max_new_tokens is not None:
            # rollouts cut at T: E[H_{1:T} 1{N > T}] = sum_t W_t . Q^(T-t) (1 - e)
            G = np.empty((L, self.n_states))
            G[0] = 1.0 - e
            for k in range(1, L):
                G[k] = self.Q @ G[k - 1]
            cut_h = float(sum(W[t] @ G[L - 1 - t] for t in range(L)))
            rate += cut_h / max_new_tokens
        return ExactValues(
            ce_star=ce,
            mean_length=mean_len,
            length_entropy=float(entr(law).sum()),
            entropy_rate=rate,
            length_pmf=law,
            truncation_prob=trunc,
            stop_entropy=stop,
        )

    def prompt_initials(self, n_prompts: int, seed: int) -> np.ndarray:
        """Initial state distributions of ``n_prompts`` prompts (seeded Dirichlet draws)."""
        rng = np.random.default_rng([seed, 7919])
        return rng.dirichlet(np.full(self.n_states, 0.5), size=n_prompts)

    def exact_prompts(
        self, initials: np.ndarray, max_new_tokens: int | None = None
    ) -> pd.DataFrame:
        """Exact per-prompt values (one row per initial distribution)."""
        rows = []
        for pi0 in initials:  # loop over prompts only
            ex = self.exact(pi0, max_new_tokens)
            rows.append(
                {
                    "ce_star": ex.ce_star,
                    "mean_length": ex.mean_length,
                    "length_entropy": ex.length_entropy,
                    "entropy_rate": ex.entropy_rate,
                    "stop_entropy": ex.stop_entropy,
                    "truncation_prob": ex.truncation_prob,
                    "genppl": ex.genppl,
                    "bf": ex.bf,
                }
            )
        return pd.DataFrame(rows)

    @staticmethod
    def pooled(exact_prompts: pd.DataFrame) -> dict[str, float]:
        """Pooled targets over prompts, with the same rules as the estimators (docs/metrics.md section 4)."""
        ce = float(exact_prompts["ce_star"].mean())
        n = float(exact_prompts["mean_length"].mean())
        rate = float(exact_prompts["entropy_rate"].mean())
        return {
            "ce_star": ce,
            "mean_length": n,
            "entropy_rate": rate,
            "length_entropy": float(exact_prompts["length_entropy"].mean()),
            "stop_entropy": float(exact_prompts["stop_entropy"].mean()),
            "genppl": math.exp(ce / n),
            "bf": math.exp(rate),
        }

    # -- sampling --------------------------------------------------------------------------
    def sample(
        self,
        initials: np.ndarray,
        m: int,
        seed: int,
        max_new_tokens: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Sample ``m`` rollouts per prompt, vectorised over rollouts (a loop over steps only).

        Returns flat per-step arrays in rollout order plus ``offsets`` (len R+1), ``prompt``
        and ``rollout_index`` per rollout and ``finish_reason`` ('eos' | 'length').
        """
        rng = np.random.default_rng(seed)
        initials = np.asarray(initials, dtype=np.float64)
        P = len(initials)
        R = P * m
        prompt = np.repeat(np.arange(P), m)
        cum0 = np.cumsum(initials, axis=1)
        state = (rng.random(R)[:, None] > cum0[prompt]).sum(axis=1)
        state = np.minimum(state, self.n_states - 1)
        cum = np.cumsum(self.step_prob, axis=1)
        log_step = np.log(np.where(self.step_prob > 0, self.step_prob, 1.0))
        cap = max_new_tokens if max_new_tokens is not None else 10**9
        alive = np.arange(R)
        steps_rollout, steps_outcome, steps_state = [], [], []
        t = 0
        length = np.zeros(R, dtype=np.int64)
        while alive.size and t < cap:
            s = state[alive]
            u = rng.random(alive.size)
            outcome = (u[:, None] > cum[s]).sum(axis=1)
            outcome = np.minimum(outcome, self.vocab)
            steps_rollout.append(alive)
            steps_outcome.append(outcome)
            steps_state.append(s)
            length[alive] += 1
            cont = outcome > 0
            alive = alive[cont]
            state[alive] = self.next_state[s[cont], outcome[cont] - 1]
            t += 1
        rid = np.concatenate(steps_rollout)
        out = np.concatenate(steps_outcome)
        st = np.concatenate(steps_state)
        order = np.argsort(rid, kind="stable")  # steps were appended in time order
        out, st = out[order], st[order]
        offsets = np.zeros(R + 1, dtype=np.int64)
        np.cumsum(length, out=offsets[1:])
        finished_eos = np.zeros(R, dtype=bool)
        last = offsets[1:] - 1
        finished_eos[:] = out[last] == 0
        return {
            "prompt": prompt,
            "rollout_index": np.tile(np.arange(m), P),
            "offsets": offsets,
            "token_ids": np.where(out == 0, self.eos_id, out - 1).astype(np.int32),
            "entropy": self.step_entropy[st].astype(np.float32),
            "eos_prob": self.eos_prob[st].astype(np.float32),
            "logprob": log_step[st, out].astype(np.float32),
            "kept_mass": np.ones(len(out), dtype=np.float32),
            "finish_reason": np.where(finished_eos, "eos", "length"),
        }

    def sample_store(
        self,
        run_dir: str | Path,
        n_prompts: int,
        m: int,
        seed: int,
        *,
        model: str = "fsm",
        variant: str = "base",
        family: str = "fsm",
        task: str = "synthetic",
        max_new_tokens: int | None = None,
        prompt_seed: int | None = None,
        run: str | None = None,
        with_eos_prob: bool = True,
        with_logprob: bool = True,
    ) -> np.ndarray:
        """Sample ``n_prompts`` x ``m`` rollouts into a run folder (one shard per call, store
        format incl. eos_prob/logprob/kept_mass) and record the model in the manifest.

        Prompt ``p`` (id ``p0000``...) starts from ``prompt_initials(n_prompts, prompt_seed)``
        (``prompt_seed`` defaults to ``seed``); returns those initial distributions so the
        caller can get exact values with ``exact_prompts``.
        """
        initials = self.prompt_initials(n_prompts, seed if prompt_seed is None else prompt_seed)
        draw = self.sample(initials, m, seed, max_new_tokens)
        store = RunStore(run_dir)
        run_name = run or Path(run_dir).name
        table = rollouts_table_from_flat(
            draw,
            run=run_name,
            keys={"model": model, "variant": variant, "family": family, "task": task},
            seed=seed,
            with_eos_prob=with_eos_prob,
            with_logprob=with_logprob,
        )
        store.write_rollouts(slug(model, variant, family, task, str(seed)), table)
        record = ModelRecord(
            label=model,
            model=model,
            variant=variant,
            family=family,
            source="reference",
            policy=PolicyRecord(temperature=1.0, max_new_tokens=max_new_tokens),
            seed_scheme=SeedScheme(
                kind="reference", description="reference sampler: one numpy Generator per call"
            ),
            vocab_size=self.vocab + 1,
            engine={"engine": "reference-fsm"},
        )
        update_manifest(
            run_dir,
            lambda m: dataclasses.replace(m, run=m.run or run_name).with_model(record),
        )
        return initials


def rollouts_table_from_flat(
    draw: dict[str, Any],
    *,
    run: str,
    keys: dict[str, str],
    seed: int,
    with_eos_prob: bool,
    with_logprob: bool,
) -> pa.Table:
    """Build ROLLOUT_SCHEMA rows straight from flat arrays + offsets (no per-row loop)."""
    R = len(draw["prompt"])
    offsets = pa.array(draw["offsets"].astype(np.int32))

    def lst(name: str, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(draw[name], type=typ))

    length = np.diff(draw["offsets"]).astype(np.int32)
    cols = {
        "run": pa.array([run] * R, pa.string()),
        **{k: pa.array([v] * R, pa.string()) for k, v in keys.items()},
        "prompt_id": pa.array([f"p{p:04d}" for p in draw["prompt"]], pa.string()),
        "rollout_index": pa.array(draw["rollout_index"].astype(np.int32)),
        "seed": pa.array(np.full(R, seed, dtype=np.int64)),
        "length": pa.array(length),
        "finish_reason": pa.array(draw["finish_reason"].tolist(), pa.string()),
        "token_ids": lst("token_ids", pa.int32()),
        "entropy": lst("entropy", pa.float32()),
        "eos_prob": lst("eos_prob", pa.float32())
        if with_eos_prob
        else pa.nulls(R, pa.list_(pa.float32())),
        "logprob": lst("logprob", pa.float32())
        if with_logprob
        else pa.nulls(R, pa.list_(pa.float32())),
        "kept_mass": lst("kept_mass", pa.float32()),
        "entropy_upper": pa.nulls(R, pa.list_(pa.float32())),
        "text": pa.nulls(R, pa.string()),
    }
    return pa.Table.from_pydict(cols, schema=ROLLOUT_SCHEMA)
