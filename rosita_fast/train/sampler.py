"""The data order: one seeded permutation per epoch, split across ranks, resumable mid-epoch.

Every rank shuffles with the same generator seeded by ``seed + epoch`` (torch's
``DistributedSampler``) and takes every ``W``-th index. Rank ``r``'s ``k``-th local batch of ``b``
items therefore holds positions ``W*k*b .. W*(k+1)*b - 1`` of the permutation, interleaved: the
``W`` local batches of a step together are exactly the ``k``-th global batch of a single-process
run with batch ``W*b``. The whole order is a function of ``(seed, epoch)``, so the data-order
state saved in a checkpoint is just the epoch and the number of batches already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled, incomplete tail dropped) that can skip a prefix.

    Args:
        dataset: the training set.
        local_batch_size: items per rank per step.
        rank, world_size: this process and the number of processes.
        seed: data-order seed.
    """

    def __init__(
        self, dataset: Sized, *, local_batch_size: int, rank: int, world_size: int, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.local_batch_size = local_batch_size
        self.skip_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        """Complete steps per epoch (the method skips the incomplete last batch)."""
        return self.num_samples // self.local_batch_size

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Start the next iteration at ``epoch``, after its first ``skip_batches`` batches."""
        self.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        usable = self.batches_per_epoch * self.local_batch_size
        return iter(indices[self.skip_batches * self.local_batch_size : usable])

    def __len__(self) -> int:
        return max(0, (self.batches_per_epoch - self.skip_batches) * self.local_batch_size)
