"""Class hierarchies: a validated, immutable tree of class ids loaded from JSON.

This module is the single source of truth for class indices, ancestor sets, depths,
lowest common ancestors and tree distances; losses, heads and metrics derive
everything from a :class:`Hierarchy` so that a tree is never described twice.
Pure Python (no torch) so that configs, CLIs and data code can use it cheaply.

Index order (what a supervised head's outputs mean):

* ``leaves``: leaf ids in depth-first pre-order, children in file order. A head
  with ``num_leaves`` outputs predicts ``leaves[i]`` at output ``i``.
* ``nodes``: all ids; the leaves first (same order, so ``index(leaf)`` is also
  the leaf's output index), then the internal nodes in pre-order, the root last.

The JSON formats are documented in ``hierarchies/README.md``; validating a document is
:mod:`dinov2_hier.hierarchy_parse`'s job, reading a file :mod:`dinov2_hier.jsonfile`'s.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import LocatedError, suggest
from .hierarchy_parse import MAX_DEPTH, HierarchyError, TreeParser, preorder
from .jsonfile import find_json_lines, read_json_file

# ``LocatedError``, ``find_json_lines``, ``read_json_file`` and ``suggest`` moved to
# dinov2_hier.errors / dinov2_hier.jsonfile; importable from here as before.
__all__ = [
    "MAX_DEPTH",
    "Hierarchy",
    "HierarchyError",
    "LocatedError",
    "find_json_lines",
    "read_json_file",
    "suggest",
]

# Version tag inside the fingerprinted JSON: bump it if the canonical form ever changes.
_FINGERPRINT_FORMAT = "dinov2_hier.hierarchy.structure/1"


def _rebuild_hierarchy(data: dict[str, Any], source: str) -> Hierarchy:
    """Pickle support: rebuild from the nested dict (see ``Hierarchy.__reduce__``)."""
    return Hierarchy.from_dict(data, source=source)


# --------------------------------------------------------------------------- the tree


class Hierarchy:
    """An immutable rooted tree of class ids with precomputed index order and ancestry.

    Build with :meth:`from_json` or :meth:`from_dict`. All per-node queries take a
    node id and raise :class:`HierarchyError` (a ValueError) for an unknown id, with
    close matches suggested. List-returning accessors return new lists, so callers
    cannot alter the tree; cache them in hot loops.
    """

    __slots__ = (
        "_name",
        "_description",
        "_source",
        "_root",
        "_parent",
        "_children",
        "_names",
        "_metas",
        "_leaves",
        "_nodes",
        "_index",
        "_ancestors",
        "_depth",
        "_leaves_under",
        "_by_depth",
        "_fingerprint",
    )

    def __init__(
        self,
        *,
        name: str,
        description: str,
        source: str,
        root: str,
        parent: Mapping[str, str | None],
        children: Mapping[str, list[str]],
        names: Mapping[str, str],
        metas: Mapping[str, dict[str, Any]],
    ) -> None:
        """Internal: use :meth:`from_json` / :meth:`from_dict`, which validate first."""
        set_ = object.__setattr__
        set_(self, "_name", name)
        set_(self, "_description", description)
        set_(self, "_source", source)
        set_(self, "_root", root)
        set_(self, "_parent", dict(parent))
        set_(self, "_children", {k: tuple(v) for k, v in children.items()})
        set_(self, "_names", dict(names))
        set_(self, "_metas", {k: copy.deepcopy(v) for k, v in metas.items()})

        order = preorder(root, self._children)
        leaves = tuple(n for n in order if not self._children[n])
        internal = tuple(n for n in order if self._children[n] and n != root) + (root,)
        nodes = leaves + internal
        set_(self, "_leaves", leaves)
        set_(self, "_nodes", nodes)
        set_(self, "_index", {n: i for i, n in enumerate(nodes)})

        # Ancestors from the node up to (excluding) the root; parents come first in pre-order.
        ancestors: dict[str, tuple[str, ...]] = {root: ()}
        for node in order[1:]:
            ancestors[node] = (node,) + ancestors[self._parent[node]]  # type: ignore[index]
        set_(self, "_ancestors", ancestors)
        set_(self, "_depth", {n: len(a) for n, a in ancestors.items()})

        # Leaves under each node, in `leaves` order: children's lists concatenated in
        # child order equal the pre-order of the subtree's leaves.
        under: dict[str, tuple[str, ...]] = {}
        for node in reversed(order):
            kids = self._children[node]
            under[node] = (node,) if not kids else tuple(leaf for kid in kids for leaf in under[kid])
        set_(self, "_leaves_under", under)

        max_depth = max(self._depth.values())
        by_depth: list[list[str]] = [[] for _ in range(max_depth + 1)]
        for node in nodes:
            by_depth[self._depth[node]].append(node)
        set_(self, "_by_depth", tuple(tuple(level) for level in by_depth))

        canonical = json.dumps(
            {"format": _FINGERPRINT_FORMAT, "nodes": [[n, self._parent[n]] for n in order]},
            separators=(",", ":"),
            ensure_ascii=True,
        )
        set_(self, "_fingerprint", hashlib.sha256(canonical.encode("ascii")).hexdigest())

    # -- construction
    @classmethod
    def from_json(cls, path: str | Path) -> Hierarchy:
        """Load and validate a hierarchy file (nested or flat form).

        Errors name the file and, where the node's ``"id"`` can be found in the
        text, the line; JSON syntax errors give ``file:line:col``.
        """
        depth_note = f" (a hierarchy may be at most {MAX_DEPTH} levels deep)"
        data, text = read_json_file(path, HierarchyError, depth_note=depth_note)
        return cls._build(data, str(path), text)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Hierarchy:
        """Validate and build from an already-parsed document (nested or flat form)."""
        return cls._build(data, source, None)

    @classmethod
    def _build(cls, data: Any, source: str, text: str | None) -> Hierarchy:
        parser = TreeParser(source, text)
        name, description, root = parser.parse(data)
        return cls(
            name=name,
            description=description,
            source=source,
            root=root,
            parent=parser.parent,
            children=parser.children,
            names=parser.names,
            metas=parser.metas,
        )

    # -- immutability, pickling, equality
    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Hierarchy is immutable (cannot set {key!r})")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"Hierarchy is immutable (cannot delete {key!r})")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild_hierarchy, (self.to_dict(), self._source))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hierarchy):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return (
            f"Hierarchy(name={self._name!r}, source={self._source!r}, num_leaves={self.num_leaves}, "
            f"num_nodes={self.num_nodes}, max_depth={self.max_depth})"
        )

    # -- whole-tree properties
    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def source(self) -> str:
        """Where the tree came from: the file path as given, or ``"<dict>"``."""
        return self._source

    @property
    def root(self) -> str:
        return self._root

    @property
    def leaves(self) -> list[str]:
        """Leaf ids in class-index order (pre-order, children in file order)."""
        return list(self._leaves)

    @property
    def nodes(self) -> list[str]:
        """All ids in index order: leaves, then internal nodes in pre-order, root last."""
        return list(self._nodes)

    @property
    def internal_nodes(self) -> list[str]:
        """Non-leaf ids in index order (pre-order, root last): ``nodes[num_leaves:]``."""
        return list(self._nodes[len(self._leaves):])

    @property
    def num_leaves(self) -> int:
        return len(self._leaves)

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    @property
    def max_depth(self) -> int:
        """Depth of the deepest node (root has depth 0)."""
        return len(self._by_depth) - 1

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and node_id in self._index

    def __iter__(self) -> Iterator[str]:
        """Node ids in index order."""
        return iter(self._nodes)

    # -- per-node queries
    def _require(self, node_id: Any) -> str:
        if isinstance(node_id, str) and node_id in self._index:
            return node_id
        raise HierarchyError(
            f"unknown node id {node_id!r} in hierarchy {self._name!r} ({self._source})"
            f"{suggest(node_id, self._nodes)}",
            node_id=node_id,
        )

    def index(self, node_id: str) -> int:
        """Position of ``node_id`` in :attr:`nodes` (for a leaf: its output index)."""
        return self._index[self._require(node_id)]

    def parent(self, node_id: str) -> str | None:
        return self._parent[self._require(node_id)]

    def children(self, node_id: str) -> list[str]:
        return list(self._children[self._require(node_id)])

    def display_name(self, node_id: str) -> str:
        return self._names[self._require(node_id)]

    def meta(self, node_id: str) -> dict[str, Any]:
        """A deep copy of the node's free-form metadata (``{}`` when none)."""
        return copy.deepcopy(self._metas[self._require(node_id)])

    def is_leaf(self, node_id: str) -> bool:
        return not self._children[self._require(node_id)]

    def ancestors(self, node_id: str) -> list[str]:
        """The node itself, then its ancestors up to but excluding the root (root -> [])."""
        return list(self._ancestors[self._require(node_id)])

    def depth(self, node_id: str) -> int:
        """Number of edges from the root (root 0)."""
        return self._depth[self._require(node_id)]

    def ancestor_at_depth(self, node_id: str, depth: int) -> str:
        """The node on the root path of ``node_id`` at ``depth`` (0: root; ``depth(node_id)``: itself).

        E.g. the lineage of a cell type is its ancestor at depth 1.
        """
        own = self.depth(node_id)
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= own:
            raise HierarchyError(f"node {node_id!r} has depth {own}; no ancestor at depth {depth!r}", node_id=node_id)
        if depth == 0:
            return self._root
        return self._ancestors[node_id][own - depth]

    def lca(self, a: str, b: str) -> str:
        """Lowest common ancestor of ``a`` and ``b`` (a node is its own ancestor)."""
        on_path_a = set(self._ancestors[self._require(a)])
        for node in self._ancestors[self._require(b)]:
            if node in on_path_a:
                return node
        return self._root

    def distance(self, a: str, b: str) -> int:
        """Number of edges on the tree path between ``a`` and ``b``."""
        top = self.lca(a, b)
        return self._depth[a] + self._depth[b] - 2 * self._depth[top]

    def leaves_under(self, node_id: str) -> list[str]:
        """Leaves of the subtree rooted at ``node_id`` in :attr:`leaves` order (a leaf -> [itself])."""
        return list(self._leaves_under[self._require(node_id)])

    def nodes_at_depth(self, depth: int) -> list[str]:
        """Ids at exactly ``depth`` in index order (``[]`` below the deepest level)."""
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise HierarchyError(f"depth must be a non-negative int, got {depth!r}")
        if depth >= len(self._by_depth):
            return []
        return list(self._by_depth[depth])

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Nested-form document; ``from_dict(to_dict())`` rebuilds an equal tree.

        ``name`` is written only where it differs from the id, ``meta`` only when
        non-empty, ``children`` only for internal nodes.
        """
        out_nodes: dict[str, dict[str, Any]] = {}
        for node in self._nodes:
            entry: dict[str, Any] = {"id": node}
            if self._names[node] != node:
                entry["name"] = self._names[node]
            if self._metas[node]:
                entry["meta"] = copy.deepcopy(self._metas[node])
            if self._children[node]:
                entry["children"] = []
            out_nodes[node] = entry
        stack = [self._root]
        while stack:  # pre-order, so children lists fill in file order
            node = stack.pop()
            for kid in self._children[node]:
                out_nodes[node]["children"].append(out_nodes[kid])
            stack.extend(reversed(self._children[node]))
        document: dict[str, Any] = {"name": self._name}
        if self._description:
            document["description"] = self._description
        document["root"] = out_nodes[self._root]
        return document

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the tree structure, for configs and checkpoints.

        Covers exactly what fixes class indices, ancestors and distances: the ids,
        the parent links and the order of siblings. Display names, meta, the tree's
        name and description are not included. The canonical text is
        ``{"format":"dinov2_hier.hierarchy.structure/1","nodes":[[id,parent_id],...]}``
        with nodes in pre-order, the root's parent ``null``, no spaces, ASCII escapes.
        """
        return self._fingerprint
