"""The transformers engine: a batched sampling loop with a shared, expanded KV cache.

For one prompt: prefill it once, expand its cache to the batch of rollouts, then step all
rows in lockstep (every active row has the same length, so no padding or attention mask is
needed). Each step computes the SPEC section-1 fields with ``policy_ops.step_stats`` on the
device, in float32, and writes them into ``[batch, max_new_tokens]`` device buffers copied to
the host once per batch. Finished rows are dropped from the batch and the cache. An
out-of-memory error halves the batch size and redoes that batch (results are unchanged:
randomness is a function of the rollout seed and step only).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from canopy_entropy.engines.base import DecodingPolicy, Engine, RolloutBatch
from canopy_entropy.engines.policy_ops import step_stats, step_uniforms
from canopy_entropy.errors import CanopyError, ConfigError, require

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}  # fmt: skip
_FINISH = ("eos", "length", "stop")


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


class HFEngine(Engine):
    """Sample rollouts with a transformers causal LM on CPU or CUDA.

    ``model`` is an offline alias (see ``canopy_entropy.models``), a local folder or a hub
    id. ``dtype='auto'`` runs bfloat16 on CUDA and float32 on CPU; the policy math is float32
    either way. ``batch_size`` caps rollouts stepped together (default: all M on CPU, up to
    256 on CUDA); it halves automatically on out-of-memory errors.
    """

    name = "hf"

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        attn_implementation: str | None = None,
    ):
        torch = require("torch", "hf")
        transformers = require("transformers", "hf")
        from canopy_entropy.models import resolve_model

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
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
        self.model_name = model
        self.model_path = resolve_model(model)
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if revision:
            kwargs["revision"] = revision
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.model_path, revision=revision, trust_remote_code=trust_remote_code
            )
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.model_path, **kwargs
            )
        except OSError as exc:
            raise CanopyError(
                f"cannot load model '{model}': {str(exc).splitlines()[0]}; give a local folder, "
                "an offline alias (smollm2-135m-instruct, gemma3-270m) or a hub id with network"
            ) from exc
        self._finish_setup()

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, name: str = "in-memory", batch_size: int | None = None
    ) -> HFEngine:
        """Wrap an already loaded model and tokenizer (benchmarks, notebooks); no loading."""
        engine = cls.__new__(cls)
        engine.model_name = name
        engine.model_path = name
        engine.model = model
        engine.tokenizer = tokenizer
        engine.device = next(model.parameters()).device
        engine.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        engine.batch_size = batch_size
        engine._finish_setup()
        return engine

    def _finish_setup(self) -> None:
        self.model.to(self.device).eval()
        self.eos_token_ids = model_eos_ids(self.model, self.tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.stats = {"steps": 0, "tokens": 0}

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
        import torch

        policy.validate()
        if not prompt_token_ids:
            raise ConfigError("the prompt has no tokens; give a non-empty prompt")
        seeds = np.asarray(seeds, dtype=np.int64)
        total = len(seeds)
        default = total if self.device.type == "cpu" else min(total, 256)
        batch = min(self.batch_size or default, total)
        with torch.inference_mode():
            prefix_cache, prefix_logits = self._prefill(prompt_token_ids)
            parts: list[dict[str, np.ndarray]] = []
            start = 0
            while start < total:
                size = min(batch, total - start)
                try:
                    parts.append(
                        self._sample_batch(
                            prefix_cache, prefix_logits, seeds[start : start + size], policy
                        )
                    )
                except Exception as exc:
                    if not _is_oom(exc) or size == 1:
                        raise
                    batch = max(1, size // 2)
                    self.batch_size = batch
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                start += size
        return self._assemble(parts, seeds, np.asarray(rollout_indices, dtype=np.int32))

    # -- internals ---------------------------------------------------------------------------
    def _prefill(self, prompt_token_ids: list[int]):
        import torch
        from transformers import DynamicCache

        ids = torch.tensor([prompt_token_ids], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        try:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        except TypeError:  # remote-code models without logits_to_keep
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.past_key_values, out.logits[:, -1, :]

    def _sample_batch(self, prefix_cache, prefix_logits, seeds: np.ndarray, policy: DecodingPolicy):
        import copy

        import torch

        dev = self.device
        size = len(seeds)
        cap = policy.max_new_tokens
        eos = torch.tensor(policy.eos_token_ids, dtype=torch.long, device=dev)
        seed_t = torch.as_tensor(seeds, dtype=torch.int64, device=dev)
        buf_tok = torch.full((size, cap), -1, dtype=torch.int64, device=dev)
        buf = torch.full((4, size, cap), float("nan"), dtype=torch.float32, device=dev)
        length = torch.full((size,), cap, dtype=torch.int64, device=dev)
        reason = torch.ones(size, dtype=torch.int8, device=dev)  # default 'length'
        cache = copy.copy(prefix_cache)
        cache.layers = [copy.copy(layer) for layer in prefix_cache.layers]
        cache.batch_repeat_interleave(size)
        logits = prefix_logits.expand(size, -1)
        rows = torch.arange(size, device=dev)  # buffer row of each active batch row
        stop = (
            _StopChecker(self.tokenizer, policy.stop_strings, size) if policy.stop_strings else None
        )
        for step in range(cap):
            stats = step_stats(logits, policy, eos, step_uniforms(seed_t[rows], step))
            buf_tok[rows, step] = stats.token
            buf[:, rows, step] = torch.stack(
                [stats.entropy, stats.eos_prob, stats.logprob, stats.kept_mass]
            )
            done = (stats.token.unsqueeze(-1) == eos).any(dim=-1)
            reason[rows] = torch.where(done, 0, reason[rows])
            if stop is not None:
                hit = stop.update(rows.cpu().numpy(), stats.token.cpu().numpy())
                hit_t = torch.as_tensor(hit, device=dev) & ~done
                reason[rows] = torch.where(hit_t, 2, reason[rows])
                done = done | hit_t
            if step == cap - 1:
                break
            if bool(done.any()):
                length[rows[done]] = step + 1
                keep = torch.nonzero(~done)[:, 0]
                if keep.numel() == 0:
                    break
                rows = rows[keep]
                cache.batch_select_indices(keep)
                tokens = stats.token[keep]
            else:
                tokens = stats.token
            out = self.model(input_ids=tokens.unsqueeze(-1), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
        self.stats["steps"] += step + 1
        length_np = length.cpu().numpy()
        mask = np.arange(cap)[None, :] < length_np[:, None]
        floats = buf.cpu().numpy()
        return {
            "length": length_np,
            "reason": reason.cpu().numpy(),
            "tokens": buf_tok.cpu().numpy()[mask],
            "entropy": floats[0][mask],
            "eos_prob": floats[1][mask],
            "logprob": floats[2][mask],
            "kept_mass": floats[3][mask],
        }

    def _assemble(self, parts, seeds: np.ndarray, rollout_indices: np.ndarray) -> RolloutBatch:
        lengths = np.concatenate([p["length"] for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([p["tokens"] for p in parts]).astype(np.int32)
        self.stats["tokens"] += int(offsets[-1])
        per_rollout = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
        text = self.tokenizer.batch_decode(per_rollout, skip_special_tokens=True)
        return RolloutBatch(
            rollout_index=rollout_indices,
            seed=seeds,
            finish_reason=[_FINISH[r] for r in np.concatenate([p["reason"] for p in parts])],
            offsets=offsets,
            token_ids=tokens,
            entropy=np.concatenate([p["entropy"] for p in parts]).astype(np.float32),
            eos_prob=np.concatenate([p["eos_prob"] for p in parts]).astype(np.float32),
            logprob=np.concatenate([p["logprob"] for p in parts]).astype(np.float32),
            kept_mass=np.concatenate([p["kept_mass"] for p in parts]).astype(np.float32),
            text=list(text),
        )

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        import torch

        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _StopChecker:
    """Detects stop strings in the tail of each rollout's decoded text (host side)."""

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...], size: int):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.window = max(len(s) for s in stop_strings) + 8
        self.history: list[list[int]] = [[] for _ in range(size)]

    def update(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(rows), dtype=bool)
        for j, (row, tok) in enumerate(zip(rows.tolist(), tokens.tolist(), strict=True)):
            hist = self.history[row]
            hist.append(tok)
            tail = self.tokenizer.decode(hist[-self.window :], skip_special_tokens=False)
            hit[j] = any(s in tail for s in self.stop_strings)
        return hit
