"""Engine lookup by name; heavy dependencies are imported only when an engine is chosen."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from canopy_entropy.engines.base import Engine
from canopy_entropy.errors import ConfigError, MissingExtraError

ENGINES = {
    "hf": ("canopy_entropy.engines.hf", "HFEngine", "hf"),
    "vllm": ("canopy_entropy.engines.vllm", "VLLMEngine", "vllm"),
    "openai": ("canopy_entropy.engines.openai", "OpenAIEngine", "openai"),
}


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass registered as ``name`` (its module imports no heavy dependency)."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine '{name}'; use one of {sorted(ENGINES)}")
    module_name, cls_name, _ = ENGINES[name]
    return getattr(importlib.import_module(module_name), cls_name)


def engine_options(name: str) -> dict[str, Any] | None:
    """The options engine ``name`` accepts: its ``OPTIONS``, else its constructor's keyword
    parameters; None when it passes any option through (it validates them itself)."""
    cls = engine_class(name)
    if cls.OPTIONS:
        return dict(cls.OPTIONS)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p.annotation for k, p in params.items() if k not in ("self", "model")}


def engine_options_problem(name: str, options: dict[str, Any]) -> str | None:
    """Why ``options`` are not valid for engine ``name`` (an unknown name), or None."""
    if name not in ENGINES:
        return None
    valid = engine_options(name)
    if valid is None:
        return None
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(sorted(valid))}"
            return f"engine '{name}' has no option '{key}'; {hint}"
    return None


def get_engine(name: str, model: str, **options: Any) -> Engine:
    """Construct engine ``name`` for ``model`` (alias, HF id, local path or served name)."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine '{name}'; use one of {sorted(ENGINES)}")
    problem = engine_options_problem(name, options)
    if problem:
        raise ConfigError(problem)
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
