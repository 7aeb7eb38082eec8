"""Safe reading of weights files and non-strict loading of backbone weights.

Files: ``.safetensors``, or ``torch.save`` files holding only tensors and plain
containers (read with ``weights_only=True``; pickled objects are refused). Layouts: a
plain backbone state dict, ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers, and
DINOv2 / DinoBloom training checkpoints (``{"teacher": {"backbone.<name>": ...}}``,
possibly with FSDP block chunks). Which file is what, and the loading of a file by path:
:mod:`dinov2_hier.models.artifacts`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dinov2_hier.errors import UserError
from dinov2_hier.io import load_error_message
from dinov2_hier.models.vision_transformer import VisionTransformer, interpolate_pos_embed

# Wrappers that hold the real state dict, most specific first (the EMA teacher is the
# model DINOv2 evaluates and releases).
_WRAPPER_KEYS = ("teacher", "model", "state_dict")
# Prefixes that training wrappers (DDP, torch.compile, meta-architecture) add to names.
_STRIP_PREFIXES = ("module.", "_orig_mod.", "teacher.", "backbone.")
_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
# DINOv2 with block_chunks > 0 names block i of chunk c "blocks.c.i."; i is already global.
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


#: Least share of the model's weights (counted in elements) that a file given for
#: :func:`load_backbone_state` must provide; below it the file is refused as not this
#: backbone's weights. Legitimate partial loads (a checkpoint without register tokens or
#: mask token, another resolution's ``pos_embed``) keep far more than this.
MIN_MATCHED_SHARE = 0.5
#: Example keys named on each side when a file matches too little.
_EXAMPLE_KEYS = 3


class WeightsError(UserError, ValueError):
    """A weights file or state dict that cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """Outcome of :func:`load_backbone_state`: model keys absent from the checkpoint,
    checkpoint keys the model does not have, and keys resampled to the model's shape."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a weights file onto the CPU.

    Returns the stored top-level mapping: name -> Tensor for a plain state dict, or the
    nested checkpoint dict (see :func:`extract_backbone_state_dict`). Raises
    :class:`WeightsError` naming the file when it is missing, unreadable, holds pickled
    objects other than tensors and plain containers, or is not a mapping.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise WeightsError(
                f"reading {path} needs the 'safetensors' package (pip install safetensors)"
            ) from err
        try:
            obj: Any = load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own, non-ValueError, error types
            raise WeightsError(f"cannot read safetensors file {path}: {err}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refusals, truncated or foreign files
            raise WeightsError(load_error_message(path, err)) from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, expected a dict")
    return dict(obj)


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


def _teacher_state(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The mapping that holds the weights: ``teacher`` / ``model`` / ``state_dict``
    containers unwrapped and, when student and teacher weights sit side by side
    (``teacher.`` prefixed keys), the teacher's only."""
    state: Mapping[str, Any] = obj
    for _ in range(len(_WRAPPER_KEYS)):  # wrappers may nest, e.g. {"model": {"teacher": ...}}
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner

    def outer_stripped(key: str) -> str:
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        return key

    if any(outer_stripped(k).startswith("teacher.") for k in state):
        state = {k: v for k, v in state.items() if outer_stripped(k).startswith("teacher.")}
    return state


def _named_tensors(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Keys stripped of wrapper prefixes (chunked block names made global), values checked
    to be tensors; raises :class:`WeightsError` on a non-tensor or two keys that collide."""
    result: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _CHUNKED_BLOCK.sub(r"blocks.\1.", _strip_prefixes(key))
        if not isinstance(value, Tensor):
            raise WeightsError(f"entry {key!r} is a {type(value).__name__}, expected a tensor")
        if name in result:
            raise WeightsError(f"two checkpoint entries map to the parameter name {name!r} (one is {key!r})")
        result[name] = value
    return result


def extract_backbone_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Backbone state dict (DINOv2 parameter names) from any accepted layout.

    Unwraps ``teacher`` / ``model`` / ``state_dict`` containers; when student and teacher
    weights sit side by side (``teacher.`` prefixed keys), keeps the teacher's; strips
    ``module.``, ``_orig_mod.``, ``teacher.`` and ``backbone.`` prefixes; drops
    ``dino_head.`` / ``ibot_head.`` keys (:func:`extract_head_state_dicts` reads them);
    renames chunked ``blocks.c.i.`` to ``blocks.i.``. Raises :class:`WeightsError` for
    non-tensor entries or names that collide.
    """
    named = _named_tensors(_teacher_state(obj))
    result = {name: value for name, value in named.items() if not name.startswith(_HEAD_PREFIXES)}
    if not result:
        raise WeightsError("no backbone tensors found in the checkpoint")
    return result


def extract_head_state_dicts(obj: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """The DINO and iBOT heads of a DINOv2 / DinoBloom / dinov2_hier training checkpoint
    (the teacher's, as :func:`extract_backbone_state_dict`): ``{"dino_head": {name:
    tensor}, "ibot_head": {...}}`` with the head prefix removed (``mlp.0.weight``,
    ``last_layer.weight_g``, ...); only the heads the file has; empty for a released
    backbone or an export."""
    heads: dict[str, dict[str, Tensor]] = {}
    for name, value in _named_tensors(_teacher_state(obj)).items():
        for prefix in _HEAD_PREFIXES:
            if name.startswith(prefix):
                heads.setdefault(prefix[:-1], {})[name[len(prefix):]] = value
    return heads


def dtype_name(dtype: torch.dtype) -> str:
    """``int64`` for ``torch.int64``: how messages name a dtype."""
    return str(dtype).removeprefix("torch.")


def check_floating(own: Mapping[str, Tensor], state: Mapping[str, Any], source: str,
                   error: type[Exception] = WeightsError) -> None:
    """Raise ``error`` naming ``source``, the first key and its dtype when ``state`` holds an
    integer or bool tensor where the model (``own``: name -> tensor) has floating weights.
    Loading would cast it silently (``7`` -> ``7.0``, ``True`` -> ``1.0``): never weights."""
    for key, value in state.items():
        target = own.get(key)
        if (isinstance(value, Tensor) and target is not None and target.is_floating_point()
                and not value.is_floating_point()):
            raise error(
                f"{source}: '{key}' is {dtype_name(value.dtype)} {tuple(value.shape)}, expected floating-point "
                f"weights ({dtype_name(target.dtype)})"
            )


def _examples(keys: list[str]) -> str:
    if not keys:
        return "(none)"
    more = f", ... ({len(keys)} in all)" if len(keys) > _EXAMPLE_KEYS else ""
    return ", ".join(repr(k) for k in keys[:_EXAMPLE_KEYS]) + more


def _check_matched_share(model_state: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str) -> None:
    """Refuse a file that provides less than :data:`MIN_MATCHED_SHARE` of the model's
    weights (by element count), naming unmatched keys of both sides."""
    total = sum(v.numel() for v in model_state.values())
    matched = [k for k in model_state if k in state]
    share = sum(model_state[k].numel() for k in matched) / total if total else 1.0
    if share >= MIN_MATCHED_SHARE:
        return
    missing = [k for k in model_state if k not in state]
    foreign = [k for k in state if k not in model_state]
    raise WeightsError(
        f"{source}: matches {len(matched)} of {len(model_state)} backbone tensors ({100 * share:.1f}% of the "
        f"weights; at least {100 * MIN_MATCHED_SHARE:.0f}% must match): not weights of this backbone? "
        f"model keys not in the file e.g. {_examples(missing)}; file keys not in the model e.g. {_examples(foreign)}"
    )


def load_backbone_state(model: VisionTransformer, state: dict[str, Tensor], source: str) -> LoadReport:
    """Load a backbone state dict (DINOv2 names, as :func:`extract_backbone_state_dict`
    gives) into ``model`` in place (non-strict); ``source`` names it in the errors.

    ``pos_embed`` is resampled (bicubic) to the model's patch grid when the checkpoint
    was trained at another resolution. Any other key present in both with a different
    shape raises :class:`WeightsError` naming the first such key and both shapes; so does
    an integer or bool tensor where the model has floating weights (naming key and dtype),
    and a state providing less than :data:`MIN_MATCHED_SHARE` of the model's weights
    (by element count; naming example keys of both sides). The model is left untouched
    when it raises. Keys present on one side only are returned in the report for the
    caller to log. Files and other layouts: :func:`dinov2_hier.models.load_backbone_weights`.
    """
    state = dict(state)  # pos_embed may be replaced: never in the caller's mapping
    model_state = model.state_dict()
    check_floating(model_state, state, source)  # before pos_embed is resampled as floats
    report = LoadReport()
    ckpt_pos = state.get("pos_embed")
    if ckpt_pos is not None and ckpt_pos.shape != model_state["pos_embed"].shape:
        same_width = ckpt_pos.ndim == 3 and ckpt_pos.shape[-1] == model.embed_dim
        if same_width:  # otherwise left to the shape check below, which names it
            try:
                state["pos_embed"] = interpolate_pos_embed(
                    ckpt_pos, model.grid_size, model.interpolate_offset, model.interpolate_antialias
                )
            except ValueError as err:
                raise WeightsError(f"{source}: cannot interpolate pos_embed: {err}") from err
            report.interpolated.append("pos_embed")

    for key, value in state.items():
        if key in model_state and value.shape != model_state[key].shape:
            raise WeightsError(
                f"{source}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} "
                f"vs model {tuple(model_state[key].shape)}"
            )
    _check_matched_share(model_state, state, source)
    result = model.load_state_dict(state, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    return report
