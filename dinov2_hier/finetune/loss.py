"""The classifier head and loss of a fine-tuning run, from the supervised-term registry
(:func:`dinov2_hier.losses.supervised.build_supervised_terms`) with a linear head.

Without a hierarchy the classes become the leaves of a one-level tree, so ``ce`` works on
any labels; ``hierce`` needs a real hierarchy. The head's outputs are the tree's leaves
(``[B, num_leaves]``); targets are node indices (a coarse label is an internal node: CE
skips it, HierCE uses it).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinov2_hier.errors import UserError
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.class_weights import balanced_class_weights
from dinov2_hier.losses.supervised import build_supervised_terms

__all__ = ["LOSSES", "FinetuneError", "FinetuneLoss", "flat_hierarchy", "leaf_class_weights"]

LOSSES = ("ce", "hierce")
_FLAT_ROOT = "__all_classes__"


class FinetuneError(UserError, ValueError):
    """Bad fine-tuning input (mode, loss, labels, options): one line, exit code 2."""


def flat_hierarchy(classes: Sequence[str]) -> Hierarchy:
    """A one-level tree whose leaves are ``classes`` in order."""
    return Hierarchy.from_dict({"name": "flat", "root": {"id": _FLAT_ROOT, "children": [{"id": c} for c in classes]}})


class FinetuneLoss(nn.Module):
    """Head ``[B, D] -> leaf logits [B, L]`` and the loss.

    ``forward(logits, targets)``: ``targets`` long ``[B]`` node indices (hard) or float
    ``[B, L]`` soft leaf targets (mixup; CE only: ``-sum_c w_c p_c log q_c``, averaged over
    the batch, ``w`` the class weights or 1).
    """

    def __init__(self, name: str, hierarchy: Hierarchy, embed_dim: int,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if name not in LOSSES:
            raise FinetuneError(f"--loss must be one of {', '.join(LOSSES)}, got {name!r}")
        entry: dict[str, Any] = {"name": name, "head": "linear"}
        if class_weights is not None:
            if name != "ce":
                raise FinetuneError("--class-weights applies to --loss ce only")
            entry["class_weights"] = list(class_weights)
        terms, _ = build_supervised_terms([entry], hierarchy, embed_dim)
        self.name, self.hierarchy = name, hierarchy
        self.term = terms[name]
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("weights", weights, persistent=False)

    @property
    def head(self) -> nn.Module:
        return self.term.head

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            if self.name != "ce":
                raise FinetuneError("mixup (soft targets) needs --loss ce")
            return F.cross_entropy(logits.float(), targets, weight=self.weights)
        return self.term.criterion(logits.float(), targets)


def leaf_class_weights(hierarchy: Hierarchy, train_labels: Sequence[str]) -> list[float]:
    """Balanced weights (:func:`balanced_class_weights`) over the leaves seen in
    ``train_labels``, in leaf order; leaves without a training sample (never a target) get 1."""
    leaves = [label for label in train_labels if hierarchy.is_leaf(label)]
    if not leaves:
        raise FinetuneError("--class-weights balanced: no training label is a leaf class")
    seen = sorted(set(leaves), key=hierarchy.index)
    weights = dict(zip(seen, balanced_class_weights(leaves, seen)))
    return [weights.get(leaf, 1.0) for leaf in hierarchy.leaves]
