"""The generate stage of ``canopy run``: every missing rollout, model by model, into the store.

The manifest is the authority on how a folder's rollouts were made: a config whose policy, seed,
models or prompts differ is refused before anything is sampled.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from canopy_entropy.config import ExperimentConfig, config_dict, generation_fingerprint
from canopy_entropy.errors import CanopyError, ConfigError
from canopy_entropy.run.manifest import PolicyRecord, read_manifest, update_manifest
from canopy_entropy.runner.display import RunDisplay
from canopy_entropy.store import RunStore
from canopy_entropy.tasks import Prompt, load_task_prompts


def load_prompts(cfg: ExperimentConfig) -> dict[str, list[Prompt]]:
    """The configured prompts of every task."""
    out = {}
    for task in cfg.tasks:
        p = cfg.prompts_for(task)
        out[task] = load_task_prompts(
            task,
            n=p.n,
            source=p.source,
            path=p.path or None,
            fewshot=p.fewshot,
            sample=p.sample,
            seed=p.seed,
            fewshot_path=p.fewshot_path or None,
        )
    return out


def _store_counts(run_dir: Path) -> dict[tuple[str, str, str], int]:
    """Rollouts per (model, task, prompt_id) already in the store."""
    store = RunStore(run_dir)
    if not store.shard_files():
        return {}
    table = store.read_rollouts(columns=["model", "task", "prompt_id"])
    if table.num_rows == 0:
        return {}
    counts = table.group_by(["model", "task", "prompt_id"]).aggregate([("prompt_id", "count")])
    cols = counts.to_pydict()
    return {
        (m, t, p): int(c)
        for m, t, p, c in zip(
            cols["model"], cols["task"], cols["prompt_id"], cols["prompt_id_count"], strict=True
        )
    }


def check_store_matches(
    run_dir: Path, cfg: ExperimentConfig, prompts: dict[str, list[Prompt]]
) -> dict[tuple[str, str, str], int]:
    """Refuse a run folder holding rollouts this config would not produce (never mix studies)."""
    counts = _store_counts(run_dir)
    wanted = {(m.label, t, p.id) for m in cfg.models for t in cfg.tasks for p in prompts[t]}
    extra = [k for k in counts if k not in wanted]
    if extra:
        m, t, p = extra[0]
        raise ConfigError(
            f"{run_dir} holds rollouts this config does not ask for ({len(extra)} prompts, e.g. "
            f"model '{m}', task '{t}', prompt '{p}'); use another --out folder or "
            "--force generate to start over"
        )
    over = [k for k, c in counts.items() if c > cfg.generation.rollouts]
    if over:
        m, t, p = over[0]
        raise ConfigError(
            f"{run_dir} holds {counts[over[0]]} rollouts for model '{m}', prompt '{p}' but the "
            f"config asks for {cfg.generation.rollouts}; use another --out folder or --force "
            "generate"
        )
    return counts


_POLICY_KEYS = {"stop_strings": "stop"}  # PolicyRecord field -> [generation] key


def _check_provenance(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A run folder made with other generation settings cannot be continued with these.

    The manifest is the authority (config.toml is only a copy for people): its recorded policy
    and seed scheme, and the experiment config that ``canopy run`` recorded there.
    """
    if not RunStore(run_dir).shard_files():
        return
    manifest = read_manifest(run_dir)  # rollouts without a manifest: an error with a hint
    wanted = PolicyRecord.from_policy(_policy(cfg))
    if manifest.policy is not None:
        for k in manifest.policy.differences(wanted):
            if k == "eos_token_ids":
                continue  # [generation] has no EOS ids: the engine resolves them
            key = f"generation.{_POLICY_KEYS.get(k, k)}"
            raise ConfigError(
                f"{run_dir} was generated with {key} = {getattr(manifest.policy, k)!r}, this "
                f"config has {getattr(wanted, k)!r}; use another --out folder or --force generate"
            )
    seed = manifest.seed_scheme
    g = cfg.generation
    if seed is not None and (seed.run_seed, seed.common_random_numbers) != (
        g.seed,
        g.common_random_numbers,
    ):
        raise ConfigError(
            f"{run_dir} was generated with generation.seed = {seed.run_seed} (common random "
            f"numbers {seed.common_random_numbers}), this config has {g.seed} "
            f"({g.common_random_numbers}); use another --out folder or --force generate"
        )
    if manifest.experiment is None:
        return
    old, new = generation_fingerprint(manifest.experiment), generation_fingerprint(cfg)
    for key in ("generation", "engine"):
        for k in sorted(set(old[key]) | set(new[key])):
            if old[key].get(k) != new[key].get(k):
                raise ConfigError(
                    f"{run_dir} was generated with {key}.{k} = {old[key].get(k)!r}, this config "
                    f"has {new[key].get(k)!r}; use another --out folder or --force generate"
                )
    old_models = {m["label"]: m for m in old["models"]}
    for m in new["models"]:
        prev = old_models.get(m["label"])
        if prev is not None and prev != m:
            raise ConfigError(
                f"{run_dir} has model label '{m['label']}' for {prev['model']} "
                f"({prev['variant']}), this config uses it for {m['model']} ({m['variant']}); "
                "use another --out folder or a different label"
            )
    ignore = ("path", "fewshot_path", "n")
    for task, p_new in new["prompts"].items():
        p_old = old["prompts"].get(task)
        if task in cfg.tasks and isinstance(p_new, dict) and isinstance(p_old, dict):
            diff = [k for k in p_new if k not in ignore and p_new.get(k) != p_old.get(k)]
            if diff:
                raise ConfigError(
                    f"{run_dir} was generated with prompts.{diff[0]} = {p_old.get(diff[0])!r}, "
                    f"this config has {p_new.get(diff[0])!r}; use another --out folder or "
                    "--force generate"
                )


def _policy(cfg: ExperimentConfig) -> Any:
    from canopy_entropy.engines.base import DecodingPolicy

    g = cfg.generation
    return DecodingPolicy(
        temperature=g.temperature,
        top_k=g.top_k or None,
        top_p=g.top_p,
        min_p=g.min_p,
        max_new_tokens=g.max_new_tokens,
        stop_strings=tuple(g.stop),
    )


def _engine_options(cfg: ExperimentConfig, model: Any) -> dict[str, Any]:
    """[engine].options with the model's overrides; vLLM takes its dtype as an option."""
    options = {**cfg.engine.options, **model.engine_options}
    if cfg.engine.name == "vllm" and cfg.engine.dtype != "auto":
        options.setdefault("dtype", cfg.engine.dtype)
    return options


def check_run_folder(
    run_dir: Path, cfg: ExperimentConfig, prompts: dict[str, list[Prompt]]
) -> dict[tuple[str, str, str], int]:
    """Refuse a folder whose rollouts this config would not produce; rollouts per prompt."""
    _check_provenance(run_dir, cfg)
    return check_store_matches(run_dir, cfg, prompts)


def run_generate(
    run_dir: Path, cfg: ExperimentConfig, display: RunDisplay, fn: Callable[..., Any]
) -> str:
    """Generate every missing rollout, model by model (one model in memory at a time) with
    ``fn`` (the stage's ``generate_run``)."""
    prompts = load_prompts(cfg)
    counts = check_store_matches(run_dir, cfg, prompts)
    M = cfg.generation.rollouts
    for m in cfg.models:
        for task in cfg.tasks:
            display.totals[(m.label, task)] = len(prompts[task])
            display.done[(m.label, task)] = sum(
                counts.get((m.label, task, p.id), 0) >= M for p in prompts[task]
            )
    display.refresh()
    generated = 0
    for m in cfg.models:
        todo = [t for t in cfg.tasks if display.done[(m.label, t)] < len(prompts[t])]
        if not todo:
            continue
        flat = [p for t in todo for p in prompts[t]]
        pending = [
            p for p in flat if counts.get((m.label, p.task, p.id), 0) < M
        ]  # what the engine will actually sample, in order
        base_done = {t: display.done[(m.label, t)] for t in todo}
        t0 = time.monotonic()

        def progress(
            event: dict[str, Any], m=m, flat=flat, pending=pending, base=base_done, t0_=t0
        ) -> None:
            # prompts_done counts the prompts already in the store first, then the new ones
            k = int(event.get("prompts_done", 0)) - (len(flat) - len(pending))
            per_task = dict(base)
            for p in pending[: max(k, 0)]:
                per_task[p.task] += 1
            before = sum(display.done[(m.label, t)] for t in per_task)
            for t, d in per_task.items():
                display.done[(m.label, t)] = min(d, display.totals[(m.label, t)])
            display.session_prompts += sum(display.done[(m.label, t)] for t in per_task) - before
            elapsed = float(event.get("elapsed_s", time.monotonic() - t0_)) or 1e-9
            display.tokens_per_s = float(event.get("tokens", 0)) / elapsed
            display.refresh()
            if display.live is None:  # logs: one line per prompt
                task = pending[k - 1].task if 0 < k <= len(pending) else ""
                d, t = display.done.get((m.label, task), 0), display.totals.get((m.label, task), 0)
                display.console.print(
                    f"    {m.label} · {task} {d}/{t} prompts · "
                    f"{display.tokens_per_s:,.0f} tokens/s · ETA {display.eta()}",
                    highlight=False,
                )

        fn(
            run_dir,
            model=m.model,
            prompts=flat,
            rollouts=M,
            policy=_policy(cfg),
            variant=m.variant,
            family=m.family,
            model_label=m.label,
            engine=cfg.engine.name,
            device=cfg.engine.device,
            dtype=cfg.engine.dtype,
            seed=cfg.generation.seed,
            common_random_numbers=cfg.generation.common_random_numbers,
            batch_size=cfg.generation.batch_size or None,
            engine_options=_engine_options(cfg, m),
            progress=progress,
            run_name=cfg.name,
        )
        generated += len(pending)
    counts = _store_counts(run_dir)
    missing = [
        (m.label, t, p.id)
        for m in cfg.models
        for t in cfg.tasks
        for p in prompts[t]
        if counts.get((m.label, t, p.id), 0) < M
    ]
    if missing:
        raise CanopyError(
            f"generation finished but {len(missing)} prompts lack rollouts (e.g. model "
            f"'{missing[0][0]}', prompt '{missing[0][2]}'); re-run to continue"
        )
    for key in display.totals:
        display.done[key] = display.totals[key]
    record_experiment(run_dir, cfg)
    n_roll = sum(counts.values())
    return f"{generated} prompts sampled, {n_roll} rollouts in store" if generated else ""


def generate_is_done(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Every configured (model, task, prompt) has all its rollouts in the store."""
    prompts = load_prompts(cfg)
    counts = check_store_matches(run_dir, cfg, prompts)
    return all(
        counts.get((m.label, t, p.id), 0) >= cfg.generation.rollouts
        for m in cfg.models
        for t in cfg.tasks
        for p in prompts[t]
    )


def record_experiment(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Record the resolved experiment config in the run manifest (the provenance authority)."""
    exp = config_dict(cfg)
    if read_manifest(run_dir).experiment != exp:
        update_manifest(run_dir, lambda m: dataclasses.replace(m, experiment=exp))
