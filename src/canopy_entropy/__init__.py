"""canopy-entropy: how a language model spends its uncertainty over whole generations.

Stages (each a module with a narrow interface): tasks -> engines (sampling) -> store (Parquet)
-> metrics -> semantic -> stats -> plots/report, driven by ``canopy_entropy.runner``.
"""

__version__ = "0.1.0"
