"""Evaluation outputs: fold summaries, ``metrics.json``, ``predictions.csv`` and ``report.html``.

Pure bookkeeping and rendering, no model code: :func:`summarize` turns the per-fold metric
dicts of :func:`eval.crossval.run_probes` into mean / standard deviation / per-fold values,
the ``write_*`` functions write the three output files of an evaluation directory, and
:func:`read_predictions_csv` reads a ``predictions.csv`` back (``eval.compare`` uses it).

Conventions:

* A *scalar metric* is a number in a fold's metric dict (``accuracy``,
  ``balanced_accuracy``, ``weighted_f1``, ``macro_f1`` and, with a hierarchy, the
  hierarchical ones). Nested entries (``per_class``, ``confusion_matrix``, ``labels``) are
  summarised separately (:func:`summarize_per_class`, :func:`pooled_confusion`).
* ``std`` is the population standard deviation over folds (numpy's default, ``ddof=0``;
  0 for a single split). A value that is undefined in a fold (``mistake_severity`` of a
  fold without mistakes: NaN) is left out of that metric's mean and std and written as
  ``null`` in ``folds``; ``n`` counts the folds that entered the mean.
* JSON never holds NaN or infinity (not valid JSON): they are written as ``null``.

``report.html`` is one self-contained file: inline CSS and inline SVG only, no scripts, no
external references and no plotting library. It holds the metric table (mean ± std), the
per-fold values, one confusion matrix per probe (pooled over the test folds, colour =
share of the true class's row), per-class F1 bars, and a 2D UMAP of the features coloured
by class and by lineage when ``umap-learn`` is installed (otherwise a note saying how to
install it).

Length (~765 lines): the writers and readers of the three output files and the
self-contained HTML renderer (inline SVG charts) they feed; the result files' names and
JSON writer are :mod:`dinov2_hier.eval_results`'.
"""
from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError
from dinov2_hier.eval_results import METRICS_FILE, write_results_json
from dinov2_hier.io import atomic_write_text

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

log = logging.getLogger("dinov2_hier.eval.report")

PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
#: The fixed leading columns of predictions.csv; one column per classifier follows.
PREDICTION_COLUMNS = ("sample", "path", "fold", "y_true")
UMAP_MISSING_NOTE = (
    "The feature embedding plot needs umap-learn: install umap-learn "
    "(pip install 'dinov2_hier[umap]') for the embedding plot."
)
#: Most points drawn in one embedding plot (a seeded subsample above this).
MAX_EMBEDDING_POINTS = 5000

# Report order of the metrics this module knows; unknown scalar metrics follow in fold order.
_KNOWN_ORDER = (
    "accuracy", "balanced_accuracy", "weighted_f1", "macro_f1",
    "hierarchical_precision", "hierarchical_recall", "hierarchical_f1",
    "lineage_accuracy", "mistake_severity",
)
_PER_CLASS_FIELDS = ("precision", "recall", "f1")


class PredictionsFileError(UserError, ValueError):
    """A predictions.csv is missing or malformed; the message names the file (and line)."""


# --------------------------------------------------------------------------- numbers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _as_float(value: Any) -> float | None:
    """``float(value)``, or None for None / NaN / infinity."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def scalar_metric_names(fold_metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the numeric entries of the fold dicts, in report order.

    Uses ``dinov2_hier.metrics.SCALAR_METRICS`` for the order when it is importable, then
    this module's known order, then first appearance.
    """
    seen: list[str] = []
    for fold in fold_metrics:
        for key, value in fold.items():
            if key not in seen and (_is_number(value) or value is None) and key not in ("support", "n"):
                if value is None and not any(_is_number(f.get(key)) for f in fold_metrics):
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
    folds = [_as_float(v) for v in values]
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
            for name in _PER_CLASS_FIELDS:
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


def format_mean_std(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``"0.812 ± 0.034"``; ``"n/a"`` when the mean is undefined."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    std = entry.get("std")
    std_text = f"{std:.{digits}f}" if std is not None else "n/a"
    return f"{entry['mean']:.{digits}f} ± {std_text}"


# --------------------------------------------------------------------------- metrics.json


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(allow_nan=False)`` accepts (NaN/inf -> None)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _as_float(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


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
        """``{column: [value per row]}`` as strings, the table format of :mod:`eval.bootstrap`."""
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

    Parsing is :func:`eval.bootstrap.read_predictions_csv`'s; this adds the checks of the
    format written by :func:`write_predictions_csv`.

    Raises:
        PredictionsFileError: missing file, missing columns, a bad integer, a repeated sample.
    """
    from .bootstrap import PredictionTableError
    from .bootstrap import read_predictions_csv as read_columns

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


# --------------------------------------------------------------------------- SVG helpers

_TAB20 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)


def _palette(n: int) -> list[str]:
    """``n`` distinguishable colours: tab20, then golden-angle hues."""
    colours = list(_TAB20[:n])
    for i in range(len(colours), n):
        hue = (i * 137.508) % 360
        colours.append(f"hsl({hue:.0f},65%,{45 + 10 * (i % 3)}%)")
    return colours


def svg_legend_and_ticks(
    names: Sequence[str], colours: Mapping[str, str], left: float, top: float, plot_w: float, height: float
) -> list[str]:
    """SVG pieces shared by the horizontal bar charts on a [0, 1] axis: one legend row
    per name (16 px apart from y = 8) and grid lines with labels at 0, 0.25, ..., 1 from
    ``left`` to ``left + plot_w`` (pixels), between ``top - 4`` and ``height - 24``."""
    parts = []
    for i, name in enumerate(names):
        y = 8 + 16 * i
        parts.append(f'<rect x="{left:.1f}" y="{y}" width="12" height="10" fill="{colours[name]}"/>'
                     f'<text x="{left + 16:.1f}" y="{y + 9}" font-size="11">{escape_html(name)}</text>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4:.1f}" x2="{x:.1f}" y2="{height - 24:.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{x:.1f}" y="{height - 10:.1f}" font-size="10" text-anchor="middle">{tick:g}</text>')
    return parts


def escape_html(text: Any) -> str:
    """``text`` as HTML-safe text (quotes escaped too, for attribute values)."""
    return html.escape(str(text), quote=True)


_esc = escape_html


def _blues(t: float) -> str:
    """White (t=0) to dark blue (t=1)."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (255 - (255 - 8) * t, 255 - (255 - 48) * t, 255 - (255 - 107) * t)
    return f"rgb({r:.0f},{g:.0f},{b:.0f})"


def _text_width(text: str, font_px: float) -> float:
    return 0.6 * font_px * len(text)


def svg_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> str:
    """Heatmap of a confusion matrix: rows true, columns predicted, colour = row share."""
    arr = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    cell = max(14.0, min(40.0, 640.0 / max(n, 1)))
    font = min(11.0, cell * 0.45)
    label_font = 11.0
    margin_left = 12 + max((_text_width(str(l), label_font) for l in labels), default=0) + 18
    margin_top = 40 + max((_text_width(str(l), label_font) for l in labels), default=0) * 0.75
    width = margin_left + n * cell + 10 + max((_text_width(str(l), label_font) for l in labels[-3:]), default=0) * 0.7
    height = margin_top + n * cell + 30
    rows = arr.sum(axis=1)
    parts = [f'<svg class="confusion" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{_esc(title)}">',
             f'<text x="4" y="16" font-size="13" font-weight="bold">{_esc(title)}</text>',
             f'<text x="{margin_left + n * cell / 2:.1f}" y="32" font-size="11" text-anchor="middle">predicted</text>',
             f'<text x="10" y="{margin_top + n * cell / 2:.1f}" font-size="11" text-anchor="middle" '
             f'transform="rotate(-90 10 {margin_top + n * cell / 2:.1f})">true</text>']
    for j, label in enumerate(labels):
        x = margin_left + (j + 0.5) * cell
        y = margin_top - 4
        parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{label_font}" '
                     f'transform="rotate(-45 {x:.1f} {y:.1f})">{_esc(label)}</text>')
    for i, label in enumerate(labels):
        y = margin_top + (i + 0.5) * cell
        parts.append(f'<text x="{margin_left - 4:.1f}" y="{y + 4:.1f}" font-size="{label_font}" '
                     f'text-anchor="end">{_esc(label)}</text>')
        for j in range(n):
            count = int(arr[i, j])
            share = count / rows[i] if rows[i] else 0.0
            x = margin_left + j * cell
            parts.append(
                f'<rect x="{x:.1f}" y="{margin_top + i * cell:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                f'fill="{_blues(share)}" stroke="#ddd"><title>true {_esc(label)}, predicted {_esc(labels[j])}: '
                f'{count} ({100 * share:.1f}% of the row)</title></rect>'
            )
            if count and n <= 30:
                colour = "#fff" if share > 0.5 else "#222"
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + font / 3:.1f}" font-size="{font:.1f}" '
                             f'text-anchor="middle" fill="{colour}">{count}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_per_class_bars(per_class: Mapping[str, Mapping[str, Mapping[str, Any]]], labels: Sequence[str],
                       metric: str = "f1") -> str:
    """Horizontal grouped bars: one group per class, one bar per probe (mean, whisker ± std)."""
    probes = list(per_class)
    colours = dict(zip(probes, _palette(len(probes))))
    bar = 9.0
    group = bar * len(probes) + 8
    label_font = 11.0
    margin_left = 12 + max((_text_width(str(l), label_font) for l in labels), default=0)
    plot_w = 360.0
    margin_top = 24 + 16 * len(probes)
    width = margin_left + plot_w + 60
    height = margin_top + group * len(labels) + 30
    parts = [f'<svg class="f1-bars" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
             f'role="img" aria-label="per-class {metric}">']
    parts += svg_legend_and_ticks(probes, colours, margin_left, margin_top, plot_w, height)
    for i, label in enumerate(labels):
        y0 = margin_top + i * group
        parts.append(f'<text x="{margin_left - 4:.1f}" y="{y0 + bar * len(probes) / 2 + 4:.1f}" '
                     f'font-size="{label_font}" text-anchor="end">{_esc(label)}</text>')
        for p, probe in enumerate(probes):
            entry = (per_class.get(probe) or {}).get(label, {}).get(metric) or {}
            mean, std = entry.get("mean"), entry.get("std")
            y = y0 + p * bar
            if mean is None:
                parts.append(f'<text x="{margin_left + 2:.1f}" y="{y + bar - 1:.1f}" font-size="9" fill="#888">n/a</text>')
                continue
            w = max(0.0, min(1.0, mean)) * plot_w
            parts.append(f'<rect x="{margin_left:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar - 1:.1f}" '
                         f'fill="{colours[probe]}"><title>{_esc(probe)}, {_esc(label)}: {metric} '
                         f'{format_mean_std(entry)}</title></rect>')
            if std:
                lo = margin_left + max(0.0, mean - std) * plot_w
                hi = margin_left + min(1.0, mean + std) * plot_w
                parts.append(f'<line x1="{lo:.1f}" y1="{y + bar / 2:.1f}" x2="{hi:.1f}" y2="{y + bar / 2:.1f}" '
                             f'stroke="#333" stroke-width="1"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_scatter(xy: np.ndarray, groups: Sequence[str], title: str) -> str:
    """2D scatter of points coloured by group, with a legend."""
    xy = np.asarray(xy, dtype=np.float64)
    names = sorted(set(groups))
    colours = dict(zip(names, _palette(len(names))))
    size = 420.0
    legend_w = 20 + max((_text_width(n, 11) for n in names), default=0)
    width, height = size + legend_w + 30, max(size + 40, 40 + 16 * len(names))
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pts = (xy - lo) / span * (size - 20) + 10
    parts = [f'<svg class="embedding" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
             f'role="img" aria-label="{_esc(title)}">',
             f'<text x="4" y="16" font-size="13" font-weight="bold">{_esc(title)}</text>',
             f'<rect x="0" y="28" width="{size:.0f}" height="{size:.0f}" fill="none" stroke="#ccc"/>']
    radius = 2.5 if len(pts) <= 2000 else 1.5
    for name in names:
        idx = [i for i, g in enumerate(groups) if g == name]
        circles = "".join(f'<circle cx="{pts[i, 0]:.1f}" cy="{28 + size - pts[i, 1]:.1f}" r="{radius}"/>' for i in idx)
        parts.append(f'<g fill="{colours[name]}" fill-opacity="0.75"><title>{_esc(name)}</title>{circles}</g>')
    for k, name in enumerate(names):
        y = 36 + 16 * k
        parts.append(f'<circle cx="{size + 18:.0f}" cy="{y}" r="5" fill="{colours[name]}"/>'
                     f'<text x="{size + 28:.0f}" y="{y + 4}" font-size="11">{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- embedding


def _embed_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """2D UMAP (cosine metric) of ``features``; raises ImportError when umap-learn is missing."""
    import umap  # optional dependency: pip install 'dinov2_hier[umap]'

    n = len(features)
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), metric="cosine", random_state=seed)
    return np.asarray(reducer.fit_transform(np.asarray(features, dtype=np.float32)), dtype=np.float64)


def _lineage(label: str, hierarchy: Any) -> str:
    if hierarchy is None or label not in hierarchy:
        return label
    if hierarchy.depth(label) < 1:
        return label
    return hierarchy.ancestor_at_depth(label, 1)


def _embedding_section(features: np.ndarray | None, y_true: Sequence[str], hierarchy: Any, seed: int) -> str:
    head = "<h2>Feature embedding (UMAP)</h2>"
    if features is None:
        return head + '<p class="note">No features were passed to the report; embedding omitted.</p>'
    features = np.asarray(features)
    if len(features) != len(y_true):
        return head + (f'<p class="note">Embedding omitted: {len(features)} feature rows for '
                       f'{len(y_true)} predictions.</p>')
    if len(features) < 4:
        return head + '<p class="note">Embedding omitted: fewer than 4 samples.</p>'
    labels = np.asarray([str(v) for v in y_true], dtype=object)
    if len(features) > MAX_EMBEDDING_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), MAX_EMBEDDING_POINTS, replace=False))
        features, labels = features[keep], labels[keep]
        sub = f" (a seeded random subset of {MAX_EMBEDDING_POINTS} of the samples)"
    else:
        sub = ""
    try:
        xy = _embed_2d(features, seed)
    except ImportError:
        return head + f'<p class="note missing-umap">{_esc(UMAP_MISSING_NOTE)}</p>'
    except Exception as exc:  # a plot must never sink the evaluation
        log.warning("UMAP embedding failed: %s", exc)
        return head + f'<p class="note">UMAP embedding failed: {_esc(type(exc).__name__)}: {_esc(exc)}</p>'
    parts = [head, f"<p>Frozen CLS features of the evaluated samples{_esc(sub)}, 2D UMAP (cosine, seed {seed}).</p>",
             '<div class="row">', svg_scatter(xy, list(labels), "coloured by class")]
    if hierarchy is not None:
        parts.append(svg_scatter(xy, [_lineage(l, hierarchy) for l in labels], "coloured by lineage"))
    parts.append("</div>")
    return "".join(parts)


# --------------------------------------------------------------------------- report.html

REPORT_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
.warn{background:#fde8e8;border:1px solid #e0a0a0;padding:8px 12px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.note{background:#fff8e1;border:1px solid #f0d48a;padding:6px 10px;display:inline-block}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.meta td{text-align:left}code{font-size:12px}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    out = [f'<table class="{cls}">' if cls else "<table>", "<tr>"]
    out.extend(f"<th>{_esc(h)}</th>" for h in header)
    out.append("</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _fmt(value: Any, digits: int = 3) -> str:
    f = _as_float(value) if _is_number(value) or value is None else None
    return "n/a" if f is None else f"{f:.{digits}f}"


def render_report_html(
    metrics: Mapping[str, Any],
    predictions: PredictionTable | None = None,
    features: np.ndarray | None = None,
    hierarchy: Any = None,
    seed: int = 0,
    title: str | None = None,
) -> str:
    """The report as one HTML string (see the module docstring for its content)."""
    from dinov2_hier.metrics import metric_label

    probes: Mapping[str, Mapping[str, Any]] = metrics.get("probes") or {}
    classes = list(metrics.get("classes") or [])
    ckpt = metrics.get("checkpoint") or {}
    ckpt_name = ckpt.get("name") if isinstance(ckpt, Mapping) else ckpt
    title = title or f"Evaluation report: {ckpt_name or 'checkpoint'}"
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{_esc(title)}</title><style>{REPORT_CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>"]

    # -- what was evaluated
    info: list[tuple[str, str]] = []
    if isinstance(ckpt, Mapping):
        for key in ("name", "path", "arch", "iteration", "fingerprint"):
            if ckpt.get(key) is not None:
                info.append((f"checkpoint {key}", str(ckpt[key])))
    elif ckpt:
        info.append(("checkpoint", str(ckpt)))
    data = metrics.get("data")
    if isinstance(data, Mapping):
        info.extend((f"data {k}", str(v)) for k, v in data.items() if v is not None)
    elif data:
        info.append(("data", str(data)))
    for key in ("n_samples", "n_unreadable"):
        if key in metrics:
            info.append((key.replace("_", " "), str(metrics[key])))
    hier = metrics.get("hierarchy")
    if isinstance(hier, Mapping):
        info.append(("hierarchy", f"{hier.get('name')} ({hier.get('path')})"))
    settings = metrics.get("settings") or {}
    for key, value in settings.items():
        info.append((f"setting {key}", json.dumps(json_safe(value)) if not isinstance(value, str) else value))
    training = metrics.get("training")
    if isinstance(training, Mapping):
        info.append(("training run", _collapse_text(training)))
        if training.get("collapsed"):
            parts.append(f"<p class=\"warn\"><b>This checkpoint comes from a collapsed run</b>: "
                         f"{_esc(_collapse_text(training))}. Its DINO / iBOT losses sat at ln K and taught the "
                         "backbone nothing; compare it with <code>--ckpt baseline:colour</code> and see "
                         "docs/training-dynamics.md.</p>")
    parts.append(_table(["", ""], info, cls="meta"))
    counts = metrics.get("class_counts") or {}
    if classes:
        parts.append("<h2>Classes</h2>")
        parts.append(_table(["class", "name", "samples"], [
            (c, hierarchy.display_name(c) if hierarchy is not None and c in hierarchy else "", str(counts.get(c, "")))
            for c in classes]))

    # -- metric table: rows = metrics, columns = probes
    probe_names = list(probes)
    metric_names: list[str] = []
    for probe in probe_names:
        for name in probes[probe]:
            if name not in metric_names:
                metric_names.append(name)
    folds_n = max((len(e.get("folds") or []) for p in probes.values() for e in p.values()), default=0)
    split = "fixed train/test split" if folds_n == 1 else f"{folds_n}-fold cross-validation, mean ± std over folds"
    parts.append(f"<h2>Metrics</h2><p>{_esc(split)}. Higher is better, except for metrics marked "
                 "(lower better).</p>")
    parts.append(_table(["metric", *probe_names],
                        [(metric_label(m), *(format_mean_std(probes[p].get(m)) for p in probe_names))
                         for m in metric_names],
                        cls="metrics"))
    if folds_n > 1:
        parts.append("<details><summary>Per-fold values</summary>")
        for probe in probe_names:
            rows = [(metric_label(m), *(_fmt(v) for v in (probes[probe][m].get("folds") or []))) for m in probes[probe]]
            parts.append(f"<h3>{_esc(probe)}</h3>")
            parts.append(_table(["metric", *(f"fold {i}" for i in range(folds_n))], rows))
        parts.append("</details>")

    # -- confusion matrices, one per probe
    confusion = metrics.get("confusion_matrix") or {}
    if confusion:
        parts.append("<h2>Confusion matrices</h2><p>Pooled over the test folds; rows true class, columns "
                     "predicted; colour is the share of the row (the class's recall on the diagonal).</p>"
                     '<div class="row">')
        for probe, matrix in confusion.items():
            parts.append(svg_confusion_matrix(matrix, classes, probe))
        parts.append("</div>")

    # -- per-class F1
    per_class = metrics.get("per_class") or {}
    if per_class:
        parts.append("<h2>Per-class F1</h2><p>Mean over folds; the whisker spans ± one standard deviation.</p>")
        parts.append(svg_per_class_bars(per_class, classes or list(next(iter(per_class.values()))), "f1"))
        header = ["class", "support"] + [f"{p} {f}" for p in per_class for f in _PER_CLASS_FIELDS]
        rows = []
        for c in classes or list(next(iter(per_class.values()))):
            support = next((str(per_class[p][c]["support"]) for p in per_class if c in per_class[p]), "")
            rows.append((c, support, *(format_mean_std((per_class[p].get(c) or {}).get(f))
                                       for p in per_class for f in _PER_CLASS_FIELDS)))
        parts.append("<details><summary>Per-class precision, recall and F1</summary>")
        parts.append(_table(header, rows))
        parts.append("</details>")

    # -- embedding
    y_true = list(predictions.y_true) if predictions is not None else []
    parts.append(_embedding_section(features, y_true, hierarchy, seed))
    parts.append("</body></html>\n")
    return "".join(parts)


def _collapse_text(training: Mapping[str, Any]) -> str:
    """One line on a training run's collapse status (metrics.json's ``training``)."""
    last = training.get("last") or {}
    kls = ", ".join(
        f"{loss} KL to uniform: student {v.get('student_kl_to_uniform', float('nan')):.4f}, "
        f"teacher {v.get('teacher_kl_to_uniform', float('nan')):.4f} nats"
        for loss, v in last.items() if isinstance(v, Mapping)
    )
    if training.get("collapsed"):
        head = f"collapsed (detected at iteration {training.get('detected_at_iteration')})"
    elif training.get("detected_at_iteration") is not None:
        head = f"collapsed at iteration {training.get('detected_at_iteration')}, recovered by iteration {training.get('iteration')}"
    else:
        head = f"not collapsed up to iteration {training.get('iteration')}"
    return f"{head}; {kls}" if kls else head


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
