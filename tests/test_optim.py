from __future__ import annotations

import pytest
import torch
from torch import nn

from dinov2_hier.train.optim import apply_schedule, build_optimizer, build_param_groups, param_multipliers


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.qkv = nn.Linear(4, 4)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(4))


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.norm = nn.LayerNorm(4)


def _toy_student() -> nn.Module:
    student = nn.Module()
    student.backbone = _Backbone()
    student.dino_head = nn.Module()
    student.dino_head.mlp = nn.Linear(4, 4)
    student.dino_head.last_layer = nn.Linear(4, 8, bias=False)
    return student


def test_layerwise_decay_multipliers():
    d, n = 0.5, 2
    s = _toy_student()
    named = dict(s.named_parameters())
    m = lambda name: param_multipliers(name, named[name], n, d, patch_embed_lr_mult=0.2)  # noqa: E731
    # layer ids: embeddings 0, blocks.i -> i+1, rest n+1; multiplier d ** (n + 1 - id)
    assert m("backbone.pos_embed").lr_mult == pytest.approx(0.125)
    assert m("backbone.patch_embed.proj.weight").lr_mult == pytest.approx(0.125 * 0.2)
    assert m("backbone.blocks.0.qkv.weight").lr_mult == pytest.approx(0.25)
    assert m("backbone.blocks.1.qkv.weight").lr_mult == pytest.approx(0.5)
    assert m("backbone.norm.weight").lr_mult == pytest.approx(1.0)
    assert m("dino_head.mlp.weight").lr_mult == pytest.approx(1.0)


def test_no_weight_decay_on_norms_biases_layerscale():
    s = _toy_student()
    named = dict(s.named_parameters())
    wd = {k: param_multipliers(k, p, 2, 0.9, 0.2).wd_mult for k, p in named.items()}
    assert wd["backbone.blocks.0.qkv.weight"] == 1.0
    assert wd["backbone.blocks.0.qkv.bias"] == 0.0
    assert wd["backbone.blocks.0.norm1.weight"] == 0.0
    assert wd["backbone.blocks.1.ls1.gamma"] == 0.0
    assert wd["backbone.norm.bias"] == 0.0
    assert wd["dino_head.last_layer.weight"] == 1.0
    last = [k for k, p in named.items() if param_multipliers(k, p, 2, 0.9, 0.2).is_last_layer]
    assert last == ["dino_head.last_layer.weight"]


def test_apply_schedule_sets_group_values_and_freezes_last_layer():
    s = _toy_student()
    groups = build_param_groups(s, n_blocks=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    assert sum(len(g["params"]) for g in groups) == len(list(s.parameters()))
    opt = build_optimizer(groups, (0.9, 0.999), fused=False)
    apply_schedule(opt, lr=0.1, last_layer_lr=0.0, wd=0.04)
    by_name = {}
    for g in opt.param_groups:
        for p in g["params"]:
            by_name[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(s.named_parameters())
    assert by_name[id(named["backbone.blocks.0.qkv.weight"])] == pytest.approx((0.025, 0.04))
    assert by_name[id(named["backbone.blocks.0.qkv.bias"])] == pytest.approx((0.025, 0.0))
    assert by_name[id(named["dino_head.last_layer.weight"])] == pytest.approx((0.0, 0.04))
    assert by_name[id(named["backbone.patch_embed.proj.weight"])] == pytest.approx((0.1 * 0.125 * 0.2, 0.04))


def test_clip_grad_mode_values_and_legacy_default():
    from omegaconf import OmegaConf

    from dinov2_hier.config import ConfigError, load_config
    from dinov2_hier.train.optim import clip_grad_per_module

    assert clip_grad_per_module(load_config(None, [])) is True  # DINOv2's per-module clipping by default
    assert clip_grad_per_module(load_config(None, ["optim.clip_grad_mode=global"])) is False
    assert clip_grad_per_module(OmegaConf.create({"optim": {"clip_grad": 3.0}})) is False  # saved before the key
    # load_config refuses the value first (tests/test_bad_inputs.py); a saved config reaches this check.
    with pytest.raises(ConfigError, match="optim.clip_grad_mode must be per_module or global, got 'layer'"):
        clip_grad_per_module(OmegaConf.create({"optim": {"clip_grad_mode": "layer"}}))
