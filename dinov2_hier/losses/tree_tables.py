"""Index tables of a class hierarchy for the hierarchical losses, and the level-by-level tree path.

* node tables: :func:`leaf_membership` (``bool [num_nodes, num_leaves]``),
  :func:`class_at_level_table` (``long [num_nodes, max_depth]``), :func:`level_classes`;
* the dense/sparse switch: a tree of at most :data:`DENSE_MAX_NODES` nodes (every
  blood-cell tree) uses dense ``[num_nodes, num_leaves]`` / ``[num_nodes, num_nodes]``
  tables in :class:`~dinov2_hier.losses.hierarchical.HierCELoss` and
  :class:`~dinov2_hier.losses.hierarchical.DistanceLoss`, a larger one the level-by-level
  tree path (:class:`_Levels` and the per-level reductions below), whose tables and
  per-batch tensors are linear in the number of nodes (a 100,000-leaf tree would need
  ~50 GB of dense tables).

The level tables of :class:`~dinov2_hier.losses.hierarchical.MultiLevelCELoss` and
:class:`~dinov2_hier.losses.HierSupConLoss` are ``[num_nodes, max_depth]`` (depth is at
most :data:`~dinov2_hier.hierarchy.MAX_DEPTH`). Every table is built with tensor
operations or one Python pass over the nodes, never a loop over node pairs.
"""
from __future__ import annotations

import torch
from torch import nn

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.centering import LossInputError

__all__ = [
    "DENSE_MAX_NODES",
    "class_at_level_table",
    "leaf_membership",
    "level_classes",
]


#: Trees with at most this many nodes (root included) use dense ``[num_nodes, num_leaves]``
#: and ``[num_nodes, num_nodes]`` tables in
#: :class:`~dinov2_hier.losses.hierarchical.HierCELoss` and :class:`~dinov2_hier.losses.hierarchical.DistanceLoss`
#: (a handful of large kernels, bit-for-bit the original results); larger trees use the
#: level-by-level tree path, linear in the number of nodes (see the module docstring).
DENSE_MAX_NODES = 256


def _use_dense(hierarchy: Hierarchy, dense: bool | None) -> bool:
    if dense is None:
        return hierarchy.num_nodes <= DENSE_MAX_NODES
    if not isinstance(dense, bool):
        raise LossInputError(f"dense must be true, false or None (automatic), got {dense!r}")
    return dense


def leaf_membership(hierarchy: Hierarchy) -> torch.Tensor:
    """``bool [num_nodes, num_leaves]``: entry ``[n, j]`` is True iff leaf ``j`` lies under node ``n``.

    A leaf is under itself; every leaf is under the root. Quadratic in the tree size:
    the losses use it only for trees of at most :data:`DENSE_MAX_NODES` nodes.
    """
    mask = torch.zeros(hierarchy.num_nodes, hierarchy.num_leaves, dtype=torch.bool)
    for node in hierarchy.nodes:
        row = hierarchy.index(node)
        for leaf in hierarchy.leaves_under(node):
            mask[row, hierarchy.index(leaf)] = True
    return mask


def _parent_depth(hierarchy: Hierarchy) -> tuple[torch.Tensor, torch.Tensor]:
    """``(parent, depth)``, both ``long [num_nodes]`` in index order; the root is its own parent."""
    index = hierarchy.index
    parents: list[int] = []
    depths: list[int] = []
    for i, node in enumerate(hierarchy.nodes):
        parent = hierarchy.parent(node)
        parents.append(i if parent is None else index(parent))
        depths.append(hierarchy.depth(node))
    return torch.tensor(parents, dtype=torch.long), torch.tensor(depths, dtype=torch.long)


def _level_columns(hierarchy: Hierarchy, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`class_at_level_table` level-major, ``long [max_depth, num_nodes]`` (or written
    into ``out``, any ``[max_depth, num_nodes]`` view, e.g. the transpose of the table).

    Built from the deepest level up, ``max_depth`` tensor steps over the nodes, so the cost
    is the size of the table.
    """
    parent, depth = _parent_depth(hierarchy)
    n = hierarchy.num_nodes
    own = torch.arange(n)
    leaf = own < hierarchy.num_leaves  # leaves come first
    fixed = torch.where(leaf & (depth >= 1), own, torch.full_like(own, -1))  # what a shallow label means
    columns = torch.empty(hierarchy.max_depth, n, dtype=torch.long) if out is None else out
    current = own.clone()  # ancestor of each node at depth min(depth(node), d)
    for d in range(hierarchy.max_depth, 0, -1):
        columns[d - 1] = torch.where(depth >= d, current, fixed)
        current = torch.where(depth[current] == d, parent[current], current)
    return columns


def class_at_level_table(hierarchy: Hierarchy) -> torch.Tensor:
    """``long [num_nodes, max_depth]``: column ``d - 1`` is the node index a label means at depth ``d``.

    Row ``index(y)``, column ``d - 1`` holds ``index(ancestor_at_depth(y, d))`` when
    ``depth(y) >= d``; ``index(y)`` when ``y`` is a leaf shallower than ``d``; ``-1`` (ignore)
    when ``y`` is an internal node shallower than ``d`` or the root.

    Built column by column from the deepest level up (``max_depth`` tensor steps over the
    nodes), so the cost is the size of the table.
    """
    table = torch.empty(hierarchy.num_nodes, hierarchy.max_depth, dtype=torch.long)
    _level_columns(hierarchy, out=table.t())  # written in place: no second copy of the table
    return table


def _level_members(hierarchy: Hierarchy) -> list[torch.Tensor]:
    """Node indices (``long``, index order) of the classes of each level ``d = 1 .. max_depth``."""
    _, depth = _parent_depth(hierarchy)
    leaf = torch.arange(hierarchy.num_nodes) < hierarchy.num_leaves
    return [
        torch.nonzero((depth == d) | (leaf & (depth < d)), as_tuple=True)[0]
        for d in range(1, hierarchy.max_depth + 1)
    ]


def level_classes(hierarchy: Hierarchy) -> list[list[str]]:
    """The classes of each level ``d = 1 .. max_depth`` (list index ``d - 1``), in node-index order.

    Level ``d`` holds the nodes at depth ``d`` plus the leaves shallower than ``d``
    (a leaf keeps being its own class below its depth), i.e. exactly the values that
    column ``d - 1`` of :func:`class_at_level_table` can take. A head for level ``d``
    predicts ``level_classes(h)[d - 1][k]`` at output ``k``.
    """
    nodes = hierarchy.nodes
    return [[nodes[i] for i in members.tolist()] for members in _level_members(hierarchy)]


class _Levels:
    """The nodes grouped by depth, for the tree path (everything linear in the tree size).

    Level ``d`` (``1 .. max_depth``) lists the nodes at depth ``d`` in index order, so its
    leaves come first (``leaf_counts[d - 1]`` of them), then its internal nodes. Tensors:

    * ``leaf_order`` ``long [num_leaves]``: leaf output indices, level 1's leaves first;
    * ``parent_slot`` ``long [num_nodes - 1 - sizes[0]]``: for every node of levels ``2 ..``
      (in level order), its parent's position among the internal nodes of the level above;
    * ``column`` ``long [num_nodes]``: node index -> position in the concatenation of the
      levels ``1 .. max_depth`` followed by the root (last).
    """

    def __init__(self, hierarchy: Hierarchy) -> None:
        index = hierarchy.index
        n_leaves = hierarchy.num_leaves
        sizes: list[int] = []
        leaf_counts: list[int] = []
        leaf_order: list[int] = []
        parent_slot: list[int] = []
        column = [0] * hierarchy.num_nodes
        position: dict[str, int] = {}
        offset = 0
        for d in range(1, hierarchy.max_depth + 1):
            level = hierarchy.nodes_at_depth(d)
            ids = [index(node) for node in level]
            n_leaf = sum(1 for i in ids if i < n_leaves)
            leaf_order.extend(ids[:n_leaf])
            if d >= 2:
                above = leaf_counts[-1]
                parent_slot.extend(position[hierarchy.parent(node)] - above for node in level)  # type: ignore[index]
            for k, (node, i) in enumerate(zip(level, ids)):
                position[node] = k
                column[i] = offset + k
            sizes.append(len(level))
            leaf_counts.append(n_leaf)
            offset += len(level)
        column[index(hierarchy.root)] = offset
        self.sizes = tuple(sizes)
        self.leaf_counts = tuple(leaf_counts)
        self.leaf_order = torch.tensor(leaf_order, dtype=torch.long)
        self.parent_slot = torch.tensor(parent_slot, dtype=torch.long)
        self.column = torch.tensor(column, dtype=torch.long)

    def register(self, module: nn.Module) -> None:
        """Register the tensors as non-persistent buffers ``tree_*`` and keep the sizes."""
        module.register_buffer("tree_leaf_order", self.leaf_order, persistent=False)
        module.register_buffer("tree_parent_slot", self.parent_slot, persistent=False)
        module.register_buffer("tree_column", self.column, persistent=False)
        module._level_sizes = self.sizes
        module._level_leaf_counts = self.leaf_counts


def _segment_logsumexp(values: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, n]`` values, ``long [n]`` segment ids in ``[0, count)`` (none empty) -> ``[B, count]`` logsumexp."""
    index = segments.unsqueeze(0).expand_as(values)
    peak = values.new_full((values.shape[0], count), float("-inf"))
    peak = peak.scatter_reduce(1, index, values.detach(), reduce="amax", include_self=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = values.new_zeros(values.shape[0], count).scatter_add(1, index, torch.exp(values - peak.gather(1, index)))
    return torch.log(total) + peak


def _segment_sum(values: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    index = segments.unsqueeze(0).expand_as(values)
    return values.new_zeros(values.shape[0], count).scatter_add(1, index, values)


def _bottom_up(module: nn.Module, leaf_values: torch.Tensor, combine) -> list[torch.Tensor]:
    """Per-leaf ``[B, num_leaves]`` values -> one ``[B, sizes[d - 1]]`` tensor per level, in
    level order: the leaves' own values, then ``combine`` of each internal node's children."""
    by_level = leaf_values[:, module.tree_leaf_order]
    sizes, leaf_counts = module._level_sizes, module._level_leaf_counts
    out: list[torch.Tensor] = [by_level] * len(sizes)
    leaf_end = sum(leaf_counts)
    slot_end = module.tree_parent_slot.shape[0]
    below: torch.Tensor | None = None
    for d in range(len(sizes), 0, -1):
        n, n_leaf = sizes[d - 1], leaf_counts[d - 1]
        part = by_level[:, leaf_end - n_leaf : leaf_end]
        leaf_end -= n_leaf
        if below is not None:  # every level above the deepest has internal nodes
            slots = module.tree_parent_slot[slot_end - below.shape[1] : slot_end]
            slot_end -= below.shape[1]
            part = torch.cat([part, combine(below, slots, n - n_leaf)], dim=1)
        out[d - 1] = part
        below = part
    return out


def _parent_positions(module: nn.Module, d: int) -> torch.Tensor:
    """Positions (within level ``d - 1``) of the parents of level ``d``'s nodes, ``d >= 2``."""
    start = sum(module._level_sizes[1 : d - 1])
    slots = module.tree_parent_slot[start : start + module._level_sizes[d - 1]]
    return slots + module._level_leaf_counts[d - 2]


def _at_targets(module: nn.Module, per_level: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per-level ``[B, sizes[d - 1]]`` values -> ``[B]`` value of each row's target node (root: 0)."""
    flat = torch.cat([*per_level, per_level[0].new_zeros(per_level[0].shape[0], 1)], dim=1)
    column = module.tree_column[targets.clamp(min=0)].unsqueeze(1)
    return flat.gather(1, column).squeeze(1)
