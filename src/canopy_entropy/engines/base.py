"""The contract every sampling engine meets (transformers, vLLM, OpenAI-compatible HTTP).

An engine samples M rollouts for one prompt given as token ids and returns them as one
columnar batch holding exactly the per-step fields of docs/metrics.md section 1. Randomness of rollout ``i``
of prompt ``p`` depends only on ``rollout_seed(run_seed, p, i)``.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from canopy_entropy.errors import ConfigError


@dataclass(frozen=True)
class DecodingPolicy:
    """The sampling policy shared by all engines (docs/metrics.md section 1).

    The per-step entropy recorded is that of the renormalised distribution actually sampled
    from: temperature applied, then top-k, top-p and min-p truncation, EOS kept whenever it
    survives truncation. ``temperature == 0`` means greedy decoding (entropy 0).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 512
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def validate(self) -> DecodingPolicy:
        for name in ("temperature", "top_p", "min_p"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number (got {getattr(self, name)})")
        if any(not s for s in self.stop_strings):
            raise ConfigError("a stop string is empty, which would stop every rollout at once")
        if self.temperature < 0:
            raise ConfigError(
                f"temperature must be >= 0 (got {self.temperature}); use 0 for greedy"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 or unset (got {self.top_k})")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p}); use 1 for no cut")
        if not (0.0 <= self.min_p < 1.0):
            raise ConfigError(f"min_p must be in [0, 1) (got {self.min_p}); use 0 for no cut")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.eos_token_ids and not self.stop_strings:
            raise ConfigError(
                "the model has no EOS token and no stop string was given: rollouts could never "
                "end; pass --eos-id or --stop"
            )
        return self


@dataclass
class RolloutBatch:
    """M rollouts of one prompt, columnar: per-step fields as flat arrays + offsets.

    ``offsets`` has M+1 entries; rollout i's steps are ``[offsets[i], offsets[i+1])``.
    Optional per-step fields are None when the engine cannot provide them.
    """

    rollout_index: np.ndarray  # int32 [M]
    seed: np.ndarray  # int64 [M]
    finish_reason: list[str]  # M of 'eos' | 'length' | 'stop'
    offsets: np.ndarray  # int64 [M+1]
    token_ids: np.ndarray  # int32 [sum N]
    entropy: np.ndarray  # float32 [sum N]
    eos_prob: np.ndarray | None = None
    logprob: np.ndarray | None = None
    kept_mass: np.ndarray | None = None
    entropy_upper: np.ndarray | None = None
    text: list[str | None] | None = None
    extra: dict = field(default_factory=dict)

    def split(self, flat: np.ndarray | None) -> list[np.ndarray] | None:
        """Per-rollout views of a flat per-step array."""
        if flat is None:
            return None
        return [flat[self.offsets[i] : self.offsets[i + 1]] for i in range(len(self.offsets) - 1)]


def rollout_seed(run_seed: int, prompt_id: str, rollout_index: int, stream: str = "") -> int:
    """A 63-bit seed that depends only on (run seed, prompt id, rollout index[, stream]).

    ``stream`` is the model name unless common random numbers are requested (then ""), so
    distinct models get independent streams by default.
    """
    h = hashlib.blake2b(
        f"{run_seed}\x1f{prompt_id}\x1f{rollout_index}\x1f{stream}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class Engine:
    """Base class: subclasses implement ``sample`` for one prompt.

    Constructed as ``Engine(model, **options)``; after construction it exposes the model's
    ``tokenizer`` (a HF tokenizer, for prompt rendering via ``prompting.render_prompt``),
    ``eos_token_ids`` (every EOS id of the model's generation config), ``vocab_size`` and
    ``context_length`` (max prompt + new tokens), and ``describe()`` for the run manifest.
    """

    name = "base"
    # option name -> type accepted from ``[engine] options`` (empty: the constructor's keywords)
    OPTIONS: ClassVar[dict[str, Any]] = {}
    prompts_per_call = 1  # prompts ``generate`` hands to one ``sample_many`` call
    chat = False  # True: the engine takes the user's text and applies the chat template itself
    tokenizer: object = None
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int = 0
    context_length: int | None = None
    approximate: bool = False  # True when entropies are bounds, not exact (top-20 APIs)

    def describe(self) -> dict:
        """Facts for the manifest: model path/revision, dtype, device, tokenizer hash."""
        return {"engine": self.name}

    def sample(
        self,
        prompt_token_ids: list[int],
        seeds: np.ndarray,
        rollout_indices: np.ndarray,
        policy: DecodingPolicy,
    ) -> RolloutBatch:  # pragma: no cover - interface
        raise NotImplementedError

    def sample_many(
        self,
        requests: list[tuple[Any, np.ndarray, np.ndarray]],
        policy: DecodingPolicy,
    ) -> list[RolloutBatch]:
        """Sample several prompts, each ``(prompt, seeds, rollout_indices)``; engines with
        continuous batching override this to keep every batch slot busy."""
        return [self.sample(p, seeds, idx, policy) for p, seeds, idx in requests]

    def close(self) -> None:
        """Release resources (GPU memory, servers)."""


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has type ``hint`` (unions, list/tuple of int, int for float; no bools
    for numbers)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, origin) and all(_fits(v, args[0]) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_options(options_cls: type, options: dict[str, Any], engine: str, hint: str = "") -> None:
    """Refuse option names ``options_cls`` (a dataclass of an engine's options) does not
    declare, and values of the wrong type: one ConfigError naming the option and the fix."""
    hints = typing.get_type_hints(options_cls)
    for name, value in options.items():
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            suggestion = f"did you mean '{close[0]}'? " if close else ""
            extra = f"{hint}; " if hint else ""
            raise ConfigError(
                f"unknown option '{name}' for engine '{engine}'; {suggestion}{extra}known "
                f"options: {', '.join(sorted(hints))}"
            )
        if not _fits(value, hints[name]):
            raise ConfigError(
                f"engine '{engine}' option '{name}' must be {_type_name(hints[name])} "
                f"(got {value!r})"
            )
