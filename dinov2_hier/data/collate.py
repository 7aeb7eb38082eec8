"""Batch collation: crop-major stacking, iBOT masks, and dropping of unreadable items."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .masking import BlockMaskGenerator, masked_patch_budget, sample_masks
from .photometric import stack_photometric


class CollateError(ValueError):
    """An item lacks a field the collator needs or has crops of the wrong shape."""


def _photometric_field(ok: Sequence[dict], key: str = "photometric") -> dict:
    """``{key: crop-major params}`` when the items carry photometric params under ``key``
    (``crops.photometric=device``), else ``{}``; a mix of both kinds is an error."""
    carrying = sum(key in item for item in ok)
    if carrying == 0:
        return {}
    if carrying != len(ok):
        raise CollateError(f"{carrying} of {len(ok)} items carry {key} params; all or none must")
    return {key: stack_photometric([item[key] for item in ok])}


def _crop_major(ok: Sequence[dict], key: str, n: int, size: int | None) -> torch.Tensor:
    """The items' ``n`` crops under ``key`` stacked crop-major: crop 0 of every item, then
    crop 1, ...; their side must be ``size`` when given."""
    for item in ok:
        crops = item.get(key)
        if crops is None or len(crops) != n:
            have = 0 if crops is None else len(crops)
            raise CollateError(f"item for '{item.get('path')}' has {have} {key.replace('_', ' ')}, expected {n}")
    stacked = torch.stack([item[key][j] for j in range(n) for item in ok])
    if size is not None and tuple(stacked.shape[-2:]) != (size, size):
        raise CollateError(f"{key} are {tuple(stacked.shape[-2:])}, expected {size} x {size}")
    return stacked


class GlobalCropsCollator:
    """Turn a list of dataset items into a training batch.

    Output (``B`` readable items, ``N = h * w`` patches per crop, ``S`` crop side):

    - ``global_crops`` float ``[2B, 3, S, S]``, crop-major: crop 0 of every image, then crop 1;
      with ``crops.photometric=device`` items (uint8 crops plus ``photometric`` params)
      uint8, and ``photometric`` = their parameter rows stacked crop-major (``[2B, ...]``,
      see :mod:`~dinov2_hier.data.photometric`), applied later on the training device;
    - only with ``local_crops_number = nL > 0``: ``local_crops`` float ``[nL*B, 3, s, s]``
      (``s = local_crops_size``), crop-major like the global crops (local crop 0 of every
      image, then local crop 1, ...), in device mode uint8 with ``local_photometric`` rows
      ``[nL*B, ...]``; with ``nL = 0`` neither key exists (the batch is exactly as without
      local crops). Local crops get no masks;
    - ``labels`` ``list[str|None]``, ``datasets`` ``list[str|None]``, ``paths`` ``list[str]``,
      ``draw_ids`` ``list[int]`` (length B);
    - ``masks`` bool ``[2B, N]``; ``mask_indices`` long ``[M]`` = flat indices of the masked
      patches in ``masks.flatten()`` (``2B * N`` positions) followed by padding, so that
      ``M`` = :func:`~dinov2_hier.data.masking.masked_patch_budget` for ``2B`` crops is
      the same every step; ``masks_weight`` float ``[M]``, ``1 / (number of masked
      patches of that crop)`` so each masked crop weighs 1 in the iBOT loss, and 0 on the
      padding (whose index is 0, a real position, so gathers stay in range);
      ``n_masked_patches`` = the number of real masked patches (``<= M``);
    - ``n_drawn`` items received (readable or not), ``skipped`` paths of unreadable items,
      ``skipped_errors`` their error messages.

    Masks are a pure function of ``(seed, draw_id of the first item received)``, so they do
    not depend on worker count or on which items of the batch were unreadable.
    An all-unreadable batch gives ``B = 0`` (``global_crops`` ``[0, 3, S, S]`` with
    ``S = crop_size``, or 0 when ``crop_size`` is not given, and likewise ``local_crops``
    ``[0, 3, s, s]`` when ``nL > 0``; float and without ``photometric`` in either mode:
    there is nothing left to augment). Every item must carry exactly ``nL`` local crops.
    """

    def __init__(
        self,
        patch_grid: Sequence[int],
        mask_ratio: Sequence[float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        seed: int = 0,
        crop_size: int | None = None,
        mask_generator: BlockMaskGenerator | None = None,
        local_crops_number: int = 0,
        local_crops_size: int | None = None,
    ) -> None:
        self.patch_grid = (int(patch_grid[0]), int(patch_grid[1]))
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.mask_probability = float(mask_probability)
        self.seed = int(seed)
        self.crop_size = crop_size
        self.local_crops_number = int(local_crops_number)
        self.local_crops_size = local_crops_size
        self.mask_generator = mask_generator if mask_generator is not None else BlockMaskGenerator(self.patch_grid)
        # Validate the ratio range now rather than on the first batch.
        sample_masks(0, self.patch_grid, self.mask_ratio, self.mask_probability,
                     rng=np.random.default_rng(0), mask_generator=self.mask_generator)

    def __call__(self, items: Sequence[dict]) -> dict:
        if len(items) == 0:
            raise CollateError("cannot collate an empty list of items")
        for item in items:
            if "draw_id" not in item:
                raise CollateError(f"item for '{item.get('path')}' has no 'draw_id' (keys: {sorted(item)})")
        ok = [item for item in items if "error" not in item]
        bad = [item for item in items if "error" in item]
        n_patches = self.patch_grid[0] * self.patch_grid[1]

        local: dict = {}
        if ok:
            global_crops = _crop_major(ok, "global_crops", 2, self.crop_size)
            if self.local_crops_number:
                local["local_crops"] = _crop_major(ok, "local_crops", self.local_crops_number, self.local_crops_size)
                local.update(_photometric_field(ok, "local_photometric"))
            elif any("local_crops" in item for item in ok):
                raise CollateError("items carry local crops but the collator was built for none (local_crops_number=0)")
        else:
            s = self.crop_size or 0
            global_crops = torch.zeros((0, 3, s, s), dtype=torch.float32)
            if self.local_crops_number:
                s = self.local_crops_size or 0
                local["local_crops"] = torch.zeros((0, 3, s, s), dtype=torch.float32)

        rng = np.random.default_rng([self.seed, int(items[0]["draw_id"])])
        masks_np = sample_masks(
            len(global_crops), self.patch_grid, self.mask_ratio, self.mask_probability,
            rng=rng, mask_generator=self.mask_generator,
        )
        masks = torch.from_numpy(masks_np).reshape(len(global_crops), n_patches)
        mask_indices = masks.flatten().nonzero().flatten()
        per_crop = masks.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
        masks_weight = (1.0 / per_crop).expand_as(masks)[masks]
        n_masked = int(mask_indices.numel())
        budget = masked_patch_budget(len(global_crops), self.patch_grid, self.mask_ratio, self.mask_probability)
        if n_masked > budget:  # cannot happen with sample_masks; guards a changed generator
            raise CollateError(f"{n_masked} masked patches exceed the buffer of {budget}")
        mask_indices = torch.cat([mask_indices, mask_indices.new_zeros(budget - n_masked)])
        masks_weight = torch.cat([masks_weight, masks_weight.new_zeros(budget - n_masked)])

        return {
            "global_crops": global_crops,
            "labels": [item.get("label") for item in ok],
            "datasets": [item.get("dataset") for item in ok],
            "paths": [item.get("path") for item in ok],
            "draw_ids": [int(item["draw_id"]) for item in ok],
            "masks": masks,
            "mask_indices": mask_indices,
            "masks_weight": masks_weight,
            "n_masked_patches": n_masked,
            "n_drawn": len(items),
            "skipped": [item.get("path") for item in bad],
            "skipped_errors": [str(item["error"]) for item in bad],
            **_photometric_field(ok),
            **local,
        }
