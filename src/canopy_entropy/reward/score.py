"""Score every rollout of a run with a reward model, cached per rollout.

The reward model is any transformers ``AutoModelForSequenceClassification`` with one output
(``num_labels = 1``), e.g. Skywork-Reward-V2. A rollout is shown to it as a chat: the prompt as
the user turn, the rollout's text as the assistant turn, rendered by the tokenizer's chat
template (or, when the tokenizer has none, the plain ``FALLBACK_FORMAT``, with a note). Scores
are cached in ``RUN/reward/scores.parquet`` keyed by (reward key, rollout, text hash): the
reward key fingerprints the model, its revision, the format and the token limit, the text hash
the prompt and response, so a rerun scores only new or changed rollouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from canopy_entropy.errors import CanopyError, ConfigError, StoreError, require
from canopy_entropy.run.layout import PROMPT_KEYS, ROLLOUT_KEYS, artefact_path, schema_of
from canopy_entropy.store import RunStore, atomic_write_table, read_table

FALLBACK_FORMAT = "User: {prompt}\n\nAssistant: {response}"
SCORE_COLUMNS = (*ROLLOUT_KEYS, "reward_key", "text_sha1", "score")
SAVE_EVERY = 2048  # rollouts scored between two saves of the cache


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    torch = require("torch", "hf")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("reward device cuda was asked for but no CUDA GPU is visible; use cpu")
    return device


class RewardScorer:
    """A loaded reward model: ``score(prompts, responses)`` -> one float per pair."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 4096,
        batch_size: int = 8,
    ):
        if max_length < 8:
            raise ConfigError(f"reward max_length must be at least 8 tokens (got {max_length})")
        if batch_size < 1:
            raise ConfigError(f"reward batch_size must be at least 1 (got {batch_size})")
        torch = require("torch", "hf")
        transformers = require("transformers", "hf")
        from canopy_entropy.models import resolve_model

        self.name = model
        self.device = resolve_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ConfigError(
                f"unknown reward dtype {dtype!r}; use auto, float32, bfloat16 or float16"
            )
        path = resolve_model(model)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, torch_dtype=dtypes[dtype]
            )
        except (OSError, ValueError) as exc:
            raise CanopyError(
                f"cannot load reward model {model!r} ({str(exc).splitlines()[0]}); pass a "
                "sequence-classification reward model (HF id or local folder)"
            ) from exc
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"reward model {model!r} has {self.model.config.num_labels} outputs; a reward "
                "model gives one score (num_labels = 1)"
            )
        if self.tokenizer.pad_token_id is None:  # batching needs a pad token; EOS serves
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.to(self.device).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.n_truncated = 0
        self.calls = 0  # forward passes (one per batch)
        self.seconds = 0.0

    @property
    def key(self) -> str:
        """Fingerprint of what the scores depend on: model (and revision), format, limit."""
        revision = getattr(self.model.config, "_commit_hash", None) or _folder_stamp(
            Path(str(getattr(self.model, "name_or_path", self.name)))
        )
        fmt = self.tokenizer.chat_template if self.chat else FALLBACK_FORMAT
        return _sha1(json.dumps([self.name, revision, fmt, self.max_length]))

    def format(self, prompt: str, response: str) -> str:
        """The text the reward model reads: the chat template's rendering, or FALLBACK_FORMAT."""
        if self.chat:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return FALLBACK_FORMAT.format(prompt=prompt, response=response)

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """One reward per (prompt, response), batched in length order (float64)."""
        torch = require("torch", "hf")
        texts = [self.format(p, r) for p, r in zip(prompts, responses, strict=True)]
        # the chat template writes its own special tokens; the plain format gets the usual ones
        enc = self.tokenizer(texts, add_special_tokens=not self.chat, truncation=False)
        ids = enc["input_ids"]
        self.n_truncated += sum(len(x) > self.max_length for x in ids)
        ids = [x[: self.max_length] for x in ids]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty(len(ids), dtype=np.float64)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                ).logits
            out[rows] = logits[:, 0].float().cpu().numpy()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            if on_batch is not None:
                on_batch(len(rows))
        return out


def _folder_stamp(path: Path) -> str:
    """A local model folder's config and weight files (name, size, mtime): a re-saved model
    gets a new stamp, so its old scores are not reused."""
    if not path.is_dir():
        return ""
    parts = []
    for p in sorted(path.iterdir()):
        if p.suffix in (".json", ".safetensors", ".bin"):
            st = p.stat()
            parts.append((p.name, st.st_size, st.st_mtime_ns))
    return _sha1(json.dumps(parts))


@dataclass
class ScoreResult:
    """Scores of every rollout of a run (one row per rollout, ROLLOUT_KEYS + ``score``) and
    what was computed: rollouts scored now, reused from the cache, notes."""

    reward_model: str
    reward_key: str
    scores: pd.DataFrame
    n_scored: int
    n_cached: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def read_score_cache(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every cached reward score of a run (all reward models), or an empty frame."""
    path = artefact_path(run_dir, "reward.scores")
    if not path.exists():
        types = {"rollout_index": np.int32, "score": np.float64}
        return pd.DataFrame({c: pd.Series(dtype=types.get(c, object)) for c in SCORE_COLUMNS})
    table = read_table(path, schema_of("reward.scores")).to_pandas()
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise StoreError(f"{path} lacks columns {missing}; delete it and re-run 'canopy reward'")
    return table


def _rollout_texts(run: Path) -> pd.DataFrame:
    """Keys, prompt text and response text of every rollout (texts required)."""
    store = RunStore(run)
    rollouts = store.read_rollouts(columns=[*ROLLOUT_KEYS, "text"]).to_pandas()
    if rollouts.duplicated(list(ROLLOUT_KEYS)).any():
        row = rollouts[rollouts.duplicated(list(ROLLOUT_KEYS))].iloc[0]
        raise StoreError(
            f"rollout {row['prompt_id']}#{row['rollout_index']} of {row['model']}/{row['task']} "
            f"appears more than once; remove the duplicate shard from {store.rollouts_dir}"
        )
    if rollouts["text"].isna().any():
        raise CanopyError(
            f"{int(rollouts['text'].isna().sum())} rollouts have no text; reward scoring needs "
            "decoded text: re-generate, or import with a 'text' column"
        )
    prompts = store.read_prompts().select([*PROMPT_KEYS, "text"]).to_pandas()
    prompts = prompts.rename(columns={"text": "prompt_text"}).drop_duplicates(list(PROMPT_KEYS))
    frame = rollouts.merge(prompts, on=list(PROMPT_KEYS), how="left")
    if frame["prompt_text"].isna().any():
        raise StoreError(
            f"{run} has rollouts whose prompt is not in prompts/; the run folder is incomplete, "
            "re-generate or re-import it"
        )
    return frame


def score_run(
    run_dir: str | os.PathLike[str],
    model: str | RewardScorer,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int = 4096,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreResult:
    """Reward score of every rollout of a run, reusing the cache; new scores are added to
    ``RUN/reward/scores.parquet`` (scores of other reward models stay). ``model``: a name
    (HF id, local folder) or a loaded RewardScorer. ``progress(done, total)`` after each batch."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CanopyError(f"run folder {run} does not exist; pass the folder 'canopy run' wrote")
    frame = _rollout_texts(run)
    frame["text_sha1"] = [
        _sha1(p + "\x1f" + r) for p, r in zip(frame["prompt_text"], frame["text"], strict=True)
    ]
    scorer = (
        model
        if isinstance(model, RewardScorer)
        else RewardScorer(
            model, device=device, dtype=dtype, max_length=max_length, batch_size=batch_size
        )
    )
    key = scorer.key
    cache = read_score_cache(run)
    mine = cache[cache["reward_key"] == key][[*ROLLOUT_KEYS, "text_sha1", "score"]]
    merged = frame.merge(mine, on=[*ROLLOUT_KEYS, "text_sha1"], how="left")
    merged["score"] = merged["score"].astype(np.float64)
    todo = np.flatnonzero(merged["score"].isna().to_numpy())
    done = len(merged) - len(todo)
    if progress is not None:
        progress(done, len(merged))
    notes: list[str] = []
    t0 = scorer.seconds
    truncated0 = scorer.n_truncated
    state = {"done": done}

    def on_batch(k: int) -> None:
        state["done"] += k
        if progress is not None:
            progress(state["done"], len(merged))

    keep_old = cache[cache["reward_key"] != key]  # other models' rows stay as they are
    for start in range(0, len(todo), SAVE_EVERY):  # saved after each chunk: a kill loses little
        rows = todo[start : start + SAVE_EVERY]
        new = scorer.score(
            merged["prompt_text"].iloc[rows].tolist(),
            merged["text"].iloc[rows].tolist(),
            on_batch=on_batch,
        )
        if not np.isfinite(new).all():
            raise CanopyError(f"reward model {scorer.name!r} returned non-finite scores; check it")
        merged.loc[rows, "score"] = new
        scored = merged[merged["score"].notna()]
        current = scored[[*ROLLOUT_KEYS, "text_sha1", "score"]].assign(reward_key=key)
        table = pd.concat([keep_old, current], ignore_index=True)[list(SCORE_COLUMNS)]
        table["rollout_index"] = table["rollout_index"].astype(np.int32)
        table["score"] = table["score"].astype(np.float64)
        atomic_write_table(
            artefact_path(run, "reward.scores"),
            pa.Table.from_pandas(table, preserve_index=False),
            schema_of("reward.scores"),
        )
    if not scorer.chat:
        notes.append(
            f"the reward model's tokenizer has no chat template; prompt and response were "
            f"joined as {FALLBACK_FORMAT!r}"
        )
    n_trunc = scorer.n_truncated - truncated0
    if n_trunc:
        notes.append(
            f"{n_trunc} prompt + response texts exceeded {scorer.max_length} tokens and were cut "
            "to that length before scoring"
        )
    scores = merged[[*ROLLOUT_KEYS, "score"]].sort_values(list(ROLLOUT_KEYS)).reset_index(drop=True)
    return ScoreResult(
        reward_model=scorer.name,
        reward_key=key,
        scores=scores,
        n_scored=len(todo),
        n_cached=done,
        seconds=scorer.seconds - t0,
        notes=notes,
    )
