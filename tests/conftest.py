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
