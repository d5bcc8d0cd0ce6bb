"""Reading and writing GLUE-format TSV files.

Files are parsed the way GLUE distributes them: tab-separated, UTF-8 (an optional BOM is accepted,
MRPC has one), no quoting. Headed files are read by column *name*, so the train, dev and test files
of a task, whose column sets differ, share one reader; CoLA's headerless train/dev files use the
task's positional layout. Every problem is reported with the file name and line number.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DataError
from .examples import Example
from .tasks import GlueTask, get_task

# STS-B scores are similarities on a 0..5 scale; anything else means a wrong column or file.
_STSB_RANGE = (0.0, 5.0)
# Optional column of headed files: Example.source (CoLA's headerless files have it positionally).
SOURCE_COLUMN = "source"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        # newline="\n": a stray carriage return inside a sentence must not split the row.
        with open(path, encoding="utf-8-sig", newline="\n") as handle:
            for lineno, line in enumerate(handle, start=1):
                yield lineno, line.rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from exc


def parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    """Convert a TSV label string to the task's label id (or float score for STS-B).

    Raises:
        DataError: the value is not one of the task's labels; ``where`` prefixes the message.
    """
    value = raw.strip()
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise DataError(f"{where}: label {raw!r} of task {task.name} is not a number") from None
        low, high = _STSB_RANGE
        if not low <= score <= high:
            raise DataError(
                f"{where}: score {score} of task {task.name} is outside [{low}, {high}]"
            )
        return score
    try:
        return task.tsv_labels.index(value)
    except ValueError:
        raise DataError(
            f"{where}: label {raw!r} is not a label of task {task.name} "
            f"(expected one of {', '.join(task.tsv_labels)})"
        ) from None


def read_glue_tsv(
    path: str | os.PathLike[str],
    task: str | GlueTask,
    *,
    split: str = "train",
    require_labels: bool = True,
    skip_malformed_rows: bool = False,
) -> list[Example]:
    """Read one GLUE TSV file into :class:`Example` objects.

    Args:
        path: the ``.tsv`` file.
        task: task name or :class:`GlueTask`.
        split: used only to build the ``guid`` of each example.
        require_labels: raise when the file has no label column (use ``False`` for test files).
        skip_malformed_rows: skip rows with missing columns (with a warning giving the count)
            instead of raising; labels outside the task's set are always an error.

    Raises:
        DataError: missing file, missing header columns, short rows, or bad labels (with line).
    """
    task = get_task(task)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = _lines(path)
    first = next(rows, None)
    if first is None or not first[1].strip():
        raise DataError(f"{path}: file is empty (expected a GLUE {task.name} TSV)")
    header = first[1].split("\t")
    if all(name in header for name in task.text_columns):
        text_idx = [header.index(name) for name in task.text_columns]
        label_idx = header.index(task.label_column) if task.label_column in header else None
        source_idx = header.index(SOURCE_COLUMN) if SOURCE_COLUMN in header else None
        exact_cols: int | None = None
        data_rows: Iterable[tuple[int, str]] = rows
    elif task.positional_layout is not None:
        n_cols, text_col, label_col = task.positional_layout
        if len(header) != n_cols:
            raise DataError(
                f"{path}:1: expected {n_cols} tab-separated columns (headerless {task.name} "
                f"layout) or a header naming {', '.join(task.text_columns)}; "
                f"found {len(header)} columns"
            )
        text_idx, label_idx = [text_col], label_col
        source_idx = task.source_index
        exact_cols = n_cols
        data_rows = _chain(first, rows)
    else:
        wanted = [*task.text_columns, task.label_column]
        raise DataError(
            f"{path}:1: header must name the columns {', '.join(wanted)} for task {task.name}; "
            f"found {first[1][:120]!r}"
        )
    if label_idx is None and require_labels:
        raise DataError(f"{path}:1: no {task.label_column!r} column; this split needs labels")

    needed = max([*text_idx, -1 if label_idx is None else label_idx,
                  -1 if source_idx is None else source_idx]) + 1
    examples: list[Example] = []
    skipped = 0
    for lineno, line in data_rows:
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) < needed or (exact_cols is not None and len(fields) != exact_cols):
            if skip_malformed_rows:
                skipped += 1
                continue
            expected = f"{exact_cols}" if exact_cols is not None else f"at least {needed}"
            raise DataError(
                f"{path}:{lineno}: expected {expected} tab-separated columns, found {len(fields)}"
            )
        where = f"{path}:{lineno}"
        label = None if label_idx is None else parse_label(task, fields[label_idx], where)
        texts = [fields[i] for i in text_idx]
        examples.append(Example(
            guid=f"{split}-{len(examples) + skipped}",
            text_a=texts[0],
            text_b=texts[1] if len(texts) > 1 else None,
            label=label,
            source=None if source_idx is None else fields[source_idx] or None,
        ))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed rows", stacklevel=2)
    if not examples:
        raise DataError(f"{path}: no data rows")
    return examples


def _chain(first: tuple[int, str], rest: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    yield first
    yield from rest


def _clean(text: str) -> str:
    # The format has no quoting, so separators inside a text would corrupt the row.
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_glue_tsv(
    path: str | os.PathLike[str],
    task: str | GlueTask,
    examples: Iterable[Example],
    *,
    overwrite: bool = False,
) -> Path:
    """Write examples as a headed GLUE TSV that :func:`read_glue_tsv` reads back unchanged.

    Used for augmented training sets (``train_aug.tsv``). When any example has a ``source``,
    the file gets a ``source`` column (empty for ``None``, which reads back as ``None``). The
    file is written to a temporary name and renamed, so an interrupted write never leaves a
    truncated file behind. Tabs and newlines inside texts are replaced by spaces.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        DataError: some examples are labelled and others are not, or a label is invalid.
    """
    task = get_task(task)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    rows = list(examples)
    labelled = {ex.label is not None for ex in rows}
    if len(labelled) > 1:
        raise DataError(f"{path}: cannot mix labelled and unlabelled examples in one file")
    with_labels = labelled == {True}
    with_sources = any(ex.source is not None for ex in rows)
    header = list(task.text_columns) + ([task.label_column] if with_labels else [])
    header += [SOURCE_COLUMN] if with_sources else []
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write("\t".join(header) + "\n")
            for ex in rows:
                fields = [_clean(ex.text_a)]
                if task.is_pair:
                    fields.append(_clean(ex.text_b or ""))
                if with_labels:
                    fields.append(_format_label(task, ex.label, ex.guid))
                if with_sources:
                    fields.append(_clean(ex.source or ""))
                handle.write("\t".join(fields) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _format_label(task: GlueTask, label: int | float | None, guid: str) -> str:
    if task.is_regression:
        return repr(float(label))  # repr keeps every digit, so a round trip is exact
    if not isinstance(label, int) or not 0 <= label < len(task.tsv_labels):
        raise DataError(f"example {guid}: label {label!r} is not a label id of task {task.name}")
    return task.tsv_labels[label]


def load_tsv_examples(
    data_dir: str | os.PathLike[str],
    task: str | GlueTask,
    split: str = "train",
    *,
    require_labels: bool | None = None,
    skip_malformed_rows: bool = False,
) -> list[Example]:
    """Load one split of a task from a GLUE directory.

    ``data_dir`` may be the task directory (holding ``train.tsv`` ...) or a GLUE root holding
    ``<TASK>/`` (e.g. ``glue/SST-2``). ``split`` is ``train``, ``dev`` or ``test`` (MNLI maps
    ``dev``/``test`` to the matched or mismatched files, depending on ``mnli`` vs ``mnli-mm``), or
    any other file stem in the directory, such as ``train_aug``.

    Args:
        require_labels: default: labels are required unless the split name starts with ``test``.

    Raises:
        DataError: the directory or split file does not exist, or the file is malformed.
    """
    task = get_task(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist (task {task.name})")
    file_name = task.split_file(split)
    directory = root
    if not (root / file_name).is_file() and (root / task.dir_name / file_name).is_file():
        directory = root / task.dir_name
    path = directory / file_name
    if not path.is_file():
        present = sorted(p.name for p in directory.glob("*.tsv"))
        raise DataError(
            f"{path}: missing; split {split!r} of task {task.name} needs this file "
            f"(TSV files present: {', '.join(present) or 'none'})"
        )
    if require_labels is None:
        require_labels = not split.startswith("test")
    return read_glue_tsv(path, task, split=split, require_labels=require_labels,
                         skip_malformed_rows=skip_malformed_rows)
