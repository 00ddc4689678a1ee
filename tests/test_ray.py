"""Ray workers for generation: rollouts of one process; a killed worker replaced or its units
re-queued; `canopy run --check` of a Ray config.

One local Ray cluster (2 CPUs) for the module; the reference is ``generate_run`` sampling the
same prompts in this process with the same torch thread count as each worker (1).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console

from canopy_entropy import runner
from canopy_entropy.config import RayConfig, parse_config
from canopy_entropy.errors import MissingExtraError
from canopy_entropy.generate import generate_run
from canopy_entropy.runner import generation, ray_pool
from canopy_entropy.store import RunStore, slug
from cli_helpers import run_cli
from test_docs import fenced_blocks

REPO = Path(__file__).parents[1]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray")


def _twin_text(model: Path) -> str:
    """The CPU twin of docs/scaling.md, with the tiny model in place of ``tiny-model``."""
    (body,) = [b for _, info, b in fenced_blocks(REPO / "docs/scaling.md")
               if info == "toml" and 'name = "ray-twin"' in b]  # fmt: skip
    assert 'backend = "ray"' in body and 'model = "tiny-model"' in body
    return body.replace('model = "tiny-model"', f'model = "{model}"')


def _rollouts(run_dir: Path):
    keys = ["model", "task", "prompt_id", "rollout_index"]
    return RunStore(run_dir).read_rollouts().sort_by([(k, "ascending") for k in keys])


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def twin(tiny_model):
    return parse_config(_twin_text(tiny_model), source="tiny-ray.toml")


def _kwargs(cfg) -> dict:
    """What the runner gives each model's generation (one model in the twin)."""
    (m,) = cfg.models
    prompts = generation.load_prompts(cfg)
    return dict(
        model=m.model, prompts=[p for t in cfg.tasks for p in prompts[t]],
        rollouts=cfg.generation.rollouts, policy=generation._policy(cfg), variant=m.variant,
        family=m.family, model_label=m.label, engine=cfg.engine.name, device=cfg.engine.device,
        dtype=cfg.engine.dtype, seed=cfg.generation.seed, run_name=cfg.name,
        engine_options=generation._engine_options(cfg, m),
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_process(twin, tmp_path_factory) -> Path:
    """The twin's rollouts sampled by ``generate_run`` in this process, 1 torch thread."""
    out = tmp_path_factory.mktemp("one") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # = [engine.ray] num_cpus: CPU kernels split work by threads
    try:
        summary = generate_run(out, **_kwargs(twin))
    finally:
        torch.set_num_threads(threads)
    assert summary.prompts_generated == 6
    return out


@needs_ray
def test_docs_twin_on_two_workers_equals_one_process(cluster, twin, one_process, tmp_path):
    out = tmp_path / "run"
    results = {r.name: r for r in runner.run_experiment(twin, out)}
    assert results["generate"].status == "done", results["generate"]
    assert results["metrics"].status == "done", results["metrics"]
    assert results["generate"].detail == "6 prompts sampled, 18 rollouts in store"
    got, want = _rollouts(out), _rollouts(one_process)
    assert got.num_rows == 18 and got.equals(want)  # token ids, entropies, seeds: every byte
    # the driver wrote the manifest as a local run does; the config records the backend
    manifest = (out / "manifest.json").read_text()
    assert '"backend": "ray"' in manifest and '"workers": 2' in manifest
    assert cluster.is_initialized()  # a cluster the run found is left running


@needs_ray
def test_killed_worker_units_requeued_result_identical(cluster, twin, one_process, tmp_path):
    """os.kill of the first worker handed its third unit (6 units, 2 workers holding at most
    2 each: one always is; it has returned one and holds one): the units it held go back to
    the queue and the other worker samples them (no restart: one model load less); every
    prompt is written once and the rollouts are those of one process."""
    out = tmp_path / "run"
    events, written, taken, killed = [], [], {}, []

    def on_event(kind, info):
        events.append((kind, info))
        if kind == "taken":
            taken.setdefault(info["worker"], []).append(info["unit"])
            if not killed and len(taken[info["worker"]]) == 3:
                killed.append(info["worker"])
                os.kill(info["pid"], signal.SIGKILL)  # before the unit is sent to it

    class Writer(ray_pool.FolderWriter):
        def write_shard(self, name, *tables):
            written.append(name)
            super().write_shard(name, *tables)

    summary = ray_pool.generate_on_ray(
        out, **_kwargs(twin), workers=2, ray_options=RayConfig(num_cpus=1, restarts=0),
        writer=Writer(out), on_event=on_event,
    )  # fmt: skip
    (died,) = [info for kind, info in events if kind == "died"]
    (k,) = killed
    assert died["worker"] == k and not died["replaced"]
    assert taken[k][2] in died["requeued"]  # sent to a dead worker: certainly not done
    requeued = set(died["requeued"])
    # each re-queued unit was handed out again, to the other worker, and nothing else twice
    again = [u for w, units in taken.items() if w != k for u in units if u in requeued]
    assert sorted(again) == sorted(requeued)
    handed = [u for units in taken.values() for u in units]
    assert len(handed) == 6 + len(requeued)
    prompts = _kwargs(twin)["prompts"]
    assert sorted(written) == sorted(slug("tiny", p.task, p.id) for p in prompts)
    assert summary.prompts_generated == 6
    assert _rollouts(out).equals(_rollouts(one_process))


def _kill_when_taken(nth: int, victims: set, events: list, taken: dict, killed: list):
    """An ``on_event`` that records events and SIGKILLs each worker numbered in ``victims``
    when it is handed its ``nth`` unit (before the unit is sent); ``killed``: those killed."""

    def on_event(kind, info):
        events.append((kind, info))
        if kind == "taken":
            taken.setdefault(info["worker"], []).append(info["unit"])
            if info["worker"] in victims and len(taken[info["worker"]]) == nth:
                killed.append(info["worker"])
                os.kill(info["pid"], signal.SIGKILL)

    return on_event


def _recording_writer(out: Path, written: list) -> ray_pool.FolderWriter:
    class Writer(ray_pool.FolderWriter):
        def write_shard(self, name, *tables):
            written.append(name)
            super().write_shard(name, *tables)

    return Writer(out)


@needs_ray
def test_killed_worker_is_replaced_and_the_replacement_finishes(
    cluster, tiny_model, one_process, tmp_path, monkeypatch
):
    """``canopy run`` of the twin with one worker and ``restarts = 1``: the worker, killed when
    handed its third unit, is replaced by a fresh actor (another process) that samples the
    units it held and every unit still queued; the run says so in one line, every prompt is
    written once and the rollouts are those of one process."""
    text = _twin_text(tiny_model).replace("workers = 2", "workers = 1")
    cfg = parse_config(text.replace("num_cpus = 1", "num_cpus = 1\nrestarts = 1"))
    assert (cfg.engine.workers, cfg.engine.ray.restarts) == (1, 1)
    out = tmp_path / "run"
    events, written, taken, killed = [], [], {}, []
    kill = _kill_when_taken(3, {1}, events, taken, killed)
    real = ray_pool.generate_on_ray

    def generate_on_ray(*, run_dir, on_event, **kwargs):  # the runner's call, plus the kill
        def both(kind, info):
            kill(kind, info)
            on_event(kind, info)

        writer = _recording_writer(run_dir, written)
        return real(run_dir=run_dir, on_event=both, writer=writer, **kwargs)

    monkeypatch.setattr(ray_pool, "generate_on_ray", generate_on_ray)
    screen = io.StringIO()
    console = Console(file=screen, width=200)
    results = {r.name: r for r in runner.run_experiment(cfg, out, ["generate"], console=console)}
    assert results["generate"].status == "done", results["generate"]
    assert killed == [1]
    (died,) = [info for kind, info in events if kind == "died"]
    assert died["worker"] == 1 and died["replaced"]
    assert taken[1][2] in died["requeued"]  # sent to a dead worker: certainly not done
    line = (f"tiny: Ray worker 1 (pid {died['pid']}) died; {len(died['requeued'])} prompt "
            "chunks re-queued, worker replaced")  # fmt: skip
    assert line in [x.strip() for x in screen.getvalue().splitlines()], screen.getvalue()
    ready = [info for kind, info in events if kind == "ready"]
    assert [r["worker"] for r in ready] == [1, 2] and ready[0]["pid"] != ready[1]["pid"]
    # the replacement takes the dead worker's units first (head of the queue), then the rest
    rest = [u for u in range(6) if u not in taken[1]]
    assert rest and taken[2] == died["requeued"] + rest
    prompts = _kwargs(cfg)["prompts"]
    assert sorted(written) == sorted(slug("tiny", p.task, p.id) for p in prompts)
    assert results["generate"].detail == "6 prompts sampled, 18 rollouts in store"
    assert _rollouts(out).equals(_rollouts(one_process))


@needs_ray
def test_every_worker_dead_with_restarts_used_up_fails(cluster, twin, tmp_path):
    """One worker, ``restarts = 1``, each worker killed when handed its first unit: the
    replacement dies too and the run fails with one line naming engine.ray.restarts."""
    from canopy_entropy.errors import CanopyError

    out = tmp_path / "run"
    events, written, taken, killed = [], [], {}, []
    on_event = _kill_when_taken(1, {1, 2}, events, taken, killed)
    with pytest.raises(CanopyError, match="every Ray worker died") as exc:
        ray_pool.generate_on_ray(
            out, **_kwargs(twin), workers=1, ray_options=RayConfig(num_cpus=1, restarts=1),
            writer=_recording_writer(out, written), on_event=on_event,
        )  # fmt: skip
    message = str(exc.value)
    assert "\n" not in message and "the 1 restarts are used up" in message
    assert "raise engine.ray.restarts or re-run to continue" in message
    died = [(info["worker"], info["replaced"]) for kind, info in events if kind == "died"]
    assert killed == [1, 2] and died == [(1, True), (2, False)]
    assert written == []


def _config_error(tmp_path, capsys, monkeypatch, engine: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(f'[engine]\n{engine}\n\n[[models]]\nmodel = "{tmp_path}"\n')
    code, _, err = run_cli(["run", str(path), "--out", str(tmp_path / "r")], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ('backend = "rey"', "line 2: unknown engine.backend 'rey'; use one of ['local', 'ray'] (did you mean 'ray'?)"),
        ("workers = 2", "line 2: engine.workers = 2 needs backend = 'ray'"),
        ('backend = "ray"\nworkers = 0', "line 3: engine.workers = 0 must be >= 1"),
        ('backend = "ray"\n[engine.ray]\nnum_cpu = 2', "line 4: unknown key 'num_cpu' in [engine.ray]; did you mean 'num_cpus'?"),
        ('backend = "ray"\n[engine.ray]\nnum_gpus = -1', "line 4: engine.ray.num_gpus = -1.0 must be >= 0"),
        ('[engine.ray]\naddress = "auto"', "line 3: engine.ray.address is set but engine.backend is 'local'"),
    ],
)  # fmt: skip
def test_misspelled_ray_settings_are_one_line_errors(
    engine, message, tmp_path, capsys, monkeypatch
):
    err = _config_error(tmp_path, capsys, monkeypatch, engine)
    assert message in err, err


def test_resolved_config_keeps_the_ray_settings(tiny_model):
    from canopy_entropy.config import resolved_config_toml

    cfg = parse_config(_twin_text(tiny_model))
    again = parse_config(resolved_config_toml(cfg))
    assert again.engine == cfg.engine
    assert (cfg.engine.backend, cfg.engine.workers, cfg.engine.ray.num_cpus) == ("ray", 2, 1.0)
    assert re.search(r"\[engine\.ray\]", resolved_config_toml(cfg))


def test_without_ray_installed_the_error_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'canopy-entropy\[ray\]'"):
        with ray_pool.session(RayConfig()):
            pass


@needs_ray
@pytest.mark.parametrize(
    ("address", "env", "where"),
    [
        ("", None, "a local Ray started for the run (no engine.ray.address or $RAY_ADDRESS)"),
        ("", "auto", "the Ray cluster at 'auto' (from $RAY_ADDRESS; not contacted by --check)"),
        ("10.255.0.7:6379", "auto",
         "the Ray cluster at '10.255.0.7:6379' (from engine.ray.address; not contacted by --check)"),
    ],
)  # fmt: skip
def test_check_names_ray_and_the_cluster_it_would_use(
    address, env, where, tiny_model, tmp_path, capsys, monkeypatch
):
    """``canopy run --check`` of a Ray config: ray's version, the workers and the address the
    run would connect to (a config address before $RAY_ADDRESS); no cluster is contacted."""
    import ray

    text = _twin_text(tiny_model)
    if address:
        text = text.replace("[engine.ray]\n", f'[engine.ray]\naddress = "{address}"\n')
    (tmp_path / "tiny-ray.toml").write_text(text)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    connected = ray.is_initialized()
    args = ["run", str(tmp_path / "tiny-ray.toml"), "--check", "--out", str(tmp_path / "run")]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    line = (f"backend: Ray {ray.__version__}, 2 workers per model (each num_cpus = 1, "
            f"num_gpus = 0; restarts = 3) on {where}")  # fmt: skip
    assert line in [x.strip() for x in out.splitlines()], out
    assert ray.is_initialized() == connected and not (tmp_path / "run").exists()


def test_check_without_ray_installed_is_one_line_naming_the_extra(
    tiny_model, tmp_path, capsys, monkeypatch
):
    import sys

    (tmp_path / "tiny-ray.toml").write_text(_twin_text(tiny_model))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    args = ["run", str(tmp_path / "tiny-ray.toml"), "--check", "--out", str(tmp_path / "run")]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "engine.backend = 'ray' needs ray" in err
    assert "pip install 'canopy-entropy[ray]'" in err and out == ""


@needs_ray
def test_an_engine_that_cannot_start_fails_at_once(cluster, twin, tmp_path):
    """A worker whose engine raises while starting is not retried: the engine's one line."""
    from canopy_entropy.errors import CanopyError

    events = []
    kwargs = {**_kwargs(twin), "engine": "openai", "engine_options": {"base_url": "localhost:1"}}
    with pytest.raises(CanopyError, match="the engine could not start on Ray worker 1: ") as exc:
        ray_pool.generate_on_ray(
            tmp_path / "run", **kwargs, workers=1, ray_options=RayConfig(restarts=3),
            on_event=lambda kind, info: events.append(kind),
        )  # fmt: skip
    assert str(exc.value).endswith(
        "base_url 'localhost:1' needs a scheme; write it as http://localhost:1"
    )
    assert events == []  # never ready, never replaced


@needs_ray
def test_thinking_mode_and_series_reach_the_ray_path_as_the_local_one(cluster, twin, tmp_path):
    """The runner's per-model extras (thinking mode, checkpoint series and step) are arguments
    of the Ray path too: the same manifest record and rollouts as ``generate_run`` with them
    (an instruct model: the task's chat text and the thinking flag go to the chat template)."""
    import json

    extras = dict(enable_thinking=True, series="ckpts", step=300)
    kwargs = {**_kwargs(twin), "variant": "instruct", **extras}
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_run(local, **kwargs)
    finally:
        torch.set_num_threads(threads)
    ray_pool.generate_on_ray(
        on_ray, **kwargs, workers=2, ray_options=RayConfig(num_cpus=1, restarts=0)
    )
    records = []
    for out in (local, on_ray):
        (model,) = json.loads((out / "manifest.json").read_text())["models"].values()
        assert (model["series"], model["step"], model["enable_thinking"]) == ("ckpts", 300, True)
        records.append(model)
    assert records[0] == records[1]
    assert _rollouts(on_ray).equals(_rollouts(local))
