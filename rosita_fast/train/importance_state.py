"""Saving, restoring and averaging across ranks the importance accumulated between events.

``ImportanceTracker`` (rosita_fast.compress) has no public API for either yet, and the trainer
needs both: a run resumed between two pruning events must prune on the same scores as an
uninterrupted one, and under data parallelism every rank must prune the same units. Until the
tracker grows ``state_dict``/``load_state_dict`` and a cross-rank reduction, this module is the
one place that reads its accumulators (``_sums``/``_counts`` for Taylor, the masks' gradients
for the mask estimator); each function checks that they are still there.

Under data parallelism the tracker's gradient hooks see each rank's *local* gradient, before
DDP averages it. Averaging the accumulators over ranks before an event makes the ranks agree;
for the mask estimator (linear in the gradient) the result equals a single-process run on the
same global batches, for Taylor (``|w| * mean|g|``) it is the mean over ranks of the per-rank
``|g|`` and so differs from a single-process run's ``|g|`` of the averaged gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..compress import ImportanceTracker

__all__ = ["all_reduce_importance_", "importance_state", "load_importance_state_"]


def _parts(tracker: ImportanceTracker) -> tuple[list[torch.Tensor], list[list[int]]]:
    try:
        counts = tracker._counts
        if tracker.method == "taylor":
            tensors = [t for layer in tracker._sums for t in layer]
        else:
            tensors = [m for pair in tracker._masks for m in pair]
    except AttributeError as exc:  # the tracker's internals changed: fail loudly, not silently
        raise RuntimeError("ImportanceTracker internals changed; update "
                           "rosita_fast/train/importance_state.py") from exc
    return tensors, counts


def _accumulator(tensor: torch.Tensor, method: str) -> torch.Tensor | None:
    # Taylor sums are plain tensors; the mask estimator accumulates in the masks' .grad.
    return tensor if method == "taylor" else tensor.grad


def importance_state(tracker: ImportanceTracker | None) -> dict[str, Any] | None:
    """The tracker's accumulated sums and counts (CPU copies), or ``None`` without a tracker."""
    if tracker is None:
        return None
    tensors, counts = _parts(tracker)
    sums = []
    for t in tensors:
        acc = _accumulator(t, tracker.method)
        sums.append(None if acc is None else acc.detach().cpu().clone())
    return {"method": tracker.method, "sums": sums, "counts": [list(c) for c in counts]}


def load_importance_state_(tracker: ImportanceTracker | None, state: dict[str, Any] | None) -> None:
    """Put :func:`importance_state` output back into a tracker attached to the same shapes."""
    if tracker is None or state is None:
        if (tracker is None) != (state is None):
            raise ValueError("importance state and tracker presence disagree (was the "
                             "checkpoint written with a different pruning configuration?)")
        return
    tensors, counts = _parts(tracker)
    if state["method"] != tracker.method or len(state["sums"]) != len(tensors) \
            or len(state["counts"]) != len(counts):
        raise ValueError("saved importance accumulators do not match the tracker")
    with torch.no_grad():
        for t, saved in zip(tensors, state["sums"], strict=True):
            if saved is None:
                continue
            if tracker.method == "taylor":
                t.copy_(saved.to(t.device))
            else:
                t.grad = saved.to(t.device).clone()
    for live, saved in zip(counts, state["counts"], strict=True):
        live[:] = saved


def all_reduce_importance_(tracker: ImportanceTracker | None) -> None:
    """Average the accumulators over all ranks (no-op outside a process group)."""
    if tracker is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tensors, _ = _parts(tracker)
    for t in tensors:
        acc = _accumulator(t, tracker.method)
        if acc is None:  # a mask no backward reached yet: its accumulated gradient is zero
            acc = t.grad = torch.zeros_like(t)
        dist.all_reduce(acc, op=dist.ReduceOp.SUM)
        acc.div_(dist.get_world_size())
