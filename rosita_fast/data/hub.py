"""Loading GLUE from the ``datasets`` hub, yielding the same :class:`Example` s as the TSV reader.

Needs network access (or a populated ``datasets`` cache). The conversion from a loaded
``datasets.Dataset`` is a separate function so it can be used, and tested, without the hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import DataError
from .examples import Example
from .tasks import GlueTask, get_task

DEFAULT_HUB_DATASET = "nyu-mll/glue"


def hub_split_name(task: str | GlueTask, split: str) -> str:
    """Hub split name for a project split name (``dev`` -> ``validation`` / ``validation_matched``).

    Raises:
        DataError: the task has no such split on the hub.
    """
    task = get_task(task)
    if split not in task.hub_splits:
        raise DataError(
            f"task {task.name} has no hub split for {split!r} "
            f"(known: {', '.join(task.hub_splits)})"
        )
    return task.hub_splits[split]


def load_hub_examples(
    task: str | GlueTask,
    split: str = "train",
    *,
    dataset_name: str = DEFAULT_HUB_DATASET,
    **load_kwargs: Any,
) -> list[Example]:
    """Download (or read from the cache) ``<dataset_name>/<task>`` and convert one split.

    Extra keyword arguments go to ``datasets.load_dataset`` (``cache_dir``, ``revision`` ...).
    """
    import datasets  # deferred: importing datasets is slow and only online users need it

    task = get_task(task)
    hub_split = hub_split_name(task, split)
    dataset = datasets.load_dataset(dataset_name, task.hub_config, split=hub_split, **load_kwargs)
    source = f"{dataset_name}/{task.hub_config}:{hub_split}"
    return examples_from_hf_dataset(task, dataset, split=split, source=source)


def examples_from_hf_dataset(
    task: str | GlueTask, dataset: Any, *, split: str = "train", source: str = "hub dataset"
) -> list[Example]:
    """Convert a ``datasets.Dataset`` with the hub's GLUE columns into examples.

    Labels ``-1`` (the hub's marker for unlabelled test rows) become ``None``. STS-B scores, stored
    as float32 on the hub, are rounded to 5 decimals so that they equal the TSV values.

    Raises:
        DataError: a required column is missing or a label is outside the task's set.
    """
    task = get_task(task)
    columns = list(getattr(dataset, "column_names", []))
    missing = [c for c in (*task.hub_text_columns, "label") if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)} for task {task.name} "
            f"(found: {', '.join(columns)})"
        )
    texts: list[Sequence[str]] = [list(dataset[c]) for c in task.hub_text_columns]
    labels = list(dataset["label"])
    indices = list(dataset["idx"]) if "idx" in columns else list(range(len(labels)))
    examples = []
    for row, (idx, raw) in enumerate(zip(indices, labels, strict=True)):
        examples.append(Example(
            guid=f"{split}-{idx}",
            text_a=texts[0][row],
            text_b=texts[1][row] if task.is_pair else None,
            label=_convert_label(task, raw, f"{source} row {row}"),
        ))
    return examples


def _convert_label(task: GlueTask, raw: Any, where: str) -> int | float | None:
    if raw is None:
        return None
    if task.is_regression:
        value = float(raw)
        if value == -1.0:
            return None
        if not 0.0 <= value <= 5.0:
            raise DataError(f"{where}: score {value} of task {task.name} is outside [0, 5]")
        return round(value, 5)
    value = int(raw)
    if value == -1:
        return None
    if not 0 <= value < task.num_labels:
        raise DataError(
            f"{where}: label {value} is outside the label ids 0..{task.num_labels - 1} "
            f"of task {task.name}"
        )
    return value
