"""Supervised fine-tuning of a pretrained backbone (issue 22, item 1): the model, its
optimizer groups with layer-wise LR decay, mixup, the loss and the per-fold training loop
with atomic epoch checkpoints and resume.

This package holds no folds, metrics files or command line: the face is
``python -m eval.finetune`` (:mod:`eval.finetune`), which needs ``eval/``'s folds and
``predictions.csv`` writer and therefore lives above ``eval/`` in the floors
(docs/architecture.md).
"""
from __future__ import annotations

from .loop import FinetuneConfig, predict, train_fold
from .loss import FinetuneError, FinetuneLoss, flat_hierarchy, leaf_class_weights
from .mixup import mixup_batch
from .model import MODES, FinetuneModel, param_groups

__all__ = ["MODES", "FinetuneConfig", "FinetuneError", "FinetuneLoss", "FinetuneModel", "flat_hierarchy",
           "leaf_class_weights", "mixup_batch", "param_groups",
           "predict", "train_fold"]
