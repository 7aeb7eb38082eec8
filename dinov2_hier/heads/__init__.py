"""Classification heads trained on frozen backbone features.

* :mod:`dinov2_hier.heads.constrained`: biologically constrained multi-label classification
  (learnable relation matrix, MC-dropout uncertainty, adaptive thresholds, decoding that
  never predicts an exclusive pair): training, prediction, saving; the head itself is
  :mod:`dinov2_hier.heads.constrained_head`, its loss :mod:`dinov2_hier.heads.constrained_loss`.
"""
from __future__ import annotations

from dinov2_hier.heads.constrained import (
    CONSTRAINT_MODES,
    THRESHOLD_MODES,
    ConstrainedConfig,
    ConstrainedHeadError,
    ConstrainedMultiLabelHead,
    FitResult,
    MultiLabelPrediction,
    decode_exclusive,
    fit_constrained_head,
    impossible_mask,
    load_head,
    predict,
    save_head,
)

__all__ = [
    "CONSTRAINT_MODES",
    "THRESHOLD_MODES",
    "ConstrainedConfig",
    "ConstrainedHeadError",
    "ConstrainedMultiLabelHead",
    "FitResult",
    "MultiLabelPrediction",
    "decode_exclusive",
    "fit_constrained_head",
    "impossible_mask",
    "load_head",
    "predict",
    "save_head",
]
