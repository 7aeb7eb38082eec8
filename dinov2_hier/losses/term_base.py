"""The base of every supervised term and the heads they put on the CLS tokens.

Split from :mod:`dinov2_hier.losses.supervised` so that modules defining more terms
(:mod:`dinov2_hier.losses.guided`) and the registry there can both import it.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from dinov2_hier.errors import suggest
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.centering import LossInputError
from dinov2_hier.losses.inputs import _check_hierarchy, check_2d

__all__ = ["HeadKind", "SupervisedTerm", "build_head", "build_projection"]

HeadKind = Literal["linear", "mlp"]
_HEAD_KINDS = ("linear", "mlp")


# --------------------------------------------------------------------------- heads


def build_head(in_dim: int, out_dim: int, head: HeadKind = "mlp", hidden_dim: int = 2048) -> nn.Module:
    """``[n, in_dim] -> [n, out_dim]``: ``linear`` (one layer) or ``mlp`` (Linear-GELU-Linear)."""
    _check_dim("in_dim", in_dim)
    _check_dim("out_dim", out_dim)
    if head == "linear":
        return nn.Linear(in_dim, out_dim)
    if head == "mlp":
        _check_dim("hidden_dim", hidden_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
    raise LossInputError(f"head must be one of {_HEAD_KINDS}, got {head!r}{suggest(head, _HEAD_KINDS)}")


def build_projection(embed_dim: int, projection_dim: int, head: HeadKind, hidden_dim: int) -> nn.Module:
    """The optional projection of contrastive and embedding terms: ``[n, embed_dim] ->
    [n, projection_dim]`` (:func:`build_head`), or the CLS tokens themselves for
    ``projection_dim`` 0 (Chossegros et al. Fig. 6)."""
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 0:
        raise LossInputError(f"projection_dim must be an int >= 0 (0 = no projection), got {projection_dim!r}")
    if head not in _HEAD_KINDS:
        raise LossInputError(f"head must be one of {_HEAD_KINDS}, got {head!r}{suggest(head, _HEAD_KINDS)}")
    return build_head(embed_dim, projection_dim, head, hidden_dim) if projection_dim else nn.Identity()


def _check_dim(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LossInputError(f"{name} must be an int >= 1, got {value!r}")


# --------------------------------------------------------------------------- terms


class SupervisedTerm(nn.Module):
    """Base class: ``forward(cls_tokens [2B, D], targets long [B]) -> float32 scalar``.

    Subclasses set ``name`` and implement :meth:`loss` on the ``2B`` rows with the
    targets already repeated for both crops.
    """

    name: ClassVar[str] = ""
    #: Whether the loss compares the rows with each other (contrastive, pairwise, triplet):
    #: such terms see the CLS tokens of every rank (``supervision.contrast_across_ranks``).
    pairwise: ClassVar[bool] = False
    #: Whether the term needs the batch's domains (``boda``): ``train/meta_arch.py`` calls such
    #: terms as ``term(cls_tokens, targets, domains=long [B])`` and every other term as before;
    #: :func:`~dinov2_hier.losses.supervised.build_supervised_terms` gives them the vocabulary.
    uses_domains: ClassVar[bool] = False

    def __init__(self, hierarchy: Hierarchy, embed_dim: int) -> None:
        super().__init__()
        self.hierarchy = _check_hierarchy(hierarchy)
        _check_dim("embed_dim", embed_dim)
        self.embed_dim = embed_dim

    def forward(self, cls_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``cls_tokens [2B, D]`` crop-major and node indices (``-1`` unlabelled) -> scalar.

        ``targets`` is ``[B]`` (one per image, applied to both crops) or ``[2B]`` (one per
        crop row, crop-major: how ``supervision.crops=unmasked`` leaves masked crops out).
        """
        check_2d("cls_tokens", cls_tokens, self.embed_dim)
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
            raise LossInputError(f"targets must be a 1-D tensor [B], got {getattr(targets, 'shape', targets)!r}")
        n_rows = cls_tokens.shape[0]
        if n_rows % 2 or targets.shape[0] not in (n_rows // 2, n_rows):
            raise LossInputError(
                f"cls_tokens must hold 2B rows (two crops per image, crop-major) for B={targets.shape[0]} "
                f"targets (or one target per row), got {n_rows} rows"
            )
        targets = targets.to(cls_tokens.device)
        # Crop-major rows: the same label sequence for crop 0 and crop 1.
        return self.loss(cls_tokens, targets if targets.shape[0] == n_rows else targets.repeat(2))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``tokens [n, D]``, ``targets [n]`` (already one per row) -> scalar."""
        raise NotImplementedError
