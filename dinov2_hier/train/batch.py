"""A collated batch -> the training device, finishing the photometric augmentations there."""
from __future__ import annotations

import torch

from ..data import GlobalCropsAugmentation

#: Batch entries the step reads as device tensors.
DEVICE_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight", "targets", "domains")
#: Crops and the key of their photometric parameter rows (``crops.photometric=device``).
PHOTOMETRIC_KEYS = (("global_crops", "photometric"), ("local_crops", "local_photometric"))


def batch_to_device(batch: dict, device: torch.device, augmentation: GlobalCropsAugmentation) -> dict:
    """A copy of ``batch`` with its tensors on ``device`` (``non_blocking``: pinned memory
    overlaps the copy with compute).

    A batch collated with ``crops.photometric=device`` holds uint8 ``global_crops``
    ``[2B, 3, S, S]`` and ``photometric`` parameter rows; their ops then run here on the
    whole batch (``augmentation.photometric_batch``) and ``global_crops`` becomes the
    float32 normalised result, exactly what the loader path delivers, while
    ``photometric`` is dropped. The parameters stay on the CPU: the op reads which crops
    each op touches from them without waiting for the device. Local crops
    (``crops.local_crops_number`` > 0), another size, are a tensor of their own:
    ``local_crops`` with ``local_photometric``, finished the same way in a second call.
    """
    moved = dict(batch)
    for key in DEVICE_KEYS:
        if isinstance(moved.get(key), torch.Tensor):
            moved[key] = moved[key].to(device, non_blocking=True)
    for crops_key, params_key in PHOTOMETRIC_KEYS:
        params = moved.pop(params_key, None)
        if params is not None:
            moved[crops_key] = augmentation.photometric_batch(moved[crops_key], params)
    return moved
