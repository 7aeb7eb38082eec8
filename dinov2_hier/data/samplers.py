"""Infinite, resumable, rank-sharded samplers that name every draw by its global position:
``InfiniteSampler`` over the whole dataset, ``LabelledShareSampler`` with a fixed labelled share per batch."""
from __future__ import annotations

import math
from typing import Iterator, Literal, Sequence

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


# --------------------------------------------------------------------------------------------
# Labelled / unlabelled share per batch
# --------------------------------------------------------------------------------------------

Balance = Literal["none", "class", "branch"]
BALANCE_MODES: tuple[str, ...] = ("none", "class", "branch")

# Stream ids mixed into the seeds, so the labelled and unlabelled pools never share randomness
# (and neither coincides with InfiniteSampler's ``(seed, epoch)`` permutations).
LABELLED_STREAM = 1
UNLABELLED_STREAM = 2
# Draws per deterministic chunk of a weighted (balanced) stream.
BALANCED_CHUNK = 4096


def labelled_per_batch_from_fraction(batch_size: int, fraction: float) -> int:
    """Labelled slots per batch for a labelled ``fraction`` of the batch.

    ``round(batch_size * fraction)`` (halves round up), clamped to ``[0, batch_size]``.
    ``fraction`` must be a finite number; ``None`` (no labelled share) is the caller's business.
    """
    if batch_size < 1:
        raise SamplerConfigError(f"batch_size must be >= 1, got {batch_size}")
    if fraction is None or isinstance(fraction, bool):
        raise SamplerConfigError(f"fraction must be a number, got {fraction!r}")
    fraction = float(fraction)
    if not math.isfinite(fraction):
        raise SamplerConfigError(f"fraction must be finite, got {fraction}")
    count = math.floor(batch_size * fraction + 0.5)
    return int(min(max(count, 0), batch_size))


def _balanced_weights(keys: torch.Tensor) -> torch.Tensor:
    """Weights making every distinct value of ``keys`` equally likely, uniform within a value."""
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    return 1.0 / counts.to(torch.float64)[inverse]


class LabelledShareSampler(Sampler):
    """Yields ``(index, draw_id)`` forever, with a fixed labelled share in every batch.

    ``labels[i]`` is the class id of dataset item ``i``, ``-1`` for unlabelled. Use with
    ``DataLoader(batch_size=batch_size, sampler=...)``: in each block of ``batch_size``
    consecutive positions of a rank, the first ``labelled_per_batch`` items come from the
    labelled pool and the rest from the unlabelled pool.

    Each pool is an endless stream. The unlabelled stream (and the labelled one with
    ``balance="none"``) is ``perm_0 ++ perm_1 ++ ...`` over the pool, ``perm_e`` seeded with
    ``(seed, stream_id, e)``; a small labelled pool is oversampled by cycling. With
    ``balance="class"`` (every class equally likely, uniform within a class) or ``"branch"``
    (every value of ``groups[i]`` equally likely, uniform within a group) the labelled stream
    is drawn with replacement in chunks of :data:`BALANCED_CHUNK`, chunk ``c`` by
    ``torch.multinomial`` seeded with ``(seed, stream_id, c)``. Balancing applies to the
    labelled pool only. Stream ids: :data:`LABELLED_STREAM`, :data:`UNLABELLED_STREAM`.

    Rank ``r`` of ``W``, draw ``k`` uses position ``p = start + k``, batch ``b = p // B``,
    slot ``s = p % B`` (``B = batch_size``, ``L = labelled_per_batch``). Labelled slots
    (``s < L``) take labelled-stream position ``(b*L + s)*W + r``, unlabelled slots take
    unlabelled-stream position ``(b*(B-L) + s-L)*W + r``; ranks thus interleave each stream
    without overlap. ``draw_id = r + W*p`` as in :class:`InfiniteSampler`. Every position is
    computed directly (one permutation or chunk), so resuming at any ``start`` is O(pool).
    ``start`` counts items this rank already consumed; keep it a multiple of ``batch_size``
    for DataLoader batches to line up with the blocks (the trainer's ``step * batch_size``).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        labelled_per_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        balance: Balance = "none",
        groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        labels_t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels_t.numel() < 1:
            raise SamplerConfigError("labels is empty (empty dataset?)")
        if bool((labels_t < -1).any()):
            raise SamplerConfigError(f"labels must be class ids >= 0 or -1 (unlabelled), got {int(labels_t.min())}")
        if batch_size < 1:
            raise SamplerConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= labelled_per_batch <= batch_size:
            raise SamplerConfigError(
                f"labelled_per_batch must be in [0, batch_size={batch_size}], got {labelled_per_batch}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise SamplerConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise SamplerConfigError(f"seed must be >= 0, got {seed}")
        if balance not in BALANCE_MODES:
            raise SamplerConfigError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")

        self.size = int(labels_t.numel())
        self.batch_size = int(batch_size)
        self.labelled_per_batch = int(labelled_per_batch)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.balance = balance

        is_labelled = labels_t >= 0
        self.labelled_indices = torch.nonzero(is_labelled).reshape(-1)
        self.unlabelled_indices = torch.nonzero(~is_labelled).reshape(-1)
        n_lab, n_unl = self.labelled_indices.numel(), self.unlabelled_indices.numel()
        if self.labelled_per_batch > 0 and n_lab == 0:
            raise SamplerConfigError(
                f"labelled_per_batch={self.labelled_per_batch} but no item is labelled "
                "(every label is -1): set labelled_per_batch=0 or provide labels"
            )
        if self.labelled_per_batch < self.batch_size and n_unl == 0:
            raise SamplerConfigError(
                f"{self.batch_size - self.labelled_per_batch} unlabelled slots per batch but every item "
                f"is labelled: set labelled_per_batch=batch_size={self.batch_size}"
            )

        if groups is not None:
            groups_t = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
            if groups_t.numel() != self.size:
                raise SamplerConfigError(f"groups has {groups_t.numel()} entries, labels has {self.size}")
        elif balance == "branch":
            raise SamplerConfigError("balance='branch' needs groups (one group id per item)")
        self.weights: torch.Tensor | None = None  # over labelled_indices, for balanced modes
        if balance != "none" and n_lab > 0:
            keys = labels_t if balance == "class" else groups_t
            self.weights = _balanced_weights(keys[self.labelled_indices])
        self._labelled_list = self.labelled_indices.tolist()
        self._unlabelled_list = self.unlabelled_indices.tolist()
        self.set_start(start)

    def set_start(self, start: int) -> None:
        """Resume after ``start`` items consumed by this rank (takes effect at the next ``iter``)."""
        if start < 0:
            raise SamplerConfigError(f"start must be >= 0, got {start}")
        self.start = int(start)

    # -- position arithmetic -----------------------------------------------------------------

    def stream_position(self, position: int) -> tuple[int, int]:
        """``(stream_id, stream position)`` used by this rank's ``position`` (= start + k)."""
        b, s = divmod(int(position), self.batch_size)
        lab = self.labelled_per_batch
        if s < lab:
            q = b * lab + s
            stream = LABELLED_STREAM
        else:
            q = b * (self.batch_size - lab) + s - lab
            stream = UNLABELLED_STREAM
        return stream, q * self.world_size + self.rank

    def _block(self, stream: int, block: int) -> list[int]:
        """Dataset indices of permutation ``block`` (or balanced chunk ``block``) of ``stream``."""
        if stream == LABELLED_STREAM and self.weights is not None:
            draws = torch.multinomial(
                self.weights, BALANCED_CHUNK, replacement=True,
                generator=torch_generator(self.seed, stream, block),
            )
            return self.labelled_indices[draws].tolist()
        pool = self._labelled_list if stream == LABELLED_STREAM else self._unlabelled_list
        perm = torch.randperm(len(pool), generator=torch_generator(self.seed, stream, block))
        return [pool[j] for j in perm.tolist()]

    def _block_length(self, stream: int) -> int:
        if stream == LABELLED_STREAM:
            return BALANCED_CHUNK if self.weights is not None else len(self._labelled_list)
        return len(self._unlabelled_list)

    def stream_item(self, stream: int, q: int) -> int:
        """Dataset index at position ``q`` of ``stream`` (one permutation or chunk of work)."""
        block, offset = divmod(int(q), self._block_length(stream))
        return self._block(stream, block)[offset]

    def item_at(self, position: int) -> tuple[int, int]:
        """``(index, draw_id)`` this rank yields at ``position`` (= start + k), computed directly."""
        stream, q = self.stream_position(position)
        return self.stream_item(stream, q), self.rank + self.world_size * int(position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cache: dict[int, tuple[int, list[int]]] = {}  # stream -> (block number, block)
        p = self.start
        while True:
            stream, q = self.stream_position(p)
            block, offset = divmod(q, self._block_length(stream))
            cached = cache.get(stream)
            if cached is None or cached[0] != block:
                cached = (block, self._block(stream, block))
                cache[stream] = cached
            yield cached[1][offset], self.rank + self.world_size * p
            p += 1
