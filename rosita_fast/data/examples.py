"""The unit of data every loader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One GLUE example.

    Attributes:
        guid: ``"<split>-<row index>"`` (augmented rows append ``-aug<k>``).
        text_a: first (or only) text field.
        text_b: second text field of pair tasks, ``None`` for single-sentence tasks.
        label: class id in the task's hub order, a float score for STS-B, or ``None`` when
            unlabelled (test splits).
        source: where the text was collected, for files that say so (CoLA's first column, the
            publication a sentence comes from); ``None`` otherwise. A validation split can hold
            whole sources out of training
            (:func:`~rosita_fast.pipeline.inputs.validation_split`'s ``unseen_sources``).
    """

    guid: str
    text_a: str
    text_b: str | None
    label: int | float | None
    source: str | None = None
