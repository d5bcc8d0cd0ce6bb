"""Exceptions of the pipeline layer."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe is unknown, unreadable, or has unknown, missing or ill-typed keys.

    Raised while the recipe is loaded, before any model or data is touched.
    """


class PipelineError(RuntimeError):
    """A pipeline cannot run or resume (e.g. its output directory belongs to another recipe)."""
