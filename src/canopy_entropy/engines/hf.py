"""The transformers engine: continuous batching over a left-padded KV cache.

``batch_size`` slots are stepped together. Each prompt is prefilled once (batch 1) and its KV
is copied into every slot that starts one of its rollouts; a slot whose rollout ends is
refilled at once with the next pending rollout of the same or a later prompt of the call, so
no slot idles while work is pending (only the last rollouts of a call run in a shrinking
batch). Rows of different lengths share one ``DynamicCache`` right-aligned: row ``i`` holds
its ``n_i`` tokens in the last ``n_i`` columns, the columns before are zeros masked out by the
attention mask, and each row's position id is its own ``n_i``. Masked keys get exactly zero
attention weight and rotary positions are the unpadded ones, so every step equals the
unbatched computation up to float summation order; left padding (not per-row caches) keeps
one batched forward per step. All-padding columns on the left are cropped whenever rows
change, so the cache is at most max(prompt) + max_new_tokens wide.

Each step computes the per-step fields of docs/metrics.md section 1 with ``policy_ops.step_stats`` on the device, in
float32, written into per-rollout device buffers copied to the host once per call. A rollout's
randomness is a function of its seed and step only, so its tokens do not depend on batch size,
refill order or prompts per call (the float fields agree to rounding, ~1e-6). An out-of-memory error halves the batch size and restarts
the rollouts in flight (finished ones are kept). The KV cache is passed as ``cache=`` (the
transformers 5.x name; ``past_key_values`` is deprecated) where the model accepts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import typing
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from canopy_entropy.engines.base import DecodingPolicy, Engine, RolloutBatch, check_options
from canopy_entropy.engines.policy_ops import step_stats, step_uniforms
from canopy_entropy.errors import CanopyError, ConfigError, require

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}  # fmt: skip
_FINISH = ("eos", "length", "stop")
# Third-party modules whose warnings are notes for developers, not for users (unless verbose).
_QUIET_MODULES = r"(transformers|huggingface_hub|accelerate|torch|tokenizers)(\.|$)"

Request = tuple[list[int], np.ndarray, np.ndarray]


@dataclass(frozen=True)
class HFOptions:
    """The options ``HFEngine`` accepts (``[engine] options`` / ``engine_options``)."""

    device: str = "auto"  # "auto" (CUDA if visible), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
    batch_size: int | None = None  # slots stepped together; default all M on CPU, 256 on CUDA
    prompts_per_call: int | None = None  # default HFEngine.prompts_per_call (see there)
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None  # e.g. "sdpa", "eager"
    verbose: bool = False  # let transformers' progress bars and warnings through

    @classmethod
    def parse(cls, options: dict[str, Any]) -> HFOptions:
        """Options from a dict, refusing unknown names and values of the wrong type."""
        check_options(cls, options, "hf")
        opts = cls(**options)
        if opts.batch_size is not None and opts.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 (got {opts.batch_size})")
        if opts.prompts_per_call is not None and opts.prompts_per_call < 1:
            raise ConfigError(f"prompts_per_call must be >= 1 (got {opts.prompts_per_call})")
        return opts


def _is_oom(exc: BaseException) -> bool:
    torch = require("torch", "hf")
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _sha256(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text else None


def model_eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every EOS id of a model: its generation config's list, its config's, the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.extend([value] if isinstance(value, int) else list(value))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(sorted(set(int(i) for i in ids)))


@contextlib.contextmanager
def quiet_transformers(verbose: bool = False):
    """Keep transformers' and the hub's progress bars, info logs and warnings out of the output.

    Errors still surface: exceptions are untouched and ERROR-level log records still print.
    The previous verbosity, progress-bar state and warning filters are restored on exit.
    """
    if verbose:
        yield
        return
    from transformers.utils import logging as tf_logging

    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    hub = None
    try:
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        hub = (are_progress_bars_disabled(), enable_progress_bars)
        disable_progress_bars()
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        pass
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_QUIET_MODULES)
            yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
        if hub is not None and not hub[0]:
            hub[1]()


class HFEngine(Engine):
    """Sample rollouts with a transformers causal LM on CPU or CUDA.

    ``model`` is an offline alias (see ``canopy_entropy.models``), a local folder or a hub
    id; options are the fields of ``HFOptions``. ``dtype='auto'`` runs bfloat16 on CUDA and
    float32 on CPU; the policy math is float32 either way. ``batch_size`` caps rollouts
    stepped together and halves automatically on out-of-memory errors.
    """

    name = "hf"
    # option name -> accepted type, for validating engine options before construction
    OPTIONS: ClassVar[dict[str, Any]] = typing.get_type_hints(HFOptions)
    # Prompts whose rollouts share the slots in one generate_run call. Above 1 each prompt's
    # tail is filled with the next prompt's rollouts: tokens never change, but float fields
    # move in the last bits with the batch's make-up, so a resumed run is bit-identical to an
    # uninterrupted one only at 1 (or when generate_run aligns calls to fixed prompt chunks).
    prompts_per_call: int = 1

    def __init__(self, model: str, **options: Any):
        opts = HFOptions.parse(options)
        torch = require("torch", "hf")
        transformers = require("transformers", "hf")
        from canopy_entropy.models import resolve_model

        device, dtype = opts.device, opts.dtype
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
            )
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
        self.model_name = model
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.batch_size = opts.batch_size
        if opts.prompts_per_call is not None:
            self.prompts_per_call = opts.prompts_per_call
        # --verbose (CANOPY_VERBOSE=1, inherited by the per-model child processes) or the option
        self.verbose = opts.verbose or os.environ.get("CANOPY_VERBOSE") == "1"
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if opts.revision:
            kwargs["revision"] = opts.revision
        if opts.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if opts.attn_implementation:
            kwargs["attn_implementation"] = opts.attn_implementation
        with quiet_transformers(self.verbose):
            self.model_path = resolve_model(model, verbose=self.verbose)
            try:
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                    self.model_path,
                    revision=opts.revision,
                    trust_remote_code=opts.trust_remote_code,
                )
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.model_path, **kwargs
                )
            except OSError as exc:
                raise CanopyError(
                    f"cannot load model '{model}': {str(exc).splitlines()[0]}; give a local "
                    "folder, an offline alias (smollm2-135m-instruct, gemma3-270m) or a hub id "
                    "with network"
                ) from exc
        self._finish_setup()

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        name: str = "in-memory",
        batch_size: int | None = None,
        prompts_per_call: int | None = None,
        verbose: bool = False,
    ) -> HFEngine:
        """Wrap an already loaded model and tokenizer (benchmarks, notebooks); no loading."""
        opts = HFOptions.parse(
            {"batch_size": batch_size, "prompts_per_call": prompts_per_call, "verbose": verbose}
        )
        engine = cls.__new__(cls)
        engine.model_name = name
        engine.model_path = name
        engine.model = model
        engine.tokenizer = tokenizer
        engine.device = next(model.parameters()).device
        engine.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        engine.batch_size = opts.batch_size
        if opts.prompts_per_call is not None:
            engine.prompts_per_call = opts.prompts_per_call
        engine.verbose = opts.verbose
        engine._finish_setup()
        return engine

    def _finish_setup(self) -> None:
        self.model.to(self.device).eval()
        self.eos_token_ids = model_eos_ids(self.model, self.tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        params = inspect.signature(self.model.forward).parameters
        # transformers 5.x takes the KV cache as `cache`; older versions and remote code
        # as `past_key_values`.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # forwards: decode steps; idle_slot_steps: empty slots summed over decode steps
        self.stats = {"forwards": 0, "tokens": 0, "idle_slot_steps": 0}

    @property
    def occupancy(self) -> float:
        """Useful tokens / slot-steps so far (1 = no slot ever idled)."""
        tokens = self.stats["tokens"]
        return tokens / (tokens + self.stats["idle_slot_steps"]) if tokens else 0.0

    def describe(self) -> dict:
        """Manifest facts: model path, dtype, device, tokenizer and chat-template hashes."""
        import torch
        import transformers

        tok_json = getattr(self.tokenizer, "backend_tokenizer", None)
        return {
            "engine": self.name,
            "model": self.model_name,
            "model_path": self.model_path,
            "dtype": self.dtype,
            "device": str(self.device),
            "tokenizer_sha256": _sha256(tok_json.to_str()) if tok_json is not None else None,
            "chat_template_sha256": _sha256(getattr(self.tokenizer, "chat_template", None)),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }

    def sample(
        self,
        prompt_token_ids: list[int],
        seeds: np.ndarray,
        rollout_indices: np.ndarray,
        policy: DecodingPolicy,
    ) -> RolloutBatch:
        """Sample ``len(seeds)`` rollouts of one prompt (prefilled once)."""
        return self._sample_requests([(prompt_token_ids, seeds, rollout_indices)], policy)[0]

    def sample_many(self, requests: list[Request], policy: DecodingPolicy) -> list[RolloutBatch]:
        """Sample the rollouts of several prompts through one pool of continuously refilled slots."""
        return self._sample_requests(requests, policy)

    # -- internals ---------------------------------------------------------------------------
    def _sample_requests(self, requests: list[Request], policy: DecodingPolicy):
        import torch

        policy.validate()
        prompts: list[list[int]] = []
        seeds: list[np.ndarray] = []
        indices: list[np.ndarray] = []
        for ids, s, r in requests:
            if len(ids) == 0:
                raise ConfigError("the prompt has no tokens; give a non-empty prompt")
            s, r = np.asarray(s, dtype=np.int64), np.asarray(r, dtype=np.int32)
            if len(s) != len(r):
                raise ConfigError(
                    f"{len(s)} seeds for {len(r)} rollout indices; give one seed per rollout"
                )
            prompts.append([int(t) for t in ids])
            seeds.append(s)
            indices.append(r)
        counts = np.array([len(s) for s in seeds], dtype=np.int64)
        owner = np.repeat(np.arange(len(prompts)), counts)
        all_seeds = np.concatenate(seeds) if seeds else np.zeros(0, dtype=np.int64)
        with torch.inference_mode(), quiet_transformers(self.verbose):
            rec = self._decode(prompts, owner, all_seeds, policy)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [
            self._assemble(rec, int(bounds[p]), int(bounds[p + 1]), seeds[p], indices[p])
            for p in range(len(prompts))
        ]

    def _decode(self, prompts, owner, seeds, policy) -> dict[str, np.ndarray]:
        """Run every rollout to its end; restart the ones in flight at half the slots on OOM."""
        import torch

        total = len(seeds)
        most = int(np.bincount(owner).max()) if total else 0  # largest M of the call
        default = most if self.device.type == "cpu" else min(most, 256)
        slots = min(self.batch_size or default, total)
        rec = _Record(total, policy.max_new_tokens, self.device)
        while not rec.finished.all():
            pending = deque(np.flatnonzero(~rec.finished).tolist())
            try:
                self._run_slots(prompts, owner, seeds, policy, rec, pending, slots)
            except Exception as exc:
                if not _is_oom(exc) or slots == 1:
                    raise
                slots = max(1, slots // 2)
                self.batch_size = slots
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return rec.to_host()

    def _run_slots(self, prompts, owner, seeds, policy, rec, pending: deque, slots: int) -> None:
        """Step ``slots`` rows until ``pending`` is empty and every row has ended."""
        import torch

        dev = self.device
        cap = policy.max_new_tokens
        eos = torch.tensor(policy.eos_token_ids, dtype=torch.long, device=dev)
        seed_t = torch.as_tensor(seeds, dtype=torch.int64, device=dev)
        left = np.bincount(owner[list(pending)], minlength=len(prompts))  # not yet started
        prefixes: dict[int, tuple[Any, Any]] = {}
        stop = _StopChecker(self.tokenizer, policy.stop_strings) if policy.stop_strings else None

        def start(free: np.ndarray) -> np.ndarray:
            """Put the next pending rollouts into slots ``free``; return the rollouts."""
            nonlocal logits
            new = np.array([pending.popleft() for _ in range(len(free))], dtype=np.int64)
            for p in np.unique(owner[new]).tolist():
                if p not in prefixes:
                    prefixes[p] = self._prefill(prompts[p])
                rows = free[owner[new] == p]
                if batch.cache is None:  # the first rows: the batch takes this prefix's shape
                    batch.create(prefixes[p][0], len(free), len(prompts[p]))
                    logits = prefixes[p][1].new_empty((len(free), prefixes[p][1].shape[-1]))
                batch.put(torch.as_tensor(rows, device=dev), prefixes[p][0], len(prompts[p]))
                logits[rows] = prefixes[p][1]
                left[p] -= len(rows)
                if left[p] == 0:
                    del prefixes[p]
            if stop is not None:
                stop.reset(new)
            return new

        batch = _PaddedCache(self.model, self._cache_kw, dev)
        n = min(slots, len(pending))
        logits = None
        rid_h = start(np.arange(n))  # rollout of each slot (host)
        rid = torch.as_tensor(rid_h, device=dev)
        step = torch.zeros(n, dtype=torch.int64, device=dev)
        tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        need = None  # slots to sample now (None: every slot, after a forward)
        while True:
            dead: list[np.ndarray] = []
            while need is None or len(need):
                sel_h = slice(None) if need is None else need
                sel = sel_h if need is None else torch.as_tensor(need, device=dev)
                r, t = rid[sel].clone(), step[sel].clone()
                stats = step_stats(logits[sel], policy, eos, step_uniforms(seed_t[r], t))
                rec.write(r, t, stats)
                is_eos = (stats.token.unsqueeze(-1) == eos).any(dim=-1)
                done = is_eos | (t == cap - 1)
                rec.reason[r] = torch.where(is_eos, 0, rec.reason[r])
                if stop is not None:
                    hit = stop.update(rid_h[sel_h], stats.token.cpu().numpy())
                    hit_t = torch.as_tensor(hit, device=dev) & ~done
                    rec.reason[r] = torch.where(hit_t, 2, rec.reason[r])
                    done = done | hit_t
                tokens[sel] = stats.token
                step[sel] = t + 1
                if not bool(done.any()):
                    break
                rec.length[r[done]] = t[done] + 1
                free = np.arange(len(rid_h))[sel_h][done.cpu().numpy()]
                rec.finished[rid_h[free]] = True
                k = min(len(free), len(pending))
                if k:
                    rid_h[free[:k]] = start(free[:k])
                    rid[free[:k]] = torch.as_tensor(rid_h[free[:k]], device=dev)
                    step[free[:k]] = 0
                dead.append(free[k:])
                need = free[:k]
            gone = np.concatenate(dead) if dead else np.zeros(0, dtype=np.int64)
            if len(gone):
                keep_h = np.setdiff1d(np.arange(len(rid_h)), gone)
                if len(keep_h) == 0:
                    break
                keep = torch.as_tensor(keep_h, device=dev)
                batch.keep(keep, keep_h)
                rid_h, rid, step, tokens = rid_h[keep_h], rid[keep], step[keep], tokens[keep]
            batch.trim()
            logits = batch.forward(tokens)
            need = None
            self.stats["forwards"] += 1
            self.stats["idle_slot_steps"] += slots - len(rid_h)

    def _prefill(self, prompt_token_ids: list[int]):
        """One prompt's KV cache and last-position logits (batch 1)."""
        import torch
        from transformers import DynamicCache

        ids = torch.tensor([prompt_token_ids], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        kw = {self._cache_kw: cache, "use_cache": True}
        try:
            out = self.model(input_ids=ids, logits_to_keep=1, **kw)
        except TypeError:  # remote-code models without logits_to_keep
            out = self.model(input_ids=ids, **kw)
        _check_layers(cache)
        return cache, out.logits[:, -1, :]

    def _assemble(self, rec, lo: int, hi: int, seeds, rollout_indices) -> RolloutBatch:
        """The RolloutBatch of rollouts ``[lo, hi)`` of the call (one prompt)."""
        lengths = rec["length"][lo:hi]
        mask = np.arange(rec["tokens"].shape[1])[None, :] < lengths[:, None]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = rec["tokens"][lo:hi][mask].astype(np.int32)
        floats = [rec["floats"][j][lo:hi][mask].astype(np.float32) for j in range(4)]
        self.stats["tokens"] += int(offsets[-1])
        per_rollout = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
        text = self.tokenizer.batch_decode(per_rollout, skip_special_tokens=True)
        return RolloutBatch(
            rollout_index=np.asarray(rollout_indices, dtype=np.int32),
            seed=np.asarray(seeds, dtype=np.int64),
            finish_reason=[_FINISH[r] for r in rec["reason"][lo:hi]],
            offsets=offsets,
            token_ids=tokens,
            entropy=floats[0],
            eos_prob=floats[1],
            logprob=floats[2],
            kept_mass=floats[3],
            text=list(text),
        )

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        import torch

        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_layers(cache) -> None:
    """Refuse cache layers whose state the padded batch cannot move (linear attention, ...)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise CanopyError(
                f"the model's cache layer {type(layer).__name__} is not supported by the "
                "transformers engine (only full and sliding-window attention); use the vllm engine"
            )


class _Record:
    """Per-rollout device buffers of the per-step fields of docs/metrics.md section 1, copied to the host once."""

    def __init__(self, total: int, cap: int, device):
        import torch

        self.tokens = torch.full((total, cap), -1, dtype=torch.int32, device=device)
        self.floats = torch.full((4, total, cap), float("nan"), dtype=torch.float32, device=device)
        self.length = torch.full((total,), cap, dtype=torch.int64, device=device)
        self.reason = torch.ones(total, dtype=torch.int8, device=device)  # default 'length'
        self.finished = np.zeros(total, dtype=bool)  # host side, for scheduling

    def write(self, r, t, stats) -> None:
        import torch

        self.tokens[r, t] = stats.token.to(torch.int32)
        self.floats[:, r, t] = torch.stack(
            [stats.entropy, stats.eos_prob, stats.logprob, stats.kept_mass]
        )

    def to_host(self) -> dict[str, np.ndarray]:
        return {
            "tokens": self.tokens.cpu().numpy(),
            "floats": self.floats.cpu().numpy(),
            "length": self.length.cpu().numpy(),
            "reason": self.reason.cpu().numpy(),
        }


class _PaddedCache:
    """A DynamicCache whose rows hold different prompts and lengths, right-aligned.

    ``width`` columns; row ``i`` holds its ``lengths[i]`` tokens in the last columns. Sliding
    window layers keep their last ``window - 1`` columns and count ``width`` as their length,
    so transformers' masks line up with the shared attention mask.
    """

    def __init__(self, model, cache_kw: str, device):
        self.model = model
        self.cache_kw = cache_kw
        self.device = device
        self.cache = None
        self.width = 0
        self.lengths = np.zeros(0, dtype=np.int64)

    def create(self, prefix, rows: int, width: int) -> None:
        """A batch of ``rows`` copies of a prefix (rows are overwritten by ``put``)."""
        import copy

        self.cache = copy.copy(prefix)
        self.cache.layers = [copy.copy(layer) for layer in prefix.layers]
        self.cache.batch_repeat_interleave(rows)
        self.width = width
        self.lengths = np.full(rows, width, dtype=np.int64)

    def put(self, rows, prefix, length: int) -> None:
        """Overwrite slots ``rows`` (a device index tensor) with a prefix of ``length`` tokens."""
        import torch

        if length > self.width:
            self._pad_left(length - self.width)
        for layer, src in zip(self.cache.layers, prefix.layers, strict=True):
            for name in ("keys", "values"):
                dst, part = getattr(layer, name), getattr(src, name)
                fill = torch.zeros((len(rows), *dst.shape[1:]), dtype=dst.dtype, device=dst.device)
                fill[:, :, dst.shape[2] - part.shape[2] :] = part
                dst[rows] = fill
        self.lengths[rows.cpu().numpy()] = length

    def keep(self, keep, keep_h: np.ndarray) -> None:
        """Keep only slots ``keep`` (device tensor; ``keep_h`` the same on the host)."""
        self.cache.batch_select_indices(keep)
        self.lengths = self.lengths[keep_h]

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row."""
        cut = self.width - int(self.lengths.max())
        if cut <= 0:
            return
        self.width -= cut
        for layer in self.cache.layers:
            stored = min(self.width, getattr(layer, "sliding_window", self.width + 1) - 1)
            layer.keys = layer.keys[:, :, -stored:]
            layer.values = layer.values[:, :, -stored:]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = self.width

    def _pad_left(self, extra: int) -> None:
        import torch

        self.width += extra
        for layer in self.cache.layers:
            stored = min(self.width, getattr(layer, "sliding_window", self.width + 1) - 1)
            for name in ("keys", "values"):
                t = getattr(layer, name)
                pad = t.new_zeros((t.shape[0], t.shape[1], stored - t.shape[2], t.shape[3]))
                setattr(layer, name, torch.cat([pad, t], dim=2))
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = self.width

    def forward(self, tokens):
        """Feed one token per row; return next-token logits ``[rows, V]``."""
        import torch

        lengths = torch.as_tensor(self.lengths, device=self.device)
        mask = None
        if (self.lengths != self.width).any():
            cols = torch.arange(self.width + 1, device=self.device)
            mask = cols[None, :] >= (self.width - lengths)[:, None]
        out = self.model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=mask,
            position_ids=lengths.unsqueeze(-1),
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        self.width += 1
        self.lengths = self.lengths + 1
        return out.logits[:, -1, :]


class _StopChecker:
    """Detects stop strings in the tail of each rollout's decoded text (host side)."""

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.window = max(len(s) for s in stop_strings) + 8
        self.history: dict[int, list[int]] = {}

    def reset(self, rollouts: np.ndarray) -> None:
        for r in rollouts.tolist():
            self.history[r] = []

    def update(self, rollouts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(rollouts), dtype=bool)
        for j, (r, tok) in enumerate(zip(rollouts.tolist(), tokens.tolist(), strict=True)):
            hist = self.history[r]
            hist.append(tok)
            tail = self.tokenizer.decode(hist[-self.window :], skip_special_tokens=False)
            hit[j] = any(s in tail for s in self.stop_strings)
        return hit
