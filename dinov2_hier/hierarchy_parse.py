"""Validation of a hierarchy document (nested or flat form) into the parts of a tree.

:class:`TreeParser` checks an already-read JSON document (ids, keys, names, meta,
parent links, one root, no cycle, at most :data:`MAX_DEPTH` levels) and collects
``root``, ``parent``, ordered ``children``, ``names`` and ``metas``, from which
:class:`~dinov2_hier.hierarchy.Hierarchy` builds the tree. Every error is a
:class:`HierarchyError` naming the file and, where the node's ``"id"`` can be found in the
raw text, the line. The formats are documented in ``hierarchies/README.md``.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from .errors import LocatedError, suggest
from .jsonfile import find_json_lines

__all__ = ["MAX_DEPTH", "HierarchyError", "TreeParser", "preorder"]

# Keys a node may carry. Anything else is an error so that typos ("chidren") fail loudly.
_NESTED_NODE_KEYS = ("id", "name", "meta", "children")
_FLAT_NODE_KEYS = ("id", "name", "meta", "parent")
_TOP_LEVEL_KEYS = ("name", "description", "root", "nodes")
#: The deepest tree accepted (the root is at depth 0). Class trees are a few levels deep;
#: the limit keeps every tree within what recurses once per level with room to spare:
#: Python's JSON reader and ``json.dumps(to_dict())`` spend two of Python's ~1000 recursion
#: levels per tree level (an object inside a list), pickling (a tree sent to DataLoader
#: workers) about four (measured: a 256-level tree no longer pickles).
MAX_DEPTH = 100


class HierarchyError(LocatedError):
    """A hierarchy file or tree is malformed, or a node id is unknown.

    ``node_id`` names the offending node when there is one.
    """

    def __init__(self, message: str, *, node_id: Any = None, **location: Any) -> None:
        """``location``: :class:`~dinov2_hier.errors.LocatedError`'s ``source``, ``line``
        and ``column``."""
        self.node_id = node_id
        super().__init__(message, **location)


class TreeParser:
    """Validates a nested or flat tree description and collects its parts.

    Holds the raw text (or None) so every error can point at a line. Produces
    ``root``, ``parent``, ordered ``children``, ``names`` and ``metas``.
    """

    def __init__(self, source: str, text: str | None) -> None:
        self.source = source
        self.text = text
        self.parent: dict[str, str | None] = {}
        self.children: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}
        self.metas: dict[str, dict[str, Any]] = {}
        self.where: dict[str, str] = {}  # id -> position in the data, for messages without a file

    # -- errors
    def lines_of(self, node_id: Any) -> list[int]:
        return find_json_lines(self.text, "id", node_id)

    def fail(self, message: str, node_id: Any = None, line: int | None = None) -> NoReturn:
        if line is None and node_id is not None:
            lines = self.lines_of(node_id)
            line = lines[0] if lines else None
        raise HierarchyError(message, source=self.source, line=line, node_id=node_id)

    # -- one node
    def check_node(self, obj: Any, path: str, allowed: tuple[str, ...], context_id: str | None) -> str:
        """Validate one node object (id, unknown keys, name, meta); return its id."""
        context = f" (under {context_id!r})" if context_id is not None else ""
        if not isinstance(obj, dict):
            self.fail(
                f"node at {path}{context} must be a JSON object, got {_type_name(obj)} {_short(obj)}",
                node_id=context_id,
            )
        if "id" not in obj:
            keys = ", ".join(repr(k) for k in obj) or "no keys"
            self.fail(f"node at {path}{context} has no 'id' (it has {keys})", node_id=context_id)
        node_id = obj["id"]
        if not isinstance(node_id, str):
            lines = self.lines_of(node_id) or self.lines_of(context_id)
            self.fail(
                f"node id at {path}{context} must be a string, got {_type_name(node_id)} {_short(node_id)}",
                node_id=node_id,
                line=lines[0] if lines else None,
            )
        if not node_id.strip():
            self.fail(f"node id at {path}{context} is empty", node_id=node_id)
        if node_id != node_id.strip():
            self.fail(f"node id {node_id!r} at {path} has leading or trailing whitespace", node_id=node_id)
        unknown = [k for k in obj if k not in allowed]
        if unknown:
            hints = "".join(suggest(k, allowed, n=1) for k in unknown)
            allowed_text = ", ".join(repr(k) for k in allowed)
            self.fail(
                f"node {node_id!r} has unknown key(s) {', '.join(repr(k) for k in unknown)}"
                f" (allowed: {allowed_text}){hints}",
                node_id=node_id,
            )
        if node_id in self.names:
            lines = self.lines_of(node_id)
            if len(lines) >= 2:
                self.fail(
                    f"duplicate node id {node_id!r} (first defined at line {lines[0]})",
                    node_id=node_id,
                    line=lines[1],
                )
            self.fail(
                f"duplicate node id {node_id!r} (at {self.where[node_id]} and at {path})",
                node_id=node_id,
            )
        name = obj.get("name", node_id)
        if not isinstance(name, str) or not name.strip():
            self.fail(f"node {node_id!r}: 'name' must be a non-empty string, got {_short(name)}", node_id=node_id)
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            self.fail(
                f"node {node_id!r}: 'meta' must be a JSON object, got {_type_name(meta)} {_short(meta)}",
                node_id=node_id,
            )
        self.names[node_id] = name
        self.metas[node_id] = copy.deepcopy(meta)
        self.where[node_id] = path
        self.children[node_id] = []
        return node_id

    # -- forms
    def parse_nested(self, root_obj: Any) -> str:
        # Iterative pre-order walk: no recursion limit for deep trees.
        root_id: str | None = None
        stack: list[tuple[Any, str | None, str]] = [(root_obj, None, "root")]
        while stack:
            obj, parent_id, path = stack.pop()
            node_id = self.check_node(obj, path, _NESTED_NODE_KEYS, parent_id)
            self.parent[node_id] = parent_id
            if parent_id is None:
                root_id = node_id
            else:
                self.children[parent_id].append(node_id)
            kids = obj.get("children", [])
            if not isinstance(kids, list):
                self.fail(
                    f"node {node_id!r}: 'children' must be a JSON list, got {_type_name(kids)} {_short(kids)}",
                    node_id=node_id,
                )
            for i in range(len(kids) - 1, -1, -1):
                stack.append((kids[i], node_id, f"{path}.children[{i}]"))
        assert root_id is not None
        return root_id

    def parse_flat(self, nodes: Any) -> str:
        if not isinstance(nodes, list):
            self.fail(f"'nodes' must be a JSON list, got {_type_name(nodes)} {_short(nodes)}")
        if not nodes:
            self.fail("empty tree: 'nodes' is an empty list")
        declared_parent: dict[str, Any] = {}
        order: list[str] = []
        for i, obj in enumerate(nodes):
            node_id = self.check_node(obj, f"nodes[{i}]", _FLAT_NODE_KEYS, None)
            if "parent" not in obj:
                self.fail(
                    f"node {node_id!r} has no 'parent' (use \"parent\": null for the root)", node_id=node_id
                )
            parent = obj["parent"]
            if parent is not None and (not isinstance(parent, str) or not parent):
                self.fail(
                    f"node {node_id!r}: 'parent' must be a node id or null, got {_short(parent)}",
                    node_id=node_id,
                )
            declared_parent[node_id] = parent
            order.append(node_id)
        roots = [n for n in order if declared_parent[n] is None]
        for node_id in order:
            parent = declared_parent[node_id]
            if parent is not None and parent not in declared_parent:
                self.fail(
                    f"node {node_id!r} has unknown parent {parent!r}{suggest(parent, order)}", node_id=node_id
                )
            if parent == node_id:
                self.fail(f"cycle: node {node_id!r} is its own parent", node_id=node_id)
        if len(roots) > 1:
            listed = ", ".join(f"{r!r}{self._at_line(r)}" for r in roots)
            self.fail(
                f"more than one root (nodes with \"parent\": null): {listed}; a tree has exactly one",
                node_id=roots[1],
            )
        for node_id in order:  # file order, so siblings keep their order
            parent = declared_parent[node_id]
            self.parent[node_id] = parent
            if parent is not None:
                self.children[parent].append(node_id)
        reached = set(preorder(roots[0], self.children)) if roots else set()
        unreached = [n for n in order if n not in reached]
        if unreached:
            cycle = self._find_cycle(unreached[0], declared_parent)
            prefix = "no root (no node has \"parent\": null); " if not roots else ""
            self.fail(
                prefix + "cycle in parent links: " + " -> ".join(repr(c) for c in cycle), node_id=cycle[0]
            )
        return roots[0]

    def _at_line(self, node_id: str) -> str:
        lines = self.lines_of(node_id)
        return f" (line {lines[0]})" if lines else ""

    @staticmethod
    def _find_cycle(start: str, declared_parent: Mapping[str, Any]) -> list[str]:
        # Every unreached node has an existing, non-null parent; following parents
        # must therefore loop. Report the loop itself, closed on its first node.
        seen: dict[str, int] = {}
        chain: list[str] = []
        node = start
        while node not in seen:
            seen[node] = len(chain)
            chain.append(node)
            node = declared_parent[node]
        loop = chain[seen[node]:]
        return loop + [loop[0]]

    def parse(self, data: Any) -> tuple[str, str, str]:
        """Validate the whole document; return ``(name, description, root_id)``."""
        if not isinstance(data, dict):
            self.fail(f"a hierarchy must be a JSON object, got {_type_name(data)} {_short(data)}")
        unknown = [k for k in data if k not in _TOP_LEVEL_KEYS]
        if unknown:
            hints = "".join(suggest(k, _TOP_LEVEL_KEYS, n=1) for k in unknown)
            key_lines = find_json_lines(self.text, unknown[0])
            self.fail(
                f"unknown top-level key(s) {', '.join(repr(k) for k in unknown)}"
                f" (allowed: {', '.join(repr(k) for k in _TOP_LEVEL_KEYS)}){hints}",
                line=key_lines[0] if key_lines else None,
            )
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            self.fail(f"the hierarchy needs a 'name' (non-empty string), got {_short(name)}")
        description = data.get("description", "")
        if not isinstance(description, str):
            self.fail(f"'description' must be a string, got {_type_name(description)}")
        has_root, has_nodes = "root" in data, "nodes" in data
        if has_root and has_nodes:
            self.fail("give either 'root' (nested form) or 'nodes' (flat form), not both")
        if not has_root and not has_nodes:
            self.fail("empty tree: no 'root' (nested form) and no 'nodes' (flat form)")
        if has_root:
            if data["root"] is None or data["root"] == {}:
                self.fail("empty tree: 'root' is empty")
            root_id = self.parse_nested(data["root"])
        else:
            root_id = self.parse_flat(data["nodes"])
        if not self.children[root_id]:
            self.fail(f"root {root_id!r} has no children: a hierarchy needs at least one class", node_id=root_id)
        depth = {root_id: 0}
        for node_id in preorder(root_id, self.children)[1:]:
            depth[node_id] = depth[self.parent[node_id]] + 1
            if depth[node_id] > MAX_DEPTH:
                self.fail(f"the tree is deeper than {MAX_DEPTH} levels (node {node_id!r} is at depth "
                          f"{MAX_DEPTH + 1})", node_id=node_id)
        return name, description, root_id


def preorder(root: str, children: Mapping[str, Sequence[str]]) -> list[str]:
    """The ids under ``root`` (itself first) in depth-first pre-order, children in their
    order; iterative, so a deep tree never meets Python's recursion limit."""
    out: list[str] = []
    stack = [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(children[node]))
    return out


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 60) -> str:
    """Compact JSON-ish rendering of a bad value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
