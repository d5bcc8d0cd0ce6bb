"""Turning a :class:`~.config.PruningConfig` into the compress engine's
:class:`~rosita_fast.compress.PruningSchedule`, fresh or from a checkpoint.

The trainer's schedules gather importance from ``.grad`` (``importance_source="grads"``), which
the trainer feeds once per update with :meth:`PruningSchedule.accumulate_from_grads`. Under DDP
``.grad`` then holds the gradient averaged over ranks, so every rank accumulates the importance
of the global batch and prunes exactly what a single process would; the hooks would see each
rank's local gradient instead, and Taylor's ``mean |g|`` of local gradients is not that of the
global one. A single process uses the same mode, so both are one computation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..compress import PruningSchedule
from .config import PruningConfig
from .errors import CheckpointError, TrainConfigError

__all__ = ["build_schedule", "restore_schedule"]


def _options(config: PruningConfig) -> dict[str, Any]:
    return {"method": config.method, "selection": config.selection,
            "optimizer_state": config.optimizer_state, "importance_source": "grads"}


def build_schedule(model: nn.Module, config: PruningConfig, total_steps: int) -> PruningSchedule:
    """The schedule for a fresh stage of ``total_steps`` updates.

    Raises:
        TrainConfigError: the targets do not fit the model, or the last event would not fire
            before the stage ends (the stage must end in its target shape).
    """
    spread = {"total_steps": total_steps, "prune_fraction": config.prune_fraction,
              "interval": config.interval}
    try:
        if config.mode == "width":
            schedule = PruningSchedule.width(
                model, heads=config.heads, ffn=config.ffn, embedding_rank=config.embedding_rank,
                num_events=config.num_events, **spread, **_options(config))
        elif config.mode == "depth":
            schedule = PruningSchedule.depth(model, layers=config.layers, **spread,
                                             **_options(config))
        else:
            schedule = PruningSchedule.one_step(
                model, at_step=config.at_step, layers=config.layers, heads=config.heads,
                ffn=config.ffn, embedding_rank=config.embedding_rank, **_options(config))
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"pruning: {exc}") from exc
    last = schedule.events[-1].step if schedule.events else 0
    if last >= total_steps:
        if schedule.tracker is not None:
            schedule.tracker.detach()
        raise TrainConfigError(f"pruning: the last event fires after {last} updates but the "
                               f"stage has only {total_steps}; lower prune_fraction/interval/"
                               "at_step or train longer")
    return schedule


def restore_schedule(model: nn.Module, config: PruningConfig, state: dict[str, Any]
                     ) -> PruningSchedule:
    """The schedule of a checkpoint, attached to the checkpoint's (already pruned) model.

    The saved events are used as they are (recomputing them from the pruned model would give a
    different trajectory), and so is the importance gathered since the last event.

    Raises:
        CheckpointError: the saved schedule does not fit the model or the configuration.
    """
    try:
        return PruningSchedule.from_state_dict(model, state, **_options(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's pruning schedule cannot be restored: {exc}"
                              ) from exc

