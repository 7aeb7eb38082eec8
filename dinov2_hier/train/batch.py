"""A collated batch -> the training device, finishing the photometric augmentations there."""
from __future__ import annotations

import torch

from ..data import GlobalCropsAugmentation

#: Batch entries the step reads as device tensors.
DEVICE_KEYS = ("global_crops", "masks", "mask_indices", "masks_weight", "targets")


def batch_to_device(batch: dict, device: torch.device, augmentation: GlobalCropsAugmentation) -> dict:
    """A copy of ``batch`` with its tensors on ``device`` (``non_blocking``: pinned memory
    overlaps the copy with compute).

    A batch collated with ``crops.photometric=device`` holds uint8 ``global_crops``
    ``[2B, 3, S, S]`` and ``photometric`` parameter rows; their ops then run here on the
    whole batch (``augmentation.photometric_batch``) and ``global_crops`` becomes the
    float32 normalised result, exactly what the loader path delivers, while
    ``photometric`` is dropped. The parameters stay on the CPU: the op reads which crops
    each op touches from them without waiting for the device.
    """
    moved = dict(batch)
    for key in DEVICE_KEYS:
        if isinstance(moved.get(key), torch.Tensor):
            moved[key] = moved[key].to(device, non_blocking=True)
    params = moved.pop("photometric", None)
    if params is not None:
        moved["global_crops"] = augmentation.photometric_batch(moved["global_crops"], params)
    return moved
