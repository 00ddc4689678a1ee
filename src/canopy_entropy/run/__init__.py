"""The run folder's single owner: its layout (paths, schema tags, keys), the typed manifest and
the typed view a notebook opens with ``canopy_entropy.open_run``."""

from canopy_entropy.run.layout import (
    ARTEFACTS,
    GROUP_KEYS,
    PROMPT_KEYS,
    ROLLOUT_KEYS,
    VARIANTS,
    Artefact,
    artefact_path,
    schema_of,
)
from canopy_entropy.run.manifest import (
    ImportRecord,
    Manifest,
    ModelRecord,
    PolicyRecord,
    SeedScheme,
    read_manifest,
    update_manifest,
)

__all__ = [
    "ARTEFACTS",
    "GROUP_KEYS",
    "PROMPT_KEYS",
    "ROLLOUT_KEYS",
    "VARIANTS",
    "Artefact",
    "ImportRecord",
    "Manifest",
    "ModelRecord",
    "PolicyRecord",
    "SeedScheme",
    "artefact_path",
    "read_manifest",
    "schema_of",
    "update_manifest",
]
