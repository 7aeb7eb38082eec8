"""Evaluation outputs: fold summaries, ``metrics.json``, ``predictions.csv`` and ``report.html``.

Pure bookkeeping, no model code: :func:`summarize` turns the per-fold metric
dicts of :func:`eval.crossval.run_probes` into mean / standard deviation / per-fold values,
the ``write_*`` functions write the three output files of an evaluation directory, and
:func:`read_predictions_csv` reads a ``predictions.csv`` back (``eval.compare`` uses it).

Conventions:

* A *scalar metric* is a number in a fold's metric dict (``accuracy``,
  ``balanced_accuracy`` (= macro recall), ``weighted_f1``, ``macro_f1``, ``macro_precision``
  and, with a hierarchy, the hierarchical ones). Nested entries (``per_class``, ``confusion_matrix``, ``labels``) are
  summarised separately (:func:`summarize_per_class`, :func:`pooled_confusion`).
* ``std`` is the population standard deviation over folds (numpy's default, ``ddof=0``;
  0 for a single split). A value that is undefined in a fold (``mistake_severity`` of a
  fold without mistakes: NaN) is left out of that metric's mean and std and written as
  ``null`` in ``folds``; ``n`` counts the folds that entered the mean.
* JSON never holds NaN or infinity (not valid JSON): they are written as ``null``.

``report.html`` is rendered by :mod:`eval.report_html` (through the :mod:`dinov2_hier.render`
toolkit); :func:`write_report_html` writes it. The rendering names this module always had
(:func:`render_report_html`, ``UMAP_MISSING_NOTE``, the ``svg_*`` charts) are re-exported.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError
from dinov2_hier.eval_results import METRICS_FILE, write_results_json
from dinov2_hier.io import atomic_write_text

from dinov2_hier.render import REPORT_CSS, escape_html, svg_legend_and_ticks  # noqa: F401  (re-exported)
from .report_html import (  # noqa: F401  (re-exported)
    MAX_EMBEDDING_POINTS,
    UMAP_MISSING_NOTE,
    render_report_html,
    svg_confusion_matrix,
    svg_per_class_bars,
    svg_scatter,
)
from .values import PER_CLASS_FIELDS, as_float, format_mean_std, is_number, json_safe

__all__ = [
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "REPORT_FILE",
    "PREDICTION_COLUMNS",
    "UMAP_MISSING_NOTE",
    "PredictionTable",
    "PredictionsFileError",
    "format_mean_std",
    "json_safe",
    "pooled_confusion",
    "read_predictions_csv",
    "render_report_html",
    "scalar_metric_names",
    "summarize",
    "summarize_per_class",
    "write_metrics_json",
    "write_predictions_csv",
    "write_report_html",
]

PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
#: The fixed leading columns of predictions.csv; one column per classifier follows.
PREDICTION_COLUMNS = ("sample", "path", "fold", "y_true")

# Report order of the metrics this module knows; unknown scalar metrics follow in fold order.
_KNOWN_ORDER = (
    "accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "macro_precision",
    "hierarchical_precision", "hierarchical_recall", "hierarchical_f1",
    "lineage_accuracy", "mistake_severity",
)


class PredictionsFileError(UserError, ValueError):
    """A predictions.csv is missing or malformed; the message names the file (and line)."""


def scalar_metric_names(fold_metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the numeric entries of the fold dicts, in report order.

    Uses ``dinov2_hier.metrics.SCALAR_METRICS`` for the order when it is importable, then
    this module's known order, then first appearance.
    """
    seen: list[str] = []
    for fold in fold_metrics:
        for key, value in fold.items():
            if key not in seen and (is_number(value) or value is None) and key not in ("support", "n"):
                if value is None and not any(is_number(f.get(key)) for f in fold_metrics):
                    continue
                seen.append(key)
    try:
        from dinov2_hier.metrics import SCALAR_METRICS as order  # noqa: N811
        order = tuple(order)
    except Exception:  # the module is optional for rendering; fall back to the known order
        order = ()
    rank = {name: i for i, name in enumerate(tuple(order) + tuple(n for n in _KNOWN_ORDER if n not in order))}
    return sorted(seen, key=lambda k: (rank.get(k, len(rank)), seen.index(k)))


def _mean_std(values: Sequence[Any]) -> dict[str, Any]:
    folds = [as_float(v) for v in values]
    finite = [v for v in folds if v is not None]
    if finite:
        arr = np.asarray(finite, dtype=np.float64)
        mean, std = float(arr.mean()), float(arr.std())
    else:
        mean = std = None
    return {"mean": mean, "std": std, "n": len(finite), "folds": folds}


def summarize(per_fold: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{probe: {metric: {"mean", "std", "n", "folds"}}}`` over the scalar metrics of each fold.

    ``folds`` keeps every fold's value in fold order (None where undefined); ``mean`` and
    ``std`` (population, ``ddof=0``) are over the defined values, ``n`` counts them; both
    are None when no fold defines the metric.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for probe, folds in per_fold.items():
        folds = list(folds)
        out[probe] = {name: _mean_std([f.get(name) for f in folds]) for name in scalar_metric_names(folds)}
    return out


def summarize_per_class(per_fold: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{probe: {class: {"precision"|"recall"|"f1": {"mean","std","n","folds"}, "support": total}}}``.

    Built from each fold's ``per_class`` entry; a class whose test fold holds none of its
    samples (support 0, possible with a fixed split) contributes no value for that fold.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for probe, folds in per_fold.items():
        classes: list[str] = []
        for fold in folds:
            for label in (fold.get("per_class") or {}):
                if label not in classes:
                    classes.append(label)
        probe_out: dict[str, dict[str, Any]] = {}
        for label in classes:
            entries = [(fold.get("per_class") or {}).get(label) for fold in folds]
            support = [int(e.get("support", 0)) if e else 0 for e in entries]
            row: dict[str, Any] = {}
            for name in PER_CLASS_FIELDS:
                row[name] = _mean_std([e.get(name) if e and s > 0 else None for e, s in zip(entries, support)])
            row["support"] = int(sum(support))
            probe_out[label] = row
        out[probe] = probe_out
    return out


def pooled_confusion(per_fold: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[list[int]]]:
    """``{probe: confusion matrix summed over folds}`` (rows true, columns predicted).

    Every fold's matrix is in the same fixed class order (the evaluation's ``classes``), so
    the sum is the confusion matrix of the pooled test predictions.
    """
    out: dict[str, list[list[int]]] = {}
    for probe, folds in per_fold.items():
        total: np.ndarray | None = None
        for fold in folds:
            matrix = fold.get("confusion_matrix")
            if matrix is None:
                continue
            arr = np.asarray(matrix, dtype=np.int64)
            if total is not None and arr.shape != total.shape:
                raise ValueError(f"probe {probe!r}: confusion matrices of different shapes {total.shape} and {arr.shape}")
            total = arr if total is None else total + arr
        if total is not None:
            out[probe] = total.tolist()
    return out


# --------------------------------------------------------------------------- metrics.json


_METRICS_KEY_ORDER = (
    "checkpoint", "data", "split", "n_samples", "n_images", "n_unreadable", "unreadable", "classes",
    "class_counts", "hierarchy", "probes", "per_class", "confusion_matrix", "fit_info", "settings", "timings",
)


def write_metrics_json(directory: str | Path, summary: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
    """Write ``directory/metrics.json``: ``extra`` plus ``"probes": summary``; return its path.

    ``extra`` carries ``checkpoint``, ``data``, ``n_samples``, ``n_unreadable``,
    ``classes``, ``hierarchy``, ``settings`` and anything else worth keeping; known keys
    are written first, in a fixed order.
    """
    doc = dict(extra)
    doc["probes"] = summary
    ordered = {k: doc[k] for k in _METRICS_KEY_ORDER if k in doc}
    ordered.update({k: v for k, v in doc.items() if k not in ordered})
    return write_results_json(Path(directory) / METRICS_FILE, json_safe(ordered))


# --------------------------------------------------------------------------- predictions.csv


@dataclass
class PredictionTable:
    """The rows of a predictions.csv: test samples, their fold and each classifier's prediction."""

    sample: np.ndarray  # int64 [n], row index in the dataset
    path: list[str]
    fold: np.ndarray  # int64 [n], -1 for a fixed test split
    y_true: np.ndarray  # object [n] of str
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # classifier -> object [n] of str
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.sample = np.asarray(self.sample, dtype=np.int64)
        self.fold = np.asarray(self.fold, dtype=np.int64)
        self.y_true = np.asarray([str(v) for v in self.y_true], dtype=object)
        self.path = [str(p) for p in self.path]
        self.predictions = {
            str(k): np.asarray([str(v) for v in vals], dtype=object) for k, vals in self.predictions.items()
        }
        n = len(self.sample)
        for name, column in (("path", self.path), ("fold", self.fold), ("y_true", self.y_true),
                             *self.predictions.items()):
            if len(column) != n:
                raise ValueError(f"{self.source}: column {name!r} has {len(column)} rows, 'sample' has {n}")

    def __len__(self) -> int:
        return len(self.sample)

    @property
    def classifiers(self) -> list[str]:
        return list(self.predictions)

    def columns(self) -> dict[str, list[str]]:
        """``{column: [value per row]}`` as strings, the table format of :mod:`eval.predictions_csv`."""
        out = {"sample": [str(int(v)) for v in self.sample], "path": list(self.path),
               "fold": [str(int(v)) for v in self.fold], "y_true": [str(v) for v in self.y_true]}
        out.update({k: [str(v) for v in vals] for k, vals in self.predictions.items()})
        return out

    def sorted_by_sample(self) -> PredictionTable:
        order = np.argsort(self.sample, kind="stable")
        return PredictionTable(
            self.sample[order], [self.path[i] for i in order], self.fold[order], self.y_true[order],
            {k: v[order] for k, v in self.predictions.items()}, source=self.source,
        )


def write_predictions_csv(
    directory: str | Path,
    sample: Sequence[int],
    path: Sequence[str],
    fold: Sequence[int],
    y_true: Sequence[str],
    predictions: Mapping[str, Sequence[str]],
) -> Path:
    """Write ``directory/predictions.csv`` (columns ``sample,path,fold,y_true,<classifier>...``).

    One row per test sample, in the order given (callers pass ascending ``sample``).
    Returns the file's path.
    """
    table = PredictionTable(np.asarray(sample), list(path), np.asarray(fold), np.asarray(y_true, dtype=object),
                            {k: np.asarray(v, dtype=object) for k, v in predictions.items()})
    clash = set(table.predictions) & set(PREDICTION_COLUMNS)
    if clash:
        raise ValueError(f"classifier names {sorted(clash)} clash with the fixed columns {PREDICTION_COLUMNS}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*PREDICTION_COLUMNS, *table.classifiers])
    for i in range(len(table)):
        writer.writerow([int(table.sample[i]), table.path[i], int(table.fold[i]), table.y_true[i],
                         *(table.predictions[c][i] for c in table.classifiers)])
    out = Path(directory) / PREDICTIONS_FILE
    atomic_write_text(out, buffer.getvalue())
    return out


def read_predictions_csv(path: str | Path) -> PredictionTable:
    """Read a predictions.csv (or the one inside a directory) into a :class:`PredictionTable`.

    Parsing is :func:`eval.predictions_csv.read_predictions_csv`'s; this adds the checks of the
    format written by :func:`write_predictions_csv`.

    Raises:
        PredictionsFileError: missing file, missing columns, a bad integer, a repeated sample.
    """
    from .predictions_csv import PredictionTableError
    from .predictions_csv import read_predictions_csv as read_columns

    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS_FILE
    if not path.is_file():
        raise PredictionsFileError(f"predictions file not found: '{path}'")
    try:
        cols = read_columns(path)
    except PredictionTableError as exc:
        raise PredictionsFileError(str(exc)) from None
    missing = [c for c in PREDICTION_COLUMNS if c not in cols]
    if missing:
        raise PredictionsFileError(f"{path}:1: header {list(cols)} lacks column(s) {missing}")
    classifiers = [c for c in cols if c not in PREDICTION_COLUMNS]
    if not classifiers:
        raise PredictionsFileError(f"{path}:1: no classifier columns after {','.join(PREDICTION_COLUMNS)}")
    ints: dict[str, np.ndarray] = {}
    for name in ("sample", "fold"):
        try:
            ints[name] = np.asarray([int(v) for v in cols[name]], dtype=np.int64)
        except ValueError:
            bad = next(i for i, v in enumerate(cols[name]) if not v.strip().lstrip("-").isdigit())
            raise PredictionsFileError(
                f"{path}:{bad + 2}: '{name}' must be an integer, got {cols[name][bad]!r}"
            ) from None
    values, counts = np.unique(ints["sample"], return_counts=True)
    if (counts > 1).any():
        raise PredictionsFileError(f"{path}: sample {int(values[counts > 1][0])} appears more than once")
    return PredictionTable(ints["sample"], cols["path"], ints["fold"], cols["y_true"],
                           {c: cols[c] for c in classifiers}, source=str(path))


# --------------------------------------------------------------------------- report.html


def write_report_html(
    directory: str | Path,
    metrics: Mapping[str, Any],
    predictions: PredictionTable | None = None,
    features: np.ndarray | None = None,
    hierarchy: Any = None,
    seed: int = 0,
) -> Path:
    """Write ``directory/report.html``; ``features`` (optional) align with ``predictions`` rows."""
    out = Path(directory) / REPORT_FILE
    atomic_write_text(out, render_report_html(metrics, predictions, features, hierarchy, seed=seed))
    return out
