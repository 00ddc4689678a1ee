"""Generation on a Ray cluster: engine replicas as Ray actors fed from one queue of work units.

A work unit is one fixed chunk of ``prompts_per_call`` consecutive prompts of a model's prompt
list, the same chunks a local run samples (one (model, task, prompt) with the transformers
engine), so every batch, and with it every float, is the one a single process makes. The
driver (this process) gives each worker ``IN_FLIGHT`` units at a time and hands it the next
whenever one comes back, so no worker waits on a barrier or on the slowest prompt. A worker
sends back only each prompt's reduced per-step arrays (``RolloutBatch``); the driver writes
them through the run folder's writer as they arrive. A worker that dies (node lost, out of
memory, killed) has its units put back at the head of the queue and is replaced, up to
``[engine.ray] restarts`` times per model; a unit that was on ``MAX_ATTEMPTS`` dying workers
fails the run. Each model gets fresh workers, killed when its units are done (their memory,
GPU memory too, goes with them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from canopy_entropy.config import RayConfig
from canopy_entropy.engines.base import DecodingPolicy, RolloutBatch, rollout_seed
from canopy_entropy.errors import CanopyError, ConfigError, MissingExtraError
from canopy_entropy.generate import (
    SEED_SCHEME,
    FolderWriter,
    GenerateSummary,
    Shard,
    _batch_table,
    _check_context,
    _check_continuation,
    _model_record,
    _prompt_table,
    check_generation_inputs,
    default_model_label,
    engine_prompts_per_call,
    owned_prompts,
)
from canopy_entropy.prompting import render_prompt
from canopy_entropy.run.manifest import PolicyRecord, SeedScheme, read_manifest
from canopy_entropy.store import RunStore, slug
from canopy_entropy.tasks.base import Prompt

IN_FLIGHT = 2  # units queued on each worker: the next one is there when the current ends
MAX_ATTEMPTS = 3  # a unit whose worker died this often is not handed out again
# The driver's settings of the engines' libraries (vLLM, the Hugging Face hub, transformers,
# tokenizers) that its workers get too: Ray starts a worker with its node's environment, not
# the driver's. The node's own address and ports stay the node's (as vLLM's Ray executor does).
FORWARDED_ENV = ("VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_")
NODE_ENV = frozenset({"VLLM_HOST_IP", "VLLM_HOST_PORT", "VLLM_PORT"})

Event = Callable[[str, dict[str, Any]], None]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError(
            "engine.backend = 'ray' needs ray, which is not installed; install it with: "
            "pip install 'canopy-entropy[ray]'"
        ) from exc
    return ray


@contextlib.contextmanager
def session(options: RayConfig) -> Iterator[Any]:
    """Ray connected for a run: the cluster at ``options.address`` (or ``$RAY_ADDRESS``), else
    a local one started here and shut down on leaving; one already initialised is kept."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        _connect(ray, options)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _address(options: RayConfig) -> tuple[str | None, str]:
    """The cluster address a run connects to and the setting it comes from (None, '': none
    set, a local Ray is started)."""
    if options.address:
        return options.address, "engine.ray.address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    return None, ""


def check(options: RayConfig, workers: int) -> str:
    """What ``canopy run --check`` says of the Ray backend: ray is importable (else the
    MissingExtraError) and which cluster the run would use. Contacts no cluster: a check must
    not wait on an unreachable address."""
    ray = _import_ray()
    address, source = _address(options)
    where = (
        f"the Ray cluster at '{address}' (from {source}; not contacted by --check)"
        if address
        else "a local Ray started for the run (no engine.ray.address or $RAY_ADDRESS)"
    )
    return (
        f"Ray {ray.__version__}, {workers} worker{'s' if workers != 1 else ''} per model (each num_cpus = "
        f"{options.num_cpus:g}, num_gpus = {options.num_gpus:g}; restarts = {options.restarts}) "
        f"on {where}"
    )


def _connect(ray: Any, options: RayConfig) -> None:
    address, _ = _address(options)
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False  # a throwaway local cluster
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at '{address}' ({exc}); start it with "
            "'ray start --head' or fix engine.ray.address"
        ) from exc


def worker_env() -> dict[str, str]:
    """The environment variables this process passes to its workers (``FORWARDED_ENV``)."""
    return {
        k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and k not in NODE_ENV
    }


class _Worker:
    """One engine replica (the Ray actor): renders prompts and samples units of them."""

    def __init__(self, engine: str, model: str, options: dict[str, Any], threads: int) -> None:
        from canopy_entropy.engines.registry import get_engine

        self.engine = get_engine(engine, model, **options)
        torch = sys.modules.get("torch")  # an engine that uses torch: the reserved CPUs only
        if torch is not None:
            torch.set_num_threads(threads)  # (CPU float kernels split work by thread count)

    def ready(
        self, texts: list[str], variant: str, enable_thinking: bool = False
    ) -> tuple[dict[str, Any], list[Any]]:
        """The engine's facts and ``texts`` rendered for ``variant`` (text, token ids)."""
        import ray

        eng = self.engine
        facts = {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "prompts_per_call": int(eng.prompts_per_call),
            "chat": bool(eng.chat),
            "eos_token_ids": tuple(eng.eos_token_ids),
            "vocab_size": int(eng.vocab_size),
            "context_length": eng.context_length,
            "approximate": bool(eng.approximate),
            "describe": eng.describe(),
        }
        return facts, [render_prompt(eng.tokenizer, t, variant, enable_thinking) for t in texts]

    def sample(self, requests: list[Any], policy: DecodingPolicy) -> list[RolloutBatch]:
        return self.engine.sample_many(requests, policy)


@dataclass
class _Handle:
    """The driver's view of one worker: its actor and the units it holds (by result ref)."""

    number: int
    actor: Any
    pid: int | None = None
    units: dict[Any, int] = field(default_factory=dict)  # result ref -> unit (chunk number)


def generate_on_ray(
    run_dir: str | Path,
    *,
    model: str,
    prompts: Sequence[Prompt],
    rollouts: int,
    policy: DecodingPolicy,
    workers: int,
    ray_options: RayConfig | None = None,
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
    run_name: str | None = None,
    shard: Shard | None = None,
    writer: FolderWriter | None = None,
    progress: Callable[[dict], None] | None = None,
    on_event: Event | None = None,
    enable_thinking: bool = False,
    series: str | None = None,
    step: int | None = None,
) -> GenerateSummary:
    """``generate_run`` with ``workers`` engine replicas as Ray actors (same arguments, same
    rollouts). ``on_event(kind, info)`` hears of each worker's life: 'ready' (worker, pid,
    node), 'taken' (worker, pid, unit, prompt ids; called before the unit is sent) and 'died'
    (worker, pid, requeued units). Connects to Ray (``ray_options``) if not yet connected."""
    ray = _import_ray()
    opts = ray_options or RayConfig()
    if not ray.is_initialized():
        _connect(ray, opts)
    check_generation_inputs(rollouts, prompts)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1 (got {workers})")
    label = model_label or default_model_label(model)
    family = family or label
    run = run_name or Path(run_dir).resolve().name
    requested = PolicyRecord.from_policy(policy)
    seed_rec = SeedScheme(kind="counter-hash", run_seed=int(seed),
                          common_random_numbers=bool(common_random_numbers),
                          description=SEED_SCHEME)  # fmt: skip
    _check_continuation(read_manifest(run_dir), requested, seed_rec, label, rollouts)
    store = RunStore(run_dir)
    writer = writer or FolderWriter(run_dir)
    names = [slug(label, p.task, p.id) for p in prompts]
    options = dict(engine_options or {})
    if engine == "hf":
        options.setdefault("device", device)
        options.setdefault("dtype", dtype)
        options.setdefault("batch_size", batch_size)
    chunk = engine_prompts_per_call(engine, options)
    owned = owned_prompts(label, len(prompts), chunk, shard)
    todo = [i for i in owned if not store.has_shard(names[i])]
    start = time.perf_counter()
    summary = GenerateSummary(str(run_dir), label, len(owned), 0, len(owned), rollouts, 0, 0, 0.0)
    if not todo:
        return summary
    units = sorted({i // chunk for i in todo})
    members = {k: list(range(k * chunk, min((k + 1) * chunk, len(prompts)))) for k in units}
    sampled = [i for k in units for i in members[k]]
    pool = _Pool(ray, opts, workers, (engine, model, options), on_event)
    try:
        texts = {i: prompts[i].text_for(variant) for i in sampled}  # as generate_run renders
        facts, rendered = pool.start([texts[i] for i in sampled], variant, enable_thinking)
        if facts["prompts_per_call"] != chunk:
            raise CanopyError(
                f"the engine on the Ray workers takes {facts['prompts_per_call']} prompts per "
                f"call, the driver laid out {chunk}; install the same canopy-entropy on both"
            )
        rendered = dict(zip(sampled, rendered, strict=True))
        resolved = policy
        if not policy.eos_token_ids:
            resolved = dataclasses.replace(policy, eos_token_ids=facts["eos_token_ids"])
        resolved.validate()
        _check_context(prompts, rendered, resolved, facts["context_length"])
        eng = SimpleNamespace(**{k: facts[k] for k in ("vocab_size", "context_length", "approximate")},
                              describe=lambda: facts["describe"])  # fmt: skip
        writer.record_model(run, requested, seed_rec,
                            _model_record(label, model, variant, family, rollouts, eng, resolved,
                                          seed_rec, series=series, step=step,
                                          enable_thinking=enable_thinking))  # fmt: skip
        stream = "" if common_random_numbers else label
        seeds = {i: np.array([rollout_seed(seed, prompts[i].id, r, stream=stream)
                              for r in range(rollouts)], dtype=np.int64) for i in sampled}  # fmt: skip
        index = np.arange(rollouts, dtype=np.int32)

        def requests(k: int) -> list[Any]:
            return [(texts[i] if facts["chat"] else rendered[i][1], seeds[i], index)
                    for i in members[k]]  # fmt: skip

        missing = set(todo)
        done_before = len(owned) - len(todo)
        for k, batches in pool.run(units, requests, resolved, prompts, members):
            for i, batch in zip(members[k], batches, strict=True):
                if i not in missing:  # sampled only to keep the unit's batch make-up
                    continue
                missing.discard(i)
                p = prompts[i]
                writer.write_shard(
                    names[i],
                    _prompt_table(run, label, variant, family, p, rendered[i][0], len(rendered[i][1])),
                    _batch_table(batch, run, label, variant, family, p),
                )  # fmt: skip
                summary.tokens += int(batch.offsets[-1])
                summary.truncated += sum(r == "length" for r in batch.finish_reason)
                summary.prompts_generated += 1
                if progress is not None:
                    n = done_before + summary.prompts_generated
                    progress({"task": p.task, "prompt_id": p.id, "prompts_done": n,
                              "prompts_total": len(owned), "rollouts_done": n * rollouts,
                              "tokens": summary.tokens,
                              "elapsed_s": time.perf_counter() - start})  # fmt: skip
    finally:
        pool.close()
    summary.prompts_skipped = len(owned) - summary.prompts_generated
    summary.elapsed_s = time.perf_counter() - start
    return summary


class _Pool:
    """The workers of one model and the queue of its units."""

    def __init__(self, ray: Any, opts: RayConfig, size: int, spec: tuple, on_event: Event | None):
        self.ray = ray
        self.opts = opts
        self.size = size
        self.spec = spec  # (engine, model, engine options)
        self.on_event = on_event or (lambda kind, info: None)
        self.actor_cls = ray.remote(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus,
                                    runtime_env={"env_vars": worker_env()})(_Worker)  # fmt: skip
        self.handles: list[_Handle] = []
        self.restarts_left = opts.restarts
        self.pending: dict[Any, tuple[_Handle, int | None]] = {}  # ref -> (worker, unit | None)
        self.queue: deque[int] = deque()
        self.attempts: dict[int, int] = {}
        self.ready_args: tuple = ()
        self.work: tuple | None = None  # (requests, policy, prompts, members) once running
        self.started = 0

    def _spawn(self) -> None:
        self.started += 1
        actor = self.actor_cls.remote(*self.spec, max(1, int(self.opts.num_cpus)))
        h = _Handle(self.started, actor)
        self.handles.append(h)
        self.pending[actor.ready.remote(*self.ready_args)] = (h, None)

    def start(
        self, texts: list[str], variant: str, enable_thinking: bool = False
    ) -> tuple[dict[str, Any], list[Any]]:
        """Start the workers; the first one's facts and rendering, once it is up."""
        self.ready_args = (texts, variant, enable_thinking)
        for _ in range(self.size):
            self._spawn()
        _, _, value = self._next()  # nothing is queued yet: a worker that is ready
        return value

    def _next(self) -> tuple[_Handle, int | None, Any]:
        """The next finished call: (worker, unit or None for 'ready', its value); a dead
        worker's units go back to the queue and it is replaced."""
        ray = self.ray
        while True:
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            h, unit = self.pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:  # the engine cannot start there: not worth retrying
                    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
                    raise CanopyError(
                        f"the engine could not start on Ray worker {h.number}: {lines[-1]}"
                    ) from None
                self._died(h, exc)
                continue
            except ray.exceptions.RayTaskError as exc:  # the engine raised: raise that error
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                cause.add_note(f"in Ray worker {h.number} (pid {h.pid}):\n{exc}")
                raise cause from None
            if unit is None:
                h.pid = value[0]["pid"]
                self.on_event("ready", {"worker": h.number, "pid": h.pid,
                                        "node": value[0]["node"]})  # fmt: skip
            else:
                del h.units[ref]
            self._feed(h)
            return h, unit, value

    def _died(self, h: _Handle, exc: Exception) -> None:
        self.handles.remove(h)
        for ref in [r for r, (x, _) in self.pending.items() if x is h]:
            del self.pending[ref]
        with contextlib.suppress(Exception):
            self.ray.kill(h.actor)
        lost = sorted(h.units.values())
        for u in lost:
            self.attempts[u] = self.attempts.get(u, 0) + 1
            if self.attempts[u] >= MAX_ATTEMPTS:
                raise CanopyError(
                    f"{MAX_ATTEMPTS} Ray workers died while sampling prompt chunk {u} "
                    f"(last: {type(exc).__name__}); see the Ray logs (e.g. out of memory)"
                )
        self.queue.extendleft(reversed(lost))
        replaced = self.restarts_left > 0
        self.on_event("died", {"worker": h.number, "pid": h.pid, "requeued": lost,
                               "replaced": replaced})  # fmt: skip
        if replaced:
            self.restarts_left -= 1
            self._spawn()
        elif not self.handles:
            raise CanopyError(
                f"every Ray worker died and the {self.opts.restarts} restarts are used up "
                f"(last: {type(exc).__name__}); see the Ray logs, raise engine.ray.restarts "
                "or re-run to continue"
            )
        for x in self.handles:  # the lost units go to workers that have room now
            self._feed(x)

    def _feed(self, h: _Handle) -> None:
        """Top ``h`` up to ``IN_FLIGHT`` units from the head of the queue."""
        if self.work is None or h.pid is None:
            return
        requests, policy, prompts, members = self.work
        while len(h.units) < IN_FLIGHT and self.queue:
            k = self.queue.popleft()
            self.on_event("taken", {"worker": h.number, "pid": h.pid, "unit": k,
                                    "prompts": [prompts[i].id for i in members[k]]})  # fmt: skip
            ref = h.actor.sample.remote(requests(k), policy)
            h.units[ref] = k
            self.pending[ref] = (h, k)

    def run(
        self, units: list[int], requests, policy, prompts, members
    ) -> Iterator[tuple[int, list]]:
        """``(unit, batches)`` as each unit comes back, until every unit has."""
        self.queue.extend(units)
        self.work = (requests, policy, prompts, members)
        for h in list(self.handles):
            self._feed(h)
        left = len(units)
        while left:
            _, unit, value = self._next()
            if unit is not None:
                left -= 1
                yield unit, value

    def close(self) -> None:
        """Kill every worker (its model's memory goes with it)."""
        for h in self.handles:
            with contextlib.suppress(Exception):
                self.ray.kill(h.actor)
        self.handles.clear()
        self.pending.clear()
