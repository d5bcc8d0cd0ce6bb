"""Registry of the GLUE tasks: column layouts, label sets, metrics and the method's defaults.

Label ids follow the class order of the ``datasets`` hub (``nyu-mll/glue``) so that a TSV directory
and the hub produce identical examples. ``tsv_labels[i]`` is the string that stands for label id
``i`` in the GLUE TSV files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnknownTaskError


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
        name: canonical name (``"sst-2"``, ``"mnli-mm"`` ...).
        dir_name: directory name in the GLUE distribution (``"SST-2"``).
        text_columns: header names of the text columns in headed TSV files (one or two).
        label_column: header name of the label column (absent in test files).
        label_names: class names in hub order; empty for regression (STS-B).
        tsv_labels: label strings used in the TSV files, index = label id.
        metrics: metric names reported by :func:`rosita_fast.data.metrics.compute_metrics`.
        main_metric: the metric used for model selection.
        hub_config: config name on the hub (``glue/<hub_config>``).
        hub_text_columns: text column names of the hub dataset.
        split_files: split name -> TSV file stem, for splits whose file is not ``<split>.tsv``.
        hub_splits: split name -> hub split name.
        positional_layout: ``(n_columns, text_index, label_index)`` for headerless files (CoLA).
        source_index: column of a headerless file that names each row's source (CoLA: 0), read
            into :attr:`Example.source`; ``None``: the files name none.
        max_seq_length: the method's default sequence length (method 5.1).
        train_batch_size: the method's default training batch size (method 5.1).
        augment_n: sentences generated per text field by augmentation (method 5.3).
    """

    name: str
    dir_name: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    hub_config: str
    hub_text_columns: tuple[str, ...]
    # hash=False: dicts are unhashable, and the other fields already identify a task.
    split_files: dict[str, str] = field(default_factory=dict, hash=False)
    hub_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"}, hash=False
    )
    positional_layout: tuple[int, int, int] | None = None
    source_index: int | None = None
    max_seq_length: int = 128
    train_batch_size: int = 64
    augment_n: int = 20

    @property
    def is_regression(self) -> bool:
        """True for STS-B (a real-valued score instead of a class)."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Number of model outputs: classes, or 1 for regression."""
        return 1 if self.is_regression else len(self.label_names)

    def label_maps(self) -> dict[str, dict]:
        """``{"id2label": {0: name, ...}, "label2id": {name: 0, ...}}`` for a model config, so a
        saved model (and a Hugging Face ``pipeline``) names its classes; empty for regression."""
        if self.is_regression:
            return {}
        return {"id2label": dict(enumerate(self.label_names)),
                "label2id": {name: i for i, name in enumerate(self.label_names)}}

    def name_labels(self, config) -> bool:
        """Give a model ``config`` this task's label names if it has none of its own (Hugging
        Face's ``LABEL_<i>`` placeholders). Returns whether it changed the config; names a user
        set are kept."""
        maps = self.label_maps()
        if not maps or getattr(config, "num_labels", None) != self.num_labels:
            return False
        placeholders = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        current = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
        if current and current != placeholders:
            return False
        config.id2label = maps["id2label"]
        config.label2id = maps["label2id"]
        return True

    @property
    def is_pair(self) -> bool:
        """True when examples have two text fields."""
        return len(self.text_columns) == 2

    def split_file(self, split: str) -> str:
        """File name (``<stem>.tsv``) that holds ``split`` in a GLUE directory."""
        return self.split_files.get(split, split) + ".tsv"


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")

_TASKS: dict[str, GlueTask] = {}


def _register(task: GlueTask) -> None:
    _TASKS[task.name] = task


_register(GlueTask(
    name="cola", dir_name="CoLA", text_columns=("sentence",), label_column="label",
    label_names=("unacceptable", "acceptable"), tsv_labels=_BINARY,
    metrics=("mcc", "acc"), main_metric="mcc", hub_config="cola", hub_text_columns=("sentence",),
    # train/dev ship without a header: source, label, original mark, sentence.
    positional_layout=(4, 3, 1), source_index=0, max_seq_length=64, train_batch_size=32,
    augment_n=30,
))
_register(GlueTask(
    name="sst-2", dir_name="SST-2", text_columns=("sentence",), label_column="label",
    label_names=("negative", "positive"), tsv_labels=_BINARY,
    metrics=("acc",), main_metric="acc", hub_config="sst2", hub_text_columns=("sentence",),
    max_seq_length=64, train_batch_size=32, augment_n=20,
))
_register(GlueTask(
    name="mrpc", dir_name="MRPC", text_columns=("#1 String", "#2 String"), label_column="Quality",
    label_names=("not_equivalent", "equivalent"), tsv_labels=_BINARY,
    metrics=("acc", "f1", "acc_and_f1"), main_metric="f1", hub_config="mrpc",
    hub_text_columns=("sentence1", "sentence2"),
))
_register(GlueTask(
    name="sts-b", dir_name="STS-B", text_columns=("sentence1", "sentence2"), label_column="score",
    label_names=(), tsv_labels=(), metrics=("pearson", "spearman", "corr"), main_metric="corr",
    hub_config="stsb", hub_text_columns=("sentence1", "sentence2"),
))
_register(GlueTask(
    name="qqp", dir_name="QQP", text_columns=("question1", "question2"),
    label_column="is_duplicate", label_names=("not_duplicate", "duplicate"), tsv_labels=_BINARY,
    # The method selects QQP checkpoints on accuracy, not F1 (method 3.6).
    metrics=("acc", "f1", "acc_and_f1"), main_metric="acc", hub_config="qqp",
    hub_text_columns=("question1", "question2"), augment_n=10,
))
_register(GlueTask(
    name="mnli", dir_name="MNLI", text_columns=("sentence1", "sentence2"),
    label_column="gold_label", label_names=_NLI3, tsv_labels=_NLI3,
    metrics=("acc",), main_metric="acc", hub_config="mnli",
    hub_text_columns=("premise", "hypothesis"),
    split_files={"dev": "dev_matched", "test": "test_matched"},
    hub_splits={"train": "train", "dev": "validation_matched", "test": "test_matched",
                "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched",
                "test_matched": "test_matched", "test_mismatched": "test_mismatched"},
    augment_n=10,
))
_register(GlueTask(
    name="mnli-mm", dir_name="MNLI", text_columns=("sentence1", "sentence2"),
    label_column="gold_label", label_names=_NLI3, tsv_labels=_NLI3,
    metrics=("acc",), main_metric="acc", hub_config="mnli",
    hub_text_columns=("premise", "hypothesis"),
    split_files={"dev": "dev_mismatched", "test": "test_mismatched"},
    hub_splits={"train": "train", "dev": "validation_mismatched", "test": "test_mismatched"},
    augment_n=10,
))
_register(GlueTask(
    name="qnli", dir_name="QNLI", text_columns=("question", "sentence"), label_column="label",
    label_names=_NLI2, tsv_labels=_NLI2, metrics=("acc",), main_metric="acc",
    hub_config="qnli", hub_text_columns=("question", "sentence"),
))
_register(GlueTask(
    name="rte", dir_name="RTE", text_columns=("sentence1", "sentence2"), label_column="label",
    label_names=_NLI2, tsv_labels=_NLI2, metrics=("acc",), main_metric="acc",
    hub_config="rte", hub_text_columns=("sentence1", "sentence2"),
))

_ALIASES = {"mnlim": "mnli", "mnlimatched": "mnli", "mnlimm": "mnli-mm",
            "mnlimismatched": "mnli-mm"}


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def task_names() -> list[str]:
    """Canonical names of all known tasks, in registry order."""
    return list(_TASKS)


def get_task(name: str | GlueTask) -> GlueTask:
    """Look a task up by name; case, ``-`` and ``_`` are ignored (``SST2`` == ``sst-2``).

    Raises:
        UnknownTaskError: the name is not a known task; the message lists the known ones.
    """
    if isinstance(name, GlueTask):
        return name
    key = _squash(str(name))
    key = _squash(_ALIASES.get(key, key))
    for task in _TASKS.values():
        if _squash(task.name) == key:
            return task
    raise UnknownTaskError(
        f"unknown GLUE task {name!r}; known tasks: {', '.join(task_names())}"
    )
