"""``prune_``: structured pruning and embedding factorization of an encoder, in place."""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import adapter_for
from ..models.student import convert_to_student_, model_layout
from .importance import ImportanceScores
from .plan import LayerSpec, PrunePlan, UnitSpec, make_plan
from .surgery import factorize_embedding_, keep_ffn_, keep_heads_, keep_layers_, truncate_embedding_

__all__ = ["plan_prune", "prune_"]


def plan_prune(
    model: nn.Module,
    *,
    layers: LayerSpec = None,
    heads: UnitSpec = None,
    ffn: UnitSpec = None,
    embedding_rank: int | None = None,
    scores: ImportanceScores | None = None,
) -> PrunePlan:
    """Validate :func:`prune_`'s arguments against ``model`` and return the explicit plan.

    Nothing is modified. Raises exactly what :func:`prune_` would raise for the same arguments.
    """
    adapter = adapter_for(model)
    adapter.student_class(type(model))  # an unsupported head fails here, not half-way
    return make_plan(
        model_layout(model),
        layers=layers,
        heads=heads,
        ffn=ffn,
        embedding_rank=embedding_rank,
        scores=scores,
    )


def prune_(
    model: nn.Module,
    *,
    layers: LayerSpec = None,
    heads: UnitSpec = None,
    ffn: UnitSpec = None,
    embedding_rank: int | None = None,
    scores: ImportanceScores | None = None,
) -> nn.Module:
    """Prune ``model`` in place and make it a student model; returns the same object.

    Args:
        model: a supported dense or student model (BERT, RoBERTa, MPNet; base, sequence
            classification or masked-LM head).
        layers: ``int`` keeps the bottom ``n`` layers (ROSITA drops the top-most); a sequence keeps
            those layer indices.
        heads: attention heads to keep: an ``int`` count for every kept layer, a list with one
            count per kept layer, or a list with one index list per kept layer. Counts select the
            top-scoring heads of each layer from ``scores``.
        ffn: FFN neurons to keep, same forms as ``heads``.
        embedding_rank: factorize the word embedding at this rank by economy SVD, or, if it is
            already factorized, truncate it to this rank (no new SVD).
        scores: importance of the *current* model (:class:`ImportanceScores`); needed whenever a
            count keeps fewer units than a layer has.

    Per-layer lists refer to the kept layers, in order. Keeping everything reproduces the
    model's outputs; keeping a subset of heads equals zeroing the other heads' context vectors.
    Afterwards ``model.config`` records every per-layer size, so ``save_pretrained`` and
    ``AutoModel*.from_pretrained`` round-trip the student exactly.

    Raises:
        UnsupportedArchitectureError: unknown architecture or head.
        ValueError / TypeError: a target that does not fit the model. All checks run before the
            first modification, so a failing call leaves the model untouched.
    """
    plan = plan_prune(
        model,
        layers=layers,
        heads=heads,
        ffn=ffn,
        embedding_rank=embedding_rank,
        scores=scores,
    )
    apply_plan_(model, plan)
    return model


@torch.no_grad()
def apply_plan_(model: nn.Module, plan: PrunePlan) -> None:
    """Carry out a validated :class:`PrunePlan` (from :func:`plan_prune`) on ``model``."""
    adapter = adapter_for(model)
    layer_list = adapter.layer_list(model)
    for original, kept_heads, kept_ffn in zip(plan.layers, plan.heads, plan.ffn, strict=True):
        layer = layer_list[original]
        if kept_heads is not None:
            keep_heads_(layer, adapter, model.config, kept_heads)
        if kept_ffn is not None:
            keep_ffn_(layer, adapter, kept_ffn)
    if plan.layers != list(range(len(layer_list))):
        keep_layers_(model, adapter, plan.layers)
    if plan.embedding_rank is not None:
        if plan.factorize:
            factorize_embedding_(model, adapter, plan.embedding_rank)
        else:
            truncate_embedding_(model, adapter, plan.embedding_rank)
    convert_to_student_(model)
