"""An infinite, resumable, rank-sharded sampler that names every draw by its global position."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from .seeding import torch_generator


class SamplerConfigError(ValueError):
    """A sampler argument is out of range."""


def epoch_permutation(size: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Order of the dataset in ``epoch``: ``randperm(size)`` seeded with ``(seed, epoch)``,
    or ``arange(size)`` without shuffling. Long tensor ``[size]``."""
    if not shuffle:
        return torch.arange(size)
    return torch.randperm(size, generator=torch_generator(seed, epoch))


class InfiniteSampler(Sampler):
    """Yields ``(index, draw_id)`` forever.

    The global stream is ``perm_0 ++ perm_1 ++ ...`` with ``perm_e = epoch_permutation(size,
    seed, e)``; position ``g`` of the stream holds ``perm_{g // size}[g % size]``. Rank ``r``
    of ``world_size`` takes positions ``g = r + world_size * (start + k)`` for ``k = 0, 1, ...``
    and yields ``(stream[g], g)``, so ranks never share a position, together they cover the
    stream exactly, and ``draw_id = g`` seeds the item's augmentation. ``start`` is the number
    of items this rank has already consumed: resuming costs one permutation, not ``start`` draws.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        super().__init__()
        if size < 1:
            raise SamplerConfigError(f"size must be >= 1 (empty dataset?), got {size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SamplerConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise SamplerConfigError(f"seed must be >= 0, got {seed}")
        self.size = int(size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.set_start(start)

    def set_start(self, start: int) -> None:
        """Resume after ``start`` items consumed by this rank (takes effect at the next ``iter``)."""
        if start < 0:
            raise SamplerConfigError(f"start must be >= 0, got {start}")
        self.start = int(start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.rank + self.world_size * self.start
        epoch, perm = -1, torch.empty(0, dtype=torch.long)
        while True:
            if g // self.size != epoch:
                epoch = g // self.size
                perm = epoch_permutation(self.size, self.seed, epoch, self.shuffle)
            yield int(perm[g % self.size]), g
            g += self.world_size
