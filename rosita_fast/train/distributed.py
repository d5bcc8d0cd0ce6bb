"""Process-group setup for data-parallel training launched by ``torchrun``.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address for every process; :func:`init_distributed` joins the group (gloo on CPU, nccl on GPU).
A plain ``python`` launch is a world of one and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the (possibly single-process) job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when gradients are averaged over several processes."""
        return self.world_size > 1

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` as a list on rank 0 (``None`` elsewhere)."""
        if not self.distributed:
            return [value]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of ``tensor`` over all ranks, as a new tensor (``tensor``
        itself in a single process). A collective: every rank must call it, in the same order."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()  # all_reduce works in place; the caller's stays intact
        dist.all_reduce(total)
        return total / self.world_size

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if there is one; return this process's context.

    Idempotent: an already initialised default group (e.g. from an earlier stage of the same
    job) is reused. The backend is nccl when training on CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, target)
    return DistContext(0, 1, 0, target)


def shutdown_distributed() -> None:
    """Leave the process group (call once at the end of a ``torchrun`` job)."""
    if dist.is_initialized():
        dist.destroy_process_group()
