"""Multi-stage compression pipelines: recipe files, the method's presets, the runner, the report.

Typical use::

    from rosita_fast.pipeline import load_recipe, run_pipeline

    recipe = load_recipe("rosita")                    # a shipped recipe, or a YAML/JSON path
    result = run_pipeline(recipe, "runs/rosita", data_dir="../shared/data/glue/SST-2")
    result.report                                     # runs/rosita/report.md (+ report.png)
"""

from .errors import PipelineError, RecipeError
from .presets import STAGE_KINDS, preset_for, presets_table
from .recipe import (
    AugmentSpec,
    DataSpec,
    Recipe,
    ReportSpec,
    StageSpec,
    builtin_recipes,
    load_recipe,
    recipe_from_dict,
)
from .runner import PipelineResult, StageOutcome, run_pipeline

__all__ = [
    "STAGE_KINDS", "AugmentSpec", "DataSpec", "PipelineError", "PipelineResult", "Recipe",
    "RecipeError", "ReportSpec", "StageOutcome", "StageSpec", "builtin_recipes", "load_recipe",
    "preset_for", "presets_table", "recipe_from_dict", "run_pipeline",
]
