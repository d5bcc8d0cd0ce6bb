"""``compress``: one-step ROSITA pruning (score once, then cut to the target shape)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..models.student import model_layout
from .importance import ImportanceMethod, ImportanceScores, compute_importance
from .plan import LayerSpec, UnitSpec
from .prune import plan_prune, prune_
from .schedule import Selection
from .selection import global_targets

__all__ = ["compress"]


def compress(
    model: nn.Module,
    *,
    layers: LayerSpec = None,
    heads: UnitSpec = None,
    ffn: UnitSpec = None,
    embedding_rank: int | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    scores: ImportanceScores | None = None,
    method: ImportanceMethod = "taylor",
    selection: Selection = "layer",
    normalize: bool = True,
    max_batches: int | None = None,
) -> nn.Module:
    """One-step pruning (ROSITA method 3.1): score the current model, then :func:`prune_` it.

    Scores come from ``scores`` if given, else from a gradient pass over ``batches`` with
    ``loss_fn`` (see :func:`compute_importance`; no weight is updated). The targets are checked
    before the scoring pass, so a bad target fails fast. With ``selection="global"`` the same
    total number of heads / neurons is spread over the kept layers by (normalized) score.

    Example, the ROSITA shape from a 12-layer teacher::

        compress(model, layers=8, heads=2, ffn=512, embedding_rank=128, batches=train_batches)

    Returns:
        ``model``, pruned in place (a student model).
    """
    if selection not in ("layer", "global"):
        raise ValueError(f"selection must be 'layer' or 'global', got {selection!r}")
    layout = model_layout(model)
    # Placeholder scores of the right shape validate every target before the costly pass.
    placeholder = ImportanceScores(
        heads=[torch.zeros(h) for h in layout.heads],
        ffn=[torch.zeros(f) for f in layout.intermediate_sizes],
        num_batches=0,
        method="placeholder",
    )
    plan = plan_prune(
        model,
        layers=layers,
        heads=heads,
        ffn=ffn,
        embedding_rank=embedding_rank,
        scores=scores or placeholder,
    )
    if scores is None and plan.used_scores:
        if batches is None:
            raise ValueError("selecting heads/FFN needs scores=... or batches=... to score on")
        scores = compute_importance(model, batches, loss_fn, method=method, max_batches=max_batches)
    if selection == "global" and scores is not None:
        targets = global_targets(scores, plan.layers, heads=heads, ffn=ffn, normalize=normalize)
        heads, ffn = targets["heads"], targets["ffn"]
    return prune_(
        model,
        layers=layers,
        heads=heads,
        ffn=ffn,
        embedding_rank=embedding_rank,
        scores=scores,
    )
