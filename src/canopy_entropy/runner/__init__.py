"""``canopy run``: every stage of a study from one config, resumable, into one results folder.

``run_experiment(cfg, out)`` runs the stages of ``runner.stages.STAGE_TABLE`` in order;
``plan_run(cfg, out)`` validates everything and says what a run would do, writing nothing.
"""

from canopy_entropy.runner.core import (
    Plan,
    default_out_dir,
    parse_stage_list,
    plan_run,
    run_experiment,
    with_prompts_dir,
)
from canopy_entropy.runner.display import RunDisplay, StageResult
from canopy_entropy.runner.stages import STAGE_TABLE, Stage, StageImportError, stage_function
from canopy_entropy.runner.summary import family_note, headline_frame, truncation_note

__all__ = [
    "STAGE_TABLE",
    "Plan",
    "RunDisplay",
    "Stage",
    "StageImportError",
    "StageResult",
    "default_out_dir",
    "family_note",
    "headline_frame",
    "parse_stage_list",
    "plan_run",
    "run_experiment",
    "stage_function",
    "truncation_note",
    "with_prompts_dir",
]
