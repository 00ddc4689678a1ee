"""Semantic diversity of rollouts: embeddings (``embed``) and diversity statistics (``diversity``)."""

from canopy_entropy.semantic.diversity import diversity_tables, rollout_diversity, vendi_score
from canopy_entropy.semantic.embed import (
    DEFAULT_ENCODER,
    OFFLINE_ENCODER,
    EmbedResult,
    embed_run,
    load_encoder,
    read_prompt_diversity,
)

__all__ = [
    "DEFAULT_ENCODER",
    "OFFLINE_ENCODER",
    "EmbedResult",
    "diversity_tables",
    "embed_run",
    "load_encoder",
    "read_prompt_diversity",
    "rollout_diversity",
    "vendi_score",
]
