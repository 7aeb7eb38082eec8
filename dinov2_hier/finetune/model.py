"""The fine-tuned classifier: a backbone's CLS token and a head, with the trainable part
set by the mode, and AdamW parameter groups with layer-wise LR decay.

Modes (:data:`MODES`): ``linear`` (backbone frozen, only the head trains), ``partial``
(the last ``blocks`` transformer blocks and the final norm train too) and ``full``
(everything trains).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MODES", "FinetuneModel", "layer_id", "param_groups"]

MODES = ("linear", "partial", "full")


class FinetuneModel(nn.Module):
    """``images float [B, 3, S, S] -> logits [B, K]`` = ``head(backbone(x)["x_norm_clstoken"])``.

    ``head``: any module ``[B, D] -> [B, K]`` (the supervised term's head). The frozen part
    of the backbone runs in eval mode and without gradients.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mode: str = "linear", blocks: int = 0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        depth = len(backbone.blocks)
        if mode == "partial" and not 1 <= blocks <= depth:
            raise ValueError(f"--blocks must be in 1..{depth} (the backbone's depth) for mode partial, got {blocks}")
        self.backbone, self.head, self.mode = backbone, head, mode
        self.first_trainable = {"linear": depth + 1, "partial": depth - blocks, "full": -1}[mode]
        self.head_only(False)
        for p in head.parameters():
            p.requires_grad_(True)

    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone runs frozen now: mode ``linear``, or the head-only phase."""
        return self.mode == "linear" or self._head_only

    def head_only(self, flag: bool = True) -> None:
        """Freeze the whole backbone (eval mode, no gradients) for a head-only phase, or undo it."""
        self._head_only = bool(flag)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not self._head_only and (self.mode == "full" or (self.mode == "partial" and self._trains(name))))

    def _trains(self, name: str) -> bool:
        return layer_id(name, len(self.backbone.blocks)) > self.first_trainable

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, D]`` CLS features."""
        if self.backbone_frozen:
            with torch.no_grad():
                return self.backbone(images)["x_norm_clstoken"]
        return self.backbone(images)["x_norm_clstoken"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def layer_id(name: str, depth: int) -> int:
    """Layer of a backbone parameter for the LR decay: embeddings and tokens 0, block ``i``
    ``i + 1``, the final norm (and anything after) ``depth + 1``."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token")):
        return 0
    return depth + 1


def param_groups(model: FinetuneModel, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: ``lr * layer_decay ** (depth + 1 - layer)``
    (the head at ``lr``), no weight decay on biases, norms, tokens and position embeddings.
    Each group carries ``lr_scale`` for the schedule."""
    depth = len(model.backbone.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    named = [(f"backbone.{n}", layer_id(n, depth), p) for n, p in model.backbone.named_parameters()]
    named += [(f"head.{n}", depth + 1, p) for n, p in model.head.named_parameters()]
    for name, layer, p in named:
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "register_tokens", "mask_token"))
        key = (layer, no_decay)
        if key not in groups:
            scale = float(layer_decay) ** (depth + 1 - layer)
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
