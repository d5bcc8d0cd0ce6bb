"""Length-grouped training batches that still go through the stage trainer's sampler.

The trainer shuffles *items* and collates ``batch_size`` of them per step. Here an item is a
whole chunk of sentences of similar length, so a trainer ``batch_size`` of ``W`` (one chunk per
process) gives steps whose padded width is close to their real lengths. The chunks are fixed for
the stage (seeded), which keeps the data order a function of the seed, as resuming requires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import EncodedDataset

__all__ = ["LengthGroupedChunks", "flatten_collator", "length_sorted", "subset"]


class LengthGroupedChunks(Dataset):
    """Chunks of ``chunk_size`` items of ``dataset`` with similar lengths.

    Items are ordered by length with a seeded random tie-break (so equal-length sentences are
    mixed across chunks), then cut into consecutive chunks; an incomplete last chunk is dropped.

    Args:
        dataset: an :class:`~rosita_fast.data.EncodedDataset`.
        chunk_size: sentences per chunk (the per-process batch).
        seed: tie-break seed.
    """

    def __init__(self, dataset: EncodedDataset, chunk_size: int, seed: int) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        rng = np.random.default_rng(seed)
        noise = rng.random(len(dataset))
        order = np.lexsort((noise, dataset.lengths))
        n_chunks = len(dataset) // chunk_size
        self.dataset = dataset
        self.chunks = order[: n_chunks * chunk_size].reshape(n_chunks, chunk_size)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.dataset[int(i)] for i in self.chunks[index]]

    def example_indices(self, index: int) -> list[int]:
        """The indices (in the underlying dataset) of chunk ``index``'s sentences, in row
        order: what identifies each row for the trainer's teacher cache."""
        return [int(i) for i in self.chunks[index]]


def flatten_collator(
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
) -> Callable[[Sequence[list[dict[str, Any]]]], dict[str, torch.Tensor]]:
    """Wrap a per-sentence collator so that it also accepts a list of chunks.

    The trainer uses one collator for training chunks and for plain dev items alike.
    """

    def collate_chunks(items: Sequence[Any]) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], list):
            items = [item for chunk in items for item in chunk]
        return collate(items)

    return collate_chunks


def length_sorted(dataset: EncodedDataset) -> EncodedDataset:
    """The same items sorted by length (dev metrics do not depend on order; padding does)."""
    order = np.argsort(dataset.lengths, kind="stable")
    return subset(dataset, order)


def subset(dataset: EncodedDataset, indices: np.ndarray) -> EncodedDataset:
    """A new :class:`EncodedDataset` holding ``indices`` of ``dataset`` in that order."""
    pieces = [dataset.input_ids[dataset.offsets[i]:dataset.offsets[i + 1]] for i in indices]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(pieces) if pieces else dataset.input_ids[:0]
    types = None
    if dataset.token_type_ids is not None:
        types = np.concatenate([dataset.token_type_ids[dataset.offsets[i]:dataset.offsets[i + 1]]
                                for i in indices]) if pieces else dataset.token_type_ids[:0]
    return EncodedDataset(ids, offsets, dataset.labels[np.asarray(indices, dtype=np.int64)], types)
