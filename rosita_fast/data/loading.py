"""One entry point for task data, whatever the source."""

from __future__ import annotations

import os
from typing import Any

from .examples import Example
from .hub import DEFAULT_HUB_DATASET, load_hub_examples
from .tasks import GlueTask, get_task
from .tsv import load_tsv_examples


def load_examples(
    task: str | GlueTask,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_dataset: str = DEFAULT_HUB_DATASET,
    **kwargs: Any,
) -> list[Example]:
    """Load a split of a GLUE task from a TSV directory, or from the hub when ``data_dir`` is None.

    Both sources give identical examples (same texts, label ids, guids). Extra keyword arguments
    go to :func:`load_tsv_examples` or to ``datasets.load_dataset``.

    Raises:
        UnknownTaskError: unknown task name (lists the known ones).
        DataError: missing/malformed directory or file, or labels outside the task's set.
    """
    task = get_task(task)
    if data_dir is not None:
        return load_tsv_examples(data_dir, task, split, **kwargs)
    return load_hub_examples(task, split, dataset_name=hub_dataset, **kwargs)
