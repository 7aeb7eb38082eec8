"""Parameter groups (layer-wise LR decay, no weight decay on norms/biases/LayerScale)
and the AdamW optimizer built from them."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import ConfigError

_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED_NAMES = ("patch_embed", "cls_token", "pos_embed", "mask_token", "register_tokens")


@dataclass(frozen=True)
class ParamMultipliers:
    lr_mult: float
    wd_mult: float
    is_last_layer: bool


def backbone_layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings, ``i + 1`` for ``blocks.i``, ``n_blocks + 1`` for everything after."""
    if any(part in name for part in _EMBED_NAMES):
        return 0
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return n_blocks + 1


def param_multipliers(
    name: str, param: nn.Parameter, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float
) -> ParamMultipliers:
    """Multipliers of one student parameter.

    ``name`` contains ``backbone.`` for backbone parameters
    (``student.backbone.blocks.3.attn.qkv.weight``); anything else (DINO/iBOT heads,
    supervised heads) sits above the last block (layer id ``n_blocks + 1``, multiplier 1).
    """
    if "backbone." in name:
        layer_id = backbone_layer_id(name.split("backbone.", 1)[1], n_blocks)
    else:
        layer_id = n_blocks + 1
    lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id)
    if "patch_embed" in name:
        lr_mult *= patch_embed_lr_mult
    no_wd = name.endswith(".bias") or "norm" in name or ".gamma" in name or param.ndim == 1
    return ParamMultipliers(lr_mult=lr_mult, wd_mult=0.0 if no_wd else 1.0, is_last_layer="last_layer" in name)


def build_param_groups(
    student: nn.Module, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float
) -> list[dict]:
    """One group per distinct (lr_mult, wd_mult, is_last_layer); each group carries its
    multipliers so the step can set ``lr`` and ``weight_decay`` from the schedules."""
    groups: dict[ParamMultipliers, dict] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        mult = param_multipliers(name, param, n_blocks, layerwise_decay, patch_embed_lr_mult)
        group = groups.setdefault(
            mult,
            {
                "params": [],
                "names": [],
                "lr_mult": mult.lr_mult,
                "wd_mult": mult.wd_mult,
                "is_last_layer": mult.is_last_layer,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, last_layer_lr: float, wd: float) -> None:
    """Set each group's lr and weight decay for the coming step."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_mult"]
        group["weight_decay"] = wd * group["wd_mult"]


def build_optimizer(param_groups: list[dict], betas: tuple[float, float], fused: bool) -> torch.optim.AdamW:
    # The names are kept for debugging but AdamW must not see them as hyper-parameters.
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups]
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), fused=fused)


def clip_grad_per_module(cfg: DictConfig) -> bool:
    """``optim.clip_grad_mode``: ``per_module`` (True: each module's gradient norm is clipped
    on its own, as DINOv2) or ``global`` (False); configs saved before the key existed
    clipped globally."""
    mode = OmegaConf.select(cfg, "optim.clip_grad_mode", default="global")
    if mode not in ("per_module", "global"):
        raise ConfigError(f"optim.clip_grad_mode must be per_module or global, got {mode!r}")
    return mode == "per_module"
