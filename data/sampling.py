"""The order of training samples and their flips: a pure function of (seed, epoch, rank).

Training must resume exactly, even in the middle of an epoch. A DataLoader that shuffles
draws its order from the global random generator, which the network's dropout also
consumes, so the order depends on everything that ran before. :class:`EpochSampler`
instead draws each epoch's permutation and left-right flips from a generator seeded with
``(seed, epoch)`` alone; a resumed run asks for the same epoch and skips the samples
already seen (:meth:`EpochSampler.start_at`).

It yields ``(index, flip)`` pairs, which ``robust_nifti``'s ``__getitems__`` understands,
so flips are decided here and not in DataLoader worker processes (whose generators would
depend on the number of workers). Under torchrun each rank takes every ``world_size``-th
sample of the shared permutation, as ``DistributedSampler`` does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Shuffled (or serial) sample indices with flip decisions, reproducible per epoch.

    Args:
        n_samples: the dataset's length.
        seed: the run's ``--seed``.
        shuffle: permute the samples (else take them in order, ``--serial_batches``).
        flip: draw a left-right flip per sample with probability 1/2 (else never flip).
        rank, world_size: this process's share under torchrun (0, 1 outside it). Every
            rank gets ``ceil(n_samples / world_size)`` samples; the permutation is padded
            by repeating its start so that ranks take equal steps.
    """

    def __init__(self, n_samples: int, seed: int, shuffle: bool = True, flip: bool = True,
                 rank: int = 0, world_size: int = 1):
        if n_samples < 1:
            raise ValueError("no samples to draw from")
        self.n_samples = n_samples
        self.seed = seed
        self.shuffle = shuffle
        self.flip = flip
        self.rank = rank
        self.world_size = world_size
        self.epoch = 1
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields, from its start."""
        self.epoch = epoch
        self.start = 0

    def start_at(self, position: int) -> None:
        """Skip this rank's first ``position`` samples of the current epoch (a resumed epoch)."""
        self.start = position

    def per_rank(self) -> int:
        return -(-self.n_samples // self.world_size)

    def order(self) -> list[tuple[int, bool]]:
        """This rank's whole epoch: ``[(index, flip), ...]``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            indices = torch.randperm(self.n_samples, generator=generator)
        else:
            indices = torch.arange(self.n_samples)
        flips = torch.rand(self.n_samples, generator=generator) < 0.5
        flips &= self.flip
        total = self.per_rank() * self.world_size
        if total > self.n_samples:  # pad so that every rank takes the same number of steps
            repeat = torch.arange(total - self.n_samples) % self.n_samples
            indices, flips = torch.cat([indices, indices[repeat]]), torch.cat([flips, flips[repeat]])
        mine = slice(self.rank, total, self.world_size)
        return list(zip(indices[mine].tolist(), flips[mine].tolist(), strict=True))

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start
