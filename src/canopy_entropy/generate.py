"""Sample M rollouts per prompt with any engine into a resumable run folder.

One rollout shard (and one prompt-row shard) per (model label, task, prompt), named
``store.slug(model_label, task, prompt_id)``; a shard already present and valid is skipped,
so a killed run continues where it stopped and ends identical to an uninterrupted one (the
randomness of every rollout is a function of the run seed, prompt id and rollout index).
Prompts go to the engine in fixed chunks of ``prompts_per_call`` over the full prompt list (a
chunk with a missing shard is sampled whole again, only its missing shards are written), so the
batch make-up, and with it every float, is the same however often a run was resumed. A
``Shard`` takes a fixed share of the chunks, so N jobs can fill one folder concurrently.
The manifest records, per model label, the model, engine facts, EOS ids and hashes, plus the
run's policy and seed scheme; continuing a folder with another policy or seed is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from canopy_entropy.engines.base import DecodingPolicy, Engine, rollout_seed
from canopy_entropy.errors import ConfigError
from canopy_entropy.prompting import render_prompt
from canopy_entropy.run.manifest import (
    Manifest,
    ModelRecord,
    PolicyRecord,
    SeedScheme,
    read_manifest,
    update_manifest,
)
from canopy_entropy.store import PROMPT_SCHEMA, RunStore, rollouts_table, slug
from canopy_entropy.tasks.base import Prompt

SEED_SCHEME = (
    "rollout seed = blake2b(run_seed, prompt_id, rollout_index, stream) & (2^63-1); "
    "step uniform = splitmix64(rollout seed, step) >> 11 / 2^53 (hf engine)"
)


@dataclass
class GenerateSummary:
    """What one ``generate_run`` call did."""

    run_dir: str
    model_label: str
    prompts_total: int
    prompts_generated: int
    prompts_skipped: int
    rollouts: int
    tokens: int
    truncated: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class Shard:
    """Job ``index`` of ``count`` (1-based): it owns every ``count``-th chunk of each model."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 1 <= I <= N."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        index, count = (int(match[1]), int(match[2])) if match else (0, 0)
        if not match or count < 1 or not 1 <= index <= count:
            raise ConfigError(
                f"shard '{text}' is not I/N with 1 <= I <= N; give e.g. 1/4 for the first of "
                "four jobs"
            )
        return cls(index, count)

    def owns(self, label: str, chunk: int) -> bool:
        """Round-robin over a model's chunks, starting at a shard fixed by the model label
        (so each job gets an equal share of every model)."""
        start = int.from_bytes(hashlib.blake2b(label.encode(), digest_size=4).digest(), "big")
        return (start + chunk) % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def engine_prompts_per_call(engine: str, options: dict[str, Any]) -> int:
    """Prompts per ``sample_many`` call, without loading the engine: the option, else the
    engine's default (chunks and shard shares are laid out with it)."""
    if options.get("prompts_per_call"):
        return int(options["prompts_per_call"])
    if engine == "vllm":
        from canopy_entropy.engines.vllm import VLLMOptions

        return int(VLLMOptions().prompts_per_call)
    from canopy_entropy.engines.registry import engine_class

    return int(engine_class(engine).prompts_per_call)


def owned_prompts(label: str, n_prompts: int, per_call: int, shard: Shard | None) -> list[int]:
    """Indices of the prompts (of a model's full list) whose chunk ``shard`` owns."""
    per_call = max(1, int(per_call))
    return [i for i in range(n_prompts) if shard is None or shard.owns(label, i // per_call)]


class FolderWriter:
    """Where ``generate_run`` puts its results: the run folder itself (the manifest under its
    lock, one atomic shard per prompt). The runner's per-model child sends them to its parent."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.store = RunStore(run_dir)

    def record_model(
        self, run: str, requested: PolicyRecord, seed_rec: SeedScheme, record: ModelRecord
    ) -> None:
        def change(m: Manifest) -> Manifest:
            m = dataclasses.replace(m, run=m.run or run, policy=requested, seed_scheme=seed_rec)
            return m.with_model(record)

        update_manifest(self.run_dir, change)

    def write_shard(self, name: str, prompt_table: pa.Table, rollout_table: pa.Table) -> None:
        """The prompt row first, then the rollouts (whose presence marks the prompt done)."""
        self.store.write_prompts(name, prompt_table)
        self.store.write_rollouts(name, rollout_table)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("canopy-entropy", "torch", "transformers", "vllm", "numpy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def default_model_label(model: str) -> str:
    """A short label for a model: the folder name of a local path, else the name as given."""
    path = Path(model)
    return path.name if path.exists() else model


def _check_continuation(
    manifest: Manifest, requested: PolicyRecord, seed_rec: SeedScheme, label: str, rollouts: int
) -> None:
    """Refuse to add rollouts made another way to a folder (the manifest is the authority)."""
    if manifest.policy is not None and manifest.policy != requested:
        diff = manifest.policy.differences(requested)
        raise ConfigError(
            f"the run folder was generated with another decoding policy (differs in {', '.join(diff)}); "
            "use the same options or a new --run folder"
        )
    stored = manifest.seed_scheme
    if stored is not None and stored != seed_rec:
        raise ConfigError(
            f"the run folder was generated with seed {stored.run_seed} "
            f"(common random numbers {stored.common_random_numbers}); "
            "use the same --seed/--common-random-numbers or a new --run folder"
        )
    entry = manifest.model(label)
    if entry is not None and entry.source != "generate":
        raise ConfigError(
            f"model '{label}' in this run folder was made by '{entry.source}', not sampled here; "
            "give the generated model another label or use a new --run folder"
        )
    if entry is not None and entry.rollouts != rollouts:
        raise ConfigError(
            f"model '{label}' in this run folder has {entry.rollouts} rollouts per prompt, "
            f"not {rollouts}; use --rollouts {entry.rollouts} or a new --run folder"
        )


def check_generation_inputs(rollouts: int, prompts: Sequence[Prompt]) -> None:
    """One-line errors for what no engine can sample: no rollouts, no prompts, a repeated id."""
    if rollouts < 1:
        raise ConfigError(f"rollouts must be >= 1 (got {rollouts})")
    if not prompts:
        raise ConfigError("no prompts given; pass a JSONL file with a 'prompt' field per line")
    ids = [(p.task, p.id) for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise ConfigError(
            f"prompt id '{dup[1]}' appears twice in task '{dup[0]}'; prompt ids must be unique"
        )


def generate_run(
    run_dir: str | Path,
    *,
    model: str,
    prompts: Sequence[Prompt],
    rollouts: int,
    policy: DecodingPolicy,
    variant: str = "base",
    family: str | None = None,
    model_label: str | None = None,
    engine: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    common_random_numbers: bool = False,
    batch_size: int | None = None,
    engine_options: dict[str, Any] | None = None,
    engine_instance: Engine | None = None,
    progress: Callable[[dict], None] | None = None,
    run_name: str | None = None,
    shard: Shard | None = None,
    writer: FolderWriter | None = None,
    enable_thinking: bool = False,
    series: str | None = None,
    step: int | None = None,
) -> GenerateSummary:
    """Sample ``rollouts`` rollouts for every prompt into ``run_dir`` (resumable).

    ``policy.eos_token_ids`` empty means the engine's EOS ids. ``engine_instance`` reuses a
    constructed engine (the caller keeps ownership); otherwise one is built and closed here.
    ``progress`` receives dicts with task, prompt_id, prompts_done, prompts_total (of this
    shard), rollouts_done, tokens and elapsed_s after each prompt. ``shard``: only the chunks
    that job owns. ``writer``: where results go (default: the run folder).
    ``enable_thinking`` goes to the chat template of instruct prompts; ``series`` / ``step``
    place the model in a checkpoint series (recorded in the manifest).
    """
    check_generation_inputs(rollouts, prompts)
    label = model_label or default_model_label(model)
    family = family or label
    store = RunStore(run_dir)
    run = run_name or Path(run_dir).resolve().name
    requested_rec = PolicyRecord.from_policy(policy)
    seed_rec = SeedScheme(
        kind="counter-hash",
        run_seed=int(seed),
        common_random_numbers=bool(common_random_numbers),
        description=SEED_SCHEME,
    )
    _check_continuation(read_manifest(run_dir), requested_rec, seed_rec, label, rollouts)
    shard_names = [slug(label, p.task, p.id) for p in prompts]
    writer = writer or FolderWriter(run_dir)

    owns_engine = engine_instance is None
    eng = engine_instance
    start = time.perf_counter()
    tokens_done = truncated = n_done = 0
    try:
        if eng is None:
            from canopy_entropy.engines.registry import get_engine

            options = dict(engine_options or {})
            if engine == "hf":
                options.setdefault("device", device)
                options.setdefault("dtype", dtype)
                options.setdefault("batch_size", batch_size)
            eng = get_engine(engine, model, **options)
        # Engines with continuous batching (vLLM, HTTP servers) take many prompts per call;
        # the chunks are fixed over the full list, shards are still written per prompt.
        chunk = max(1, int(eng.prompts_per_call))
        owned = owned_prompts(label, len(prompts), chunk, shard)
        todo = [i for i in owned if not store.has_shard(shard_names[i])]
        groups = sorted({i // chunk for i in todo})  # chunks to sample (whole)
        resolved = policy
        if not policy.eos_token_ids:
            resolved = dataclasses.replace(policy, eos_token_ids=tuple(eng.eos_token_ids))
        resolved.validate()
        sampled = [i for k in groups for i in range(k * chunk, min((k + 1) * chunk, len(prompts)))]
        rendered = {
            i: render_prompt(eng.tokenizer, prompts[i].text_for(variant), variant, enable_thinking)
            for i in sampled
        }
        _check_context(prompts, rendered, resolved, eng.context_length)
        writer.record_model(
            run, requested_rec, seed_rec,
            _model_record(label, model, variant, family, rollouts, eng, resolved, seed_rec,
                          series=series, step=step, enable_thinking=enable_thinking),
        )  # fmt: skip
        done_before = len(owned) - len(todo)
        missing = set(todo)
        stream = "" if common_random_numbers else label
        chat = eng.chat  # chat APIs take the user text itself
        for k in groups:
            group = list(range(k * chunk, min((k + 1) * chunk, len(prompts))))
            requests = [
                (
                    prompts[i].text_for(variant) if chat else rendered[i][1],
                    np.array(
                        [
                            rollout_seed(seed, prompts[i].id, r, stream=stream)
                            for r in range(rollouts)
                        ],
                        dtype=np.int64,
                    ),
                    np.arange(rollouts, dtype=np.int32),
                )
                for i in group
            ]
            batches = eng.sample_many(requests, resolved)
            for i, batch in zip(group, batches, strict=True):
                if i not in missing:  # sampled only to keep the chunk's batch make-up
                    continue
                prompt = prompts[i]
                writer.write_shard(
                    shard_names[i],
                    _prompt_table(
                        run, label, variant, family, prompt, rendered[i][0], len(rendered[i][1])
                    ),
                    _batch_table(batch, run, label, variant, family, prompt),
                )
                tokens_done += int(batch.offsets[-1])
                truncated += sum(r == "length" for r in batch.finish_reason)
                n_done += 1
                if progress is not None:
                    progress(
                        {
                            "task": prompt.task,
                            "prompt_id": prompt.id,
                            "prompts_done": done_before + n_done,
                            "prompts_total": len(owned),
                            "rollouts_done": (done_before + n_done) * rollouts,
                            "tokens": tokens_done,
                            "elapsed_s": time.perf_counter() - start,
                        }
                    )
    finally:
        if owns_engine and eng is not None:
            eng.close()
    return GenerateSummary(
        run_dir=str(run_dir),
        model_label=label,
        prompts_total=len(owned),
        prompts_generated=n_done,
        prompts_skipped=len(owned) - n_done,
        rollouts=rollouts,
        tokens=tokens_done,
        truncated=truncated,
        elapsed_s=time.perf_counter() - start,
    )


def _check_context(prompts, rendered, policy: DecodingPolicy, context_length: int | None) -> None:
    for i, (_, ids) in rendered.items():
        if not ids:
            raise ConfigError(
                f"prompt '{prompts[i].id}' (task {prompts[i].task}) renders to no tokens; "
                "give it some text or drop it"
            )
        if context_length and len(ids) + policy.max_new_tokens > context_length:
            raise ConfigError(
                f"prompt '{prompts[i].id}' (task {prompts[i].task}) has {len(ids)} tokens, and with "
                f"max_new_tokens {policy.max_new_tokens} exceeds the model's context of "
                f"{context_length}; lower --max-new-tokens or drop that prompt"
            )


def _model_record(
    label, model, variant, family, rollouts, eng, resolved, seed_rec,
    *, series=None, step=None, enable_thinking=False,
) -> ModelRecord:  # fmt: skip
    """This model's facts for the manifest (with the run's policy and seed scheme, and its
    place in a checkpoint series and thinking mode, as the local and the Ray path sample)."""
    return ModelRecord(
        label=label,
        model=model,
        variant=variant,
        family=family,
        source="generate",
        rollouts=rollouts,
        policy=PolicyRecord.from_policy(resolved),
        seed_scheme=seed_rec,
        vocab_size=int(eng.vocab_size),
        context_length=eng.context_length,
        engine=eng.describe(),
        approximate=bool(eng.approximate),
        versions=_versions(),
        series=series or None,
        step=step,
        enable_thinking=bool(enable_thinking),
    )


def _batch_table(batch, run, label, variant, family, prompt: Prompt) -> pa.Table:
    return rollouts_table(
        run=run,
        model=label,
        variant=variant,
        family=family,
        task=prompt.task,
        prompt_id=prompt.id,
        rollout_index=batch.rollout_index,
        seed=batch.seed,
        finish_reason=batch.finish_reason,
        entropy=batch.split(batch.entropy),
        token_ids=batch.split(batch.token_ids),
        eos_prob=batch.split(batch.eos_prob),
        logprob=batch.split(batch.logprob),
        kept_mass=batch.split(batch.kept_mass),
        entropy_upper=batch.split(batch.entropy_upper),
        text=batch.text,
    )


def _prompt_table(
    run, label, variant, family, prompt: Prompt, rendered: str, count: int
) -> pa.Table:
    row = {
        "run": [run],
        "model": [label],
        "variant": [variant],
        "family": [family],
        "task": [prompt.task],
        "prompt_id": [prompt.id],
        "text": [prompt.text_for(variant)],
        "rendered": [rendered],
        "token_count": [count],
    }
    return pa.Table.from_pydict(row, schema=PROMPT_SCHEMA)


def load_prompts(source: str, n: int | None = None) -> list[Prompt]:
    """Prompts from a JSONL file (``prompt``, optional ``id`` and ``task``) or a task name.

    JSONL files follow the same rules as the ``jsonl`` source of ``canopy run`` (validation,
    ids: the line's ``id`` or a content hash, so both commands give a prompt the same id);
    a line without ``task`` belongs to the task named by the file's stem.
    """
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.exists():
        from canopy_entropy.tasks.jsonl import read_jsonl_records, read_prompt_file

        pairs = read_prompt_file(path, task=path.stem)
        tasks = [str(obj.get("task", path.stem)) for _, obj in read_jsonl_records(path)]
        out = [
            Prompt(id=pid, text=text, task=t) for (pid, text), t in zip(pairs, tasks, strict=True)
        ]
        return out if n is None else out[:n]
    from canopy_entropy.tasks import load_task_prompts

    return list(load_task_prompts(source, n))
