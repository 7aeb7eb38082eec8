"""Mixup through torchvision's ``transforms.v2.MixUp`` (not a copy), made reproducible.

``MixUp`` draws its mixing weight and pairing from torch's global RNG; :func:`mixup_batch`
runs it under ``torch.random.fork_rng`` seeded with the caller's seed, so a step's mix
depends only on that seed (resume reproduces it) and the global RNG is left untouched.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

__all__ = ["mixup_batch"]


def mixup_batch(images: torch.Tensor, targets: torch.Tensor, num_classes: int, alpha: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch.

    Args:
        images: float ``[B, 3, H, W]``.
        targets: long ``[B]`` class indices in ``[0, num_classes)``.
        num_classes: width ``K`` of the soft targets.
        alpha: Beta(alpha, alpha) parameter, > 0.
        seed: seeds the draw (weight and pairing).

    Returns:
        ``(mixed images [B, 3, H, W], soft targets float [B, K])``; each target row sums to 1.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mixed, soft = v2.MixUp(alpha=float(alpha), num_classes=int(num_classes))(images, targets)
    return mixed, soft
