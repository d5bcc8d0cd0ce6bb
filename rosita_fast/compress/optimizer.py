"""Keeping an optimizer valid across pruning, which replaces parameter tensors.

Pruning installs new parameter objects under the old names (or, for a factorized embedding, under
names one level deeper). The optimizer object itself is kept, so learning-rate schedulers that
hold it keep working; its param groups are re-pointed at the new tensors by name and the state
(Adam moments etc.) is reset as ROSITA does at every pruning event.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["OptimizerStatePolicy", "group_names", "rebuild_optimizer_"]

OptimizerStatePolicy = Literal["reset", "keep_unpruned"]


def group_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """Names (in ``model``) of the parameters in each param group of ``optimizer``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        [names[id(p)] for p in group["params"] if id(p) in names]
        for group in optimizer.param_groups
    ]


def _lineage(name: str, old: dict[str, int]) -> str | None:
    # A renamed parameter (e.g. "...word_embeddings.lookup.weight") belongs to the group of the
    # parameter it came from ("...word_embeddings.weight"): drop module levels until one matches.
    module, _, leaf = name.rpartition(".")
    parts = module.split(".")
    for cut in range(len(parts), -1, -1):
        candidate = ".".join([*parts[:cut], leaf]) if cut else leaf
        if candidate in old:
            return candidate
    return None


def rebuild_optimizer_(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    old_group_names: list[list[str]],
    *,
    state: OptimizerStatePolicy = "reset",
) -> None:
    """Point ``optimizer``'s param groups at ``model``'s current parameters, in place.

    Args:
        old_group_names: :func:`group_names` taken before pruning.
        state: ``"reset"`` clears all optimizer state (ROSITA: a fresh optimizer at every
            event); ``"keep_unpruned"`` keeps the state of parameters that pruning did not replace.

    Parameters that pruning removed disappear from their group; new parameters join the group of
    the parameter they replace. Group hyperparameters (lr, weight decay, ...) are unchanged.
    """
    if state not in ("reset", "keep_unpruned"):
        raise ValueError(f"state must be 'reset' or 'keep_unpruned', got {state!r}")
    group_of = {name: g for g, names in enumerate(old_group_names) for name in names}
    new_params: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    for name, param in model.named_parameters():
        origin = name if name in group_of else _lineage(name, group_of)
        if origin is not None:
            new_params[group_of[origin]].append(param)
    for group, params in zip(optimizer.param_groups, new_params, strict=True):
        group["params"] = params
    if state == "reset":
        optimizer.state.clear()
    else:
        alive = {id(p) for params in new_params for p in params}
        for param in [p for p in optimizer.state if id(p) not in alive]:
            del optimizer.state[param]
