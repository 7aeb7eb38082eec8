"""Backbones (DINOv2-layout ViT), projection heads, their architecture (:class:`BackboneSpec`)
and safe reading and loading of the files that hold them (:func:`read_artifact`)."""
from __future__ import annotations

from dinov2_hier.models.artifacts import BackboneArtifact, load_backbone_weights, read_artifact
from dinov2_hier.models.heads import DINOHead
from dinov2_hier.models.spec import TEACHER_BACKBONE_PREFIX, BackboneSpec
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
    read_state_dict,
)

__all__ = [
    "TEACHER_BACKBONE_PREFIX",
    "BackboneArtifact",
    "BackboneSpec",
    "DINOHead",
    "LoadReport",
    "VisionTransformer",
    "WeightsError",
    "build_backbone",
    "extract_backbone_state_dict",
    "interpolate_pos_embed",
    "load_backbone_weights",
    "read_artifact",
    "read_state_dict",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
