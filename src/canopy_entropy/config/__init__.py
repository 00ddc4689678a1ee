"""Experiment config: one TOML file describing a whole study, validated with one-line errors.

A config names the models (each with variant and family), the tasks, how many prompts per
task and where they come from, how many rollouts per prompt, the decoding policy, the engine,
and options for the analysis stages. Every field has a default (see ``docs/running.md`` and
``FIELD_DOCS`` below); ``resolved_config_toml`` writes the fully resolved config back out so
a run folder records exactly what was run. Relative paths in a config file are resolved
against the folder that holds the file.

Errors name the file, the line (where the key can be found in the text), the key and the fix,
e.g. ``demo.toml line 7: unknown key 'temprature' in [generation]; did you mean 'temperature'?``
"""

from canopy_entropy.config.models import check_model_available
from canopy_entropy.config.parse import demo_config_path, load_config, parse_config
from canopy_entropy.config.schema import (
    DEFAULT_STAGES,
    FIGURE_FORMATS,
    OFFLINE_ALIASES,
    OPT_IN_STAGES,
    STAGE_OPTIONS,
    STAGES,
    AnalysisConfig,
    CompareConfig,
    EmbedConfig,
    EngineConfig,
    ExperimentConfig,
    GenerationConfig,
    ModelSpec,
    PlotsConfig,
    PromptsConfig,
    RayConfig,
    RegressConfig,
    RewardConfig,
    SemanticEntropyConfig,
)
from canopy_entropy.config.write import config_dict, generation_fingerprint, resolved_config_toml
from canopy_entropy.run.layout import VARIANTS

__all__ = [
    "DEFAULT_STAGES",
    "FIGURE_FORMATS",
    "OFFLINE_ALIASES",
    "OPT_IN_STAGES",
    "STAGES",
    "STAGE_OPTIONS",
    "VARIANTS",
    "AnalysisConfig",
    "CompareConfig",
    "EmbedConfig",
    "EngineConfig",
    "ExperimentConfig",
    "GenerationConfig",
    "ModelSpec",
    "PlotsConfig",
    "PromptsConfig",
    "RayConfig",
    "RegressConfig",
    "RewardConfig",
    "SemanticEntropyConfig",
    "check_model_available",
    "config_dict",
    "demo_config_path",
    "generation_fingerprint",
    "load_config",
    "parse_config",
    "resolved_config_toml",
]
