"""Guided embedding terms (Gräbel et al.) and the batch-hard triplet baseline.

The embedding is a projection of the CLS token (``projection_dim`` wide, ``n_max``; 0 =
the CLS token itself). With the growing schedule (``growth > 0``) only its first
``n = min(max(growth * epoch, 2), n_max)`` dimensions are used at an epoch
(:func:`~dinov2_hier.losses.guide.growing_dims`): the other dimensions are masked to 0,
so the shapes never change with the epoch (no recompilation, no host synchronisation).
The trainer tells a term the epoch with :meth:`GuidedTerm.set_epoch` (or
:func:`set_supervised_epoch` for all terms of a run); until then a growing term is at
epoch 0.

With ``e_i`` the used embedding of row ``i`` (first ``n`` dims), ``g(y)`` the guide point of
label node ``y`` (:mod:`dinov2_hier.losses.guide`; a coarse label uses its own node's
point), ``V`` the labelled rows and ``lambda`` = ``norm_weight`` (0.001, the paper's factor
"for each loss"):

* ``guide2d``: ``mean_{i in V} ( |e_i[0] - g_x| + |e_i[1] - g_y| + lambda ||e_i||_2 )``.
* ``guide_distance`` (eq. 2): ``2 / (b (b - 1)) sum_{i<j in V} | ||e_i - e_j||_1 - ||g(y_i) - g(y_j)||_1 |``
  with ``b = |V|``, plus ``lambda`` times the mean of ``||e_i||_2`` over ``V``.
* ``triplet`` (batch hard, Hermans et al. 2017): for each labelled anchor with a positive
  and a negative in the batch, ``relu(max_pos d - min_neg d + margin)`` with ``d`` the
  Euclidean distance, averaged over those anchors, plus the norm term. Positives share
  the anchor's leaf label (the anchor's other crop included); internal-node labels are
  dropped as in ``supcon``.

Unlabelled rows (``-1``) take no part; a batch without a usable label (or pair) gives 0.
Everything is computed in float32 with autocast off.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.centering import LossInputError
from dinov2_hier.losses.guide import growing_dims, guide_points
from dinov2_hier.losses.inputs import check_targets
from dinov2_hier.losses.ssl import _autocast_disabled
from dinov2_hier.losses.term_base import HeadKind, SupervisedTerm, build_projection
from dinov2_hier.paths import resolve_resource

logger = logging.getLogger(__name__)

__all__ = [
    "Guide2DTerm",
    "GuideDistanceTerm",
    "GuidedTerm",
    "TripletTerm",
    "batch_hard_triplet_loss",
    "guide2d_loss",
    "guide_distance_loss",
    "set_supervised_epoch",
]


# --------------------------------------------------------------------------- losses


def _mean_over(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; exactly 0 (with a zero gradient) when none."""
    picked = torch.where(mask, values, torch.zeros_like(values))
    return picked.sum() / mask.sum().clamp(min=1)


def _norms(embedding: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 norms with a gradient of 0 (not NaN) at a zero row."""
    squared = embedding.square().sum(dim=1)
    safe = torch.where(squared > 0, squared, torch.ones_like(squared))
    return torch.where(squared > 0, safe.sqrt(), torch.zeros_like(squared))


def guide2d_loss(
    embedding: torch.Tensor, points: torch.Tensor, valid: torch.Tensor, norm_weight: float = 0.001
) -> torch.Tensor:
    """``embedding [n, m >= 2]`` (already masked to the used dims), ``points [n, 2]`` (each
    row's guide point), ``valid bool [n]`` -> mean over valid rows of the L1 distance of the
    first two dims to the point plus ``norm_weight`` times the row's L2 norm."""
    l1 = (embedding[:, :2] - points).abs().sum(dim=1)
    return _mean_over(l1 + norm_weight * _norms(embedding), valid)


def _pairwise_l1(x: torch.Tensor) -> torch.Tensor:
    """``[n, m] -> [n, n]`` L1 distances (memory ``n * n * m`` for ``m <= 2``, cdist above)."""
    if x.shape[1] <= 2:
        return (x.unsqueeze(1) - x.unsqueeze(0)).abs().sum(dim=2)
    return torch.cdist(x, x, p=1.0)


def guide_distance_loss(
    embedding: torch.Tensor, points: torch.Tensor, valid: torch.Tensor, norm_weight: float = 0.001
) -> torch.Tensor:
    """Equation 2 over the valid rows plus ``norm_weight`` x their mean L2 norm (see module doc)."""
    n = embedding.shape[0]
    gap = (_pairwise_l1(embedding) - _pairwise_l1(points)).abs()
    upper = torch.ones(n, n, dtype=torch.bool, device=embedding.device).triu(diagonal=1)
    pairs = upper & valid.unsqueeze(0) & valid.unsqueeze(1)
    # The mean over the b (b - 1) / 2 pairs i < j is eq. 2's 2 / (b (b - 1)) times the sum.
    return _mean_over(gap, pairs) + norm_weight * _mean_over(_norms(embedding), valid)


def _pairwise_l2(x: torch.Tensor) -> torch.Tensor:
    """``[n, m] -> [n, n]`` Euclidean distances with finite gradients at 0 (equal rows)."""
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).square().sum(dim=2) if x.shape[1] <= 2 else None
    if squared is None:
        gram = x @ x.t()
        diag = gram.diagonal()
        squared = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * gram).clamp(min=0)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, torch.ones_like(squared)).sqrt(), torch.zeros_like(squared))


def batch_hard_triplet_loss(
    embedding: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, norm_weight: float = 0.001
) -> torch.Tensor:
    """Batch-hard triplet loss on ``embedding [n, m]`` with ``labels long [n]`` (``< 0``
    ignored): mean over anchors with a positive and a negative of
    ``relu(hardest positive distance - hardest negative distance + margin)``, plus
    ``norm_weight`` x the mean L2 norm of the labelled rows. No host synchronisation."""
    n = embedding.shape[0]
    dist = _pairwise_l2(embedding)
    valid = labels >= 0
    both = valid.unsqueeze(0) & valid.unsqueeze(1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    not_self = ~torch.eye(n, dtype=torch.bool, device=embedding.device)
    positive = both & same & not_self
    negative = both & ~same
    hardest_pos = torch.where(positive, dist, torch.zeros_like(dist)).amax(dim=1)
    hardest_neg = torch.where(negative, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
    anchor = positive.any(dim=1) & negative.any(dim=1)
    hardest_neg = torch.where(anchor, hardest_neg, torch.zeros_like(hardest_neg))
    per_anchor = torch.relu(hardest_pos - hardest_neg + margin)
    return _mean_over(per_anchor, anchor) + norm_weight * _mean_over(_norms(embedding), valid)


# --------------------------------------------------------------------------- terms


def _check_number(name: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or value == float("inf"):
        raise LossInputError(f"{name} must be a finite number >= {low}, got {value!r}")
    return float(value)


class GuidedTerm(SupervisedTerm):
    """A projection head to an ``n_max``-dim embedding, the growing schedule and the norm weight."""

    dims: torch.Tensor

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        projection_dim: int,
        head: HeadKind,
        hidden_dim: int,
        growth: int,
        norm_weight: float,
    ) -> None:
        super().__init__(hierarchy, embed_dim)
        self.projection = build_projection(embed_dim, projection_dim, head, hidden_dim)
        self.n_max = projection_dim or embed_dim
        if self.n_max < 2:
            raise LossInputError(f"the embedding needs at least 2 dimensions, got {self.n_max} (projection_dim)")
        if isinstance(growth, bool) or not isinstance(growth, int) or growth < 0:
            raise LossInputError(f"growth must be an int >= 0 (0 = no growing embedding), got {growth!r}")
        self.growth = growth
        self.norm_weight = _check_number("norm_weight", norm_weight)
        self.epoch = 0
        self._epoch_told = False  # Python flag: warn once if a growing term never hears the epoch
        # Non-persistent: set from the epoch by the trainer, so checkpoints keep their keys.
        self.register_buffer("dims", torch.tensor(growing_dims(0, self.n_max, growth)), persistent=False)

    def set_epoch(self, epoch: int) -> None:
        """Use ``growing_dims(epoch, n_max, growth)`` dimensions from now on (an in-place
        write to a device buffer: no synchronisation, no recompilation)."""
        self.dims.fill_(growing_dims(epoch, self.n_max, self.growth))
        self.epoch = epoch
        self._epoch_told = True

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n, D] -> [n, n_max]`` float32, dims beyond the schedule's ``n`` set to 0."""
        if self.growth and self.training and not self._epoch_told:
            logger.warning(
                "%s: growth=%d but nothing called set_epoch(); the embedding stays at %d dimensions",
                self.name, self.growth, growing_dims(0, self.n_max, self.growth),
            )
            self._epoch_told = True
        embedding = self.projection(tokens).float()
        used = torch.arange(self.n_max, device=embedding.device) < self.dims
        return torch.where(used, embedding, torch.zeros_like(embedding))

    def extra_repr(self) -> str:
        return f"n_max={self.n_max}, growth={self.growth}, epoch={self.epoch}, norm_weight={self.norm_weight}"


class _GuidePointTerm(GuidedTerm):
    """A guided term with a guide table ``[num_nodes, 2]`` indexed by the targets."""

    guide: torch.Tensor
    #: ``f(embedding [n, n_max], points [n, 2], labelled [n], norm_weight) -> scalar``.
    guide_loss: ClassVar[Callable[..., torch.Tensor]]

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        guide: str | Path | Mapping[str, Any] | None = None,
        projection_dim: int = 64,
        head: HeadKind = "linear",
        hidden_dim: int = 2048,
        growth: int = 0,
        norm_weight: float = 0.001,
    ) -> None:
        super().__init__(hierarchy, embed_dim, projection_dim, head, hidden_dim, growth, norm_weight)
        if isinstance(guide, (str, Path)):
            guide = resolve_resource(guide, "embedding guide")
        points = torch.tensor(guide_points(hierarchy, guide), dtype=torch.float32)
        self.register_buffer("guide", points, persistent=False)

    def rows(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embedding [n, n_max], guide point per row [n, 2], labelled bool [n])``."""
        targets = check_targets("targets", targets, tokens.shape[0], self.hierarchy.num_nodes)
        valid = targets >= 0
        return self.embed(tokens), self.guide[targets.clamp(min=0)], valid

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with _autocast_disabled(tokens.device):
            embedding, points, valid = self.rows(tokens, targets)
            return type(self).guide_loss(embedding, points, valid, self.norm_weight)


class Guide2DTerm(_GuidePointTerm):
    """``guide2d``: L1 of the first two embedding dims to the label's guide point + norm."""

    name = "guide2d"
    guide_loss = staticmethod(guide2d_loss)


class GuideDistanceTerm(_GuidePointTerm):
    """``guide_distance``: Gräbel et al.'s eq. 2 (pairwise L1 distances match the guide's) + norm."""

    name = "guide_distance"
    pairwise = True
    guide_loss = staticmethod(guide_distance_loss)


class TripletTerm(GuidedTerm):
    """``triplet``: batch-hard triplet loss on leaf labels (the paper's baseline) + norm."""

    name = "triplet"
    pairwise = True
    is_leaf: torch.Tensor

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        margin: float = 0.2,
        projection_dim: int = 64,
        head: HeadKind = "linear",
        hidden_dim: int = 2048,
        growth: int = 0,
        norm_weight: float = 0.001,
    ) -> None:
        super().__init__(hierarchy, embed_dim, projection_dim, head, hidden_dim, growth, norm_weight)
        self.margin = _check_number("margin", margin)
        leaf = torch.arange(hierarchy.num_nodes) < hierarchy.num_leaves  # leaves come first
        self.register_buffer("is_leaf", leaf, persistent=False)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = check_targets("targets", targets, tokens.shape[0], self.hierarchy.num_nodes)
        keep = (targets >= 0) & self.is_leaf[targets.clamp(min=0)]
        labels = torch.where(keep, targets, torch.full_like(targets, -1))
        with _autocast_disabled(tokens.device):
            return batch_hard_triplet_loss(self.embed(tokens), labels, self.margin, self.norm_weight)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, {super().extra_repr()}"


def set_supervised_epoch(terms: Mapping[str, nn.Module], epoch: int) -> None:
    """Tell every term of ``terms`` (e.g. a run's ``nn.ModuleDict``) that has a growing
    embedding the current epoch; other terms are left alone."""
    for term in terms.values():
        if isinstance(term, GuidedTerm):
            term.set_epoch(epoch)
