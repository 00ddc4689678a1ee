"""The generate stage of ``canopy run``: every missing rollout, model by model, into the store.

Each model is sampled in a fresh child process (multiprocessing spawn) that sends its shards to
this process, which writes them: the model's memory (GPU memory too, which vLLM does not free
reliably on deletion) goes with the child, so nothing accumulates across models; with
``[engine] backend = 'ray'`` a model's fresh Ray workers do the sampling instead
(``runner.ray_pool``) and this process writes what they send. The manifest is
the authority on how a folder's rollouts were made: a config whose policy, seed, models or
prompts differ is refused before anything is sampled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from canopy_entropy.config import ExperimentConfig, config_dict, generation_fingerprint
from canopy_entropy.errors import CanopyError, ConfigError, Notice
from canopy_entropy.generate import FolderWriter, Shard, engine_prompts_per_call, owned_prompts
from canopy_entropy.models import needs_conversion
from canopy_entropy.run.manifest import PolicyRecord, read_manifest, update_manifest
from canopy_entropy.runner import ray_pool
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
            spec=cfg.task_specs.get(task),
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
        stop_strings=tuple(cfg.stop_strings()),
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


def _owned_units(
    cfg: ExperimentConfig, prompts: dict[str, list[Prompt]], shard: Shard | None
) -> list[tuple[str, str, str]]:
    """The (model, task, prompt id) units a job samples: all, or a shard's share."""
    out = []
    for m in cfg.models:
        flat = [p for t in cfg.tasks for p in prompts[t]]
        per_call = engine_prompts_per_call(cfg.engine.name, _engine_options(cfg, m))
        out += [(m.label, flat[i].task, flat[i].id) for i in owned_prompts(m.label, len(flat), per_call, shard)]  # fmt: skip
    return out


def shard_of_units(
    cfg: ExperimentConfig, prompts: dict[str, list[Prompt]], count: int
) -> dict[tuple[str, str, str], int]:
    """Which of ``count`` shard jobs samples each (model, task, prompt id)."""
    return {
        unit: i for i in range(1, count + 1) for unit in _owned_units(cfg, prompts, Shard(i, count))
    }


def run_generate(
    run_dir: Path,
    cfg: ExperimentConfig,
    display: RunDisplay,
    fn: Callable[..., Any],
    shard: Shard | None = None,
) -> str:
    """Generate every missing rollout (of ``shard``'s share), model by model, each model in
    its own child process with ``fn`` (the stage's ``generate_run``), or on fresh Ray workers
    (``[engine] backend = 'ray'``)."""
    prompts = load_prompts(cfg)
    counts = check_store_matches(run_dir, cfg, prompts)
    M = cfg.generation.rollouts
    units = _owned_units(cfg, prompts, shard)
    for m in cfg.models:
        for task in cfg.tasks:
            display.totals[(m.label, task)] = 0
            display.done[(m.label, task)] = 0
    for label, task, pid in units:
        display.totals[(label, task)] += 1
        display.done[(label, task)] += counts.get((label, task, pid), 0) >= M
    display.refresh()
    generated = 0
    ray = cfg.engine.backend == "ray"
    with ray_pool.session(cfg.engine.ray) if ray else contextlib.nullcontext():
        for m in cfg.models:
            generated += _generate_model(run_dir, cfg, m, prompts, display, fn, shard, ray)
    counts = _store_counts(run_dir)
    missing = [u for u in units if counts.get(u, 0) < M]
    if missing:
        raise CanopyError(
            f"generation finished but {len(missing)} prompts lack rollouts (e.g. model "
            f"'{missing[0][0]}', prompt '{missing[0][2]}'); re-run to continue"
        )
    for key in display.totals:
        display.done[key] = display.totals[key]
    record_experiment(run_dir, cfg)
    n_roll = sum(counts.values())
    if shard is not None:
        return f"shard {shard}: {generated} prompts sampled, {n_roll} rollouts in store"
    return f"{generated} prompts sampled, {n_roll} rollouts in store" if generated else ""


def _generate_model(
    run_dir: Path,
    cfg: ExperimentConfig,
    m: Any,
    prompts: dict[str, list[Prompt]],
    display: RunDisplay,
    fn: Callable[..., Any],
    shard: Shard | None,
    ray: bool,
) -> int:
    """Sample model ``m``'s missing rollouts: in a fresh child process, or on Ray workers."""
    if all(display.done[(m.label, t)] >= display.totals[(m.label, t)] for t in cfg.tasks):
        return 0
    sampled = [0]  # prompts this model's engine finished in this session

    def progress(event: dict[str, Any], m=m, sampled=sampled) -> None:
        key = (m.label, str(event["task"]))
        display.done[key] = min(display.done[key] + 1, display.totals[key])
        sampled[0] += 1
        display.observe(m.label, int(event["tokens"]), sampled[0])  # measured decoding
        display.refresh()
        if display.live is None:  # logs: one line per prompt
            d, t = display.done[key], display.totals[key]
            display.console.print(
                f"    {m.label} · {key[1]} {d}/{t} prompts · {display.speed()}",
                highlight=False,
            )

    if display.live is None:  # logs: say what the first minutes are spent on
        first_use = " (first use: converting it once, which takes minutes)"
        display.console.print(
            f"    {m.label}: loading {m.model}{first_use if needs_conversion(m.model) else ''}",
            highlight=False,
            markup=False,
        )
    kwargs = dict(
        run_dir=run_dir,
        model=m.model,
        prompts=[p for t in cfg.tasks for p in prompts[t]],  # fixed chunks: all tasks
        rollouts=cfg.generation.rollouts,
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
        run_name=cfg.name,
        shard=shard,
        **_model_extras(cfg, m),
    )
    if not ray:
        return generate_in_child(fn, kwargs, progress)[0].prompts_generated

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "died":  # never silent: the run goes on with the units re-queued
            what = "replaced" if info["replaced"] else "not replaced (restarts used up)"
            display.console.print(
                f"    {m.label}: Ray worker {info['worker']} (pid {info['pid']}) died; "
                f"{len(info['requeued'])} prompt chunks re-queued, worker {what}",
                highlight=False,
            )

    summary = ray_pool.generate_on_ray(
        **kwargs, workers=cfg.engine.workers, ray_options=cfg.engine.ray, progress=progress,
        on_event=on_event,
    )  # fmt: skip
    return summary.prompts_generated


def generate_in_child(
    fn: Callable[..., Any], kwargs: dict[str, Any], progress: Callable[[dict], None]
) -> tuple[Any, int, int]:
    """``fn(**kwargs)`` (``generate_run``) in a fresh spawned process whose results this
    process writes; returns (its summary, the child's peak RSS in bytes, the child's pid).

    The child dies with this process (a killed parent leaves no orphan sampling on), and an
    exception in the child is raised here."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    torch = sys.modules.get("torch")  # float kernels split work by thread count: keep ours
    threads = torch.get_num_threads() if torch is not None else None
    proc = ctx.Process(target=_child_main, args=(send, fn, kwargs, threads), daemon=False)
    proc.start()
    send.close()
    writer = FolderWriter(kwargs["run_dir"])
    result = None
    try:
        while result is None:
            try:
                kind, *payload = receive.recv()
            except EOFError:
                break
            if kind == "model":
                writer.record_model(*payload)
            elif kind == "shard":
                writer.write_shard(*payload)
            elif kind == "progress":
                progress(payload[0])
            elif kind == "warning":  # the child's notes reach the user as this process's
                warnings.warn(payload[0], Notice if payload[1] else UserWarning, stacklevel=1)
            elif kind == "error":
                raise payload[0]
            else:
                result = tuple(payload)
    finally:
        receive.close()
        if result is None and proc.is_alive():
            proc.terminate()
        proc.join()
    if result is None:
        raise RuntimeError(
            f"the generation process of model '{kwargs['model_label']}' died (exit code "
            f"{proc.exitcode}; e.g. out of memory) before it finished; re-run to continue"
        )
    return result


class _PipeWriter:
    """The child's writer: every result goes to the parent, which writes it."""

    def __init__(self, conn: Any):
        self.conn = conn

    def record_model(self, *args: Any) -> None:
        self.conn.send(("model", *args))

    def write_shard(self, *args: Any) -> None:
        self.conn.send(("shard", *args))


def _exit_with_parent() -> None:
    """A watcher thread: when the parent process is gone, exit at once."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _child_main(conn: Any, fn: Callable[..., Any], kwargs: dict[str, Any], threads: int | None):
    """Entry point of the per-model child process."""
    import resource

    _exit_with_parent()
    warnings.showwarning = lambda message, category, *_args, **_kw: conn.send(
        ("warning", str(message), issubclass(category, Notice))
    )
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        summary = fn(
            **kwargs,
            writer=_PipeWriter(conn),
            progress=lambda event: conn.send(("progress", event)),
        )
    except KeyboardInterrupt:
        os._exit(130)
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        conn.close()
        return
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    conn.send(("done", summary, peak, os.getpid()))
    conn.close()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` as the parent can receive it, with the child's traceback as a note."""
    exc.add_note("in the generation process:\n" + "".join(traceback.format_exception(exc)))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def generate_is_done(run_dir: Path, cfg: ExperimentConfig, shard: Shard | None = None) -> bool:
    """Every configured (model, task, prompt) of ``shard``'s share has all its rollouts."""
    prompts = load_prompts(cfg)
    counts = check_store_matches(run_dir, cfg, prompts)
    M = cfg.generation.rollouts
    return all(counts.get(u, 0) >= M for u in _owned_units(cfg, prompts, shard))


def _model_extras(cfg: ExperimentConfig, m: Any) -> dict[str, Any]:
    """generate_run's thinking mode and checkpoint place of model ``m`` (only when set, so
    a ``fn`` without them still works for studies that do not use them)."""
    thinking = cfg.generation.enable_thinking if m.enable_thinking is None else m.enable_thinking
    extras: dict[str, Any] = {"enable_thinking": True} if thinking else {}
    if m.series:
        extras.update(series=m.series, step=m.step)
    return extras


def record_experiment(run_dir: Path, cfg: ExperimentConfig) -> None:
    """Record the resolved experiment config in the run manifest (the provenance authority)
    and each model's checkpoint series and step (they label results, so may change later)."""
    exp = config_dict(cfg)
    steps = {m.label: (m.series or None, m.step) for m in cfg.models}
    manifest = read_manifest(run_dir)
    current = {k: (r.series, r.step) for k, r in manifest.models.items() if k in steps}
    if manifest.experiment != exp or any(current[k] != steps[k] for k in current):
        update_manifest(
            run_dir, lambda m: dataclasses.replace(m, experiment=exp).with_checkpoints(steps)
        )
