"""Convert dinov2_hier backbone weights (DINOv2 names) to timm's DINOv2 Vision Transformers.

Nothing here imports timm (an optional extra); :func:`dinov2_hier.hub.create_timm_model`
builds the timm model and loads the converted weights.

Name and layout mapping, checked against timm 1.0.31's ``vit_{small,base,large}_patch14_dinov2``,
``vit_giant_patch14_dinov2`` and their ``_reg4_`` variants (``D`` width, ``N`` patches,
``R`` registers):

=================================  ==========================================================
dinov2_hier                        timm
=================================  ==========================================================
``cls_token [1, 1, D]``            ``cls_token [1, 1, D]``; with registers ``cls_token +
                                   pos_embed[:, :1]`` (timm's register models set
                                   ``no_embed_class=True``: prefix tokens get no position)
``pos_embed [1, 1 + N, D]``        same without registers; ``pos_embed[:, 1:]`` ``[1, N, D]``
                                   with registers
``register_tokens [1, R, D]``      ``reg_token [1, R, D]``
``mask_token [1, D]``              dropped (used only by iBOT masking during training)
``blocks.i.mlp.w12`` / ``w3``      ``blocks.i.mlp.fc1`` / ``fc2`` (SwiGLU: timm's
                                   ``SwiGLUPacked`` computes ``silu(first half) * second
                                   half`` of ``fc1``, like ours)
everything else                    the same name and shape (``patch_embed.proj``,
                                   ``blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
                                   mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``)
=================================  ==========================================================

Token order is the same in both (class, registers, patches), so with these weights timm's
``forward_features(x)[:, 0]`` equals our ``x_norm_clstoken`` for inputs of timm's
``img_size``. timm's DINOv2 models are built for a fixed ``img_size`` (518 px by default;
pass ``img_size=224``): the converter resamples ``pos_embed`` to that grid with the same
function our model uses on the fly for other sizes (bicubic, DINOv2's ``+0.1`` offset), so
the outputs agree. timm's own ``dynamic_img_size=True`` resampling (antialiased, no offset)
is not the same function, so at other input sizes timm's features differ slightly from ours.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from dinov2_hier.models.vision_transformer import (
    LayerScale,
    SwiGLUFFN,
    VisionTransformer,
    interpolate_pos_embed,
)

#: timm DINOv2 model families: our factory name -> timm name stem.
_TIMM_STEMS: Mapping[str, str] = MappingProxyType({
    "vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant2": "vit_giant",
})
#: The feed-forward layer each timm family is built with.
_TIMM_FFN: Mapping[str, str] = MappingProxyType({"vit_small": "mlp", "vit_base": "mlp", "vit_large": "mlp", "vit_giant": "swiglu"})


#: (embed_dim, depth, num_heads) of each timm DINOv2 family as timm registers it (patch 14).
_TIMM_SHAPES: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16), "vit_giant": (1536, 40, 24),
})


#: timm's MLP ratio of each family (giant: ``SwiGLUPacked``, both halves of ``fc1``).
_TIMM_MLP_RATIO: Mapping[str, float] = MappingProxyType({
    "vit_small": 4.0, "vit_base": 4.0, "vit_large": 4.0, "vit_giant": 2.66667 * 2,
})


class TimmConversionError(ValueError):
    """A state dict that cannot be expressed in timm's layout."""


def to_timm_state_dict(
    our_sd: Mapping[str, Tensor],
    grid_size: tuple[int, int] | None = None,
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
) -> dict[str, Tensor]:
    """Rename and reshape a dinov2_hier backbone state dict for timm (see the module table).

    Args:
        our_sd: backbone state dict with DINOv2 names; ``pos_embed [1, 1 + M*M, D]``.
        grid_size: patch grid ``(rows, cols)`` of the timm model (``img_size // patch_size``
            each); ``None`` keeps the stored ``M x M`` grid. A different grid resamples
            ``pos_embed`` exactly as our model does at that input size.
        interpolate_offset, interpolate_antialias: our model's resampling settings
            (``config.json`` records them).
    Returns:
        A new dict of tensors (the inputs are not modified; unchanged tensors are shared).
    Raises:
        TimmConversionError: ``cls_token`` or ``pos_embed`` missing or malformed.
    """
    for key in ("cls_token", "pos_embed"):
        if key not in our_sd:
            raise TimmConversionError(f"state dict has no '{key}'")
    pos = our_sd["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise TimmConversionError(f"'pos_embed' must be [1, 1 + N, D], got {tuple(pos.shape)}")
    if grid_size is not None:
        try:
            pos = interpolate_pos_embed(pos, tuple(grid_size), interpolate_offset, interpolate_antialias)
        except ValueError as err:
            raise TimmConversionError(f"cannot resample 'pos_embed': {err}") from None
    has_registers = "register_tokens" in our_sd

    out: dict[str, Tensor] = {}
    for key, value in our_sd.items():
        if key == "mask_token":
            continue
        if key == "pos_embed":
            # timm's register models add positions to patches only (no_embed_class=True).
            out[key] = pos[:, 1:].contiguous() if has_registers else pos
        elif key == "cls_token":
            # The class token's position embedding is input-independent: fold it in.
            out[key] = (value + pos[:, :1].to(value.dtype)) if has_registers else value
        elif key == "register_tokens":
            out["reg_token"] = value
        elif ".mlp.w12." in key:
            out[key.replace(".mlp.w12.", ".mlp.fc1.")] = value
        elif ".mlp.w3." in key:
            out[key.replace(".mlp.w3.", ".mlp.fc2.")] = value
        else:
            out[key] = value
    return out


def timm_model_args(
    model: VisionTransformer, img_size: int = 224, arch: str | None = None
) -> tuple[str, dict[str, Any]]:
    """timm model name and ``timm.create_model`` keyword arguments matching ``model``.

    The name is timm's DINOv2 model of the same family (``vit_large_patch14_dinov2``, or
    ``..._reg4_dinov2`` with registers, for ``arch="vit_large"``; the ``vit_small`` /
    ``vit_giant`` stems for other widths with an MLP / SwiGLU feed-forward). The keyword
    arguments state every shape, read off ``model`` (they override the named model's
    defaults), so any dinov2_hier backbone maps onto timm's VisionTransformer.
    ``img_size`` (pixels, a multiple of the patch size) fixes timm's position grid.
    ``model`` may live on the meta device.
    """
    if img_size % model.patch_size:
        raise TimmConversionError(f"img_size {img_size} is not a multiple of patch_size {model.patch_size}")
    block = model.blocks[0]
    swiglu = isinstance(block.mlp, SwiGLUFFN)
    ffn = "swiglu" if swiglu else "mlp"
    stem = _TIMM_STEMS.get(arch or "")
    if stem is None or _TIMM_FFN[stem] != ffn:
        stem = "vit_giant" if swiglu else "vit_small"
    registers = model.num_register_tokens
    name = f"{stem}_patch14_reg4_dinov2" if registers else f"{stem}_patch14_dinov2"
    dim = model.embed_dim
    # timm's fc1 width is int(dim * mlp_ratio) (for SwiGLUPacked: both halves); the +0.5
    # keeps int() from flooring width - epsilon.
    width = block.mlp.w12.out_features if swiglu else block.mlp.fc1.out_features
    args = {
        "img_size": int(img_size),
        "patch_size": model.patch_size,
        "in_chans": model.patch_embed.proj.in_channels,
        "embed_dim": dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "mlp_ratio": (width + 0.5) / dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        # Only timm's initial value (the loaded gamma replaces it). No LayerScale: 0.0, which
        # timm treats as "off"; None would be dropped by timm.create_model (it discards
        # None-valued arguments) and the named model's 1e-5 would stay.
        "init_values": 1e-5 if isinstance(block.ls1, LayerScale) else 0.0,
        "reg_tokens": registers,
        "no_embed_class": registers > 0,
        "num_classes": 0,
    }
    return name, args


def timm_registered_name(model: VisionTransformer, arch: str | None = None) -> str | None:
    """timm's registered DINOv2 model that has exactly ``model``'s shape, or None.

    ``vit_{small,base,large}_patch14_dinov2``, ``vit_giant_patch14_dinov2`` and their
    ``_reg4_`` variants: patch 14, the family's width, depth and heads, its feed-forward
    layer (MLP ratio 4, or SwiGLU for giant), 0 or 4 registers, LayerScale, qkv bias,
    3 input channels. Any other backbone (``vit_tiny``, patch 8, 2 registers, ...) still
    maps onto timm's ``VisionTransformer`` through :func:`timm_model_args`, whose name is
    then only the template its shape arguments override.
    """
    stem = _TIMM_STEMS.get(arch or "")
    if stem is None:
        return None
    block = model.blocks[0]
    swiglu = isinstance(block.mlp, SwiGLUFFN)
    registers = model.num_register_tokens
    if (
        _TIMM_FFN[stem] != ("swiglu" if swiglu else "mlp")
        or (model.embed_dim, model.n_blocks, model.num_heads) != _TIMM_SHAPES[stem]
        or model.patch_size != 14
        or registers not in (0, 4)
        or model.patch_embed.proj.in_channels != 3
        or block.attn.qkv.bias is None
        or not isinstance(block.ls1, LayerScale)
        or (not swiglu and block.mlp.fc1.out_features != 4 * model.embed_dim)
    ):
        return None
    return f"{stem}_patch14_reg4_dinov2" if registers else f"{stem}_patch14_dinov2"


def timm_family(model: VisionTransformer, arch: str | None = None) -> str | None:
    """The timm DINOv2 model whose family ``model`` belongs to, or None.

    A family is one of timm's ``vit_{small,base,large,giant}_patch14_dinov2`` (``_reg4_``
    with registers): ``arch`` names it (``vit_giant2`` is timm's ``vit_giant``), the width,
    depth, heads, feed-forward layer and patch size (14) are the family's. What else may
    differ (image size, register count, LayerScale on/off, qkv bias, MLP width, input
    channels) is stated in the ``model_args`` of :func:`timm_hub_config`. ``vit_tiny``,
    patch 8 or 16, a non-standard depth: None (timm registers no DINOv2 model to name).
    """
    stem = _TIMM_STEMS.get(arch or "")
    if stem is None:
        return None
    swiglu = isinstance(model.blocks[0].mlp, SwiGLUFFN)
    if (_TIMM_FFN[stem] != ("swiglu" if swiglu else "mlp")
            or (model.embed_dim, model.n_blocks, model.num_heads) != _TIMM_SHAPES[stem]
            or model.patch_size != 14):
        return None
    return f"{stem}_patch14_reg4_dinov2" if model.num_register_tokens else f"{stem}_patch14_dinov2"


def timm_hub_config(
    model: VisionTransformer,
    arch: str | None,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    layerscale: float | None = 1e-5,
    license_name: str | None = None,
) -> dict[str, Any]:
    """``config.json`` in timm's schema for ``model`` (read by ``timm.create_model("local-dir:DIR")``
    and ``"hf-hub:ORG/NAME"``; timm 1.0.31's ``_hub._parse_model_cfg``).

    ``architecture``: :func:`timm_family`'s name; ``num_classes`` 0 (a feature extractor);
    ``model_args``: ``img_size`` (the training crop: timm's position grid is then the
    stored one), ``reg_tokens``, ``init_values`` (the LayerScale init value, 0.0 = no
    LayerScale: timm drops None-valued arguments) and every other argument whose value
    differs from the named model's (``mlp_ratio``, ``qkv_bias``, ``in_chans``,
    ``no_embed_class``); ``pretrained_cfg``: ``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct`` and the keys timm derives for its own exports. Only
    keys timm reads are written here; callers add their own block (timm ignores other
    top-level keys). Raises :class:`TimmConversionError` when timm has no family for ``model``.
    """
    name = timm_family(model, arch)
    if name is None:
        raise TimmConversionError(f"timm registers no DINOv2 model family for {arch} / patch {model.patch_size} / "
                                  f"width {model.embed_dim}, depth {model.n_blocks}")
    stem = name.split("_patch14")[0]
    _, args = timm_model_args(model, img_size, arch)
    registers = model.num_register_tokens
    model_args: dict[str, Any] = {
        "img_size": int(img_size),
        "reg_tokens": registers,
        "init_values": float(layerscale) if args["init_values"] and layerscale is not None else args["init_values"],
    }
    block = model.blocks[0]
    width = block.mlp.w12.out_features if isinstance(block.mlp, SwiGLUFFN) else block.mlp.fc1.out_features
    if int(model.embed_dim * _TIMM_MLP_RATIO[stem]) != width:
        model_args["mlp_ratio"] = args["mlp_ratio"]
    if not args["qkv_bias"]:
        model_args["qkv_bias"] = False
    if args["in_chans"] != 3:
        model_args["in_chans"] = args["in_chans"]
    # The _reg4_ models default to no_embed_class=True, the plain ones to False: as the name.
    pretrained_cfg: dict[str, Any] = {
        "input_size": [args["in_chans"], int(img_size), int(img_size)],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if license_name:
        pretrained_cfg["license"] = license_name
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": model.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def from_timm_state_dict(
    timm_sd: Mapping[str, Tensor], num_register_tokens: int, ffn_layer: str = "mlp"
) -> dict[str, Tensor]:
    """The inverse of :func:`to_timm_state_dict` for an export in timm's layout.

    ``reg_token`` -> ``register_tokens``; SwiGLU ``mlp.fc1`` / ``fc2`` -> ``mlp.w12`` /
    ``w3``; with registers (timm's ``no_embed_class``) ``pos_embed [1, N, D]`` gets a zero
    class position in front (the class token already holds it, folded in); ``mask_token``
    (iBOT training only, not in timm's layout) is added as zeros, DINOv2's initial value.
    The result computes exactly what the exported model computed, at every input size.
    Other keys pass through unchanged, so a strict load still names what is missing or
    unexpected.
    """
    swiglu = ffn_layer != "mlp"
    out: dict[str, Tensor] = {}
    for key, value in timm_sd.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif swiglu and ".mlp.fc1." in key:
            out[key.replace(".mlp.fc1.", ".mlp.w12.")] = value
        elif swiglu and ".mlp.fc2." in key:
            out[key.replace(".mlp.fc2.", ".mlp.w3.")] = value
        else:
            out[key] = value
    pos = out.get("pos_embed")
    if num_register_tokens and isinstance(pos, Tensor) and pos.ndim == 3:
        out["pos_embed"] = torch.cat([pos.new_zeros(pos.shape[0], 1, pos.shape[2]), pos], dim=1)
    cls = out.get("cls_token")
    if "mask_token" not in out and isinstance(cls, Tensor) and cls.ndim == 3:
        out["mask_token"] = cls.new_zeros(1, cls.shape[-1])
    return out
