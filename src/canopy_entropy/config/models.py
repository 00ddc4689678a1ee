"""Model entries of a config: what may name a model, and whether it can be found offline."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

from canopy_entropy.config.checks import _check_keys, _Ctx, _get
from canopy_entropy.config.schema import _HUB_ID, OFFLINE_ALIASES, ModelSpec
from canopy_entropy.run.layout import VARIANTS

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - Python 3.10
    pass


def _aliases() -> tuple[str, ...]:
    """Offline model aliases (from canopy_entropy.models when present)."""
    try:
        from canopy_entropy.models import ALIASES

        return tuple(ALIASES)
    except ImportError:
        return OFFLINE_ALIASES


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_unreachable() -> str | None:
    """Why the model hub (``HF_ENDPOINT``, default huggingface.co) cannot be reached, or None.

    One TCP connect with a short timeout: without it, loading an unknown id spends minutes in
    the hub client's retries before failing."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3.0).close()
    except OSError as exc:
        return f"the hub ({host}) cannot be reached: {exc.strerror or exc}"
    return None


def check_model_available(spec: ModelSpec, engine: str) -> str | None:
    """Why ``spec.model`` cannot be found, or None when it can (aliases, folders, hub ids)."""
    name = spec.model
    if engine == "openai" or name in _aliases():
        return None
    if Path(name).is_absolute() or name.startswith((".", "~")):
        if Path(name).expanduser().is_dir():
            return None
        return f"model folder {name} does not exist; fix the path"
    if not _HUB_ID.match(name):
        return (
            f"model '{name}' is not a local folder, an offline alias ({', '.join(_aliases())}) "
            "or a hub id like 'org/name'; fix the name or path"
        )
    if _hub_offline() and not _in_hub_cache(name):
        return (
            f"model '{name}' is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1); download it first (huggingface-cli download {name}) or unset "
            "HF_HUB_OFFLINE"
        )
    if not _hub_offline() and not _in_hub_cache(name):
        unreachable = _hub_unreachable()
        if unreachable:
            return (
                f"model '{name}' is not in the local Hugging Face cache and {unreachable}; "
                "check the name and the network, or give a local folder or an offline alias "
                f"({', '.join(_aliases())})"
            )
    return None


def _parse_model(ctx: _Ctx, data: Any, index: int, base_dir: Path) -> ModelSpec:
    t = "models"
    if not isinstance(data, dict):
        ctx.fail(f"models[{index}] must be a table like {{ model = '...', variant = 'base' }}", t)
    _check_keys(ctx, data, [f.name for f in dataclasses.fields(ModelSpec)], t, index)
    if "model" not in data:
        ctx.fail(
            f"models[{index}] has no 'model' key; set model = '<hub id, folder or alias>'",
            t,
            None,
            index,
        )
    model = _get(ctx, data, "model", str, "", t, index)
    if model.startswith((".", "~")) or (os.sep in model and not _HUB_ID.match(model)):
        model = str((base_dir / Path(model).expanduser()).resolve())
    elif not _HUB_ID.match(model) and model not in _aliases() and (base_dir / model).is_dir():
        model = str((base_dir / model).resolve())
    variant = _get(ctx, data, "variant", str, "base", t, index)
    if variant not in VARIANTS:
        ctx.fail(
            f"models[{index}].variant = {variant!r}; use 'base' or 'instruct'",
            t,
            "variant",
            index,
        )
    label = _get(ctx, data, "label", str, "", t, index) or Path(model.rstrip("/")).name
    family = _get(ctx, data, "family", str, "", t, index) or label
    options = _get(ctx, data, "engine_options", dict, {}, t, index)
    series = _get(ctx, data, "series", str, "", t, index)
    step = _get(ctx, data, "step", int, None, t, index)
    if series and not re.match(r"^[\w.-]+$", series):
        ctx.fail(f"models[{index}].series = {series!r}: use letters, digits, '.', '_' or '-' "
                 "only", t, "series", index)  # fmt: skip
    if bool(series) != (step is not None):
        missing, given = ("step", "series") if series else ("series", "step")
        ctx.fail(
            f"models[{index}] sets {given} but not {missing}; a checkpoint needs both (e.g. "
            "series = 'sft-run', step = 1000)",
            t,
            given,
            index,
        )
    if step is not None and step < 0:
        ctx.fail(f"models[{index}].step = {step} must be >= 0", t, "step", index)
    thinking = _get(ctx, data, "enable_thinking", bool, None, t, index)
    return ModelSpec(
        model=model,
        variant=variant,
        family=family,
        label=label,
        engine_options=options,
        series=series,
        step=step,
        enable_thinking=thinking,
    )


def check_series(ctx: _Ctx, models: list[ModelSpec]) -> None:
    """Each (series, step) names one model: two checkpoints of a series at one step would make
    the step ambiguous in tables, figures and ``compare --on step``."""
    seen: dict[tuple[str, int], int] = {}
    for i, m in enumerate(models):
        if not m.series:
            continue
        key = (m.series, int(m.step or 0))
        if key in seen:
            ctx.fail(
                f"models[{i}] and models[{seen[key]}] are both step {key[1]} of series "
                f"'{key[0]}'; give each checkpoint of a series its own step",
                "models",
                "step",
                i,
            )
        seen[key] = i


def check_thinking(
    ctx: _Ctx, models: list[ModelSpec], default: bool, engine: str, options: dict[str, Any]
) -> None:
    """enable_thinking reaches the chat template of instruct prompts rendered here: on a base
    model, or with a chat endpoint that sends the user text to a server, it would do nothing."""
    for i, m in enumerate(models):
        if m.enable_thinking and m.variant != "instruct":
            ctx.fail(f"models[{i}].enable_thinking is set on a base model; it only changes the "
                     "chat template of instruct models (variant = 'instruct')",
                     "models", "enable_thinking", i)  # fmt: skip
    if default and not any(m.variant == "instruct" for m in models):
        ctx.fail("[generation] enable_thinking = true but no model is an instruct model; it "
                 "only changes the chat template of instruct prompts", "generation",
                 "enable_thinking")  # fmt: skip
    for i, m in enumerate(models):
        thinking = default if m.enable_thinking is None else m.enable_thinking
        if thinking and engine == "openai" and {**options, **m.engine_options}.get("chat"):
            ctx.fail(f"models[{i}] thinks (enable_thinking) but the openai engine with chat = "
                     "true sends the user text to the server, which applies its own chat "
                     "template; drop chat or set thinking on the server", "models", None, i)  # fmt: skip
