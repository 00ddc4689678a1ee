"""Teacher-forced token diagnostics on reference answers (docs/metrics.md section 10).

``token_diagnostics`` turns next-token log-probabilities ``[positions, vocab]`` and the
reference token of each position into ``p_t``, ``log p_t``, the entropy ``H_t``, the rank
``R_t = |{v : p(v) >= p_t}|`` (ties counted), the expected rank ``E[R_t] = sum_k k p_(k)`` of
a token drawn from the distribution itself, and the relative rank ``log(R_t / E[R_t])``.

Speed and memory: the expected rank needs each position's probabilities in sorted order, so
positions are processed in chunks of ``rows_per_chunk(vocab, chunk_bytes)`` rows, the chunk's
working set (about ``BYTES_PER_ENTRY`` bytes per vocabulary entry; half the rows when a
sampling policy is scored too) staying within ``chunk_bytes`` whatever the number of positions.
Per chunk, in float32 on the tensor's device: ``log_softmax`` once, the rank as
``(logp >= logp_t).sum(-1)`` (log-probabilities compare exactly where float32 probabilities
could round equal), and ``E[R]`` as one matrix-vector product of the sorted probabilities with
``1..V`` (no cumulative sums). The sort is NumPy's SIMD sort of values only on CPU (several
times faster than ``torch.sort``, no index array) and ``torch.sort`` on accelerators.

``score_run`` runs a causal LM teacher-forced over prompt + reference answer (one forward pass
per answer, answers batched with right padding) and writes ``RUN/diagnostics/tokens.parquet``
(per-token list columns, one row per answer) and ``RUN/diagnostics/answers.parquet`` (per-answer
means). The output layer is applied to the final hidden states chunk by chunk, so full logits
``[tokens, vocab]`` never exist at once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from canopy_entropy.engines.base import DecodingPolicy
from canopy_entropy.errors import CanopyError, ConfigError, require
from canopy_entropy.run.layout import PROMPT_KEYS

DEFAULT_CHUNK_BYTES = 256 << 20
# float32 logits, log-probs, probs and sorted probs, the bool comparison, with headroom.
BYTES_PER_ENTRY = 24
COLUMNS = ("p", "logp", "entropy", "rank", "expected_rank", "relative_rank")
TOKENS_SCHEMA_VERSION = "canopy-token-diagnostics/1"
ANSWERS_SCHEMA_VERSION = "canopy-answer-diagnostics/1"
KEYS = PROMPT_KEYS


def _dtype(name: str) -> type:
    """Stored dtype of a per-token column: ids and ranks int32, the rest float32."""
    return np.int32 if name in ("token_ids", "rank", "policy_rank") else np.float32


class DiagnosticsError(CanopyError):
    """Inputs that token diagnostics cannot be computed from (shapes, ids, non-finite rows)."""


@dataclass(frozen=True)
class TokenDiagnostics:
    """Per-position diagnostics, numpy arrays of one value per position (see module doc)."""

    p: np.ndarray  # float32
    logp: np.ndarray  # float32
    entropy: np.ndarray  # float32, nats
    rank: np.ndarray  # int64, 1 = most likely
    expected_rank: np.ndarray  # float32
    relative_rank: np.ndarray  # float32, log(rank / expected_rank)

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS}


def rows_per_chunk(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many positions one chunk holds so that its working set stays within ``chunk_bytes``."""
    return max(1, int(chunk_bytes) // (BYTES_PER_ENTRY * max(int(vocab), 1)))


def _chunk_stats(logits, targets):
    """The six diagnostics (torch tensors) of one chunk of (unnormalised) log-probabilities."""
    import torch

    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    bad = ~torch.isfinite(lse[:, 0])
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise DiagnosticsError(
            f"position {row} of a chunk has no finite log-probability (NaN, +inf or all -inf); "
            "check the model's logits (a float16 overflow?) or the masking"
        )
    logp = x - lse
    del x
    probs = torch.exp(logp)
    entropy = (probs * -logp).nansum(dim=-1)  # the NaNs are 0 * inf of excluded tokens
    logp_t = logp.gather(1, targets[:, None])
    rank = (logp >= logp_t).sum(dim=-1)
    del logp
    vocab = probs.shape[-1]
    if probs.device.type == "cpu":
        ascending = np.sort(probs.numpy(), axis=-1)  # SIMD sort, values only
        weights = np.arange(vocab, 0, -1, dtype=np.float32)  # k of the k-th largest
        expected = torch.from_numpy(ascending @ weights)
    else:
        ordered = torch.sort(probs, dim=-1, descending=True).values
        weights = torch.arange(1, vocab + 1, dtype=torch.float32, device=probs.device)
        expected = ordered @ weights
    logp_t = logp_t[:, 0]
    relative = torch.log(rank.float()) - torch.log(expected)
    return torch.exp(logp_t), logp_t, entropy, rank, expected, relative


def _as_tensor(array, name: str, ndim: int):
    torch = require("torch", "hf")
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    if t.ndim != ndim:
        raise DiagnosticsError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def token_diagnostics(
    logprobs: Any, targets: Any, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> TokenDiagnostics:
    """Diagnostics of each position's reference token under its next-token distribution.

    ``logprobs`` is ``[positions, vocab]`` (numpy or torch, any float dtype; renormalised in
    float32, so logits work too; ``-inf`` marks excluded tokens), ``targets`` the ``[positions]``
    reference ids. A target of probability 0 gets ``logp = -inf`` and rank ``vocab``. Computed
    on the tensor's device in chunks of at most ``chunk_bytes`` working memory (module doc).
    """
    import torch

    x = _as_tensor(logprobs, "logprobs", 2)
    if not (x.dtype.is_floating_point):
        raise DiagnosticsError(f"logprobs must be floating point, got {x.dtype}")
    y = _as_tensor(targets, "targets", 1)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DiagnosticsError(f"targets must be integer token ids, got {y.dtype}")
    positions, vocab = x.shape
    if len(y) != positions:
        raise DiagnosticsError(
            f"logprobs has {positions} positions but targets has {len(y)}; give one target per row"
        )
    if vocab == 0:
        raise DiagnosticsError("logprobs has an empty vocabulary axis")
    y = y.to(device=x.device, dtype=torch.int64)
    if positions and (int(y.min()) < 0 or int(y.max()) >= vocab):
        raise DiagnosticsError(
            f"target ids must lie in [0, {vocab}); got {int(y.min())}..{int(y.max())}"
        )
    step = rows_per_chunk(vocab, chunk_bytes)
    parts: list[list[np.ndarray]] = [[] for _ in COLUMNS]
    with torch.inference_mode():
        for start in range(0, positions, step):
            stats = _chunk_stats(x[start : start + step], y[start : start + step])
            for acc, value in zip(parts, stats, strict=True):
                acc.append(value.cpu().numpy())
    dtypes = (np.float32, np.float32, np.float32, np.int64, np.float32, np.float32)
    cols = [
        np.concatenate(acc).astype(dt, copy=False) if acc else np.zeros(0, dt)
        for acc, dt in zip(parts, dtypes, strict=True)
    ]
    return TokenDiagnostics(*cols)


# -- reference answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceAnswer:
    """One prompt with its reference answer (a line of an answers JSONL file)."""

    id: str
    task: str
    prompt: str
    answer: str


def read_answer_file(path: str | Path) -> list[ReferenceAnswer]:
    """Read ``{"prompt", "answer", optional "id", "task"}`` lines, validating every line.

    Prompt and id follow the prompt-file rules (``id`` or a content hash; duplicates refused);
    ``task`` defaults to the file's stem; ``answer`` must be a non-empty string.
    """
    from canopy_entropy.tasks.jsonl import PromptFileError, read_jsonl_records, read_prompt_file

    path = Path(path)
    records = read_jsonl_records(path)
    out = []
    for lineno, obj in records:
        answer = obj.get("answer")
        if answer is None:
            raise PromptFileError(
                f"{path} line {lineno}: no 'answer' field (keys: {sorted(obj)}); each line needs "
                '{"prompt": "...", "answer": "..."}'
            )
        if not isinstance(answer, str) or not answer.strip():
            raise PromptFileError(
                f"{path} line {lineno}: 'answer' must be a non-empty string; fix or drop the line"
            )
        task = obj.get("task", path.stem)
        if not isinstance(task, str) or not task:
            raise PromptFileError(
                f"{path} line {lineno}: 'task' must be a non-empty string; fix or drop it"
            )
    pairs = read_prompt_file(path, task=path.stem)
    for (_, obj), (pid, text) in zip(records, pairs, strict=True):
        out.append(ReferenceAnswer(pid, obj.get("task", path.stem), text, obj["answer"]))
    return out


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- teacher forcing -----------------------------------------------------------------------------


@dataclass
class EncodedAnswer:
    prompt_ids: list[int]
    answer_ids: list[int]


def encode_answers(
    tokenizer: Any, answers: Sequence[ReferenceAnswer], variant: str, context_length: int | None
) -> list[EncodedAnswer]:
    """Token ids of each prompt (``render_prompt``: raw or chat template) and answer (no
    special tokens), checked against the model's context."""
    from canopy_entropy.prompting import render_prompt

    out = []
    for a in answers:
        _, prompt_ids = render_prompt(tokenizer, a.prompt, variant)
        answer_ids = list(tokenizer(a.answer, add_special_tokens=False)["input_ids"])
        if not prompt_ids:
            raise ConfigError(
                f"prompt '{a.id}' (task {a.task}) renders to no tokens; give it some text"
            )
        if not answer_ids:
            raise ConfigError(
                f"the answer of '{a.id}' (task {a.task}) has no tokens; give a non-empty answer"
            )
        total = len(prompt_ids) + len(answer_ids)
        if context_length and total > context_length:
            raise ConfigError(
                f"prompt '{a.id}' (task {a.task}) with its answer has {total} tokens "
                f"({len(prompt_ids)} + {len(answer_ids)}), more than the model's context of "
                f"{context_length}; shorten the answer or drop that line"
            )
        out.append(EncodedAnswer(prompt_ids, answer_ids))
    return out


class _Head:
    """The model's output layer on final hidden states, checked against the model's own logits."""

    def __init__(self, model: Any):
        self.model = model
        self.layer = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.scale = getattr(model.config, "logit_scale", None)  # Cohere-style

    def __call__(self, hidden):
        import torch

        logits = self.layer(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden_and_check(self, input_ids, attention_mask):
        """Final hidden states ``[B, L, H]`` from one forward pass; raises if this head does
        not reproduce the model's logits at the last position (unknown logit transform)."""
        import torch

        captured = {}

        def hook(_module, _args, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        get_decoder = getattr(self.model, "get_decoder", None)
        decoder = get_decoder() if get_decoder is not None else None
        if decoder is None:
            raise CanopyError(
                f"{type(self.model).__name__} exposes no decoder (get_decoder), which "
                "teacher-forced scoring needs; this architecture is not supported by 'score'"
            )
        handle = decoder.register_forward_hook(hook)
        try:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
            try:
                out = self.model(**kwargs, logits_to_keep=1)
            except TypeError:  # remote-code models without logits_to_keep
                out = self.model(**kwargs)
        finally:
            handle.remove()
        hidden = captured["h"]
        mine = self(hidden[:, -1:, :]).float()
        theirs = out.logits[:, -1:, :].float()
        tol = 1e-4 if hidden.dtype == torch.float32 else 2e-2
        if not torch.allclose(mine, theirs, rtol=tol, atol=tol * (1 + float(theirs.abs().max()))):
            raise CanopyError(
                f"{type(self.model).__name__}: its logits are not its output layer applied to the "
                "final hidden states, which teacher-forced scoring relies on; this architecture "
                "is not supported by 'score'"
            )
        return hidden


def _is_oom(exc: BaseException) -> bool:
    from canopy_entropy.engines.hf import _is_oom as is_oom

    return is_oom(exc)


def teacher_force(
    model: Any,
    encoded: Sequence[EncodedAnswer],
    *,
    policy: DecodingPolicy | None = None,
    batch_size: int = 8,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per answer token diagnostics for every encoded answer, in input order.

    Returns ``offsets`` (``[answers + 1]``, answer ``i`` is ``[offsets[i], offsets[i+1])``) and
    flat columns: ``token_ids``, the six ``COLUMNS`` under the raw distribution and, with a
    ``policy``, the same prefixed ``policy_`` under the renormalised sampling policy. Answers
    run longest first in right-padded batches of ``batch_size``, halved on out-of-memory.
    """
    import torch

    from canopy_entropy.engines.policy_ops import policy_logprobs

    device = next(model.parameters()).device
    head = _Head(model)
    lengths = np.array([len(e.answer_ids) for e in encoded], dtype=np.int64)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    names = list(COLUMNS) + ([f"policy_{c}" for c in COLUMNS] if policy is not None else [])
    flat = {"token_ids": np.concatenate([np.asarray(e.answer_ids, np.int32) for e in encoded])}
    flat.update({n: np.empty(int(offsets[-1]), _dtype(n)) for n in names})
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].prompt_ids) - lengths[i])
    # the policy's renormalisation needs about as many [rows, vocab] temporaries again
    rows = rows_per_chunk(head.layer.weight.shape[0], chunk_bytes // (2 if policy else 1))
    start = 0
    with torch.inference_mode():
        while start < len(order):
            group = order[start : start + batch_size]
            try:
                _score_batch(model, head, encoded, group, offsets, flat, policy, rows, device,
                             policy_logprobs)  # fmt: skip
            except Exception as exc:
                if not _is_oom(exc) or len(group) == 1:
                    raise
                batch_size = max(1, len(group) // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += len(group)
            if progress is not None:
                progress(start)
    return offsets, flat


def _score_batch(model, head, encoded, group, offsets, flat, policy, rows, device, policy_lp):
    import torch

    seqs = [encoded[i].prompt_ids + encoded[i].answer_ids for i in group]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    hidden = head.hidden_and_check(ids.to(device), mask.to(device))
    # the logits at position j predict token j + 1: answer tokens follow positions P-1..P+A-2
    row_idx, pos_idx, dest = [], [], []
    for b, i in enumerate(group):
        n_prompt, n_answer = len(encoded[i].prompt_ids), len(encoded[i].answer_ids)
        row_idx.append(np.full(n_answer, b))
        pos_idx.append(np.arange(n_prompt - 1, n_prompt - 1 + n_answer))
        dest.append(np.arange(offsets[i], offsets[i + 1]))
    row_t = torch.as_tensor(np.concatenate(row_idx), device=device)
    pos_t = torch.as_tensor(np.concatenate(pos_idx), device=device)
    dest = np.concatenate(dest)
    states = hidden[row_t, pos_t]
    del hidden
    targets = torch.as_tensor(flat["token_ids"][dest].astype(np.int64), device=device)
    for c0 in range(0, len(dest), rows):
        logits = head(states[c0 : c0 + rows]).float()
        tgt = targets[c0 : c0 + rows]
        where = dest[c0 : c0 + rows]
        for name, value in zip(COLUMNS, _chunk_stats(logits, tgt), strict=True):
            flat[name][where] = value.cpu().numpy()
        if policy is not None:
            lp = policy_lp(logits, policy)
            for name, value in zip(COLUMNS, _chunk_stats(lp, tgt), strict=True):
                flat[f"policy_{name}"][where] = value.cpu().numpy()


def answer_summaries(offsets: np.ndarray, flat: dict[str, np.ndarray], prefix: str = ""):
    """Per answer: n_tokens, mean NLL, mean H, mean relative rank, share of R_t > E[R_t]."""
    starts = offsets[:-1]
    n = np.diff(offsets).astype(np.float64)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values.astype(np.float64), starts) / n

    above = (flat[f"{prefix}rank"] > flat[f"{prefix}expected_rank"]).astype(np.float64)
    return {
        f"{prefix}mean_nll": -mean(flat[f"{prefix}logp"]),
        f"{prefix}mean_entropy": mean(flat[f"{prefix}entropy"]),
        f"{prefix}mean_relative_rank": mean(flat[f"{prefix}relative_rank"]),
        f"{prefix}share_above_expected": mean(above),
    }


# -- the run folder -------------------------------------------------------------------------------


@dataclass
class ScoreSummary:
    """What one ``score_run`` call did; ``answers`` is this model's per-answer table (pandas),
    ``elapsed_s`` the teacher-forced scoring time (model loading not included)."""

    run_dir: str
    model_label: str
    answers: Any
    tokens: int
    elapsed_s: float
    paths: tuple[Path, ...]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def diagnostics_paths(run_dir: str | Path) -> tuple[Path, Path]:
    """``RUN/diagnostics/tokens.parquet`` and ``RUN/diagnostics/answers.parquet``."""
    folder = Path(run_dir) / "diagnostics"
    return folder / "tokens.parquet", folder / "answers.parquet"


def _policy_record(policy: DecodingPolicy | None) -> dict | None:
    if policy is None:
        return None
    return {"temperature": policy.temperature, "top_k": policy.top_k, "top_p": policy.top_p,
            "min_p": policy.min_p}  # fmt: skip


def _tables(keys: dict[str, list[str]], offsets, flat, summaries, meta: dict):
    import pyarrow as pa

    n = len(offsets) - 1
    offs = pa.array(offsets.astype(np.int64 if offsets[-1] >= 2**31 else np.int32))
    key_cols = {k: pa.array(v, pa.string()) for k, v in keys.items()}
    tokens = {**key_cols, "n_tokens": pa.array(np.diff(offsets).astype(np.int32))}
    list_type = pa.LargeListArray if offsets[-1] >= 2**31 else pa.ListArray
    for name, values in flat.items():
        tokens[name] = list_type.from_arrays(offs, pa.array(values.astype(_dtype(name))))
    answers = {**key_cols, "n_tokens": tokens["n_tokens"]}
    answers["prompt_tokens"] = pa.array(meta.pop("prompt_tokens"), pa.int32())
    answers.update({k: pa.array(v, pa.float64()) for k, v in summaries.items()})
    assert all(len(c) == n for c in answers.values())
    return pa.table(tokens), pa.table(answers)


def _merge_write(path: Path, table, schema_tag: str, label: str) -> None:
    """Replace this model label's rows of a diagnostics file (others kept), atomically."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from canopy_entropy.store import atomic_write_table, read_table

    if path.exists():
        old = read_table(path, schema_tag)
        if old.schema.names != table.schema.names or not old.schema.equals(table.schema):
            names = set(old.schema.names) ^ set(table.schema.names)
            if names:
                raise ConfigError(
                    f"{path} holds other columns ({sorted(names)}: scored with or without a "
                    "sampling policy); score every model the same way or use a new --run folder"
                )
            old = old.cast(table.schema)
        old = old.filter(pc.invert(pc.equal(old["model"], label)))
        table = pa.concat_tables([old, table]) if old.num_rows else table
    atomic_write_table(path, table, schema_tag)


def score_run(
    run_dir: str | Path,
    *,
    model: str,
    answers: Sequence[ReferenceAnswer] | str | Path,
    variant: str = "base",
    family: str | None = None,
    model_label: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    policy: DecodingPolicy | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    engine_instance: Any = None,
    progress: Callable[[int, int], None] | None = None,
    run_name: str | None = None,
    engine: str = "hf",
    prompt_logprobs: int | None = None,
) -> ScoreSummary:
    """Score reference answers teacher-forced and write the two diagnostics files of ``run_dir``.

    ``answers`` is a JSONL path (``read_answer_file``) or a list. The model's rows (by label)
    in existing files are replaced, other models' rows kept. ``engine_instance`` reuses a loaded
    ``HFEngine``; ``policy`` adds ``policy_*`` columns under that renormalised sampling policy.
    ``engine="vllm"`` scores through vLLM's prompt log-probs (``prompt_logprobs`` entries per
    position, default the whole vocabulary: exact); with fewer, ``entropy``, ``expected_rank``
    and ``relative_rank`` hold one end of their interval and ``*_upper`` / ``relative_rank_lower``
    the other (``vllm_prompt_diagnostics``); ``engine_instance`` is then a ``vllm.LLM``.
    """
    from canopy_entropy.generate import default_model_label
    from canopy_entropy.prompting import VARIANTS
    from canopy_entropy.store import atomic_write_json

    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant '{variant}'; use base or instruct")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
    if engine not in ("hf", "vllm"):
        raise ConfigError(f"unknown scoring engine '{engine}'; use hf or vllm")
    if engine == "vllm" and policy is not None:
        raise ConfigError("the vLLM path scores the raw distribution only; drop the sampling "
                          "policy options or use --engine hf")  # fmt: skip
    if prompt_logprobs is not None and (engine != "vllm" or prompt_logprobs < 1):
        raise ConfigError("--prompt-logprobs is the vLLM path's top-k (>= 1); use it with "
                          "--engine vllm")  # fmt: skip
    if policy is not None:
        policy = DecodingPolicy(policy.temperature, policy.top_k, policy.top_p, policy.min_p,
                                eos_token_ids=(0,))  # fmt: skip
        policy.validate()
    source = None
    if isinstance(answers, (str, Path)):
        source = Path(answers)
        answers = read_answer_file(source)
    if not answers:
        raise ConfigError("no answers given; pass a JSONL file of prompt/answer lines")
    label = model_label or default_model_label(model)
    family = family or label
    run = run_name or Path(run_dir).resolve().name
    eng = engine_instance
    try:
        if engine == "vllm":
            encoded, offsets, flat, elapsed, facts = _score_vllm(
                model, answers, variant, dtype, prompt_logprobs, engine_instance
            )
            eng = None
        elif eng is None:
            from canopy_entropy.engines.hf import HFEngine

            eng = HFEngine(model, device=device, dtype=dtype)
        if engine == "hf":
            encoded = encode_answers(eng.tokenizer, answers, variant, eng.context_length)
            start = time.perf_counter()  # scoring time, without loading the model
            offsets, flat = teacher_force(
                eng.model,
                encoded,
                policy=policy,
                batch_size=batch_size,
                chunk_bytes=chunk_bytes,
                progress=None if progress is None else lambda k: progress(k, len(encoded)),
            )
            elapsed = time.perf_counter() - start
            facts = eng.describe()
    finally:
        if engine_instance is None and eng is not None:
            eng.close()
    n = len(answers)
    keys = {"model": [label] * n, "variant": [variant] * n, "family": [family] * n,
            "task": [a.task for a in answers], "prompt_id": [a.id for a in answers]}  # fmt: skip
    summaries = answer_summaries(offsets, flat)
    if policy is not None:
        summaries.update(answer_summaries(offsets, flat, prefix="policy_"))
        zero = flat["policy_p"] == 0
        summaries["policy_excluded_share"] = np.add.reduceat(zero, offsets[:-1]) / np.diff(offsets)
    meta = {"prompt_tokens": [len(e.prompt_ids) for e in encoded]}
    tokens_table, answers_table = _tables(keys, offsets, flat, summaries, meta)
    tokens_path, answers_path = diagnostics_paths(run_dir)
    _merge_write(tokens_path, tokens_table, TOKENS_SCHEMA_VERSION, label)
    _merge_write(answers_path, answers_table, ANSWERS_SCHEMA_VERSION, label)
    record_path = tokens_path.parent / "models.json"
    records = _read_json(record_path)
    records[label] = {"run": run, "model": model, "variant": variant, "family": family,
                      "engine": facts, "policy": _policy_record(policy), "answers": n,
                      "answers_file": str(source) if source else None,
                      "answers_sha256": _sha256_file(source) if source else None}  # fmt: skip
    atomic_write_json(record_path, records)
    return ScoreSummary(
        run_dir=str(run_dir),
        model_label=label,
        answers=answers_table.to_pandas(),
        tokens=int(offsets[-1]),
        elapsed_s=elapsed,
        paths=(tokens_path, answers_path, record_path),
    )


def _score_vllm(model: str, answers, variant: str, dtype: str, k: int | None, llm: Any = None):
    """(encoded answers, offsets, flat columns, scoring seconds, engine facts) of the vLLM
    prompt log-prob path."""
    from canopy_entropy.models import resolve_model

    if llm is None:
        from transformers import AutoTokenizer

        vllm = require("vllm", "vllm")
        path = resolve_model(model)
        vocab = len(AutoTokenizer.from_pretrained(path))
        llm = vllm.LLM(model=path, dtype=dtype, max_logprobs=max(k or 0, vocab), seed=0,
                       generation_config="vllm")  # fmt: skip
    config = llm.llm_engine.model_config
    vocab = int(config.get_vocab_size())
    k = min(k or vocab, vocab)
    encoded = encode_answers(llm.get_tokenizer(), answers, variant, int(config.max_model_len))
    start = time.perf_counter()
    offsets, d = vllm_prompt_diagnostics(llm, encoded, k=k, vocab_size=vocab)
    elapsed = time.perf_counter() - start
    flat = {"token_ids": np.concatenate([np.asarray(e.answer_ids, np.int32) for e in encoded]),
            "p": d.p, "logp": d.logp, "entropy": d.entropy_lower, "rank": d.rank,
            "expected_rank": d.expected_rank_lower, "relative_rank": d.relative_rank_upper}  # fmt: skip
    exact = bool(d.exact.all())
    if not exact:  # the other end of each interval
        flat.update(entropy_upper=d.entropy_upper, expected_rank_upper=d.expected_rank_upper,
                    relative_rank_lower=d.relative_rank_lower)  # fmt: skip
    facts = {"engine": "vllm", "prompt_logprobs": k, "vocab_size": vocab, "exact": exact}
    return encoded, offsets, flat, elapsed, facts


def _read_json(path: Path) -> dict:
    import json

    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CanopyError(
            f"{path} is not valid JSON ({exc}); delete it and re-run 'score'"
        ) from exc
    return data if isinstance(data, dict) else {}


def pooled_summary(answers: Any, by: Sequence[str] = ("model", "variant", "task")):
    """Unweighted means over answers of the per-answer summaries, per group and over all tasks."""
    import pandas as pd

    values = [c for c in answers.columns if c.startswith(("mean_", "share_", "policy_"))]
    per = answers.groupby(list(by), sort=True)[values].mean()
    per.insert(0, "answers", answers.groupby(list(by), sort=True).size())
    outer = [c for c in by if c != "task"]
    if "task" in by and outer:
        pooled = answers.groupby(outer, sort=True)[values].mean()
        pooled.insert(0, "answers", answers.groupby(outer, sort=True).size())
        pooled = pooled.assign(task="(all)").set_index("task", append=True)
        pooled.index = pooled.index.reorder_levels(list(by))
        per = pd.concat([per, pooled]).sort_index(level=outer, sort_remaining=False)
    return per.reset_index()


SUMMARY_STATISTICS = ("mean_nll", "mean_entropy", "mean_relative_rank", "share_above_expected")


def compare_answers(answers: Any, a: str, b: str, n_boot: int = 2000, seed: int = 0):
    """Paired prompt bootstrap of B - A (model labels) on the per-answer summaries.

    Pairs the two models' answers on (task, prompt_id); per task and over all tasks ("(all)")
    the same ``compare.bootstrap_indices`` rows resample both sides. Returns one row per
    (task, statistic): the unweighted means a, b, diff = b - a, its bootstrap SE and 95%
    percentile interval, and the number of paired prompts.
    """
    import warnings

    import pandas as pd

    from canopy_entropy.comparison import CI_LEVEL, bootstrap_indices, resample_counts

    sides = {m: answers[answers["model"] == m] for m in (a, b)}
    for m, rows in sides.items():
        if rows.empty:
            raise ConfigError(f"no scored answers of model '{m}'; score it first or fix the label")
    pairs = sides[a].merge(sides[b], on=["task", "prompt_id"], suffixes=("_a", "_b"))
    pairs = pairs.sort_values(["task", "prompt_id"], ignore_index=True)  # order-free replicates
    if pairs.empty:
        raise ConfigError(f"models '{a}' and '{b}' share no (task, prompt_id); score the same file")
    unpaired = len(sides[a]) + len(sides[b]) - 2 * len(pairs)
    if unpaired:
        warnings.warn(
            f"{unpaired} answers have no partner in the other model; left out", stacklevel=2
        )
    alpha = (1.0 - CI_LEVEL) / 2.0
    rows = []
    groups = [(t, g) for t, g in pairs.groupby("task", sort=True)] + [("(all)", pairs)]
    for task, group in groups:
        counts = resample_counts(
            bootstrap_indices(len(group), n_boot, seed, (a, b, task)), len(group)
        )
        for stat in SUMMARY_STATISTICS:
            va, vb = (group[f"{stat}_{s}"].to_numpy(np.float64) for s in ("a", "b"))
            reps = counts @ (vb - va) / len(group)
            rows.append({"task": task, "statistic": stat, "prompts": len(group), "a": va.mean(),
                         "b": vb.mean(), "diff": vb.mean() - va.mean(),
                         "se": reps.std(ddof=1) if n_boot > 1 else np.nan,
                         "ci_lo": np.quantile(reps, alpha), "ci_hi": np.quantile(reps, 1 - alpha)})  # fmt: skip
    return pd.DataFrame(rows)


# -- the vLLM path: prompt log-probs ---------------------------------------------------------------


@dataclass(frozen=True)
class TopKDiagnostics:
    """Diagnostics from each position's top-k log-probs and the target's own log-prob and rank
    (what vLLM's ``prompt_logprobs=k`` returns). ``p``, ``logp`` and ``rank`` are exact; the
    entropy, expected rank and relative rank are intervals ``[*_lower, *_upper]``, equal where
    the k entries hold the whole distribution (``exact``)."""

    p: np.ndarray
    logp: np.ndarray
    rank: np.ndarray
    entropy_lower: np.ndarray
    entropy_upper: np.ndarray
    expected_rank_lower: np.ndarray
    expected_rank_upper: np.ndarray
    relative_rank_lower: np.ndarray
    relative_rank_upper: np.ndarray
    exact: np.ndarray  # bool per position


def topk_diagnostics(
    top_logprobs: np.ndarray,
    target_ids: np.ndarray,
    target_logprobs: np.ndarray,
    target_ranks: np.ndarray,
    *,
    vocab_size: int,
    top_ids: np.ndarray | None = None,
) -> TopKDiagnostics:
    """Token diagnostics with bounds from ``[positions, k]`` top log-probs (any order; padding
    ``-inf``) and the target token's log-prob and full-vocabulary rank per position.

    With ``Z`` the top-k mass, ``p_k`` the smallest top-k probability and the unknown rest
    ``1 - Z`` spread over the other ``V - k`` tokens, each at most ``p_k``:

    * entropy: ``engines.topk`` bounds (the target's mass counted as known when it lies below
      every top entry);
    * expected rank ``sum_j j p_(j)``: the top-k part is exact; the rest adds at least the
      greedy fill (``p_k`` at ranks ``k+1, k+2, ...``, the remainder next) and at most the
      uniform spread over ranks ``k+1..V`` (``(1 - Z)(k + 1 + V) / 2``);
    * relative rank ``log(R / E[R])``: ``[log R - log E_upper, log R - log E_lower]``.

    With ``k >= V`` (the whole vocabulary returned) every interval is a point, equal to
    ``token_diagnostics`` on the full log-probs up to float32 rounding.
    """
    from canopy_entropy.engines.topk import topk_step_stats

    lp = np.asarray(top_logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise DiagnosticsError(f"top_logprobs must be [positions, k], got shape {lp.shape}")
    positions, k = lp.shape
    t_lp = np.asarray(target_logprobs, dtype=np.float64).reshape(positions)
    ranks = np.asarray(target_ranks, dtype=np.int64).reshape(positions)
    ids = np.asarray(target_ids, dtype=np.int64).reshape(positions)
    if top_ids is None:
        top_ids = np.full(lp.shape, -1, dtype=np.int64)
    # the target adds known mass only when it is below every top entry (else it is one of them)
    lowest = np.where(np.isfinite(lp), lp, np.inf).min(axis=1) if k else np.full(positions, np.inf)
    extra = np.where(t_lp < lowest, t_lp, -np.inf)
    stats = topk_step_stats(top_ids, lp, (), vocab_size=vocab_size, exact_kept_set=False,
                            extra_ids=ids, extra_logprobs=extra)  # fmt: skip
    order = -np.sort(-lp, axis=1)  # descending, -inf padding last
    p_sorted = np.where(np.isfinite(order), np.exp(order), 0.0)
    n_known = np.isfinite(order).sum(axis=1)
    known_part = p_sorted @ np.arange(1, k + 1, dtype=np.float64)
    z = p_sorted.sum(axis=1)
    rest = np.clip(1.0 - z, 0.0, 1.0)
    rest = np.where(rest > 1e-6, rest, 0.0)  # float32 log-prob noise: a complete set
    p_k = np.where(n_known > 0, p_sorted[np.arange(positions), np.maximum(n_known - 1, 0)], 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        full = np.where(p_k > 0, np.floor(rest / p_k), 0.0)
    full = np.minimum(full, np.maximum(vocab_size - n_known, 0))
    # greedy fill: p_k at ranks n+1..n+m (sum of ranks m n + m(m+1)/2), leftover at n+m+1
    lower = known_part + p_k * (full * n_known + full * (full + 1) / 2)
    lower += (rest - full * p_k).clip(min=0.0) * (n_known + full + 1)
    upper = known_part + rest * (n_known + 1 + vocab_size) / 2.0
    upper = np.maximum(upper, lower)
    exact = rest == 0.0
    log_r = np.log(ranks.astype(np.float64))
    with np.errstate(divide="ignore"):
        rel_lower, rel_upper = log_r - np.log(upper), log_r - np.log(lower)
    entropy_upper = np.where(exact, stats.entropy, stats.entropy_upper)
    return TopKDiagnostics(
        p=np.exp(t_lp).astype(np.float32),
        logp=t_lp.astype(np.float32),
        rank=ranks,
        entropy_lower=stats.entropy.astype(np.float32),
        entropy_upper=np.asarray(entropy_upper, dtype=np.float32),
        expected_rank_lower=lower.astype(np.float32),
        expected_rank_upper=upper.astype(np.float32),
        relative_rank_lower=rel_lower.astype(np.float32),
        relative_rank_upper=rel_upper.astype(np.float32),
        exact=exact,
    )


def vllm_prompt_diagnostics(
    llm: Any, encoded: Sequence[EncodedAnswer], *, k: int, vocab_size: int
) -> tuple[np.ndarray, TopKDiagnostics]:
    """Teacher-forced diagnostics of the answers through a vLLM ``LLM``'s prompt log-probs.

    One request per answer (prompt + answer ids, ``max_tokens=1``, ``prompt_logprobs=k``);
    vLLM returns per position the top-k raw log-probs (temperature 1, no truncation) plus the
    actual token's log-prob and rank in the whole vocabulary, which ``topk_diagnostics`` turns
    into exact p, log p, rank and bounded entropy / expected rank. Returns the answers' offsets
    and the diagnostics over all answer tokens. The engine must allow ``max_logprobs >= k``.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=int(k), detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=[*e.prompt_ids, *e.answer_ids]) for e in encoded]
    outputs = llm.generate(requests, params, use_tqdm=False)
    lengths = np.array([len(e.answer_ids) for e in encoded], dtype=np.int64)
    n = int(lengths.sum())
    top = np.full((n, int(k)), -np.inf)
    top_ids = np.full((n, int(k)), -1, dtype=np.int64)
    t_ids, t_lp, t_rank = (np.zeros(n, np.int64), np.zeros(n), np.zeros(n, np.int64))
    row = 0
    for e, out in zip(encoded, outputs, strict=True):  # loop over answers and their positions
        start = len(e.prompt_ids)
        for j, target in enumerate(e.answer_ids):
            entries = out.prompt_logprobs[start + j]
            entry = entries[target]
            t_ids[row], t_lp[row], t_rank[row] = target, entry.logprob, entry.rank
            items = [(t, v.logprob) for t, v in entries.items() if v.rank <= k][: int(k)]
            top_ids[row, : len(items)] = [t for t, _ in items]
            top[row, : len(items)] = [lp for _, lp in items]
            row += 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return offsets, topk_diagnostics(
        top, t_ids, t_lp, t_rank, vocab_size=vocab_size, top_ids=top_ids
    )
