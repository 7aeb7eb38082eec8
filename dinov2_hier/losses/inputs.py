"""Input validation shared by the hierarchical and contrastive losses.

Targets are ``long [B]`` node indices (``-1`` unlabelled); logits are floating ``[n, K]``
tensors. Values are range-checked only on the CPU (see
:mod:`dinov2_hier.losses.hierarchical` for the conventions). Errors are
:class:`~dinov2_hier.losses.centering.LossInputError`.
"""
from __future__ import annotations

import torch

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.centering import LossInputError

__all__ = ["check_2d", "check_targets"]


def check_targets(name: str, targets: torch.Tensor, n_rows: int, num_nodes: int | None) -> torch.Tensor:
    """Validate ``targets [n_rows]`` (integer node indices, ``-1`` unlabelled); return them as long.

    Shape and dtype are always checked; values (``>= -1`` and, unless ``num_nodes`` is
    None, ``< num_nodes``) only on the CPU and outside ``torch.compile`` (reading them
    would synchronise with the device or break the compiled graph; training targets come
    from a label map that was validated against the hierarchy; see :mod:`dinov2_hier.losses.hierarchical`).
    """
    if not isinstance(targets, torch.Tensor):
        raise LossInputError(f"{name} must be a tensor of node indices, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != n_rows:
        raise LossInputError(f"{name} must have shape [{n_rows}], got {tuple(targets.shape)}")
    if targets.dtype == torch.bool or targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise LossInputError(f"{name} must hold integer node indices, got dtype {targets.dtype}")
    targets = targets.long()
    if targets.device.type == "cpu" and targets.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(targets.min()), int(targets.max())
        if low < -1 or (num_nodes is not None and high >= num_nodes):
            allowed = f"in [0, {num_nodes})" if num_nodes is not None else ">= 0"
            raise LossInputError(
                f"{name} must be indices {allowed} or -1 (unlabelled), got values in [{low}, {high}]"
            )
    return targets


def check_2d(name: str, x: torch.Tensor, n_cols: int | None = None) -> None:
    """``x`` must be a floating ``[n, K]`` tensor (with ``K == n_cols`` when given)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LossInputError(f"{name} must be a 2-D tensor [n, K], got {shape}")
    if not x.dtype.is_floating_point:
        raise LossInputError(f"{name} must be floating point, got dtype {x.dtype}")
    if n_cols is not None and x.shape[1] != n_cols:
        raise LossInputError(f"{name} must have {n_cols} columns, got shape {tuple(x.shape)}")


def _check_hierarchy(hierarchy: object) -> Hierarchy:
    if not isinstance(hierarchy, Hierarchy):
        raise LossInputError(f"hierarchy must be a Hierarchy, got {type(hierarchy).__name__}")
    return hierarchy
