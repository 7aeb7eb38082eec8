"""Embedding guides (Gräbel et al., section 3.1): one 2-D point per class of a hierarchy.

A guide maps every node of a :class:`~dinov2_hier.hierarchy.Hierarchy` that can be a
target (leaves, internal nodes, the root) to a point ``(x, y)``. The paper draws its guide
by hand (coordinates only in a figure); here it is either generated from the tree or read
from a JSON file. Pure Python: the terms in :mod:`dinov2_hier.losses.guided` turn it into
a ``[num_nodes, 2]`` tensor in :attr:`Hierarchy.nodes` order.

**Generated guide** (:func:`generate_guide`, our choice, deterministic):

* *Angle by lineage.* Every node owns an angular sector. The root owns ``[0, 2 pi)``;
  a node's sector is split among its children in file order, counter-clockwise from the
  sector's start, each child getting a share proportional to its number of leaves (a
  leaf counts 1). A node's angle is the middle of its sector. So each lineage (depth-1
  node) gets a sector, its descendants lie inside it, and siblings sit next to each other.
* *Radius by depth.* ``r = depth(node)`` (root 0, lineages 1, ...): coarse, early
  nodes near the centre, the finest classes outward (in ``hierarchies/wbc.json`` depth
  follows maturity inside a lineage: lineage > maturity > cell type > morphology).
* The point is ``(r cos(angle), r sin(angle))``; the root is ``(0, 0)``. Nodes at one
  depth have disjoint sectors and nodes at different depths different radii, so every
  node gets its own point.

**Guide file** (:func:`load_guide`): a JSON object ``{"node_id": [x, y], ...}``. Every leaf
must be given; an internal node (or the root) left out gets the mean of its children's
points, computed from the deepest nodes up. Unknown ids, repeated keys, values that are not
two finite numbers and missing leaves are refused with a :class:`GuideError` naming the
file, the line where it can be found and the node (exit code 2 on a command line).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dinov2_hier.errors import LocatedError, suggest
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.jsonfile import find_json_lines, read_json_file

__all__ = [
    "GuideError",
    "angular_sectors",
    "generate_guide",
    "growing_dims",
    "guide_points",
    "load_guide",
]

Point = tuple[float, float]


class GuideError(LocatedError):
    """An embedding-guide file or mapping is invalid (``source:line: message``)."""


# --------------------------------------------------------------------------- generation


def angular_sectors(hierarchy: Hierarchy) -> dict[str, tuple[float, float]]:
    """``{node: (start, end)}`` in radians, ``0 <= start < end <= 2 pi``, as described above."""
    sectors = {hierarchy.root: (0.0, 2.0 * math.pi)}
    stack = [hierarchy.root]
    while stack:
        node = stack.pop()
        kids = hierarchy.children(node)
        if not kids:
            continue
        start, end = sectors[node]
        sizes = [len(hierarchy.leaves_under(kid)) for kid in kids]
        total = sum(sizes)
        cumulative = 0
        for kid, size in zip(kids, sizes):
            sectors[kid] = (start + (end - start) * cumulative / total, start + (end - start) * (cumulative + size) / total)
            cumulative += size
        stack.extend(kids)
    return sectors


def generate_guide(hierarchy: Hierarchy) -> dict[str, Point]:
    """``{node: (x, y)}`` for every node: angle = middle of the node's sector, radius = depth."""
    guide: dict[str, Point] = {}
    for node, (start, end) in angular_sectors(hierarchy).items():
        radius = float(hierarchy.depth(node))
        angle = 0.5 * (start + end)
        guide[node] = (radius * math.cos(angle), radius * math.sin(angle)) if radius else (0.0, 0.0)
    return {node: guide[node] for node in hierarchy.nodes}


# --------------------------------------------------------------------------- files


def load_guide(source: str | Path | Mapping[str, Any], hierarchy: Hierarchy) -> dict[str, Point]:
    """Read a guide (a JSON file path or an already-parsed ``{node_id: [x, y]}`` mapping).

    Returns ``{node: (x, y)}`` for every node of ``hierarchy`` (internal nodes left out:
    the mean of their children). Raises :class:`GuideError`.
    """
    if isinstance(source, Mapping):
        data: Any = source
        text: str | None = None
        name = "<guide>"
    else:
        data, text = read_json_file(source, GuideError)
        name = str(source)

    def fail(message: str, node: str | None = None) -> GuideError:
        lines = find_json_lines(text, node) if node is not None else []
        return GuideError(message, source=name, line=lines[0] if lines else None)

    if not isinstance(data, Mapping):
        raise fail(f"an embedding guide must be a JSON object {{node_id: [x, y]}}, got {type(data).__name__}")
    given: dict[str, Point] = {}
    for node, value in data.items():
        if node not in hierarchy:
            raise fail(
                f"unknown node id {node!r} in the embedding guide (hierarchy {hierarchy.name!r})"
                f"{suggest(node, hierarchy.nodes)}",
                node if isinstance(node, str) else None,
            )
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        ):
            raise fail(f"guide point of node {node!r} must be [x, y], two finite numbers, got {value!r}", node)
        given[node] = (float(value[0]), float(value[1]))
    missing = [leaf for leaf in hierarchy.leaves if leaf not in given]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise fail(f"the embedding guide has no point for leaf {shown} (every leaf needs one)")
    # Internal nodes left out: the mean of their children, deepest first.
    for node in sorted(hierarchy.internal_nodes, key=hierarchy.depth, reverse=True):
        if node not in given:
            kids = [given[kid] for kid in hierarchy.children(node)]
            given[node] = (sum(p[0] for p in kids) / len(kids), sum(p[1] for p in kids) / len(kids))
    return {node: given[node] for node in hierarchy.nodes}


def guide_points(hierarchy: Hierarchy, guide: str | Path | Mapping[str, Any] | None = None) -> list[Point]:
    """One point per node in :attr:`Hierarchy.nodes` order (index = target index).

    ``guide``: None (generated), a JSON file path or a ``{node_id: [x, y]}`` mapping.
    """
    points = generate_guide(hierarchy) if guide is None else load_guide(guide, hierarchy)
    return [points[node] for node in hierarchy.nodes]


# --------------------------------------------------------------------------- schedule


def growing_dims(epoch: int, n_max: int, growth: int = 1) -> int:
    """Embedding length at ``epoch`` (Gräbel et al. 3.3): ``min(max(growth * epoch, 2), n_max)``.

    ``growth`` is the step per epoch (the paper: 1, and 4 for ``n_max = 1024``); 0 switches
    the schedule off (the whole embedding, ``n_max``, from the start). With ``growth = 1``
    epochs 0, 1, 2 use two dimensions (the 2-D guide directly), epoch 3 three, and so on.
    """
    for name, value, low in (("epoch", epoch, 0), ("n_max", n_max, 2), ("growth", growth, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if growth == 0:
        return n_max
    return min(max(growth * epoch, 2), n_max)
