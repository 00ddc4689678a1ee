"""Writing a resolved config back out (RUN/config.toml, the manifest) and what of it
determines the rollouts."""

from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Any

from canopy_entropy.config.schema import ExperimentConfig, PromptsConfig, ScoringConfig

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - Python 3.10
    pass


def config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain TOML-able data (None written as TOML-friendly values)."""
    prompts = _prompts_dict(cfg.prompts)
    for task, p in cfg.task_prompts.items():
        prompts[task] = _prompts_dict(p)
    embed = dataclasses.asdict(cfg.embed)
    if embed["prefix"] is None:
        del embed["prefix"]
    tasks = [
        cfg.task_specs[t].path if t in cfg.task_specs and t not in cfg.task_tables else t
        for t in cfg.tasks
    ]
    out = {
        "name": cfg.name,
        "tasks": tasks,
        "stages": list(cfg.stages),
        "generation": dataclasses.asdict(cfg.generation),
        "engine": dataclasses.asdict(cfg.engine),
        "prompts": prompts,
        "embed": embed,
        "compare": dataclasses.asdict(cfg.compare),
        "regress": dataclasses.asdict(cfg.regress),
        "semantic_entropy": dataclasses.asdict(cfg.semantic_entropy),
        "reward": dataclasses.asdict(cfg.reward),
        "plots": dataclasses.asdict(cfg.plots),
        "analysis": dataclasses.asdict(cfg.analysis),
        "models": [
            {k: v for k, v in dataclasses.asdict(m).items() if v is not None} for m in cfg.models
        ],  # TOML has no null: an unset step / enable_thinking is left out
    }
    if cfg.scoring != ScoringConfig():
        out["scoring"] = dataclasses.asdict(cfg.scoring)
    if cfg.task_tables:
        out["task"] = copy.deepcopy(cfg.task_tables)
    return out


def _prompts_dict(p: PromptsConfig) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["n"] = "all" if p.n is None else p.n
    return d


def resolved_config_toml(cfg: ExperimentConfig) -> str:
    """The fully resolved config as TOML (saved to RUN/config.toml); it parses back to ``cfg``."""
    import tomli_w

    header = (
        "# Resolved canopy-entropy experiment config: every field explicit.\n"
        f"# Source: {cfg.source or '(built in)'}\n"
    )
    return header + tomli_w.dumps(copy.deepcopy(config_dict(cfg)))


def generation_fingerprint(cfg: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """The parts of a config (or of its ``config_dict``) that determine the rollouts (a
    changed one needs a new run)."""
    d = config_dict(cfg) if isinstance(cfg, ExperimentConfig) else cfg
    gen = dict(d["generation"])
    gen.pop("batch_size", None)  # results do not depend on batch size
    thinking = bool(gen.pop("enable_thinking", False))
    models = []
    for m in d["models"]:
        fp = {k: m[k] for k in ("model", "variant", "family", "label")}
        if m.get("enable_thinking", thinking):  # thinking off (the default) is left out, so
            fp["enable_thinking"] = True  # folders recorded before the option still match
        models.append(fp)
    return {
        "generation": gen,
        "engine": {"name": d["engine"]["name"]},
        "prompts": d["prompts"],
        "tasks": d["tasks"],
        "models": models,
        **({"task": d["task"]} if d.get("task") else {}),
    }
