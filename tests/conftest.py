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
    import tiny_run

    from canopy_entropy.config import load_config
    from canopy_entropy.runner import run_experiment

    root = tmp_path_factory.mktemp("golden")
    threads = torch.get_num_threads()
    torch.set_num_threads(tiny_run.THREADS)  # float32 kernels split work by thread count
    try:
        results = run_experiment(load_config(tiny_run.write_config(root)), root / "run")
    finally:
        torch.set_num_threads(threads)
    assert all(r.status == "done" for r in results), results
    return root / "run"
