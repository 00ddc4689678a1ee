"""Without vLLM installed, choosing the vLLM engine is a one-line install hint."""

from __future__ import annotations

import importlib.util

import pytest

from canopy_entropy.engines.registry import get_engine
from canopy_entropy.errors import MissingExtraError


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_engine_without_vllm_gives_install_hint():
    with pytest.raises(MissingExtraError, match=r"pip install 'canopy-entropy\[vllm\]'") as info:
        get_engine("vllm", "some/model")
    assert "\n" not in str(info.value)
