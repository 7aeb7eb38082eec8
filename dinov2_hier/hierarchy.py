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

The JSON formats are documented in ``hierarchies/README.md``.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "MAX_DEPTH",
    "Hierarchy",
    "HierarchyError",
    "LocatedError",
    "find_json_lines",
    "read_json_file",
    "suggest",
]

# Keys a node may carry. Anything else is an error so that typos ("chidren") fail loudly.
_NESTED_NODE_KEYS = ("id", "name", "meta", "children")
_FLAT_NODE_KEYS = ("id", "name", "meta", "parent")
_TOP_LEVEL_KEYS = ("name", "description", "root", "nodes")
# Version tag inside the fingerprinted JSON: bump it if the canonical form ever changes.
_FINGERPRINT_FORMAT = "dinov2_hier.hierarchy.structure/1"
#: The deepest tree accepted (the root is at depth 0). Class trees are a few levels deep;
#: the limit keeps every tree within what recurses once per level with room to spare:
#: Python's JSON reader and ``json.dumps(to_dict())`` spend two of Python's ~1000 recursion
#: levels per tree level (an object inside a list), pickling (a tree sent to DataLoader
#: workers) about four (measured: a 256-level tree no longer pickles).
MAX_DEPTH = 100


class LocatedError(ValueError):
    """A bad-input error that knows where it happened: ``source:line:column: message``.

    Attributes ``source`` (file name or ``"<dict>"``), ``line`` / ``column`` (1-based,
    or None when unknown) and ``message`` (without the location prefix) are kept for
    programs that want to present the error themselves.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        location = ""
        if source is not None:
            location = source
            if line is not None:
                location += f":{line}"
                if column is not None:
                    location += f":{column}"
            location += ": "
        super().__init__(location + message)


class HierarchyError(LocatedError):
    """A hierarchy file or tree is malformed, or a node id is unknown.

    ``node_id`` names the offending node when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
        node_id: Any = None,
    ) -> None:
        self.node_id = node_id
        super().__init__(message, source=source, line=line, column=column)


# --------------------------------------------------------------------------- JSON helpers


def suggest(word: str, candidates: Any, n: int = 3) -> str:
    """``"; did you mean 'x' or 'y'?"`` for close matches of ``word``, or ``""``."""
    if not isinstance(word, str):
        return ""
    # cutoff 0.5 (difflib's default is 0.6) so that short codes like 'X2' still suggest 'X1'.
    matches = difflib.get_close_matches(word, [c for c in candidates if isinstance(c, str)], n=n, cutoff=0.5)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"


def _json_literal_pattern(value: Any) -> str | None:
    """Regex matching ``value`` as it may be written in a JSON file (escaped or raw unicode)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        forms = {json.dumps(value), json.dumps(value, ensure_ascii=False)}
        return "(?:" + "|".join(re.escape(f) for f in sorted(forms)) + ")"
    return None


def find_json_lines(text: str | None, key: str, value: Any = ...) -> list[int]:
    """1-based line numbers where ``"key": value`` (or just ``"key":`` if no value) occurs.

    A plain text search, not a parse: JSON's standard library parser keeps no
    positions, and for error messages the textual occurrence is what a user needs.
    Returns ``[]`` when ``text`` is None or nothing matches.
    """
    if text is None:
        return []
    key_pattern = _json_literal_pattern(key)
    if key_pattern is None:
        return []
    pattern = key_pattern + r"\s*:"
    if value is not ...:
        value_pattern = _json_literal_pattern(value)
        if value_pattern is None:
            return []
        # The lookahead stops "id": 5 from matching "id": 55 or 5.5.
        pattern += r"\s*" + value_pattern + r"(?![0-9A-Za-z_.])"
    return [text.count("\n", 0, m.start()) + 1 for m in re.finditer(pattern, text)]


class _DuplicateJsonKey(Exception):
    """Raised from the JSON object hook; converted to a located error by read_json_file."""

    def __init__(self, key: str, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(key)
        self.key = key
        self.pairs = pairs


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; a repeated "children"
    # would then drop a whole subtree without a word.
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateJsonKey(key, pairs)
        seen.add(key)
    return dict(pairs)


def read_json_file(path: str | Path, error_cls: type[LocatedError] = LocatedError) -> tuple[Any, str]:
    """Read and parse a JSON file; return ``(data, raw_text)``.

    Errors (unreadable file, invalid UTF-8, JSON syntax with ``file:line:col``,
    a key repeated inside one object) are raised as ``error_cls`` with the file name.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error_cls(f"file is not valid UTF-8 ({exc.reason} at byte {exc.start})", source=source) from None
    except OSError as exc:
        raise error_cls(f"cannot read file: {exc.strerror or exc}", source=source) from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise error_cls(f"invalid JSON: {exc.msg}", source=source, line=exc.lineno, column=exc.colno) from None
    except RecursionError:  # Python's reader recurses per nested object or list (~1000 in all)
        is_tree = issubclass(error_cls, HierarchyError)
        limit = f" (a hierarchy may be at most {MAX_DEPTH} levels deep)" if is_tree else ""
        raise error_cls(f"JSON nested too deeply to read{limit}", source=source) from None
    except _DuplicateJsonKey as exc:
        where = ""
        node_id = dict(exc.pairs).get("id")
        lines = find_json_lines(text, "id", node_id) if isinstance(node_id, str) else []
        if isinstance(node_id, str):
            where = f" of node {node_id!r}"
        if not lines:
            key_lines = find_json_lines(text, exc.key)
            lines = key_lines[1:2]  # the second occurrence is the repeat
        raise error_cls(
            f"key {exc.key!r} appears twice in the same JSON object{where}; JSON keeps only the last one",
            source=source,
            line=lines[0] if lines else None,
        ) from None
    return data, text


# --------------------------------------------------------------------------- parsing


class _Parser:
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
        reached = set(self._preorder(roots[0])) if roots else set()
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

    def _preorder(self, root: str) -> list[str]:
        out: list[str] = []
        stack = [root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(self.children[node]))
        return out

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
        for node_id in self._preorder(root_id)[1:]:
            depth[node_id] = depth[self.parent[node_id]] + 1
            if depth[node_id] > MAX_DEPTH:
                self.fail(f"the tree is deeper than {MAX_DEPTH} levels (node {node_id!r} is at depth "
                          f"{MAX_DEPTH + 1})", node_id=node_id)
        return name, description, root_id


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

        preorder: list[str] = []
        stack = [root]
        while stack:
            node = stack.pop()
            preorder.append(node)
            stack.extend(reversed(self._children[node]))

        leaves = tuple(n for n in preorder if not self._children[n])
        internal = tuple(n for n in preorder if self._children[n] and n != root) + (root,)
        nodes = leaves + internal
        set_(self, "_leaves", leaves)
        set_(self, "_nodes", nodes)
        set_(self, "_index", {n: i for i, n in enumerate(nodes)})

        # Ancestors from the node up to (excluding) the root; parents come first in pre-order.
        ancestors: dict[str, tuple[str, ...]] = {root: ()}
        for node in preorder[1:]:
            ancestors[node] = (node,) + ancestors[self._parent[node]]  # type: ignore[index]
        set_(self, "_ancestors", ancestors)
        set_(self, "_depth", {n: len(a) for n, a in ancestors.items()})

        # Leaves under each node, in `leaves` order: children's lists concatenated in
        # child order equal the pre-order of the subtree's leaves.
        under: dict[str, tuple[str, ...]] = {}
        for node in reversed(preorder):
            kids = self._children[node]
            under[node] = (node,) if not kids else tuple(leaf for kid in kids for leaf in under[kid])
        set_(self, "_leaves_under", under)

        max_depth = max(self._depth.values())
        by_depth: list[list[str]] = [[] for _ in range(max_depth + 1)]
        for node in nodes:
            by_depth[self._depth[node]].append(node)
        set_(self, "_by_depth", tuple(tuple(level) for level in by_depth))

        canonical = json.dumps(
            {"format": _FINGERPRINT_FORMAT, "nodes": [[n, self._parent[n]] for n in preorder]},
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
        data, text = read_json_file(path, HierarchyError)
        return cls._build(data, str(path), text)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Hierarchy:
        """Validate and build from an already-parsed document (nested or flat form)."""
        return cls._build(data, source, None)

    @classmethod
    def _build(cls, data: Any, source: str, text: str | None) -> Hierarchy:
        parser = _Parser(source, text)
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
