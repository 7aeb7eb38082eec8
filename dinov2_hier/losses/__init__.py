"""Losses: self-supervised (DINO, iBOT, KoLeo) and their teacher normalisations."""
from __future__ import annotations

from dinov2_hier.losses.centering import LossInputError, SoftmaxCentering, sinkhorn_knopp
from dinov2_hier.losses.ssl import DINOLoss, KoLeoLoss, iBOTPatchLoss

__all__ = [
    "DINOLoss",
    "KoLeoLoss",
    "LossInputError",
    "SoftmaxCentering",
    "iBOTPatchLoss",
    "sinkhorn_knopp",
]
