"""Patch masks for the iBOT loss: BEiT-style rectangular blocks, DINOv2 per-batch ratios.

All randomness comes from the ``numpy.random.Generator`` passed in, so masks are a pure
function of the caller's seed (the collator seeds it from the batch's first draw id).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


class MaskingConfigError(ValueError):
    """A masking parameter is out of range."""


class BlockMaskGenerator:
    """Rectangular block masks on a ``grid = (h, w)`` patch grid.

    ``__call__(num_masking_patches, rng) -> bool ndarray [h, w]`` places random rectangles
    (area uniform in ``[min_num_patches, max_num_patches]`` patches, aspect ratio h/w
    log-uniform in ``[min_aspect, max_aspect]``) until the target count is reached or a
    round of ``max_attempts`` placements adds nothing. A rectangle is accepted only if
    it adds at least one and at most the still-missing number of patches, so the count
    never exceeds the target; when fewer than ``min_num_patches`` are missing, smaller
    blocks are tried, and the count may still fall a few patches short if none fits.
    """

    def __init__(
        self,
        grid: Sequence[int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        if len(grid) != 2 or min(grid) < 1:
            raise MaskingConfigError(f"grid must be (h, w) with positive sides, got {grid}")
        self.height, self.width = int(grid[0]), int(grid[1])
        self.num_patches = self.height * self.width
        if min_num_patches < 1:
            raise MaskingConfigError(f"min_num_patches must be >= 1, got {min_num_patches}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = self.num_patches if max_num_patches is None else int(max_num_patches)
        if self.max_num_patches < self.min_num_patches:
            raise MaskingConfigError(
                f"max_num_patches ({self.max_num_patches}) < min_num_patches ({self.min_num_patches})"
            )
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise MaskingConfigError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        if max_attempts < 1:
            raise MaskingConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = int(max_attempts)

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try to mask one rectangle adding between 1 and ``budget`` new patches; return how many."""
        for _ in range(self.max_attempts):
            # Below min_num_patches only to fill a remainder smaller than a minimum block.
            area = rng.uniform(min(self.min_num_patches, budget), max(self.min_num_patches, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= self.height and 1 <= w <= self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        if not 0 <= num_masking_patches <= self.num_patches:
            raise MaskingConfigError(
                f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}"
            )
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask


def sample_masks(
    n_crops: int,
    grid: Sequence[int],
    mask_ratio: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    *,
    rng: np.random.Generator,
    mask_generator: BlockMaskGenerator | None = None,
) -> np.ndarray:
    """Masks for a batch of crops: ``bool ndarray [n_crops, h * w]`` (True = masked).

    As in DINOv2: the first ``n_masked = int(n_crops * mask_probability)`` crops are masked,
    crop ``i`` with ratio drawn uniformly in
    ``[lo + (hi - lo) * i / n_masked, lo + (hi - lo) * (i + 1) / n_masked]`` (so the batch
    covers the whole ratio range evenly) and ``int(ratio * h * w)`` target patches; the
    others stay unmasked; then the crop order is shuffled with ``rng``.
    """
    lo, hi = (float(r) for r in mask_ratio)
    if not 0.0 <= lo <= hi <= 1.0:
        raise MaskingConfigError(f"mask_ratio must be (lo, hi) with 0 <= lo <= hi <= 1, got {mask_ratio}")
    if not 0.0 <= mask_probability <= 1.0:
        raise MaskingConfigError(f"mask_probability must be in [0, 1], got {mask_probability}")
    generator = mask_generator if mask_generator is not None else BlockMaskGenerator(grid)
    h, w = int(grid[0]), int(grid[1])
    if (generator.height, generator.width) != (h, w):
        raise MaskingConfigError(f"mask_generator grid {(generator.height, generator.width)} != grid {grid}")
    n_patches = h * w
    masks = np.zeros((n_crops, n_patches), dtype=bool)
    for i, (low, high) in enumerate(_ratio_strata(n_crops, lo, hi, mask_probability)):
        masks[i] = generator(int(n_patches * rng.uniform(low, high)), rng).reshape(-1)
    return masks[rng.permutation(n_crops)]


def _ratio_strata(n_crops: int, lo: float, hi: float, mask_probability: float) -> list[tuple[float, float]]:
    """The mask-ratio interval of each masked crop (see :func:`sample_masks`)."""
    n_masked = int(n_crops * mask_probability)
    return [(lo + (hi - lo) * i / n_masked, lo + (hi - lo) * (i + 1) / n_masked) for i in range(n_masked)]


def masked_patch_budget(
    n_crops: int, grid: Sequence[int], mask_ratio: Sequence[float] = (0.1, 0.5), mask_probability: float = 0.5
) -> int:
    """The most patches :func:`sample_masks` can mask in a batch of ``n_crops`` crops.

    Crop ``i`` masks at most ``int(h * w * high_i)`` patches, ``high_i`` the top of its
    ratio stratum; the strata make the batch total nearly constant, so a buffer of this
    size wastes about ``h * w * (hi - lo) / 2`` rows per batch. A fixed-size buffer of
    masked patches gives the iBOT heads and losses the same shapes every step (no
    recompilation, no host synchronisation on the count).
    """
    lo, hi = (float(r) for r in mask_ratio)
    n_patches = int(grid[0]) * int(grid[1])
    # The 1e-6 absorbs rounding in rng.uniform(low, high), which may return high itself.
    strata = _ratio_strata(n_crops, lo, hi, mask_probability)
    return sum(min(n_patches, math.floor(n_patches * high + 1e-6)) for _, high in strata)
