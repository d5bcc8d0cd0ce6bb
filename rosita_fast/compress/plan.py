"""Checking pruning targets and resolving them to explicit indices, before anything is modified."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.student import ModelLayout
from .importance import ImportanceScores
from .selection import top_k

__all__ = ["LayerSpec", "PrunePlan", "UnitSpec", "make_plan"]

UnitSpec = int | Sequence[int | Sequence[int] | torch.Tensor] | None
"""Heads or FFN neurons: a count for every layer, a count per layer, or indices per layer."""
LayerSpec = int | Sequence[int] | None
"""Layers: how many bottom layers to keep, or the indices of the layers to keep."""


@dataclass
class PrunePlan:
    """Everything :func:`prune_` will do, as explicit indices into the current model.

    ``heads[i]`` / ``ffn[i]`` belong to the ``i``-th *kept* layer, i.e. original layer
    ``layers[i]``; ``None`` leaves that layer's heads / neurons as they are.
    """

    layers: list[int]
    heads: list[list[int] | None]
    ffn: list[list[int] | None]
    embedding_rank: int | None
    factorize: bool
    """True: first factorization by SVD; False with a rank: truncate an existing factorization."""
    used_scores: bool = False
    """Whether some count was resolved by importance (top-k) rather than given as indices."""


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None


def _is_sequence(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim > 0
    return isinstance(value, Sequence) and not isinstance(value, str)


def _explicit_indices(values, size: int, where: str, what: str) -> list[int]:
    indices = [_as_int(i, f"{where} index") for i in values]
    if not indices:
        raise ValueError(f"{where}: cannot keep zero {what}")
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(f"{where}: indices {bad} out of range, there are {size}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{where}: duplicate indices in {indices}")
    return sorted(indices)


def _resolve_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    if spec is None:
        return list(range(num_layers))
    if not _is_sequence(spec):
        count = _as_int(spec, "layers")
        if not 1 <= count <= num_layers:
            raise ValueError(
                f"layers={count}: the model has {num_layers} layers (keep 1..{num_layers})"
            )
        return list(range(count))
    return _explicit_indices(spec, num_layers, "layers", "layers")


def _resolve_units(
    spec: UnitSpec,
    what: str,
    kept_layers: list[int],
    sizes: list[int],
    scores: list[torch.Tensor] | None,
) -> tuple[list[list[int] | None], bool]:
    if spec is None:
        return [None] * len(kept_layers), False
    if _is_sequence(spec):
        per_layer = list(spec)
        if len(per_layer) != len(kept_layers):
            raise ValueError(
                f"{what}: got {len(per_layer)} per-layer entries for {len(kept_layers)} kept layers"
            )
    else:
        per_layer = [spec] * len(kept_layers)

    plan: list[list[int] | None] = []
    used_scores = False
    for original, entry in zip(kept_layers, per_layer, strict=True):
        size = sizes[original]
        where = f"{what} of layer {original}"
        if _is_sequence(entry):
            indices = _explicit_indices(entry, size, where, what)
        else:
            count = _as_int(entry, where)
            if count < 1:
                raise ValueError(f"{where}: cannot keep {count} {what}; keep at least 1")
            if count > size:
                raise ValueError(f"{where}: asked to keep {count} but the layer has only {size}")
            if count == size:
                plan.append(None)
                continue
            if scores is None:
                raise ValueError(
                    f"{where}: keeping {count} of {size} needs importance scores (scores=...) "
                    "or explicit indices"
                )
            indices = top_k(scores[original], count)
            used_scores = True
        plan.append(None if indices == list(range(size)) else indices)
    return plan, used_scores


def _resolve_rank(rank: int | None, layout: ModelLayout) -> tuple[int | None, bool]:
    if rank is None:
        return None, False
    rank = _as_int(rank, "embedding_rank")
    if layout.embedding_rank is not None:
        if not 1 <= rank <= layout.embedding_rank:
            raise ValueError(
                f"embedding_rank={rank}: the embedding is already factorized at rank "
                f"{layout.embedding_rank}; it can only be truncated to 1..{layout.embedding_rank}"
            )
        return (None, False) if rank == layout.embedding_rank else (rank, False)
    limit = min(layout.hidden_size, layout.vocab_size)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"embedding_rank={rank} must be in 1..{limit} (hidden size {layout.hidden_size}, "
            f"vocabulary {layout.vocab_size})"
        )
    return rank, True


def make_plan(
    layout: ModelLayout,
    *,
    layers: LayerSpec = None,
    heads: UnitSpec = None,
    ffn: UnitSpec = None,
    embedding_rank: int | None = None,
    scores: ImportanceScores | None = None,
) -> PrunePlan:
    """Validate the targets of :func:`prune_` against ``layout`` and resolve them to indices.

    Raises:
        ValueError / TypeError: any target that does not fit the model; nothing is modified.
    """
    if scores is not None:
        scores.check_matches(layout.heads, layout.intermediate_sizes)
    kept = _resolve_layers(layers, layout.num_layers)
    head_plan, head_scored = _resolve_units(
        heads, "heads", kept, layout.heads, scores.heads if scores else None
    )
    ffn_plan, ffn_scored = _resolve_units(
        ffn, "ffn", kept, layout.intermediate_sizes, scores.ffn if scores else None
    )
    rank, factorize = _resolve_rank(embedding_rank, layout)
    return PrunePlan(
        layers=kept,
        heads=head_plan,
        ffn=ffn_plan,
        embedding_rank=rank,
        factorize=factorize,
        used_scores=head_scored or ffn_scored,
    )
