"""Supervised contrastive losses: SupCon and its hierarchical version.

* :class:`SupConLoss` -- Khosla et al. (2020), the ``L_out`` form (mean over positives
  outside the log).
* :class:`HierSupConLoss` -- after Zhang et al. (2022), "Use all the labels" (HiMulConE
  with the HMCE constraint), as used by Chossegros et al. (2.3.2): one SupCon per depth
  of the tree, level penalties, and the constraint that a coarser level's loss is never
  below a finer level's.

Features are L2-normalised inside, in float32. Samples with label ``-1`` are ignored
entirely: they are neither anchors nor contrast samples (their class is unknown, so
treating them as negatives would push possible positives apart). Losses are computed
on this rank's samples only. See :mod:`dinov2_hier.losses.hierarchical` for the shared
conventions (node-index targets, exact 0 for no usable label, CPU-only value checks).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.centering import LossInputError, _check_positive
from dinov2_hier.losses.inputs import _check_hierarchy, check_2d, check_targets
from dinov2_hier.losses.ssl import _autocast_disabled
from dinov2_hier.losses.tree_tables import class_at_level_table

__all__ = ["HierSupConLoss", "SupConLoss", "supcon_per_level"]


def supcon_per_level(
    features: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SupCon (``L_out``) for ``K`` labelings of the same ``n`` samples at once.

    Args:
        features: ``[n, D]`` features (any float dtype; normalised here in float32).
        labels: ``long [K, n]``; ``labels[k, i] < 0`` removes sample ``i`` from labeling ``k``.
        temperature: ``tau > 0``.

    Returns:
        ``(losses float32 [K], active bool [K])``. For labeling ``k`` and anchor ``i`` with
        positives ``P(i) = {p != i : labels[k, p] == labels[k, i]}`` and contrast set
        ``A(i) = {a != i : labels[k, a] >= 0}``::

            l(i) = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau) )

        ``losses[k]`` is the mean of ``l(i)`` over anchors with ``|P(i)| > 0`` (0 if none;
        ``active[k]`` says whether there was one).
    """
    n = features.shape[0]
    with _autocast_disabled(features.device):
        unit = F.normalize(features.float(), p=2.0, dim=-1)
        sim = (unit @ unit.t()) / temperature  # [n, n]
        valid = labels >= 0  # [K, n]
        not_self = ~torch.eye(n, dtype=torch.bool, device=features.device)
        pair = valid.unsqueeze(2) & valid.unsqueeze(1) & not_self  # [K, n, n]
        positive = pair & (labels.unsqueeze(2) == labels.unsqueeze(1))
        # A row with an empty contrast set would give logsumexp(-inf...) = -inf and NaN
        # gradients; let it see itself instead. Such a row has no positive, so it is never used.
        lonely = ~pair.any(dim=2, keepdim=True)  # [K, n, 1]
        in_denominator = pair | (lonely & ~not_self)
        log_denominator = sim.unsqueeze(0).masked_fill(~in_denominator, float("-inf")).logsumexp(dim=2)  # [K, n]
        log_prob = sim.unsqueeze(0) - log_denominator.unsqueeze(2)  # [K, n, n], finite everywhere
        n_positive = positive.sum(dim=2)  # [K, n]
        anchor_loss = -log_prob.masked_fill(~positive, 0.0).sum(dim=2) / n_positive.clamp(min=1)
        is_anchor = n_positive > 0
        n_anchor = is_anchor.sum(dim=1)  # [K]
        losses = anchor_loss.masked_fill(~is_anchor, 0.0).sum(dim=1) / n_anchor.clamp(min=1)
    return losses, n_anchor > 0


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, ``L_out``), mean over anchors.

    ``forward(features [n, D], labels [n])``: two samples are positives iff they share a
    label ``>= 0``; anchors without a positive are skipped; ``-1`` is ignored. The
    ``tau / base_tau`` rescaling of Khosla's code is not applied (it is 1 by default).

    With ``hierarchy`` given, labels are node indices and only leaf labels take part
    (internal-node labels are dropped like in :class:`~dinov2_hier.losses.FlatCELoss`:
    a "neutrophil" may be a band or a segmented one, so it is neither a positive nor
    a safe negative of either).
    """

    is_leaf: torch.Tensor

    def __init__(self, temperature: float = 0.1, hierarchy: Hierarchy | None = None) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = float(temperature)
        self.num_nodes: int | None = None
        if hierarchy is not None:
            hierarchy = _check_hierarchy(hierarchy)
            self.num_nodes = hierarchy.num_nodes
            leaf = torch.arange(hierarchy.num_nodes) < hierarchy.num_leaves  # leaves come first
            self.register_buffer("is_leaf", leaf, persistent=False)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``features [n, D]``, ``labels long [n]`` (``-1`` ignored) -> float32 scalar."""
        check_2d("features", features)
        labels = check_targets("labels", labels, features.shape[0], self.num_nodes)
        if self.num_nodes is not None:
            keep = (labels >= 0) & self.is_leaf[labels.clamp(min=0)]
            labels = torch.where(keep, labels, torch.full_like(labels, -1))
        losses, _ = supcon_per_level(features, labels.unsqueeze(0), self.temperature)
        return losses[0]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, hierarchy={'yes' if self.num_nodes is not None else 'no'}"


class HierSupConLoss(nn.Module):
    """Hierarchical supervised contrastive loss (Zhang et al. 2022, HMCE; Chossegros et al. 2.3.2).

    Levels are the depths ``d = 1 .. max_depth``. At level ``d`` a sample's class is
    :func:`~dinov2_hier.losses.tree_tables.class_at_level_table` ``[y, d - 1]``: its
    ancestor at depth ``d``; a leaf shallower than ``d`` is its own class (it is fully
    specified); an internal label shallower than ``d`` drops out of that level (neither
    anchor nor contrast sample). So the finest level contrasts sibling leaves (band vs
    segmented neutrophils), which the published port skips.

    ``L_d`` is :func:`supcon_per_level` at level ``d`` (positives: same class at depth ``d``).
    Levels are numbered from the finest, ``k = max_depth - d + 1`` (``k = 1`` is the leaf
    level), as in Zhang et al., whose ``l = 1`` is the finest label level. Then

    * constraint (HMCE): ``L~_k = max(L_k, L~_{k-1})``, i.e. a level's loss is at least the
      loss of every finer level, so pairs sharing only a coarse node are never pulled
      together more than pairs sharing a finer one (the coarse term keeps pulling the
      fine pairs until they are at least as close). Zhang et al.'s equation writes the
      max per pair; their released code and this class apply it to the level losses.
    * penalty ``lambda_k = 1 / k`` (Chossegros et al.: "we set lambda_l = 1/l"): the
      finest level weighs 1, the lineage level ``1 / max_depth``; finer pairs carry more
      weight, as in Zhang et al. (whose code uses ``2 ** (1 / l)``). Override with
      ``level_weights`` (one per depth ``1 .. max_depth``).
    * ``loss = (1 / max_depth) * sum_k lambda_k * L~_k`` (the ``1 / |L|`` of the paper is a
      fixed number of levels: a level without any positive pair adds 0).

    Inactive levels are always the finest ones (a pair sharing a class at depth ``d``
    shares one at every shallower depth), and every ``L_k >= 0``, so they never raise
    a coarser level's max.

    ``dedup`` (default False: every level contrasts the whole batch): Zhang et al.'s
    released code (``HMLC.forward``, used by the paper's code) keeps, after each level,
    one representative sample per class of that level before it computes the next
    coarser level, so a coarse level's positives are samples of *different* finer
    classes and each finer class counts once there. With ``dedup=True`` level ``d``
    contrasts only the samples kept by levels ``max_depth .. d + 1``: after level ``d``
    the representative of each depth-``d`` class is its **first sample in batch order**
    among those still kept (what their ``unique`` helper returns) and every other sample
    of the class is dropped (neither anchor nor contrast sample) from the coarser
    levels. A sample whose label is coarser than depth ``d`` has no class there and is
    kept (it duplicates no known finer class). ``sample_ids`` in :meth:`forward` groups
    rows that are views of one image (Zhang et al. keep every view of a representative:
    its views stay positives of each other at every level); by default each row is its
    own sample. ``dedup`` changes only which rows take part, not the formula; it costs
    ``max_depth`` scatters over the batch and a ``[num_nodes]`` vector.
    """

    level_table: torch.Tensor
    level_weights: torch.Tensor

    def __init__(
        self,
        hierarchy: Hierarchy,
        temperature: float = 0.1,
        level_weights: Sequence[float] | None = None,
        dedup: bool = False,
    ) -> None:
        super().__init__()
        hierarchy = _check_hierarchy(hierarchy)
        _check_positive("temperature", temperature)
        if not isinstance(dedup, bool):
            raise LossInputError(f"dedup must be true or false, got {dedup!r}")
        self.temperature = float(temperature)
        self.dedup = dedup
        self.num_nodes = hierarchy.num_nodes
        self.num_levels = hierarchy.max_depth
        self.register_buffer("level_table", class_at_level_table(hierarchy), persistent=False)
        self.register_buffer("level_weights", self._weights(level_weights, self.num_levels), persistent=False)

    @staticmethod
    def _weights(level_weights: Sequence[float] | None, num_levels: int) -> torch.Tensor:
        """``float32 [max_depth]`` penalty per depth ``1 .. max_depth`` (default ``1 / k``, ``k`` from the leaves)."""
        if level_weights is None:
            return torch.tensor([1.0 / (num_levels - d + 1) for d in range(1, num_levels + 1)])
        values = list(level_weights) if not isinstance(level_weights, (str, bytes)) else None
        if (
            values is None
            or len(values) != num_levels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not all(math.isfinite(v) and v >= 0 for v in values)
        ):
            raise LossInputError(
                f"level_weights must be {num_levels} finite numbers >= 0 (depth 1 .. {num_levels}), "
                f"got {level_weights!r}"
            )
        return torch.tensor([float(v) for v in values])

    def level_labels(self, targets: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``long [max_depth, n]``: each row's class at depth ``d`` (row ``d - 1``), ``-1`` where
        it takes no part in that level (no class there, unlabelled, or, with ``dedup``,
        dropped as a duplicate of a finer class)."""
        labels = self.level_table[targets.clamp(min=0)]  # [n, L] node indices
        labels = torch.where((targets >= 0).unsqueeze(1), labels, torch.full_like(labels, -1)).t()
        if not self.dedup:
            return labels
        n = targets.shape[0]
        rows = torch.arange(n, device=targets.device)
        sample_ids = rows if sample_ids is None else sample_ids.to(targets.device).long()
        kept = torch.ones(n, dtype=torch.bool, device=targets.device)
        out = torch.empty_like(labels)
        for d in range(self.num_levels, 0, -1):  # finest level first, as Zhang et al.
            level = torch.where(kept, labels[d - 1], torch.full_like(labels[d - 1], -1))
            out[d - 1] = level
            has_class = level >= 0
            # First kept row of each class (n where none), then that row's sample.
            first = torch.full((self.num_nodes,), n, dtype=torch.long, device=targets.device)
            first = first.scatter_reduce(0, level.clamp(min=0), torch.where(has_class, rows, n), reduce="amin")
            representative = sample_ids[first[level.clamp(min=0)].clamp(max=n - 1)]
            kept = kept & (~has_class | (sample_ids == representative))
        return out

    def level_losses(
        self, features: torch.Tensor, targets: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(raw, constrained, active)``, each ``[max_depth]`` indexed by depth ``d - 1``."""
        check_2d("features", features)
        targets = check_targets("targets", targets, features.shape[0], self.num_nodes)
        if sample_ids is not None and (sample_ids.dim() != 1 or sample_ids.shape[0] != features.shape[0]):
            raise LossInputError(f"sample_ids must have shape [{features.shape[0]}], got {tuple(sample_ids.shape)}")
        labels = self.level_labels(targets, sample_ids)
        raw, active = supcon_per_level(features, labels, self.temperature)
        # Finest level first (flip), running max towards the coarse end, back to depth order.
        constrained = torch.cummax(raw.flip(0), dim=0).values.flip(0)
        return raw, constrained, active

    def forward(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        return_levels: bool = False,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``features [n, D]``, ``targets long [n]`` node indices -> float32 scalar.

        ``sample_ids`` (``long [n]``, optional, used by ``dedup`` only): rows with the same
        id are views of one image and are kept or dropped together.
        With ``return_levels=True`` returns ``(loss, {"raw", "constrained", "active",
        "weights"})``, each ``[max_depth]`` indexed by depth ``d - 1``.
        """
        raw, constrained, active = self.level_losses(features, targets, sample_ids)
        weighted = torch.where(active, self.level_weights.float() * constrained, torch.zeros_like(constrained))
        loss = weighted.sum() / self.num_levels
        if return_levels:
            levels = {"raw": raw, "constrained": constrained, "active": active, "weights": self.level_weights.float()}
            return loss, levels
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, num_levels={self.num_levels}, dedup={self.dedup}"

