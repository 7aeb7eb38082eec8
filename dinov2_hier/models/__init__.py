"""Backbones (DINOv2-layout ViT), projection heads and safe weight loading."""
from __future__ import annotations

from dinov2_hier.models.heads import DINOHead
from dinov2_hier.models.vision_transformer import (
    VisionTransformer,
    build_backbone,
    interpolate_pos_embed,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from dinov2_hier.models.weights import (
    LoadReport,
    WeightsError,
    extract_backbone_state_dict,
    load_backbone_weights,
    read_state_dict,
)

__all__ = [
    "DINOHead",
    "LoadReport",
    "VisionTransformer",
    "WeightsError",
    "build_backbone",
    "extract_backbone_state_dict",
    "interpolate_pos_embed",
    "load_backbone_weights",
    "read_state_dict",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
