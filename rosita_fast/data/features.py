"""Tokenising examples with the model's own tokenizer into compact, unpadded features.

Padding is deliberately left to the collator (:mod:`rosita_fast.data.collate`): each batch is padded
only to its own longest sequence. Token ids are kept in one flat int32 array with offsets, because
augmented training sets hold millions of short sentences and Python lists of ints would need ~10x
more memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .examples import Example
from .tasks import GlueTask, get_task

# Marks "no label" inside the label arrays (test splits).
MISSING_CLASS_LABEL = -100


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenised examples; item ``i`` is ``{"input_ids", ["token_type_ids"], "label"}``.

    ``input_ids``/``token_type_ids`` are 1-D numpy arrays without padding; ``label`` is an int, a
    float (regression) or ``None``.
    """

    def __init__(
        self,
        input_ids: np.ndarray,
        offsets: np.ndarray,
        labels: np.ndarray,
        token_type_ids: np.ndarray | None = None,
    ) -> None:
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != input_ids.size:
            raise ValueError("offsets must start at 0 and end at len(input_ids)")
        if labels.shape[0] != offsets.size - 1:
            raise ValueError("one label per sequence is required")
        self.input_ids = input_ids
        self.offsets = offsets
        self.labels = labels
        self.token_type_ids = token_type_ids

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        """Sequence length of every item (for length-aware batching or statistics)."""
        return np.diff(self.offsets)

    def label_at(self, index: int) -> int | float | None:
        """The label of item ``index`` as a Python value (``None`` when unlabelled)."""
        value = self.labels[index]
        if np.issubdtype(self.labels.dtype, np.floating):
            return None if np.isnan(value) else float(value)
        return None if value == MISSING_CLASS_LABEL else int(value)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        start, stop = self.offsets[index], self.offsets[index + 1]
        item: dict[str, Any] = {
            "input_ids": self.input_ids[start:stop],
            "label": self.label_at(index),
        }
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[start:stop]
        return item


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    task: str | GlueTask,
    *,
    max_length: int | None = None,
    chunk_size: int = 4096,
) -> EncodedDataset:
    """Tokenise examples as ``[CLS] a [SEP] (b [SEP])``, truncating pairs longest-first.

    Args:
        tokenizer: a Hugging Face tokenizer (the one the model was trained with).
        task: decides single vs pair input and the label type.
        max_length: longest sequence kept; defaults to the method's per-task value
            (64 for CoLA/SST-2, 128 otherwise).
        chunk_size: examples sent to the tokenizer per call (bounds peak memory).

    Raises:
        DataError: a pair task example without a second text, or the other way round.
    """
    task = get_task(task)
    max_length = task.max_seq_length if max_length is None else max_length
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 (special tokens + text); got {max_length}")
    for ex in examples:
        if (ex.text_b is not None) != task.is_pair:
            kind = "two texts" if task.is_pair else "one text"
            raise DataError(f"example {ex.guid}: task {task.name} needs {kind} per example")
    ids_chunks: list[np.ndarray] = []
    type_chunks: list[np.ndarray] = []
    lengths: list[int] = []
    has_types = True
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        texts_a = [ex.text_a for ex in chunk]
        texts_b = [ex.text_b for ex in chunk] if task.is_pair else None
        enc = tokenizer(texts_a, texts_b, truncation="longest_first", max_length=max_length,
                        return_attention_mask=False)
        has_types = has_types and "token_type_ids" in enc
        for k, seq in enumerate(enc["input_ids"]):
            lengths.append(len(seq))
            ids_chunks.append(np.asarray(seq, dtype=np.int32))
            if has_types:
                type_chunks.append(np.asarray(enc["token_type_ids"][k], dtype=np.int8))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    input_ids = np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, dtype=np.int32)
    token_types = None
    if has_types and type_chunks:
        token_types = np.concatenate(type_chunks)
    return EncodedDataset(input_ids, offsets, _label_array(task, examples), token_types)


def _label_array(task: GlueTask, examples: Sequence[Example]) -> np.ndarray:
    if task.is_regression:
        return np.array([np.nan if ex.label is None else ex.label for ex in examples],
                        dtype=np.float32)
    labels = np.array([MISSING_CLASS_LABEL if ex.label is None else ex.label for ex in examples],
                      dtype=np.int64)
    bad = (labels != MISSING_CLASS_LABEL) & ((labels < 0) | (labels >= task.num_labels))
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(
            f"example {examples[first].guid}: label {examples[first].label!r} is outside the "
            f"label ids 0..{task.num_labels - 1} of task {task.name}"
        )
    return labels
