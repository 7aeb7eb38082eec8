"""Prior constraint matrices ``C`` between classes for constrained multi-label classification.

A constraint matrix encodes what biologists know about pairs of classes (Mouadden et al.,
"Biologically-Constrained Multi-Label Classification with Learnable Domain Knowledge",
section 3 and Appendix A):

* ``C[i][j] == -1``: classes ``i`` and ``j`` are mutually exclusive (never in one cell);
* ``C[i][j] == 0``: unrelated;
* ``0 < C[i][j] <= 1``: soft co-occurrence of strength ``C[i][j]``;
* other values in ``[-1, 1]`` are accepted as soft relations (only exactly ``-1`` is a rule).

File format (JSON, UTF-8; ``hierarchies/constraints/*.json`` are examples)::

    {
      "format": "dinov2_hier.constraints/1",      # optional, must be this value when given
      "name": "my_task",                          # required, non-empty
      "description": "free text",                 # optional
      "source": "where the numbers come from",    # optional
      "classes": ["normal", "hyperseg", ...],     # required: K unique non-empty ids
      "display_names": ["Normal", "Hyperseg.", ...],   # optional: K unique names
      "matrix": [[0, -1, ...], ...]               # required: K rows of K numbers in [-1, 1]
    }

Row ``i``, column ``j`` is ``C[i][j]``. A manifest label may be a class id or its display
name. Unknown keys are rejected. Validation on load (:class:`ConstraintError`, a
``ValueError``, naming the file and the key, row and column): square ``K x K`` matching
``classes``, unique names, finite numbers in ``[-1, 1]``.

Asymmetric entries (``C[i][j] != C[j][i]``; the paper's BMC table has eight such pairs, e.g.
Eosinophil/Basophil -1 vs 0) and non-zero diagonal entries (BMC's Basophil and
Megakaryocyte rows say -1 with themselves) are kept exactly as written and reported with a
:class:`ConstraintWarning`. How they are used:

* a pair is **exclusive** when either direction says -1 (:meth:`ConstraintMatrix.exclusive_mask`);
  the diagonal never is (a class cannot exclude itself);
* the learning target (:meth:`ConstraintMatrix.effective`) is symmetric: -1 for exclusive
  pairs, else the mean of both directions; the diagonal is kept as written.

Write your own with :meth:`ConstraintMatrix.from_rules` (exclusive pairs and co-occurrence
strengths by class id) and :meth:`ConstraintMatrix.save`, or by hand in the format above.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = [
    "CONSTRAINTS_DIR",
    "FORMAT",
    "ConstraintError",
    "ConstraintMatrix",
    "ConstraintWarning",
    "load_constraints",
]

FORMAT = "dinov2_hier.constraints/1"
#: Folder of the shipped matrices, relative to the project checkout.
CONSTRAINTS_DIR = "hierarchies/constraints"
_KEYS = ("format", "name", "description", "source", "classes", "display_names", "matrix")


class ConstraintError(UserError, ValueError):
    """A constraint matrix file or object that cannot be used; the message names the file,
    the key and, for values, the row and column."""


class ConstraintWarning(UserWarning):
    """A constraint matrix that loads but is not symmetric or has a non-zero diagonal."""


@dataclass(frozen=True, eq=False)
class ConstraintMatrix:
    """A validated ``K x K`` prior matrix ``values`` (float64, read-only) over ``classes``.

    ``display_names`` default to the class ids; ``source`` is the file it came from (or
    ``"<memory>"``).
    """

    name: str
    classes: tuple[str, ...]
    values: np.ndarray = field(repr=False)
    display_names: tuple[str, ...] = ()
    description: str = ""
    reference: str = ""
    source: str = "<memory>"

    def __post_init__(self) -> None:
        where = self.source
        classes = _check_names(list(self.classes), f"{where}: 'classes'")
        display = list(self.display_names) or list(classes)
        if len(display) != len(classes):
            raise ConstraintError(f"{where}: 'display_names' has {len(display)} entries for {len(classes)} classes")
        display = _check_names(display, f"{where}: 'display_names'")
        for i, d in enumerate(display):
            if d in classes and classes.index(d) != i:
                raise ConstraintError(
                    f"{where}: 'display_names' entry {d!r} of class {classes[i]!r} is the id of another class"
                )
        values = _check_matrix(self.values, classes, where)
        values.setflags(write=False)
        object.__setattr__(self, "classes", tuple(classes))
        object.__setattr__(self, "display_names", tuple(display))
        object.__setattr__(self, "values", values)
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConstraintError(f"{where}: 'name' must be a non-empty string")

    # -- shape and lookup
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, label: str) -> int:
        """Index of a class id or display name.

        Raises:
            KeyError: unknown label.
        """
        if label in self.classes:
            return self.classes.index(label)
        if label in self.display_names:
            return self.display_names.index(label)
        raise KeyError(label)

    # -- derived matrices
    def exclusive_mask(self) -> np.ndarray:
        """bool ``[K, K]``, symmetric: True where ``C[i][j] == -1`` or ``C[j][i] == -1``, ``i != j``."""
        ex = self.values == -1.0
        ex = ex | ex.T
        np.fill_diagonal(ex, False)
        return ex

    def exclusive_pairs(self) -> list[tuple[str, str]]:
        """Exclusive pairs ``(class_i, class_j)`` with ``i < j``, in row order."""
        ex = self.exclusive_mask()
        k = self.num_classes
        return [(self.classes[i], self.classes[j]) for i in range(k) for j in range(i + 1, k) if ex[i, j]]

    def effective(self) -> np.ndarray:
        """Symmetric float64 ``[K, K]`` learning target: -1 on exclusive pairs, else
        ``(C + C^T) / 2``; the diagonal as written."""
        eff = (self.values + self.values.T) / 2.0
        eff[self.exclusive_mask()] = -1.0
        np.fill_diagonal(eff, np.diag(self.values))
        return eff

    def binary(self) -> np.ndarray:
        """``sign(effective())``: -1 exclusive, 0 unrelated, 1 any co-occurrence (the
        "binary constraints" ablation)."""
        return np.sign(self.effective())

    def asymmetries(self) -> list[tuple[str, str, float, float]]:
        """``(class_i, class_j, C[i][j], C[j][i])`` for every ``i < j`` with ``C[i][j] != C[j][i]``."""
        v, k = self.values, self.num_classes
        return [(self.classes[i], self.classes[j], float(v[i, j]), float(v[j, i]))
                for i in range(k) for j in range(i + 1, k) if v[i, j] != v[j, i]]

    def nonzero_diagonal(self) -> list[tuple[str, float]]:
        """``(class, C[i][i])`` for every non-zero diagonal entry."""
        return [(c, float(self.values[i, i])) for i, c in enumerate(self.classes) if self.values[i, i] != 0]

    def warnings_text(self) -> list[str]:
        """One line per kind of irregularity (asymmetry, non-zero diagonal); empty when none."""
        out = []
        asym = self.asymmetries()
        if asym:
            listed = "; ".join(f"{a}/{b}: {x:g} vs {y:g}" for a, b, x, y in asym[:10])
            more = f" (and {len(asym) - 10} more)" if len(asym) > 10 else ""
            out.append(f"{self.source}: constraint matrix '{self.name}' is not symmetric in {len(asym)} pair(s): "
                       f"{listed}{more}; a pair counts as exclusive when either direction is -1, and the "
                       "learning target uses -1 for such pairs, else the mean of both directions")
        diag = self.nonzero_diagonal()
        if diag:
            listed = "; ".join(f"{c}: {v:g}" for c, v in diag)
            out.append(f"{self.source}: constraint matrix '{self.name}' has non-zero diagonal entries ({listed}); "
                       "a class never excludes itself, and the relation loss ignores the diagonal by default")
        return out

    # -- construction and saving
    @classmethod
    def from_dict(cls, obj: Any, source: str = "<memory>") -> ConstraintMatrix:
        """Validate a parsed JSON object (see the module docstring for the keys)."""
        if not isinstance(obj, Mapping):
            raise ConstraintError(f"{source}: expected a JSON object at the top level, got {type(obj).__name__}")
        unknown = [k for k in obj if k not in _KEYS]
        if unknown:
            raise ConstraintError(f"{source}: unknown key(s) {unknown}; allowed: {list(_KEYS)}")
        if "format" in obj and obj["format"] != FORMAT:
            raise ConstraintError(f"{source}: 'format' must be {FORMAT!r}, got {obj['format']!r}")
        for key in ("name", "classes", "matrix"):
            if key not in obj:
                raise ConstraintError(f"{source}: missing required key {key!r}")
        for key in ("description", "source"):
            if key in obj and not isinstance(obj[key], str):
                raise ConstraintError(f"{source}: {key!r} must be a string")
        if not isinstance(obj["classes"], list):
            raise ConstraintError(f"{source}: 'classes' must be a list of class ids")
        display = obj.get("display_names", [])
        if not isinstance(display, list):
            raise ConstraintError(f"{source}: 'display_names' must be a list of strings")
        return cls(name=obj["name"], classes=tuple(obj["classes"]), values=obj["matrix"],
                   display_names=tuple(display), description=obj.get("description", ""),
                   reference=obj.get("source", ""), source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ConstraintMatrix:
        """Read and validate a JSON file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConstraintError(f"{path}: cannot read constraint file: {err.strerror or err}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConstraintError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        return cls.from_dict(obj, source=str(path))

    @classmethod
    def from_rules(cls, name: str, classes: Sequence[str], exclusive: Iterable[tuple[str, str]] = (),
                   cooccur: Mapping[tuple[str, str], float] | None = None,
                   display_names: Sequence[str] = (), description: str = "") -> ConstraintMatrix:
        """A symmetric matrix from rules: ``exclusive`` pairs get -1 both ways,
        ``cooccur[(a, b)] = c`` sets ``C[a][b] = C[b][a] = c``; everything else is 0."""
        classes = list(classes)
        k = len(classes)
        values = np.zeros((k, k))
        pos = {c: i for i, c in enumerate(classes)}

        def at(a: str, b: str, what: str) -> tuple[int, int]:
            for c in (a, b):
                if c not in pos:
                    raise ConstraintError(f"{name}: {what} pair ({a!r}, {b!r}) names unknown class {c!r}")
            if a == b:
                raise ConstraintError(f"{name}: {what} pair ({a!r}, {b!r}) relates a class to itself")
            return pos[a], pos[b]

        for a, b in exclusive:
            i, j = at(a, b, "exclusive")
            values[i, j] = values[j, i] = -1.0
        for (a, b), c in (cooccur or {}).items():
            i, j = at(a, b, "co-occurrence")
            values[i, j] = values[j, i] = float(c)
        return cls(name=name, classes=tuple(classes), values=values, display_names=tuple(display_names),
                   description=description)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this matrix (numbers as written, ``-1`` not ``-1.0``)."""
        def num(x: float) -> float | int:
            return int(x) if float(x).is_integer() else float(x)

        return {"format": FORMAT, "name": self.name, "description": self.description, "source": self.reference,
                "classes": list(self.classes), "display_names": list(self.display_names),
                "matrix": [[num(x) for x in row] for row in self.values]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file (one matrix row per line) atomically; return its path."""
        from .io import atomic_write_text

        d = self.to_dict()
        matrix = d.pop("matrix")
        head = json.dumps(d, indent=2, ensure_ascii=False)[:-2]
        rows = ",\n".join("    [" + ", ".join(json.dumps(x) for x in row) + "]" for row in matrix)
        path = Path(path)
        atomic_write_text(path, f'{head},\n  "matrix": [\n{rows}\n  ]\n}}\n')
        return path


def _check_names(names: list[Any], where: str) -> list[str]:
    if not names:
        raise ConstraintError(f"{where} must list at least one class")
    out, seen = [], {}
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip() or n != n.strip():
            raise ConstraintError(f"{where}[{i}] must be a non-empty string without surrounding spaces, got {n!r}")
        if n in seen:
            raise ConstraintError(f"{where}: {n!r} appears twice (positions {seen[n]} and {i})")
        seen[n] = i
        out.append(n)
    return out


def _check_matrix(matrix: Any, classes: list[str], where: str) -> np.ndarray:
    k = len(classes)
    if isinstance(matrix, np.ndarray):
        matrix = matrix.tolist()
    if not isinstance(matrix, list) or len(matrix) != k:
        got = len(matrix) if isinstance(matrix, list) else type(matrix).__name__
        raise ConstraintError(f"{where}: 'matrix' must have {k} rows (one per class), got {got}")
    out = np.zeros((k, k), dtype=np.float64)
    for i, row in enumerate(matrix):
        if not isinstance(row, list) or len(row) != k:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise ConstraintError(f"{where}: 'matrix' row {i} (class {classes[i]!r}) must have {k} values, got {got}")
        for j, x in enumerate(row):
            ok = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
            if not ok or not math.isfinite(float(x)) or not -1.0 <= float(x) <= 1.0:
                raise ConstraintError(
                    f"{where}: 'matrix' row {i} (class {classes[i]!r}), column {j} (class {classes[j]!r}): "
                    f"{x!r} is not a number in [-1, 1]"
                )
            out[i, j] = float(x)
    return out


def load_constraints(spec: str | os.PathLike | ConstraintMatrix, *, warn: bool = True) -> ConstraintMatrix:
    """A :class:`ConstraintMatrix` from a JSON path or a shipped name (``gr_neutro``,
    ``aml_matek``, ``bmc``: ``hierarchies/constraints/<name>.json``).

    Relative paths resolve against the current directory, then the project checkout. With
    ``warn``, asymmetric entries and a non-zero diagonal are reported as
    :class:`ConstraintWarning` (the matrix is loaded unchanged).

    Raises:
        ConstraintError: no such file or name, or an invalid file.
    """
    if isinstance(spec, ConstraintMatrix):
        matrix = spec
    else:
        from .paths import ResourceNotFoundError, resolve_resource

        text = str(spec)
        candidates = [text] if text.lower().endswith(".json") or os.sep in text or "/" in text else \
            [text, f"{CONSTRAINTS_DIR}/{text}.json"]
        path = None
        for candidate in candidates:
            try:
                path = resolve_resource(candidate, "constraint file")
                break
            except ResourceNotFoundError:
                continue
        if path is None or not path.is_file():
            raise ConstraintError(
                f"constraint matrix {text!r} is neither a JSON file nor a shipped name "
                f"({', '.join(sorted(p.stem for p in _shipped()))})"
            )
        matrix = ConstraintMatrix.from_json(path)
    if warn:
        for line in matrix.warnings_text():
            warnings.warn(line, ConstraintWarning, stacklevel=2)
    return matrix


def _shipped() -> list[Path]:
    from .paths import PROJECT_ROOT

    folder = PROJECT_ROOT / CONSTRAINTS_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []
