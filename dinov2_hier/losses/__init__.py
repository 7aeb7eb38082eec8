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

# Supervised losses over a class hierarchy, and the heads + registry that wrap them.
from dinov2_hier.losses.contrastive import HierSupConLoss, SupConLoss
from dinov2_hier.losses.hierarchical import (
    DistanceLoss,
    FlatCELoss,
    HierCELoss,
    MultiLevelCELoss,
    class_at_level_table,
    level_classes,
)
from dinov2_hier.losses.supervised import (
    SUPERVISED_TERMS,
    SupervisedConfigError,
    SupervisedTerm,
    build_supervised_terms,
)

__all__ += [
    "SUPERVISED_TERMS",
    "DistanceLoss",
    "FlatCELoss",
    "HierCELoss",
    "HierSupConLoss",
    "MultiLevelCELoss",
    "SupConLoss",
    "SupervisedConfigError",
    "SupervisedTerm",
    "build_supervised_terms",
    "class_at_level_table",
    "level_classes",
]

# Guided embeddings (issue 22, Gräbel et al.): the guide, its terms, the triplet baseline.
from dinov2_hier.losses.guide import GuideError, generate_guide, growing_dims, load_guide
from dinov2_hier.losses.guided import set_supervised_epoch

__all__ += ["GuideError", "generate_guide", "growing_dims", "load_guide", "set_supervised_epoch"]

# Domain generalisation (issue 21): BoDA, CORAL, gradient reversal, the centroid state.
from dinov2_hier.losses.domain import (
    DomainCentroids,
    boda_loss,
    coral_loss,
    grad_reverse,
    macro_alignment_loss,
)

__all__ += ["DomainCentroids", "boda_loss", "coral_loss", "grad_reverse", "macro_alignment_loss"]
