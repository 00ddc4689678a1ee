"""Engine lookup by name; heavy dependencies are imported only when an engine is chosen."""

from __future__ import annotations

import importlib
from typing import Any

from canopy_entropy.engines.base import Engine
from canopy_entropy.errors import ConfigError, MissingExtraError

ENGINES = {
    "hf": ("canopy_entropy.engines.hf", "HFEngine", "hf"),
    "vllm": ("canopy_entropy.engines.vllm", "VLLMEngine", "vllm"),
    "openai": ("canopy_entropy.engines.openai", "OpenAIEngine", "openai"),
}


def get_engine(name: str, model: str, **options: Any) -> Engine:
    """Construct engine ``name`` for ``model`` (alias, HF id, local path or served name)."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine '{name}'; use one of {sorted(ENGINES)}")
    module_name, cls_name, extra = ENGINES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and exc.name.startswith("canopy_entropy"):
            raise
        raise MissingExtraError(
            f"engine '{name}' needs '{exc.name}', which is not installed; "
            f"install it with: pip install 'canopy-entropy[{extra}]'"
        ) from exc
    return getattr(module, cls_name)(model, **options)
