"""Classification losses over a class hierarchy (leaf logits or per-level logits).

* :class:`HierCELoss` -- hierarchical cross-entropy (Bertinetto et al. 2020) with the
  multi-granular extension of Chossegros et al.: a label may be any non-root node.
* :class:`FlatCELoss` -- plain (or class-weighted) cross-entropy over the leaves; coarse labels dropped.
* :class:`MultiLevelCELoss` -- one cross-entropy per depth of the tree, averaged.
* :class:`DistanceLoss` -- expected tree distance ``sum_c p_c D[y, c]`` under the leaf softmax.

Conventions shared by every loss here and in :mod:`dinov2_hier.losses.contrastive`:

* Targets are ``long [B]`` node indices ``hierarchy.index(node_id)``; ``-1`` means
  unlabelled. The root carries no information and counts as unlabelled too.
* All index tables are built once from the tree and registered as buffers, so they
  follow ``.to(device)``; ``forward`` has no per-sample Python loop.
* Arithmetic is float32 whatever the input dtype (autocast is switched off inside).
* A batch without a usable label gives an exact ``0.`` that is still connected to the
  inputs' graph (``backward`` works and gives zero gradients, never NaN).
* Target values are range-checked only for CPU tensors: on an accelerator the check
  would force a device-to-host sync every step; out-of-range indices there fail in the
  indexing kernel instead.
* Losses are means over this rank's samples; nothing is all-reduced.

Tree size: the index tables, and the switch between dense tables (a tree of at most
:data:`DENSE_MAX_NODES` nodes) and the level-by-level tree path linear in the number of
nodes, are in :mod:`dinov2_hier.losses.tree_tables`; input checks in :mod:`.inputs`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.centering import LossInputError
from dinov2_hier.losses.class_weights import resolve_class_weights
from dinov2_hier.losses.inputs import _check_hierarchy, check_2d, check_targets
from dinov2_hier.losses.ssl import _autocast_disabled
from dinov2_hier.losses.tree_tables import (
    DENSE_MAX_NODES,
    _at_targets,
    _bottom_up,
    _level_columns,
    _level_members,
    _Levels,
    _parent_depth,
    _parent_positions,
    _segment_logsumexp,
    _segment_sum,
    _use_dense,
    class_at_level_table,
    leaf_membership,
    level_classes,
)

__all__ = [
    "DENSE_MAX_NODES",
    "DistanceLoss",
    "FlatCELoss",
    "HierCELoss",
    "MultiLevelCELoss",
    "class_at_level_table",
    "leaf_membership",
    "level_classes",
]


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``keep``; an exact 0 (with a grad_fn) when nothing is kept.

    ``where`` rather than a product, so a non-finite value in a dropped row cannot leak in.
    """
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp(min=1).to(total.dtype)


def _usable(targets: torch.Tensor, root_index: int) -> torch.Tensor:
    """``bool [B]``: labelled with something other than the root."""
    return (targets >= 0) & (targets != root_index)


# --------------------------------------------------------------------------- HierCE


class HierCELoss(nn.Module):
    """Hierarchical cross-entropy over leaf logits, for leaf or internal-node targets.

    With ``p`` the softmax over the leaves, ``p(n) = sum of p over the leaves under n``
    (so ``p(root) = 1``) and ``p(n | parent(n)) = p(n) / p(parent(n))``, the loss of a
    target ``t`` is

        ``L(t) = sum_{n on the path t -> root, n != root} exp(-alpha * depth(n)) * -log p(n | parent(n))``

    i.e. every edge ``(parent(n), n)`` is weighted by the depth of its child node
    (root depth 0, lineage edges ``exp(-alpha)``). A target that is an internal node
    uses only the edges from itself up to the root: its leaves are unknown, so the
    edges below it carry no information. This is exact for unbalanced subtrees and
    for leaves directly under the root (one edge of weight ``exp(-alpha)``).

    Relation to Bertinetto et al. (2020) / Chossegros et al. eq. (5)-(6): they write
    ``lambda(C) = exp(-alpha * h(C))`` with ``h`` the "height" of the class; their
    reference implementation takes the length of the node's tree position, i.e. its
    depth, which is what this class does: with ``alpha > 0`` edges near the root
    (generic concepts) weigh more. Reading ``h`` as height above the leaves would, on
    a balanced tree of depth ``H``, give ``exp(-alpha * (H - depth))`` = a constant times
    ``exp(+alpha * depth)``, i.e. this loss with ``-alpha``; negative ``alpha`` is allowed.
    With ``alpha = 0`` the sum telescopes to ``-log p(t)``.

    ``normalize`` (default False): False uses the weights ``exp(-alpha * depth)`` as
    written above (loss scale: a leaf target at depth ``H`` sums ``H`` edge terms, the
    first one weighted ``exp(-alpha)``; with ``alpha = 0`` it is ``-log p(t)``). True divides
    every weight by ``Z = sum over all nodes n of the tree, root included, of
    exp(-alpha * depth(n))``, as Bertinetto et al.'s reference code
    (``get_exponential_weighting(..., normalize=True)``, which sums over every
    ``treepositions()`` entry, the root's weight 1 included) and the paper's code do;
    ``Z = 14.48`` for ``hierarchies/wbc.json`` at ``alpha = 0.5``, so the loss (and its
    gradients) are ``1 / Z`` times the unnormalised ones: it is the same objective at a
    smaller scale, which matters only against the other terms' weights and the lr.

    Chossegros et al.'s internal-node extension: their eq. (7) also lists the edges
    below the node, but in their pseudo-code the numerators and denominators of those
    edges become unions over the node's leaves, so they are ``log 1 = 0`` and only the
    path above the node remains, as here. Their code indexes edges by distance from the
    leaf and averages the weights of the node's leaves per slot, which misaligns depths
    in unbalanced subtrees; building the path from the node itself avoids that.

    ``log p(n)`` is ``logsumexp`` of the leaf logits under ``n`` minus ``logsumexp`` of all
    of them, so tiny probabilities never underflow. Up to :data:`DENSE_MAX_NODES` nodes
    (``dense=None``, the default) this is a masked logsumexp over a ``[B, num_nodes,
    num_leaves]`` view with a dense ``[num_nodes, num_nodes]`` table of path weights;
    above it (or with ``dense=False``) the tree path: each level's logsumexps from its
    children's (a segmented logsumexp, deepest level first) and each node's path loss
    from its parent's (root first), linear in the tree size; the two agree to float32
    rounding.
    """

    membership: torch.Tensor
    parent_index: torch.Tensor
    path_weights: torch.Tensor
    tree_leaf_order: torch.Tensor
    tree_parent_slot: torch.Tensor
    tree_column: torch.Tensor
    level_weights: torch.Tensor

    def __init__(
        self, hierarchy: Hierarchy, alpha: float = 0.5, *, normalize: bool = False, dense: bool | None = None
    ) -> None:
        super().__init__()
        hierarchy = _check_hierarchy(hierarchy)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise LossInputError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(normalize, bool):
            raise LossInputError(f"normalize must be true or false, got {normalize!r}")
        self.alpha = float(alpha)
        self.normalize = normalize
        #: Every edge weight is multiplied by this: 1, or 1 / Z with normalize (see the class notes).
        self.weight_scale = 1.0 / self.weight_sum(hierarchy, self.alpha) if normalize else 1.0
        self.num_leaves = hierarchy.num_leaves
        self.num_nodes = hierarchy.num_nodes
        self.root_index = hierarchy.index(hierarchy.root)
        self.dense = _use_dense(hierarchy, dense)
        if self.dense:
            self.register_buffer("membership", leaf_membership(hierarchy), persistent=False)
            self.register_buffer("parent_index", self._parents(hierarchy), persistent=False)
            weights = self._path_weights(hierarchy, self.alpha) * self.weight_scale
            self.register_buffer("path_weights", weights, persistent=False)
        else:
            _Levels(hierarchy).register(self)
            # The weight of the edge into a node at depth d, as the dense table stores it.
            weights = [self.weight_scale * math.exp(-self.alpha * d) for d in range(1, hierarchy.max_depth + 1)]
            self.register_buffer("level_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    @staticmethod
    def weight_sum(hierarchy: Hierarchy, alpha: float) -> float:
        """``Z = sum_n exp(-alpha * depth(n))`` over every node, root (depth 0, weight 1) included."""
        return math.fsum(math.exp(-alpha * hierarchy.depth(node)) for node in hierarchy.nodes)

    @staticmethod
    def _parents(hierarchy: Hierarchy) -> torch.Tensor:
        """``long [num_nodes]``: parent's index (the root points at itself: its edge term is 0)."""
        return _parent_depth(hierarchy)[0]

    @staticmethod
    def _path_weights(hierarchy: Hierarchy, alpha: float) -> torch.Tensor:
        """``float32 [num_nodes, num_nodes]``: ``[t, n] = exp(-alpha * depth(n))`` for ``n`` on t's root path."""
        out = torch.zeros(hierarchy.num_nodes, hierarchy.num_nodes, dtype=torch.float32)
        for target in hierarchy.nodes:
            for node in hierarchy.ancestors(target):  # excludes the root
                out[hierarchy.index(target), hierarchy.index(node)] = math.exp(-alpha * hierarchy.depth(node))
        return out

    def _level_log_probs(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Tree path: float32 ``[B, num_leaves]`` logits -> ``log p(node)`` per level (level order)."""
        lse = _bottom_up(self, z, _segment_logsumexp)
        total = torch.logsumexp(z, dim=-1, keepdim=True)
        return [level - total for level in lse]

    def node_log_probs(self, leaf_logits: torch.Tensor) -> torch.Tensor:
        """``[B, num_leaves]`` logits -> float32 ``[B, num_nodes]`` ``log p(node)`` (root column exactly 0)."""
        check_2d("leaf_logits", leaf_logits, self.num_leaves)
        with _autocast_disabled(leaf_logits.device):
            z = leaf_logits.float()
            if not self.dense:
                levels = self._level_log_probs(z)
                flat = torch.cat([*levels, z.new_zeros(z.shape[0], 1)], dim=1)
                return flat[:, self.tree_column]
            masked = z.unsqueeze(1).masked_fill(~self.membership, float("-inf"))  # [B, N, L]
            lse = torch.logsumexp(masked, dim=-1)  # [B, N]
            # The root's row is the full logsumexp; subtracting the same column makes log p(root) == 0.
            return lse - lse[:, self.root_index : self.root_index + 1]

    def _tree_losses(self, leaf_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Tree path: each node's path loss from its parent's, root first; ``[B]`` at the targets."""
        check_2d("leaf_logits", leaf_logits, self.num_leaves)
        with _autocast_disabled(leaf_logits.device):
            log_p = self._level_log_probs(leaf_logits.float())
            weights = self.level_weights.float()
            costs = [weights[0] * (0.0 - log_p[0])]  # edges from the root: log p(root) = 0
            for d in range(2, len(log_p) + 1):
                up = _parent_positions(self, d)
                edge_nll = log_p[d - 2][:, up] - log_p[d - 1]
                costs.append(costs[-1][:, up] + weights[d - 1] * edge_nll)
            return _at_targets(self, costs, targets)

    def per_sample(self, leaf_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses ``float32 [B]`` and the ``bool [B]`` mask of usable samples.

        Unusable rows (``-1`` or the root) hold 0.
        """
        targets = check_targets("targets", targets, leaf_logits.shape[0], self.num_nodes)
        usable = _usable(targets, self.root_index)
        if not self.dense:
            losses = self._tree_losses(leaf_logits, targets)
            return torch.where(usable, losses, torch.zeros_like(losses)), usable
        log_p = self.node_log_probs(leaf_logits)  # [B, N]
        edge_nll = log_p[:, self.parent_index] - log_p  # [B, N]: -log p(n | parent(n)), 0 for the root
        weights = self.path_weights.float()[targets.clamp(min=0)]  # [B, N]; float() survives module.half()
        losses = (weights * edge_nll).sum(dim=-1)
        return torch.where(usable, losses, torch.zeros_like(losses)), usable

    def forward(self, leaf_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``leaf_logits [B, num_leaves]``, ``targets long [B]`` -> float32 scalar, mean over usable samples."""
        losses, usable = self.per_sample(leaf_logits, targets)
        return masked_mean(losses, usable)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, normalize={self.normalize}, num_leaves={self.num_leaves}, "
            f"num_nodes={self.num_nodes}, "
            f"tables={'dense' if self.dense else 'tree'}"
        )


# --------------------------------------------------------------------------- flat CE


class FlatCELoss(nn.Module):
    """Cross-entropy over the leaves (the paper's flat "CE" baseline).

    Samples labelled at an internal node are dropped, as in Chossegros et al. 2.4.1
    ("coarsely labeled images are not used"); the mean is over the leaf-labelled samples.
    ``class_weights`` (list in leaf order or ``{leaf: weight}``: :mod:`.class_weights`) gives
    the weighted mean ``sum w[y] l / sum w[y]`` of ``F.cross_entropy(weight=...)``.
    """

    def __init__(self, hierarchy: Hierarchy, class_weights: object = None) -> None:
        super().__init__()
        hierarchy = _check_hierarchy(hierarchy)
        self.num_leaves = hierarchy.num_leaves
        self.num_nodes = hierarchy.num_nodes
        self.register_buffer("class_weights", resolve_class_weights(hierarchy, class_weights), persistent=False)

    def forward(self, leaf_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``leaf_logits [B, num_leaves]``, ``targets long [B]`` -> float32 scalar."""
        check_2d("leaf_logits", leaf_logits, self.num_leaves)
        targets = check_targets("targets", targets, leaf_logits.shape[0], self.num_nodes)
        # Leaves come first in node-index order, so a leaf target is its own output index.
        keep = (targets >= 0) & (targets < self.num_leaves)
        with _autocast_disabled(leaf_logits.device):
            z = leaf_logits.float()
            safe = torch.where(keep, targets, torch.zeros_like(targets))
            losses = torch.logsumexp(z, dim=-1) - z.gather(1, safe.unsqueeze(1)).squeeze(1)
            if self.class_weights is None:  # plain mean over the leaf-labelled rows
                return masked_mean(losses, keep)
            w = torch.where(keep, self.class_weights.to(z.device)[safe], 0.0)
            return (w * torch.where(keep, losses, 0.0)).sum() / w.sum().clamp(min=1e-12)

    def extra_repr(self) -> str:
        return f"num_leaves={self.num_leaves}, weighted={self.class_weights is not None}"


# --------------------------------------------------------------------------- multilevel CE


class MultiLevelCELoss(nn.Module):
    """Cross-entropy at every depth ``d = 1 .. max_depth`` of the tree, averaged over levels.

    Level ``d`` classifies into :func:`level_classes` ``[d - 1]``: the nodes at depth ``d``
    plus the leaves shallower than ``d`` (a fully specified leaf stays its own class, so
    e.g. a basophil at depth 3 is still a class at depths 4 and 5). A label means its
    ancestor at depth ``d`` there; an internal label shallower than ``d`` is ignored at
    that level (it does not say which child). Each level's loss is the mean over its
    usable samples; the result is the plain mean over the levels with at least one
    usable sample (Chossegros et al. 3.7.1 average the heads' losses; no level weights).
    """

    level_targets: torch.Tensor

    def __init__(self, hierarchy: Hierarchy) -> None:
        super().__init__()
        hierarchy = _check_hierarchy(hierarchy)
        self.num_nodes = hierarchy.num_nodes
        members = _level_members(hierarchy)  # node indices of each level's classes
        self.level_sizes: tuple[int, ...] = tuple(len(m) for m in members)
        # Node index -> position of its class within each level's outputs (-1: ignored).
        table = _level_columns(hierarchy)  # [L, N] node indices, level-major
        position = torch.empty(hierarchy.num_nodes, len(members), dtype=torch.long)
        lookup = torch.full((hierarchy.num_nodes,), -1, dtype=torch.long)
        for level, ids in enumerate(members):
            lookup.fill_(-1)
            lookup[ids] = torch.arange(len(ids))
            column = table[level]
            position[:, level] = torch.where(column >= 0, lookup[column.clamp(min=0)], -1)
        self.register_buffer("level_targets", position, persistent=False)

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    def per_level(
        self, level_logits: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[max_depth]`` level losses (index ``d - 1``) and ``bool [max_depth]`` active levels."""
        if isinstance(level_logits, torch.Tensor) or len(level_logits) != self.num_levels:
            got = "a tensor" if isinstance(level_logits, torch.Tensor) else f"{len(level_logits)} tensors"
            raise LossInputError(f"level_logits must be a list of {self.num_levels} tensors (depth 1..), got {got}")
        for depth, (logits, size) in enumerate(zip(level_logits, self.level_sizes), start=1):
            check_2d(f"level_logits[{depth - 1}] (depth {depth})", logits, size)
        batch = level_logits[0].shape[0]
        for logits in level_logits:
            if logits.shape[0] != batch:
                raise LossInputError(f"level_logits disagree on the batch size: {batch} vs {logits.shape[0]}")
        targets = check_targets("targets", targets, batch, self.num_nodes)
        classes = self.level_targets[targets.clamp(min=0)]  # [B, L]
        classes = torch.where((targets >= 0).unsqueeze(1), classes, torch.full_like(classes, -1))
        losses, active = [], []
        with _autocast_disabled(targets.device):
            for level, logits in enumerate(level_logits):
                keep = classes[:, level] >= 0
                z = logits.float()
                safe = classes[:, level].clamp(min=0).unsqueeze(1)
                per_sample = torch.logsumexp(z, dim=-1) - z.gather(1, safe).squeeze(1)
                losses.append(masked_mean(per_sample, keep))
                active.append(keep.any())
        return torch.stack(losses), torch.stack(active)

    def forward(self, level_logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """``level_logits[d - 1] [B, level_sizes[d - 1]]`` for ``d = 1 .. max_depth``, ``targets [B]`` -> scalar."""
        losses, active = self.per_level(level_logits, targets)
        return masked_mean(losses, active)

    def extra_repr(self) -> str:
        return f"level_sizes={list(self.level_sizes)}"


# --------------------------------------------------------------------------- distance-aware


class DistanceLoss(nn.Module):
    """Distance-aware loss ``sum_c p_c * D[y, c]`` (Chossegros et al. 3.7.2).

    ``p`` is the leaf softmax and ``D[y, c]`` the number of edges between the label node
    ``y`` and leaf ``c``; for an internal label, the leaves under it are at distance 0
    (any of them is correct), the others at their tree distance from ``y`` itself.
    Distances are raw edge counts (not normalised). Mean over usable samples.

    Up to :data:`DENSE_MAX_NODES` nodes (``dense=None``) ``D`` is a dense ``[num_nodes,
    num_leaves]`` table. Above it (or with ``dense=False``) the tree path uses, with
    ``P(n)`` the probability of the leaves under ``n``, ``Q(n)`` their ``sum p_c depth(c)``,
    ``S(y)`` the sum of ``P`` over ``y`` and its ancestors below the root and
    ``T = sum_c p_c depth(c)``: ``loss(y) = depth(y) (1 + P(y)) + T - 2 S(y) - Q(y)``
    (every edge below the root counts once per leaf it separates from ``y``), linear in
    the tree size; it agrees with the table to float32 rounding (absolute, of the order
    of ``max_depth * 1e-7``).
    """

    distances: torch.Tensor
    tree_leaf_order: torch.Tensor
    tree_parent_slot: torch.Tensor
    tree_column: torch.Tensor
    leaf_depth: torch.Tensor

    def __init__(self, hierarchy: Hierarchy, *, dense: bool | None = None) -> None:
        super().__init__()
        hierarchy = _check_hierarchy(hierarchy)
        self.num_leaves = hierarchy.num_leaves
        self.num_nodes = hierarchy.num_nodes
        self.root_index = hierarchy.index(hierarchy.root)
        self.dense = _use_dense(hierarchy, dense)
        if self.dense:
            self.register_buffer("distances", self._distances(hierarchy), persistent=False)
        else:
            _Levels(hierarchy).register(self)
            depth = _parent_depth(hierarchy)[1][: hierarchy.num_leaves]
            self.register_buffer("leaf_depth", depth.float(), persistent=False)

    @staticmethod
    def _distances(hierarchy: Hierarchy) -> torch.Tensor:
        """``float32 [num_nodes, num_leaves]`` tree distances, 0 for leaves under the node."""
        out = torch.zeros(hierarchy.num_nodes, hierarchy.num_leaves, dtype=torch.float32)
        leaves = hierarchy.leaves
        for node in hierarchy.nodes:
            under = set(hierarchy.leaves_under(node))
            for j, leaf in enumerate(leaves):
                if leaf not in under:
                    out[hierarchy.index(node), j] = hierarchy.distance(node, leaf)
        return out

    def _tree_losses(self, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Tree path: float32 ``[B, num_leaves]`` leaf probabilities -> ``[B]`` losses at the targets."""
        leaf_depth = self.leaf_depth.float()
        mass = _bottom_up(self, probs, _segment_sum)  # P per level
        weighted = _bottom_up(self, probs * leaf_depth, _segment_sum)  # Q per level
        expected_depth = (probs * leaf_depth).sum(dim=-1, keepdim=True)  # T
        path = [mass[0]]  # S per level
        for d in range(2, len(mass) + 1):
            path.append(path[-1][:, _parent_positions(self, d)] + mass[d - 1])
        losses = [
            d * (1.0 + p) + expected_depth - 2.0 * s - q
            for d, (p, q, s) in enumerate(zip(mass, weighted, path), start=1)
        ]
        return _at_targets(self, losses, targets)

    def forward(self, leaf_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``leaf_logits [B, num_leaves]``, ``targets long [B]`` -> float32 scalar."""
        check_2d("leaf_logits", leaf_logits, self.num_leaves)
        targets = check_targets("targets", targets, leaf_logits.shape[0], self.num_nodes)
        usable = _usable(targets, self.root_index)
        with _autocast_disabled(leaf_logits.device):
            probs = torch.softmax(leaf_logits.float(), dim=-1)
            if self.dense:
                losses = (probs * self.distances.float()[targets.clamp(min=0)]).sum(dim=-1)
            else:
                losses = self._tree_losses(probs, targets)
            return masked_mean(losses, usable)

    def extra_repr(self) -> str:
        return f"num_leaves={self.num_leaves}, tables={'dense' if self.dense else 'tree'}"
