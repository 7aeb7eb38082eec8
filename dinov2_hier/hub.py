"""Load an exported backbone: ``config.json`` + ``model.safetensors`` (or ``model.pth``).

An export directory (written by ``python -m dinov2_hier.export``) holds

- ``config.json``: the architecture (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``,
  ``img_size`` in pixels, ``num_register_tokens``, ``ffn_layer``, ``layerscale``,
  ``qkv_bias``, ...), the input normalisation (``mean``/``std``, RGB in [0, 1]) and
  provenance (iteration, hierarchy, versions);
- ``model.safetensors`` or ``model.pth``: a flat mapping parameter name -> tensor with
  DINOv2 names (``cls_token [1, 1, D]``, ``pos_embed [1, 1 + (img_size/patch)^2, D]``,
  ``blocks.{i}.*``, ``norm.*``, ``mask_token [1, D]``, ``register_tokens [1, R, D]``);
- ``README.md``: the model card.

:func:`load_backbone` is strict: every parameter of the model described by the config must
be in the file with exactly its shape, and the file may hold nothing else. Loading never
unpickles code: safetensors, or ``torch.load(weights_only=True)`` for ``.pth``.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import torch
from torch import Tensor

from dinov2_hier.models.vision_transformer import VisionTransformer
from dinov2_hier.models.weights import WeightsError, dtype_name, read_state_dict

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PTH_FILE = "model.pth"
#: Version of the export layout (config keys and file names); bumped on incompatible change.
FORMAT_VERSION = 1
#: Key of the safetensors header metadata that repeats config.json, so that a
#: ``model.safetensors`` copied without its folder still describes itself.
SAFETENSORS_CONFIG_KEY = "dinov2_hier_config"

#: config.json keys needed to rebuild the network; a missing one is an error naming it.
REQUIRED_KEYS: tuple[str, ...] = (
    "embed_dim", "depth", "num_heads", "patch_size", "img_size", "num_register_tokens",
    "ffn_layer", "layerscale", "qkv_bias",
)
#: Keys with DINOv2's values as defaults (configs written by hand may leave them out).
OPTIONAL_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "mlp_ratio": 4.0,
    "in_chans": 3,
    "interpolate_offset": 0.1,
    "interpolate_antialias": False,
})
_FFN_LAYERS = ("mlp", "swiglu", "swiglufused")


def _positive_int(config: Mapping[str, Any], key: str, source: str, allow_zero: bool = False) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise WeightsError(f"{source}: '{key}' must be an integer {bound}, got {value!r}")
    return value


def _number(config: Mapping[str, Any], key: str, source: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WeightsError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def model_kwargs(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate an export config and return the :class:`VisionTransformer` keyword arguments.

    Raises :class:`WeightsError` naming ``source`` and the first missing key (in the order of
    :data:`REQUIRED_KEYS`) or the key whose value has the wrong type.
    """
    if not isinstance(config, Mapping):
        raise WeightsError(f"{source}: expected a JSON object, got {type(config).__name__}")
    for key in REQUIRED_KEYS:
        if key not in config:
            raise WeightsError(f"{source}: missing key '{key}'")
    full = {**OPTIONAL_DEFAULTS, **config}
    ffn = full["ffn_layer"]
    if ffn not in _FFN_LAYERS:
        raise WeightsError(f"{source}: 'ffn_layer' must be one of {', '.join(_FFN_LAYERS)}, got {ffn!r}")
    layerscale = full["layerscale"]
    if layerscale is not None:
        layerscale = _number(full, "layerscale", source)
    for key in ("qkv_bias", "interpolate_antialias"):
        if not isinstance(full[key], bool):
            raise WeightsError(f"{source}: '{key}' must be true or false, got {full[key]!r}")
    kwargs = {
        "img_size": _positive_int(full, "img_size", source),
        "patch_size": _positive_int(full, "patch_size", source),
        "in_chans": _positive_int(full, "in_chans", source),
        "embed_dim": _positive_int(full, "embed_dim", source),
        "depth": _positive_int(full, "depth", source),
        "num_heads": _positive_int(full, "num_heads", source),
        "mlp_ratio": _number(full, "mlp_ratio", source),
        "qkv_bias": full["qkv_bias"],
        "ffn_layer": ffn,
        "drop_path_rate": 0.0,
        "layerscale_init": layerscale,
        "num_register_tokens": _positive_int(full, "num_register_tokens", source, allow_zero=True),
        "interpolate_offset": _number(full, "interpolate_offset", source),
        "interpolate_antialias": full["interpolate_antialias"],
    }
    if kwargs["embed_dim"] % kwargs["num_heads"]:
        raise WeightsError(f"{source}: 'embed_dim' {kwargs['embed_dim']} is not divisible by 'num_heads' {kwargs['num_heads']}")
    if kwargs["img_size"] % kwargs["patch_size"]:
        raise WeightsError(f"{source}: 'img_size' {kwargs['img_size']} is not a multiple of 'patch_size' {kwargs['patch_size']}")
    return kwargs


def build_from_config(config: Mapping[str, Any], source: str = "config", device: Any = None) -> VisionTransformer:
    """The (randomly initialised) backbone an export config describes; ``device="meta"``
    builds it without allocating or initialising memory (shapes only)."""
    kwargs = model_kwargs(config, source)
    with torch.device(device if device is not None else "cpu"):
        return VisionTransformer(**kwargs)


def expected_shapes(config: Mapping[str, Any], source: str = "config") -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every entry of the state dict of the model ``config`` describes,
    in the model's order, without building its blocks.

    A one-block model is built on the meta device and its block repeated ``depth`` times
    (the blocks of a :class:`VisionTransformer` all have the same shapes), so a config that
    claims thousands of blocks costs milliseconds, not the minute that building them takes
    even on meta. Raises :class:`WeightsError` as :func:`model_kwargs`.
    """
    kwargs = model_kwargs(config, source)
    with torch.device("meta"):
        one = VisionTransformer(**{**kwargs, "depth": 1})
    single = {k: tuple(v.shape) for k, v in one.state_dict().items()}
    block = [k[len("blocks.0."):] for k in single if k.startswith("blocks.0.")]
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in single.items():
        if not key.startswith("blocks.0."):
            out[key] = shape
        elif key == f"blocks.0.{block[0]}":  # the block's entries are contiguous: expand them here
            for i in range(kwargs["depth"]):
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


def read_config(path: PathLike) -> dict[str, Any]:
    """Read ``config.json`` (a JSON object); :class:`WeightsError` naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeightsError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise WeightsError(f"cannot read {path}: {err}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: top level must be a JSON object, got {type(config).__name__}")
    return config


def _safetensors_config(path: Path) -> dict[str, Any] | None:
    """The config stored in a safetensors header (see :data:`SAFETENSORS_CONFIG_KEY`), if any."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors' own error types are not ValueErrors
        raise WeightsError(f"cannot read safetensors file {path}: {err}") from None
    text = metadata.get(SAFETENSORS_CONFIG_KEY)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: header metadata '{SAFETENSORS_CONFIG_KEY}' is not valid JSON: {err.msg}") from None
    return config if isinstance(config, dict) else None


def locate_export(path: PathLike) -> tuple[Path, dict[str, Any], str]:
    """Find the weights file and config of an export.

    ``path`` is an export directory, its ``config.json``, or a weights file
    (``.safetensors`` / ``.pth`` / ``.pt``). For a directory the file named by the config's
    ``weights_file`` is used, else ``model.safetensors``, else ``model.pth``. A weights file
    uses the ``config.json`` beside it, else (safetensors only) the config in its header.
    Returns ``(weights_path, config, config_source)``.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"export not found: {path}")
    if path.is_dir() or path.name == CONFIG_FILE:
        folder = path if path.is_dir() else path.parent
        config_path = folder / CONFIG_FILE
        config = read_config(config_path)
        name = config.get("weights_file")
        if name is not None:
            if not isinstance(name, str) or Path(name).name != name:
                raise WeightsError(f"{config_path}: 'weights_file' must be a file name, got {name!r}")
            weights = folder / name
        else:
            weights = next((folder / n for n in (SAFETENSORS_FILE, PTH_FILE) if (folder / n).is_file()),
                           folder / SAFETENSORS_FILE)
        if not weights.is_file():
            raise WeightsError(f"{folder}: weights file {weights.name} not found")
        return weights, config, str(config_path)
    config_path = path.parent / CONFIG_FILE
    if config_path.is_file():
        return path, read_config(config_path), str(config_path)
    if path.suffix == ".safetensors":
        config = _safetensors_config(path)
        if config is not None:
            return path, config, f"{path} (header metadata)"
    raise WeightsError(f"{path}: no {CONFIG_FILE} beside it describing the architecture")


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
    weights, config, config_source = locate_export(path)
    # Shapes first: a config that does not describe the file fails here, before the model
    # (a crafted 'depth': 5000 took ~68 s to build on meta before its mismatch was found).
    shapes = expected_shapes(config, config_source)
    state = read_state_dict(weights)  # safetensors, or torch.load(weights_only=True)
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
