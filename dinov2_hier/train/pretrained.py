"""Starting a run from released or earlier weights: the backbone, the DINO / iBOT heads
when the file has them, and the head warm-up when it has not.

A DINOv2 / DinoBloom training checkpoint holds the teacher's backbone *and* its DINO and
iBOT heads. Continuing with fresh heads makes the first steps chase random prototypes
with a pretrained backbone (DINOv2 users report collapse this way); so the heads load
when they fit (``student.pretrained_heads``), and when some head stays fresh the backbone
is frozen for ``student.head_warmup_epochs`` while the heads learn.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from ..models.artifacts import export_tensors, load_backbone_weights, locate_export
from ..models.heads import upgrade_last_layer_keys
from ..models.weights import LoadReport, WeightsError, extract_head_state_dicts, read_state_dict

logger = logging.getLogger("dinov2_hier.train")


@dataclass
class PretrainedStart:
    """What :func:`load_pretrained` did.

    ``heads_loaded``: our head -> the file's head it was loaded from (student and
    teacher). ``heads_fresh``: our head -> why it stayed randomly initialised.
    ``head_warmup_iterations``: iterations at the start with the backbone frozen (0 when
    every head loaded or the warm-up is off).
    """

    backbone: LoadReport
    heads_loaded: dict[str, str] = field(default_factory=dict)
    heads_fresh: dict[str, str] = field(default_factory=dict)
    head_warmup_iterations: int = 0


def heads_mode(cfg: DictConfig) -> str:
    """``student.pretrained_heads`` as ``"auto"``, ``"true"`` or ``"false"`` (YAML reads
    true / false as booleans; configs saved before the key existed loaded no heads)."""
    value = cfg.student.get("pretrained_heads", False)
    return "auto" if value == "auto" else str(bool(value)).lower()


def head_warmup_iterations(cfg: DictConfig) -> int:
    """``student.head_warmup_epochs`` in iterations (0 for configs saved before the key)."""
    return round(float(cfg.student.get("head_warmup_epochs", 0)) * cfg.train.epoch_length)


def _fitting_state(module: nn.Module, state: dict[str, Tensor]) -> str | None:
    """``None`` when ``state`` has exactly ``module``'s keys and shapes, else why not."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        return f"the file's head lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            return f"{key!r} is {tuple(state[key].shape)} in the file, {tuple(value.shape)} here"
    extra = sorted(set(state) - set(own))
    if extra:
        return f"the file's head has {extra[0]!r}, which this head has not (another head layout)"
    return None


def _read_weights(path: str) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """``(raw, backbone)``: the file as stored and what holds its backbone. An export of
    ``python -m dinov2_hier.export`` (its folder, ``config.json`` or weights file; either
    layout) gives its tensors in DINOv2's layout (a timm-layout file converted back);
    anything else its raw mapping, as read."""
    try:
        weights, document, source = locate_export(path)
    except WeightsError:  # not an export (or another project's timm folder): plain weights
        raw = read_state_dict(path)
        return raw, raw
    raw = read_state_dict(weights)
    return raw, export_tensors(raw, document, source)


def load_pretrained(
    student: nn.ModuleDict, teacher: nn.ModuleDict, path: str, mode: str, warmup_iterations: int
) -> PretrainedStart:
    """Load ``path`` into the student's and teacher's ``backbone`` and, as ``mode`` says,
    their ``dino_head`` / ``ibot_head``.

    ``mode``: ``auto`` loads each head the file has whose keys and shapes fit (a file
    whose one head serves DINO and iBOT, DINOv2's default, also gives a separate iBOT
    head) and leaves the others fresh; ``true`` raises :class:`WeightsError` naming the
    file and the reason when a head cannot load; ``false`` loads no head. The warm-up
    applies when some head stays fresh. Raises :class:`WeightsError` for a backbone that
    does not fit (:func:`load_backbone_weights`).
    """
    raw, backbone = _read_weights(path)
    start = PretrainedStart(backbone=load_backbone_weights(student["backbone"], backbone, source=path))
    teacher["backbone"].load_state_dict(student["backbone"].state_dict())
    file_heads = extract_head_state_dicts(raw) if mode != "false" else {}
    for name in ("dino_head", "ibot_head"):
        if name not in student or not any(p.requires_grad for p in student[name].parameters()):
            continue  # absent, or frozen because unused (dino.loss_weight=0): neither loaded nor warmed up
        source = name if name in file_heads else ("dino_head" if "dino_head" in file_heads else None)
        if mode == "false":
            start.heads_fresh[name] = "student.pretrained_heads=false"
            continue
        if source is None:
            start.heads_fresh[name] = "the file has no DINO / iBOT heads (a released backbone or an export)"
            continue
        state = upgrade_last_layer_keys(dict(file_heads[source]))
        why_not = _fitting_state(student[name], state)
        if why_not is not None:
            start.heads_fresh[name] = f"the file's {source} does not fit: {why_not}"
            continue
        student[name].load_state_dict(state)
        teacher[name].load_state_dict(state)
        start.heads_loaded[name] = source
    if mode == "true" and start.heads_fresh:
        name, why = next(iter(start.heads_fresh.items()))
        raise WeightsError(f"{path}: student.pretrained_heads=true but {name} cannot load: {why}")
    if start.heads_fresh:
        start.head_warmup_iterations = warmup_iterations
    return start


def log_pretrained(path: str, start: PretrainedStart) -> None:
    """What was loaded, in a few lines; a partial backbone match and fresh heads warn."""
    report = start.backbone
    # A partial match is allowed (see MIN_MATCHED_SHARE) but never quiet: what stays
    # randomly initialised and what was ignored is a warning.
    level = logging.WARNING if report.missing or report.unexpected else logging.INFO
    logger.log(
        level,
        "loaded pretrained backbone %s: %d missing keys %s (left randomly initialised), %d unexpected keys %s "
        "(ignored), interpolated %s",
        path, len(report.missing), report.missing[:5], len(report.unexpected), report.unexpected[:5],
        report.interpolated,
    )
    for name, source in start.heads_loaded.items():
        logger.info("loaded %s from the file's %s (student and teacher)", name, source)
    for name, why in start.heads_fresh.items():
        logger.warning("%s starts fresh: %s", name, why)
    if start.heads_fresh:
        if start.head_warmup_iterations:
            logger.warning(
                "head warm-up: the backbone stays frozen for the first %d iterations while the fresh heads train "
                "(student.head_warmup_epochs)", start.head_warmup_iterations,
            )
        else:
            logger.warning("no head warm-up (student.head_warmup_epochs=0): the pretrained backbone trains "
                           "against fresh heads from the first step")
