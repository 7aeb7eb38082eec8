"""Load an exported backbone: ``config.json`` + ``model.safetensors`` (or ``model.pth``).

An export directory (written by ``python -m dinov2_hier.export``) holds

- ``config.json``: our export document: the architecture (``embed_dim``, ``depth``,
  ``num_heads``, ``patch_size``, ``img_size`` in pixels, ``num_register_tokens``,
  ``ffn_layer``, ``layerscale``, ``qkv_bias``, ...), the input normalisation
  (``mean``/``std``, RGB in [0, 1]) and provenance (iteration, hierarchy, versions). In
  the timm layout (``format_version`` 2, the default) the file is timm's schema
  (``architecture`` a timm model name, ``model_args``, ``pretrained_cfg``) and the
  document sits in its ``"dinov2_hier"`` block; in ours (``format_version`` 1,
  ``--format ours``, and every export written before) it is the whole file;
- ``model.safetensors`` or ``model.pth``: a flat mapping parameter name -> tensor; timm's
  names in the timm layout (``reg_token``, the class position folded into ``cls_token``
  with registers, no ``mask_token``), DINOv2's in ours (``cls_token [1, 1, D]``,
  ``pos_embed [1, 1 + (img_size/patch)^2, D]``, ``blocks.{i}.*``, ``norm.*``,
  ``mask_token [1, D]``, ``register_tokens [1, R, D]``);
- ``README.md``: the model card.

Both layouts load here (the timm one converted back by
:func:`~dinov2_hier.models.artifacts.export_tensors`, exactly: same outputs at every size).

:func:`load_backbone` is strict: every parameter of the model described by the config must
be in the file with exactly its shape, and the file may hold nothing else. Loading never
unpickles code: safetensors, or ``torch.load(weights_only=True)`` for ``.pth``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor

from dinov2_hier.models.artifacts import (  # noqa: F401 (the export layout, re-exported)
    CONFIG_FILE,
    EXPORT,
    PTH_FILE,
    SAFETENSORS_CONFIG_KEY,
    SAFETENSORS_FILE,
    locate_export,
    read_artifact,
    read_config,
)
from dinov2_hier.models.spec import EXPORT_OPTIONAL_DEFAULTS as OPTIONAL_DEFAULTS  # noqa: F401
from dinov2_hier.models.spec import EXPORT_REQUIRED_KEYS as REQUIRED_KEYS  # noqa: F401
from dinov2_hier.models.spec import BackboneSpec
from dinov2_hier.models.vision_transformer import VisionTransformer
from dinov2_hier.models.weights import WeightsError, dtype_name

PathLike = Union[str, os.PathLike]

#: Version of the export layout (config keys and file names); bumped on incompatible change.
#: 2: timm's config schema with our document under ``"dinov2_hier"``, timm tensor names;
#: 1: our document as config.json, DINOv2 tensor names (``--format ours``).
FORMAT_VERSION = 2
OURS_FORMAT_VERSION = 1


def model_kwargs(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate an export config and return the :class:`VisionTransformer` keyword arguments
    (:meth:`BackboneSpec.from_export_config`: :class:`WeightsError` naming ``source`` and
    the first missing key, in the order of :data:`REQUIRED_KEYS`, or the malformed one)."""
    return {**BackboneSpec.from_export_config(config, source).build_kwargs(), "drop_path_rate": 0.0}


def build_from_config(config: Mapping[str, Any], source: str = "config", device: Any = None) -> VisionTransformer:
    """The (randomly initialised) backbone an export config describes; ``device="meta"``
    builds it without allocating or initialising memory (shapes only)."""
    spec = BackboneSpec.from_export_config(config, source)
    with torch.device(device if device is not None else "cpu"):
        return spec.build()


def expected_shapes(config: Mapping[str, Any], source: str = "config") -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every entry of the state dict of the model ``config`` describes,
    in the model's order, without building its blocks.

    A one-block model is built on the meta device and its block repeated ``depth`` times
    (the blocks of a :class:`VisionTransformer` all have the same shapes), so a config that
    claims thousands of blocks costs milliseconds, not the minute that building them takes
    even on meta. Raises :class:`WeightsError` as :func:`model_kwargs`.
    """
    spec = BackboneSpec.from_export_config(config, source)
    with torch.device("meta"):
        one = spec.build(depth=1)
    single = {k: tuple(v.shape) for k, v in one.state_dict().items()}
    block = [k[len("blocks.0."):] for k in single if k.startswith("blocks.0.")]
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in single.items():
        if not key.startswith("blocks.0."):
            out[key] = shape
        elif key == f"blocks.0.{block[0]}":  # the block's entries are contiguous: expand them here
            for i in range(spec.shape.depth):
                out.update({f"blocks.{i}.{rest}": single[f"blocks.0.{rest}"] for rest in block})
    return out


def _block_count(state: Mapping[str, Any]) -> int:
    """Number of transformer blocks in a state dict (one more than the largest ``blocks.<i>.``)."""
    indices = {int(parts[1]) for parts in (k.split(".", 2) for k in state if k.startswith("blocks."))
               if len(parts) == 3 and parts[1].isdigit()}
    return max(indices) + 1 if indices else 0


def check_state_dict(model_shapes: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], source: str) -> None:
    """Strict comparison of a state dict with the model's ``name -> shape``.

    Walks the model's parameters in order; the first one that is absent from ``state``,
    has another shape or is not a floating-point tensor (an integer or bool tensor would be
    cast silently) raises :class:`WeightsError` naming the key and (for shapes) both
    shapes or (for dtypes) the dtype. Then the first key of ``state`` the model does not
    have, or a non-tensor entry. Every backbone parameter is floating-point.
    """
    for key, shape in model_shapes.items():
        if key not in state:
            raise WeightsError(f"{source}: missing key '{key}' (model expects shape {tuple(shape)})")
        value = state[key]
        if not isinstance(value, Tensor):
            raise WeightsError(f"{source}: entry '{key}' is a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(shape):
            raise WeightsError(
                f"{source}: shape mismatch at '{key}': file {tuple(value.shape)} vs model {tuple(shape)}"
            )
        if not value.is_floating_point():
            raise WeightsError(
                f"{source}: '{key}' is {dtype_name(value.dtype)} {tuple(value.shape)}, expected floating-point weights"
            )
    for key in state:
        if key not in model_shapes:
            raise WeightsError(f"{source}: unexpected key '{key}' (not a parameter of the configured model)")


def load_backbone(
    path: PathLike, device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> VisionTransformer:
    """Load an exported backbone, strictly, in eval mode.

    Args:
        path: export directory, its ``config.json``, or its weights file.
        device: where the returned model lives.
        dtype: parameter dtype of the returned model (the file may store another one;
            ``float32`` by default whatever was exported).
    Returns:
        The :class:`~dinov2_hier.models.VisionTransformer` in eval mode. Its forward takes
        ``[n, 3, H, W]`` images (``H``, ``W`` multiples of ``patch_size``, normalised with the
        config's ``mean``/``std``) and returns ``x_norm_clstoken [n, D]`` etc.
    Raises:
        WeightsError: missing file, a config key missing or malformed (named), a weights
            file holding pickled objects, or a parameter missing, unexpected or of another
            shape (the first such key in the model's order, with both shapes).
    """
    if not os.path.exists(path):
        raise WeightsError(f"export not found: {path}")
    artifact = read_artifact(path, accept=(EXPORT,))  # safetensors, or torch.load(weights_only=True)
    weights, config, config_source = artifact.path, artifact.metadata, artifact.metadata_source
    # Shapes before building: a config that does not describe the file fails here, before
    # the model (a crafted 'depth': 5000 took ~68 s to build on meta before its mismatch was found).
    shapes = expected_shapes(config, config_source)
    # The file as stored (a timm-layout file converted back): nothing dropped, nothing else renamed.
    state = artifact.tensors
    depth, blocks = config["depth"], _block_count(state)
    if blocks != depth:
        raise WeightsError(
            f"{config_source}: 'depth' is {depth} but {weights} holds {blocks} transformer blocks "
            "(the config does not describe these weights)"
        )
    check_state_dict(shapes, state, str(weights))
    model = build_from_config(config, config_source, device="meta")
    if {k: tuple(v.shape) for k, v in model.state_dict().items()} != shapes:  # expected_shapes is exact
        raise RuntimeError(f"{config_source}: the built model's shapes differ from expected_shapes()")
    state = {k: state[k].to(dtype=dtype).contiguous() for k in shapes}
    # assign=True adopts the loaded tensors, so the meta model never allocates twice.
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def create_timm_model(path: PathLike, img_size: int = 224, device: Any = "cpu") -> Any:
    """timm's DINOv2 ViT holding an export's weights (strict load), in eval mode. Needs timm.

    ``path`` as for :func:`load_backbone`. The model is built by
    :func:`~dinov2_hier.models.timm_compat.timm_model_args` for input side ``img_size``
    (pixels) and loaded from :func:`~dinov2_hier.models.timm_compat.to_timm_state_dict`;
    ``model.forward_features(x)[:, 0]`` for ``x [n, 3, img_size, img_size]`` is our
    ``x_norm_clstoken [n, D]``.
    """
    try:
        import timm
    except ImportError as err:
        raise ImportError("create_timm_model needs timm (pip install timm)") from err
    from dinov2_hier.models.timm_compat import timm_model_args, to_timm_state_dict

    _, config, _ = locate_export(path)
    ours = load_backbone(path)
    name, args = timm_model_args(ours, img_size, arch=config.get("architecture"))
    grid = (img_size // ours.patch_size, img_size // ours.patch_size)
    state = to_timm_state_dict(ours.state_dict(), grid, ours.interpolate_offset, ours.interpolate_antialias)
    model = timm.create_model(name, pretrained=False, **args)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
