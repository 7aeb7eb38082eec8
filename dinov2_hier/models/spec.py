"""What a trained backbone *is*: :class:`BackboneSpec`, the architecture of a set of weights.

A spec holds the properties of the weights: the factory name (``arch``), patch size, the
image size of the stored position embeddings, register tokens, feed-forward layer,
LayerScale, qkv bias, and the input normalisation (``mean`` / ``std``) the weights were
trained with. Training-time settings of the network (drop-path rate and schedule,
``drop_path_mode``, ``residual_stream``, gradient checkpointing) are not: they change how a
step runs, not which tensors exist or what they compute in eval mode, and are passed to
:meth:`BackboneSpec.build` by the training code that owns them.

Where a spec comes from and goes to:

- :meth:`BackboneSpec.from_config`: a training configuration (``student.*`` and
  ``crops.global_crops_size`` / ``crops.mean`` / ``crops.std``; every one of these keys has
  been in every saved configuration since the first version, so none needs a default);
- :meth:`BackboneSpec.from_metadata`: the ``"meta"`` of a ``teacher_backbone.pt``
  (``arch, patch_size, img_size`` required; the other keys default to the values the
  readers have always assumed) or an export's ``config.json`` (explicit
  ``embed_dim, depth, num_heads, ...``, validated strictly: hand-written configs are
  accepted without ``architecture``);
- :meth:`BackboneSpec.to_metadata`: the ``"meta"`` dict a ``teacher_backbone.pt`` records
  (training adds ``"iteration"``);
- :meth:`BackboneSpec.build`: the :class:`~dinov2_hier.models.VisionTransformer`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from dinov2_hier.models.vision_transformer import VisionTransformer, build_backbone
from dinov2_hier.models.weights import WeightsError

#: Input normalisation of DINOv2's released weights (RGB in [0, 1]); the default of
#: metadata that records none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Prefix of the EMA teacher's backbone in the state dict of the training model
#: (``SSLMetaArch``), hence in the ``"model"`` of a training checkpoint.
TEACHER_BACKBONE_PREFIX = "teacher.backbone."

#: ``format`` of an export's ``config.json``.
EXPORT_FORMAT = "dinov2_hier.backbone"
#: Export config keys needed to rebuild the network; a missing one is an error naming it.
EXPORT_REQUIRED_KEYS: tuple[str, ...] = (
    "embed_dim", "depth", "num_heads", "patch_size", "img_size", "num_register_tokens",
    "ffn_layer", "layerscale", "qkv_bias",
)
#: Export config keys with DINOv2's values as defaults (configs written by hand may leave them out).
EXPORT_OPTIONAL_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "mlp_ratio": 4.0,
    "in_chans": 3,
    "interpolate_offset": 0.1,
    "interpolate_antialias": False,
})
_FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
#: Teacher-file metadata keys without which the backbone cannot be rebuilt.
_META_REQUIRED = ("arch", "patch_size", "img_size")


@dataclass(frozen=True)
class ViTShape:
    """The network's dimensions written out, as an export's ``config.json`` records them
    (a spec from a factory name leaves them to the factory)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False


@dataclass(frozen=True)
class BackboneSpec:
    """The architecture and input normalisation of a trained backbone (see the module docstring).

    ``arch``: factory name (``vit_tiny`` ... ``vit_giant2``); None only for a hand-written
    export config that gives ``shape`` and no ``architecture``. ``img_size``: pixels, the
    grid of the stored position embeddings (other input sizes interpolate them).
    ``layerscale``: LayerScale init value, None without LayerScale. ``shape``: the explicit
    dimensions of an export (None: those of the ``arch`` factory).
    """

    arch: str | None
    patch_size: int
    img_size: int
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    layerscale: float | None = 1e-5
    qkv_bias: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    shape: ViTShape | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_config(cls, cfg: Any) -> BackboneSpec:
        """The teacher's architecture from a training config (``DictConfig``).

        A missing key or a value of the wrong type raises what reading it raises
        (OmegaConf's error, ``ValueError``, ``TypeError``); callers name the file.
        """
        student, crops = cfg.student, cfg.crops
        return cls(
            arch=str(student.arch),
            patch_size=int(student.patch_size),
            img_size=int(crops.global_crops_size),
            num_register_tokens=int(student.num_register_tokens),
            ffn_layer=str(student.ffn_layer),
            # As the config holds it (teacher files have always recorded it unconverted).
            layerscale=student.layerscale,
            qkv_bias=bool(student.qkv_bias),
            mean=tuple(float(x) for x in crops.mean),
            std=tuple(float(x) for x in crops.std),
        )

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "metadata") -> BackboneSpec:
        """The spec a file's metadata records: a teacher file's ``"meta"`` (it has ``arch``)
        or an export's ``config.json`` (it has ``architecture`` / ``embed_dim`` / ``format``).

        Raises :class:`~dinov2_hier.models.WeightsError` naming ``source`` and the key
        that is missing or malformed.
        """
        if not isinstance(meta, Mapping):
            raise WeightsError(f"{source}: expected a mapping, got {type(meta).__name__}")
        if "arch" not in meta and ("architecture" in meta or "embed_dim" in meta or meta.get("format") == EXPORT_FORMAT):
            return cls.from_export_config(meta, source)
        for key in _META_REQUIRED:
            if key not in meta:
                raise WeightsError(f"{source}: missing key '{key}'")
        layerscale = meta.get("layerscale", 1e-5)
        try:
            return cls(
                arch=str(meta["arch"]),
                patch_size=int(meta["patch_size"]),
                img_size=int(meta["img_size"]),
                num_register_tokens=int(meta.get("num_register_tokens", 0)),
                ffn_layer=str(meta.get("ffn_layer", "mlp")),
                layerscale=None if layerscale is None else float(layerscale),
                qkv_bias=bool(meta.get("qkv_bias", True)),
                mean=tuple(float(x) for x in meta.get("mean", IMAGENET_MEAN)),
                std=tuple(float(x) for x in meta.get("std", IMAGENET_STD)),
            )
        except (TypeError, ValueError) as err:
            raise WeightsError(f"{source}: malformed architecture metadata: {err}") from None

    @classmethod
    def from_export_config(cls, config: Mapping[str, Any], source: str = "config") -> BackboneSpec:
        """The spec of an export's ``config.json``, validated strictly.

        Raises :class:`~dinov2_hier.models.WeightsError` naming ``source`` and the first
        missing key (in the order of :data:`EXPORT_REQUIRED_KEYS`) or the key whose value
        has the wrong type. ``architecture``, ``mean`` and ``std`` are not needed to build
        the network and are taken when well-formed.
        """
        if not isinstance(config, Mapping):
            raise WeightsError(f"{source}: expected a JSON object, got {type(config).__name__}")
        for key in EXPORT_REQUIRED_KEYS:
            if key not in config:
                raise WeightsError(f"{source}: missing key '{key}'")
        full = {**EXPORT_OPTIONAL_DEFAULTS, **config}
        ffn = full["ffn_layer"]
        if ffn not in _FFN_LAYERS:
            raise WeightsError(f"{source}: 'ffn_layer' must be one of {', '.join(_FFN_LAYERS)}, got {ffn!r}")
        layerscale = full["layerscale"]
        if layerscale is not None:
            layerscale = _number(full, "layerscale", source)
        for key in ("qkv_bias", "interpolate_antialias"):
            if not isinstance(full[key], bool):
                raise WeightsError(f"{source}: '{key}' must be true or false, got {full[key]!r}")
        shape = ViTShape(
            embed_dim=_positive_int(full, "embed_dim", source),
            depth=_positive_int(full, "depth", source),
            num_heads=_positive_int(full, "num_heads", source),
            mlp_ratio=_number(full, "mlp_ratio", source),
            in_chans=_positive_int(full, "in_chans", source),
            interpolate_offset=_number(full, "interpolate_offset", source),
            interpolate_antialias=full["interpolate_antialias"],
        )
        spec = cls(
            arch=full["architecture"] if isinstance(full.get("architecture"), str) else None,
            patch_size=_positive_int(full, "patch_size", source),
            img_size=_positive_int(full, "img_size", source),
            num_register_tokens=_positive_int(full, "num_register_tokens", source, allow_zero=True),
            ffn_layer=ffn,
            layerscale=layerscale,
            qkv_bias=full["qkv_bias"],
            mean=_three_floats(full.get("mean"), IMAGENET_MEAN),
            std=_three_floats(full.get("std"), IMAGENET_STD),
            shape=shape,
        )
        if shape.embed_dim % shape.num_heads:
            raise WeightsError(f"{source}: 'embed_dim' {shape.embed_dim} is not divisible by 'num_heads' {shape.num_heads}")
        if spec.img_size % spec.patch_size:
            raise WeightsError(f"{source}: 'img_size' {spec.img_size} is not a multiple of 'patch_size' {spec.patch_size}")
        return spec

    # ------------------------------------------------------------------ outputs
    def to_metadata(self) -> dict[str, Any]:
        """The ``"meta"`` of a ``teacher_backbone.pt`` (without ``"iteration"``, which the
        writer adds): the keys and value types training has always written. An export's
        explicit ``shape`` is not part of it (``config.json`` is written by the export)."""
        return {
            "arch": self.arch,
            "patch_size": int(self.patch_size),
            "img_size": int(self.img_size),
            "num_register_tokens": int(self.num_register_tokens),
            "ffn_layer": str(self.ffn_layer),
            "layerscale": self.layerscale,
            "qkv_bias": bool(self.qkv_bias),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
        }

    def with_arch(self, arch: str | None) -> BackboneSpec:
        """This spec with another factory name (``arch`` None or equal: itself)."""
        return self if arch is None or arch == self.arch else dataclasses.replace(self, arch=arch)

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`VisionTransformer` (of the ``arch`` factory when
        the spec has no explicit ``shape``) that fix its weights."""
        kwargs: dict[str, Any] = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "num_register_tokens": self.num_register_tokens,
            "ffn_layer": self.ffn_layer,
            "layerscale_init": self.layerscale,
            "qkv_bias": self.qkv_bias,
        }
        if self.shape is not None:
            kwargs.update(dataclasses.asdict(self.shape))
        return kwargs

    def build(self, **overrides: Any) -> VisionTransformer:
        """The (randomly initialised) backbone; ``overrides``: training-time settings such
        as ``drop_path_rate`` / ``drop_path_schedule``, or any :meth:`build_kwargs` key.

        Built by :func:`~dinov2_hier.models.build_backbone` from ``arch``; a spec with an
        explicit ``shape`` gives every dimension, so it is built as a plain
        :class:`VisionTransformer` (its ``arch``, if any, only names it). Raises
        ``ValueError`` for an unknown ``arch`` or inconsistent sizes.
        """
        kwargs = {**self.build_kwargs(), **overrides}
        if self.shape is not None:
            return VisionTransformer(**kwargs)
        if self.arch is None:
            raise ValueError("a backbone spec without 'arch' needs an explicit shape")
        return build_backbone(self.arch, **kwargs)


# --------------------------------------------------------------------------- validation


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


def _three_floats(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    """``value`` as a tuple of floats when it is a sequence of numbers, else ``default``
    (an export config's normalisation is informative: loading never needed it)."""
    if (isinstance(value, Sequence) and not isinstance(value, str) and value
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        return tuple(float(x) for x in value)
    return default
