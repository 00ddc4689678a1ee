"""Prompt sources for the four task kinds (math, coding, completion, stories)."""

from canopy_entropy.tasks.base import Prompt

__all__ = ["Prompt"]
