"""Dataset labels -> hierarchy node ids.

Each dataset names its classes its own way ("PMY", "NGS", "lymphocyte mature").
A :class:`LabelMap` (one JSON file per dataset under ``hierarchies/label_maps/``)
turns them into node ids of a :class:`~dinov2_hier.hierarchy.Hierarchy`; a coarse
label maps to an internal node (PBC "IG" -> ``granulocytic_immature``). A
:class:`LabelResolver` applies the right map per sample and decides what happens
to labels nobody mapped. Pure Python, no torch.

Label lookup is exact first, then on a normalised form (case-folded, runs of
spaces / hyphens / underscores as one ``_``), so ``"Lymphocyte typical"``,
``"lymphocyte_typical"`` and ``"LYMPHOCYTE-TYPICAL"`` are one label. Two keys of a
map that normalise alike must map to the same node.

Length (~480 lines): the label-map file format (validated with located errors), the one
folder loader and the one resolver, which training and evaluation share.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from dinov2_hier.errors import LocatedError, suggest
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.jsonfile import find_json_lines, read_json_file

__all__ = [
    "LabelMap",
    "LabelMapError",
    "LabelResolver",
    "UNLABELLED_INDEX",
    "UNLABELLED_KEY",
    "count_by_node",
    "load_label_maps",
    "normalize_label",
    "split_label_maps",
]

#: Key under which :func:`count_by_node` counts samples without a label.
UNLABELLED_KEY = "<unlabelled>"
#: Node index of an image without a usable label (training targets, ``supervision.Supervision``).
UNLABELLED_INDEX = -1

_TOP_LEVEL_KEYS = ("dataset", "hierarchy", "labels", "description", "notes")
_UNMAPPED_MODES = ("error", "unlabelled")


class LabelMapError(LocatedError):
    """A label map is malformed, or a label cannot be resolved to a node."""


def _known_labels(labels: Iterable[str], limit: int = 30) -> str:
    """``" (known labels: 'A', 'B')"`` (at most ``limit`` of them) for an error message."""
    names = list(labels)
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f" (known labels: {shown}{more})"


def _tree_file(tree: str | None, map_source: str) -> str:
    """How to name the tree ``tree`` on a command line: ``<maps folder>/../<tree>.json`` when
    it exists (relative to the project checkout when inside it), else the bare name."""
    from dinov2_hier.paths import PROJECT_ROOT

    candidate = Path(map_source).resolve().parent.parent / f"{tree}.json"
    if not tree or not candidate.is_file():
        return repr(tree)
    try:
        return candidate.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(candidate)


def normalize_label(label: str) -> str:
    """Case-folded label with runs of whitespace, ``-`` and ``_`` collapsed to one ``_``."""
    return re.sub(r"[\s_\-]+", "_", label.strip()).strip("_").casefold()


class LabelMap:
    """One dataset's mapping from its label strings to node ids.

    ``hierarchy_name`` records which tree the targets belong to; pass ``hierarchy``
    to check every target now (``from_json`` does so when given a hierarchy).
    """

    __slots__ = ("_dataset", "_labels", "_normalized", "_hierarchy_name", "_source", "_description", "_notes", "_text")

    def __init__(
        self,
        dataset: str,
        labels: Mapping[str, str],
        *,
        hierarchy_name: str | None = None,
        source: str = "<dict>",
        description: str = "",
        notes: Mapping[str, str] | None = None,
        hierarchy: Hierarchy | None = None,
        _text: str | None = None,
    ) -> None:
        self._source = source
        self._text = _text
        if not isinstance(dataset, str) or not dataset.strip():
            self._fail(f"'dataset' must be a non-empty string, got {dataset!r}", key="dataset")
        self._dataset = dataset
        if not isinstance(labels, Mapping) or not labels:
            self._fail(f"'labels' of dataset {dataset!r} must be a non-empty JSON object", key="labels")
        normalized: dict[str, tuple[str, str]] = {}  # normalised -> (original key, target)
        for label, target in labels.items():
            if not isinstance(label, str) or not label.strip():
                self._fail(f"dataset {dataset!r}: labels must be non-empty strings, got {label!r}")
            if not isinstance(target, str) or not target:
                self._fail(
                    f"dataset {dataset!r}: label {label!r} must map to a node id (string), got {target!r}",
                    key=label,
                )
            norm = normalize_label(label)
            if norm in normalized and normalized[norm][1] != target:
                other, other_target = normalized[norm]
                self._fail(
                    f"dataset {dataset!r}: labels {other!r} -> {other_target!r} and {label!r} -> {target!r}"
                    " differ only in case or separators but map to different nodes",
                    key=label,
                )
            normalized.setdefault(norm, (label, target))
        self._labels = dict(labels)
        self._normalized = {norm: target for norm, (_, target) in normalized.items()}
        self._hierarchy_name = hierarchy_name
        self._description = description
        notes = dict(notes or {})
        for label in notes:
            if label not in self._labels:
                self._fail(f"dataset {dataset!r}: note for unknown label {label!r}{suggest(label, self._labels)}")
        self._notes = notes
        if hierarchy is not None:
            self.check_targets(hierarchy)

    # -- construction
    @classmethod
    def from_json(cls, path: str | Path, hierarchy: Hierarchy | None = None) -> LabelMap:
        """Load ``{"dataset": ..., "hierarchy": ..., "labels": {label: node_id}}``.

        With ``hierarchy``, every target must be a node of it and the file's
        ``"hierarchy"`` must equal ``hierarchy.name``; errors name file, line, label
        and target, with close matches suggested.
        """
        data, text = read_json_file(path, LabelMapError)
        return cls.from_dict(data, source=str(path), hierarchy=hierarchy, _text=text)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        source: str = "<dict>",
        hierarchy: Hierarchy | None = None,
        _text: str | None = None,
    ) -> LabelMap:
        """Validate and build from a parsed document (same keys as the JSON file)."""
        if not isinstance(data, Mapping):
            raise LabelMapError(f"a label map must be a JSON object, got {type(data).__name__}", source=source)
        unknown = [k for k in data if k not in _TOP_LEVEL_KEYS]
        if unknown:
            hints = "".join(suggest(k, _TOP_LEVEL_KEYS, n=1) for k in unknown)
            lines = find_json_lines(_text, unknown[0])
            raise LabelMapError(
                f"unknown key(s) {', '.join(repr(k) for k in unknown)}"
                f" (allowed: {', '.join(repr(k) for k in _TOP_LEVEL_KEYS)}){hints}",
                source=source,
                line=lines[0] if lines else None,
            )
        for key in ("dataset", "hierarchy", "labels"):
            if key not in data:
                raise LabelMapError(f"missing required key {key!r}", source=source)
        hierarchy_name = data["hierarchy"]
        if not isinstance(hierarchy_name, str) or not hierarchy_name:
            raise LabelMapError(f"'hierarchy' must be a tree name, got {hierarchy_name!r}", source=source)
        if not isinstance(data["labels"], Mapping):
            raise LabelMapError("'labels' must be a JSON object {label: node_id}", source=source)
        description = data.get("description", "")
        if not isinstance(description, str):
            raise LabelMapError("'description' must be a string", source=source)
        notes = data.get("notes", {})
        if not isinstance(notes, Mapping) or not all(isinstance(v, str) for v in notes.values()):
            raise LabelMapError("'notes' must be a JSON object {label: text}", source=source)
        return cls(
            data["dataset"],
            data["labels"],
            hierarchy_name=hierarchy_name,
            source=source,
            description=description,
            notes=notes,
            hierarchy=hierarchy,
            _text=_text,
        )

    def _fail(self, message: str, key: str | None = None) -> NoReturn:
        lines = find_json_lines(self._text, key) if key is not None else []
        raise LabelMapError(message, source=self._source, line=lines[0] if lines else None)

    def check_targets(self, hierarchy: Hierarchy) -> None:
        """Raise :class:`LabelMapError` unless every target is a node of ``hierarchy``."""
        if self._hierarchy_name is not None and self._hierarchy_name != hierarchy.name:
            self._fail(
                f"label map of dataset {self._dataset!r} is for hierarchy {self._hierarchy_name!r},"
                f" not {hierarchy.name!r} ({hierarchy.source})",
                key="hierarchy",
            )
        for label, target in self._labels.items():
            if target not in hierarchy:
                self._fail(
                    f"dataset {self._dataset!r}: label {label!r} maps to {target!r}, which is not a node of"
                    f" hierarchy {hierarchy.name!r} ({hierarchy.source}){suggest(target, hierarchy.nodes)}",
                    key=label,
                )

    # -- queries
    @property
    def dataset(self) -> str:
        return self._dataset

    @property
    def labels(self) -> dict[str, str]:
        """A copy of ``{label: node_id}`` as written in the file."""
        return dict(self._labels)

    @property
    def hierarchy_name(self) -> str | None:
        return self._hierarchy_name

    @property
    def source(self) -> str:
        return self._source

    @property
    def description(self) -> str:
        return self._description

    @property
    def notes(self) -> dict[str, str]:
        """A copy of the per-label notes (why a label maps where it does)."""
        return dict(self._notes)

    def _lookup(self, label: Any) -> str | None:
        if not isinstance(label, str):
            return None
        target = self._labels.get(label)
        if target is None:
            target = self._normalized.get(normalize_label(label))
        return target

    def map(self, label: str) -> str:
        """Node id for ``label``; unknown -> :class:`LabelMapError` naming label and dataset."""
        target = self._lookup(label)
        if target is None:
            raise LabelMapError(
                f"unknown label {label!r} for dataset {self._dataset!r}"
                f"{_known_labels(self._labels)}{suggest(label, self._labels)}",
                source=self._source,
            )
        return target

    def __contains__(self, label: object) -> bool:
        return self._lookup(label) is not None

    def __len__(self) -> int:
        return len(self._labels)

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __repr__(self) -> str:
        return f"LabelMap(dataset={self._dataset!r}, hierarchy={self._hierarchy_name!r}, labels={len(self._labels)})"


def split_label_maps(directory: str | Path, hierarchy: Hierarchy) -> tuple[dict[str, LabelMap], dict[str, LabelMap]]:
    """The label maps of a folder, the one loader training and evaluation use.

    Every ``*.json`` in ``directory`` (sorted) is read; a file's stem must equal its
    ``"dataset"`` (``pbc.json`` holds dataset ``"pbc"``) so a copied file cannot silently
    shadow another dataset. Returns ``({dataset: map}, {dataset: map})``: the maps written
    for ``hierarchy`` (by its name, targets checked against it) and those written for
    other trees (not applied; they let an unknown label's error name the tree it belongs
    to, :class:`LabelResolver`).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise LabelMapError("label map directory not found", source=str(directory))
    maps: dict[str, LabelMap] = {}
    others: dict[str, LabelMap] = {}
    for path in sorted(folder.glob("*.json")):
        label_map = LabelMap.from_json(path)
        if label_map.dataset != path.stem:
            lines = find_json_lines(label_map._text, "dataset")
            raise LabelMapError(
                f"file name {path.name!r} does not match its dataset {label_map.dataset!r}"
                f" (expected {label_map.dataset + '.json'!r})",
                source=str(path),
                line=lines[0] if lines else None,
            )
        if label_map.hierarchy_name == hierarchy.name:
            label_map.check_targets(hierarchy)
            maps[label_map.dataset] = label_map
        else:
            others[label_map.dataset] = label_map
    return maps, others


def load_label_maps(directory: str | Path, hierarchy: Hierarchy) -> dict[str, LabelMap]:
    """``{dataset: LabelMap}`` of the maps in ``directory`` written for ``hierarchy``
    (:func:`split_label_maps`'s first half)."""
    return split_label_maps(directory, hierarchy)[0]


def count_by_node(node_ids: Iterable[str | None], hierarchy: Hierarchy | None = None) -> dict[str, int]:
    """Number of samples per resolved node id; ``None`` counts under :data:`UNLABELLED_KEY`.

    With ``hierarchy`` the keys follow its index order (leaves, then internal
    nodes), and an id that is not a node raises; without, most frequent first
    (ties by id). :data:`UNLABELLED_KEY` always comes last.
    """
    counts = Counter(UNLABELLED_KEY if n is None else n for n in node_ids)
    unlabelled = counts.pop(UNLABELLED_KEY, 0)
    if hierarchy is not None:
        ordered = sorted(counts.items(), key=lambda item: hierarchy.index(item[0]))
    else:
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    out = dict(ordered)
    if unlabelled:
        out[UNLABELLED_KEY] = unlabelled
    return out


class LabelResolver:
    """Turns ``(label, dataset)`` pairs into node ids of one hierarchy.

    * ``label`` None, ``""`` or blank -> None (an unlabelled sample, used by the
      self-supervised losses only).
    * ``dataset`` (or, when it is None, ``default_dataset``) has a label map -> the map decides.
    * no map for the dataset -> the label must already be a node id (exact, or
      equal after :func:`normalize_label` when that is unambiguous).
    * anything else -> :class:`LabelMapError` naming label and dataset, or None
      when ``unmapped == "unlabelled"`` (the sample then trains without supervision).

    ``other_maps`` (label maps written for other trees, e.g. the ``wbc`` maps while the
    tree is ``synthetic``) are never applied; an unresolvable label that one of them knows
    gets a hint naming that tree's file, given as ``hierarchy_option`` (e.g.
    ``"supervision.hierarchy="`` or ``"--hierarchy "``) followed by its path.
    """

    __slots__ = ("_hierarchy", "_maps", "_unmapped", "_default_dataset", "_node_by_norm", "_other_maps",
                 "_hierarchy_option")

    def __init__(
        self,
        hierarchy: Hierarchy,
        label_maps: Mapping[str, LabelMap] | None = None,
        unmapped: str = "error",
        default_dataset: str | None = None,
        *,
        other_maps: Mapping[str, LabelMap] | None = None,
        hierarchy_option: str = "the hierarchy ",
    ) -> None:
        if unmapped not in _UNMAPPED_MODES:
            raise LabelMapError(f"unmapped must be one of {', '.join(map(repr, _UNMAPPED_MODES))}, got {unmapped!r}")
        maps = dict(label_maps or {})
        for key, label_map in maps.items():
            if key != label_map.dataset:
                raise LabelMapError(
                    f"label map of dataset {label_map.dataset!r} is registered under {key!r}",
                    source=label_map.source,
                )
            label_map.check_targets(hierarchy)
        if default_dataset is not None and default_dataset not in maps:
            raise LabelMapError(
                f"default_dataset {default_dataset!r} has no label map (maps: {sorted(maps) or 'none'})"
                f"{suggest(default_dataset, maps)}"
            )
        by_norm: dict[str, str | None] = {}
        for node in hierarchy.nodes:
            norm = normalize_label(node)
            by_norm[norm] = None if norm in by_norm else node  # None marks an ambiguous form
        self._hierarchy = hierarchy
        self._maps = maps
        self._unmapped = unmapped
        self._default_dataset = default_dataset
        self._node_by_norm = {k: v for k, v in by_norm.items() if v is not None}
        self._other_maps = {k: m for k, m in (other_maps or {}).items() if m.hierarchy_name != hierarchy.name}
        self._hierarchy_option = hierarchy_option

    @property
    def hierarchy(self) -> Hierarchy:
        return self._hierarchy

    @property
    def label_maps(self) -> dict[str, LabelMap]:
        return dict(self._maps)

    @property
    def unmapped(self) -> str:
        return self._unmapped

    @property
    def default_dataset(self) -> str | None:
        return self._default_dataset

    def resolve(self, label: str | None, dataset: str | None = None) -> str | None:
        """Node id for one sample's label, or None for an unlabelled sample."""
        if label is None:
            return None
        if not isinstance(label, str):
            raise LabelMapError(
                f"label must be a string or None, got {type(label).__name__} {label!r} (dataset {dataset!r})"
            )
        if not label.strip():
            return None
        name = dataset if dataset else self._default_dataset
        label_map = self._maps.get(name) if name else None
        if label_map is not None:
            if label in label_map:
                return label_map.map(label)
            return self._unresolved(
                f"unknown label {label!r} for dataset {name!r} in {label_map.source}"
                f"{_known_labels(label_map)}{suggest(label, label_map)}"
            )
        if label in self._hierarchy:
            return label
        node = self._node_by_norm.get(normalize_label(label))
        if node is not None:
            return node
        origin = "no dataset given"
        if name:
            origin = f"dataset {name!r} has no label map{' for this hierarchy' if name in self._other_maps else ''}"
        return self._unresolved(
            f"label {label!r} is not a node of hierarchy {self._hierarchy.name!r} ({origin}; known maps:"
            f" {sorted(self._maps) or 'none'}){suggest(label, self._hierarchy.nodes)}{self._hint(label, name)}"
        )

    def _hint(self, label: str, name: str | None) -> str:
        """Where a label that is no node of the tree (and has no map of this tree) could resolve:
        a map of this tree that knows it (the rows name no dataset, or another one), or the
        maps written for another tree (that tree's file is named)."""
        knowing = sorted(d for d, m in self._maps.items() if label in m)
        if knowing:
            listed = ", ".join(repr(d) for d in knowing)
            return (f"; the label map of dataset{'s' if len(knowing) > 1 else ''} {listed} knows {label!r}: "
                    "give these rows that dataset name (a manifest's 'dataset' column) or apply that map")
        if not self._other_maps:
            return ""
        own = self._other_maps.get(name) if name else None
        if own is not None:
            return (f"; the label map of dataset {name!r} ({own.source}) is written for hierarchy "
                    f"{own.hierarchy_name!r}, not {self._hierarchy.name!r}: set "
                    f"{self._hierarchy_option}{_tree_file(own.hierarchy_name, own.source)}")
        fitting = sorted((m for m in self._other_maps.values() if label in m), key=lambda m: m.dataset)
        if fitting:
            tree = fitting[0].hierarchy_name
            fitting = [m for m in fitting if m.hierarchy_name == tree]
            listed = ", ".join(repr(m.dataset) for m in fitting)
            return (f"; {label!r} is a label of the map{'s' if len(fitting) > 1 else ''} of dataset"
                    f"{'s' if len(fitting) > 1 else ''} {listed}, written for hierarchy {tree!r}, not "
                    f"{self._hierarchy.name!r}: set {self._hierarchy_option}{_tree_file(tree, fitting[0].source)}, "
                    f"and name the dataset (a 'dataset' column) unless the labels are node ids of {tree!r}")
        if not self._maps:
            trees = sorted({str(m.hierarchy_name) for m in self._other_maps.values()})
            some = next(iter(self._other_maps.values()))
            files = ", ".join(_tree_file(t, some.source) for t in trees)
            return (f"; no label map is written for hierarchy {self._hierarchy.name!r} (the label maps found are "
                    f"for {', '.join(map(repr, trees))}: {self._hierarchy_option}{files})")
        return ""

    def _unresolved(self, message: str) -> None:
        if self._unmapped == "unlabelled":
            return None
        raise LabelMapError(message)

    def resolve_index(self, label: str | None, dataset: str | None = None) -> int | None:
        """``hierarchy.index`` of :meth:`resolve`'s node, or None when unlabelled."""
        node = self.resolve(label, dataset)
        return None if node is None else self._hierarchy.index(node)

    def count_by_node(self, node_ids: Iterable[str | None]) -> dict[str, int]:
        """:func:`count_by_node` in this resolver's hierarchy order."""
        return count_by_node(node_ids, self._hierarchy)
