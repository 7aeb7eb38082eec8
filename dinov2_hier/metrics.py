"""Classification metrics and hierarchy-aware metrics: pure functions of labels and predictions.

Every function takes ``y_true`` and ``y_pred`` as sequences of label strings (node ids of a
:class:`~dinov2_hier.hierarchy.Hierarchy` when one is given; internal nodes are allowed as
labels and as predictions) and returns plain Python numbers, lists and dicts (JSON-ready).

Flat metrics (:func:`classification_report`) take the class list ``labels`` explicitly, fixed
once for a whole dataset, so a class missing from a fold or a split never shifts a row of the
confusion matrix or a per-class entry. Definitions:

* ``accuracy``: fraction of samples with ``y_pred == y_true``.
* ``balanced_accuracy``: mean recall over the classes present in ``y_true`` (scikit-learn's
  ``balanced_accuracy_score``); classes of ``labels`` absent from ``y_true`` do not count.
  This *is* the macro recall (there is no separate ``macro_recall`` entry).
* ``weighted_f1``: per-class F1 averaged with the true-class supports as weights.
* ``macro_f1``: unweighted mean of per-class F1 over the classes present in ``y_true`` or
  ``y_pred`` (what scikit-learn averages when it is not given ``labels``), so a class of
  ``labels`` that occurs in neither does not pull the mean down with an F1 of 0.
* ``macro_precision``: unweighted mean of per-class precision over the same classes as
  ``macro_f1`` (present in ``y_true`` or ``y_pred``; scikit-learn's
  ``precision_score(average="macro")`` without ``labels``). A class that is true but never
  predicted has precision 0 (``zero_division=0``). Example: y_true ``[a, a, b]``, y_pred
  ``[a, b, b]``: a 1/1, b 1/2, macro precision 0.75.
* per-class precision, recall, F1 (``zero_division=0``: 0.0 where undefined) and support.

Hierarchical metrics follow section 2.4 of the paper. The ancestor set ``A(node)`` of a node
is the node itself and its ancestors up to, excluding, the root (``Hierarchy.ancestors``):

* ``hP = sum_i |A(true_i) & A(pred_i)| / sum_i |A(pred_i)|``,
  ``hR = sum_i |A(true_i) & A(pred_i)| / sum_i |A(true_i)|``, ``hF1 = 2 hP hR / (hP + hR)``
  (micro sums over samples; hF1 is 0 when hP + hR is 0).
* ``lineage_accuracy``: fraction of samples whose prediction and truth share their depth-1
  ancestor (their lineage).
* ``mistake_severity``: over the misclassified samples (``pred != true``), the mean of
  ``depth(true) - depth(lca(true, pred))``; ``nan`` when there is no mistake. A prediction
  that is a descendant of the truth (an internal node) is a mistake of severity 0; a
  prediction that is an ancestor of the truth has severity ``depth(true) - depth(pred)``.

The root of the tree is not a class: as a label or a prediction it is rejected (it has no
ancestor set and no lineage). Bad input raises :class:`MetricInputError` (a ValueError) naming
the offending label and its position.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from .errors import suggest
from .hierarchy import Hierarchy

__all__ = [
    "FLAT_SCALAR_METRICS",
    "HIERARCHICAL_SCALAR_METRICS",
    "LOWER_IS_BETTER",
    "MetricInputError",
    "SCALAR_METRICS",
    "accuracy",
    "all_metrics",
    "check_labels_in_hierarchy",
    "check_predictions",
    "classification_report",
    "hierarchical_prf",
    "lineage_accuracy",
    "metric_label",
    "mistake_severity",
]

FLAT_SCALAR_METRICS: tuple[str, ...] = (
    "accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "macro_precision",
)
HIERARCHICAL_SCALAR_METRICS: tuple[str, ...] = (
    "hierarchical_precision",
    "hierarchical_recall",
    "hierarchical_f1",
    "lineage_accuracy",
    "mistake_severity",
)
# Names of the scalar entries of all_metrics(), in report order (hierarchical ones need a tree).
SCALAR_METRICS: tuple[str, ...] = FLAT_SCALAR_METRICS + HIERARCHICAL_SCALAR_METRICS
# Every scalar metric is "higher is better" except these (with the multi-label rates of
# eval.multilabel); tables mark them with metric_label().
LOWER_IS_BETTER: frozenset[str] = frozenset({"mistake_severity", "impossible_rate", "impossible_rate_before"})


def metric_label(name: str) -> str:
    """``name`` as a metric table shows it: ``"mistake_severity (lower better)"`` for the
    metrics of :data:`LOWER_IS_BETTER`, the name itself for every other (higher better)."""
    return f"{name} (lower better)" if name in LOWER_IS_BETTER else name


class MetricInputError(ValueError):
    """Bad input to a metric: length mismatch, a non-string label, an unknown label.

    ``label`` holds the offending label when there is one (else None).
    """

    def __init__(self, message: str, label: Any = None) -> None:
        super().__init__(message)
        self.label = label


# --------------------------------------------------------------------------- validation


def _as_label_list(values: Any, what: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise MetricInputError(f"{what} must be a sequence of labels, got a single string {values!r}")
    try:
        items = list(values)
    except TypeError:
        raise MetricInputError(f"{what} must be a sequence of labels, got {type(values).__name__}") from None
    for i, value in enumerate(items):
        if not isinstance(value, str):
            raise MetricInputError(
                f"{what}[{i}] is {value!r} ({type(value).__name__}); labels must be strings (node ids)",
                label=value,
            )
    # numpy.str_ -> str, so results and dict keys are plain Python strings.
    return [str(v) for v in items]


def check_predictions(y_true: Sequence[str], y_pred: Sequence[str]) -> tuple[list[str], list[str]]:
    """Validate a pair of label sequences (strings, same non-zero length); return them as lists."""
    true_list = _as_label_list(y_true, "y_true")
    pred_list = _as_label_list(y_pred, "y_pred")
    if len(true_list) != len(pred_list):
        raise MetricInputError(
            f"y_true and y_pred have different lengths ({len(true_list)} and {len(pred_list)})"
        )
    if not true_list:
        raise MetricInputError("no samples: y_true and y_pred are empty")
    return true_list, pred_list


def _check_labels(labels: Any) -> list[str]:
    label_list = _as_label_list(labels, "labels")
    if not label_list:
        raise MetricInputError("labels is empty: give the class list of the dataset")
    seen: set[str] = set()
    for label in label_list:
        if label in seen:
            raise MetricInputError(f"label {label!r} appears twice in labels", label=label)
        seen.add(label)
    return label_list


def _check_in_labels(values: list[str], labels: list[str], what: str) -> None:
    allowed = set(labels)
    for i, value in enumerate(values):
        if value not in allowed:
            raise MetricInputError(
                f"{what}[{i}] = {value!r} is not one of the {len(labels)} labels {_preview(labels)}"
                f"{suggest(value, labels)}",
                label=value,
            )


def check_labels_in_hierarchy(values: Iterable[str], hierarchy: Hierarchy, what: str = "y_true") -> None:
    """Raise :class:`MetricInputError` for the first value that is not a class node of ``hierarchy``.

    A class node is any node except the root (internal nodes are fine).
    """
    if not isinstance(hierarchy, Hierarchy):
        raise MetricInputError(f"hierarchy must be a dinov2_hier.hierarchy.Hierarchy, got {type(hierarchy).__name__}")
    checked: set[str] = set()
    for i, value in enumerate(values):
        if value in checked:
            continue
        if value not in hierarchy:
            raise MetricInputError(
                f"{what}[{i}] = {value!r} is not a node of hierarchy {hierarchy.name!r} ({hierarchy.source})"
                f"{suggest(value, hierarchy.nodes)}",
                label=value,
            )
        if value == hierarchy.root:
            raise MetricInputError(
                f"{what}[{i}] = {value!r} is the root of hierarchy {hierarchy.name!r}, which is not a class",
                label=value,
            )
        checked.add(value)


def _preview(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


# --------------------------------------------------------------------------- flat metrics


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Fraction of samples with ``y_pred == y_true``."""
    true_list, pred_list = check_predictions(y_true, y_pred)
    return sum(t == p for t, p in zip(true_list, pred_list)) / len(true_list)


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy (= macro recall), weighted and macro F1, macro precision,
    per-class scores and the confusion matrix.

    ``labels`` is the class list of the whole dataset; every value of ``y_true`` and ``y_pred``
    must be in it (else :class:`MetricInputError`). ``confusion_matrix[i][j]`` counts samples
    of true class ``labels[i]`` predicted as ``labels[j]``. See the module docstring for the
    definitions.
    """
    true_list, pred_list = check_predictions(y_true, y_pred)
    label_list = _check_labels(labels)
    _check_in_labels(true_list, label_list, "y_true")
    _check_in_labels(pred_list, label_list, "y_pred")

    precision, recall, f1, support = precision_recall_fscore_support(
        true_list, pred_list, labels=label_list, average=None, zero_division=0
    )
    matrix = confusion_matrix(true_list, pred_list, labels=label_list)
    with warnings.catch_warnings():
        # Classes predicted but absent from y_true have no recall; sklearn drops them (as we
        # define balanced accuracy) and warns about it.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        # Its internal confusion matrix has no `labels`; with a single class it warns, harmlessly.
        warnings.filterwarnings("ignore", message="A single label was found")
        balanced = float(balanced_accuracy_score(true_list, pred_list))
    support = np.asarray(support, dtype=np.int64)
    weighted_f1 = float(np.sum(f1 * support) / np.sum(support))
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    macro_f1 = float(np.mean(f1[present]))
    macro_precision = float(np.mean(np.asarray(precision, dtype=np.float64)[present]))
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(label_list)
    }
    return {
        "accuracy": float(np.trace(matrix) / len(true_list)),
        "balanced_accuracy": balanced,
        "weighted_f1": weighted_f1,
        "macro_f1": macro_f1,
        "macro_precision": macro_precision,
        "per_class": per_class,
        "confusion_matrix": [[int(x) for x in row] for row in matrix],
        "labels": label_list,
    }


# --------------------------------------------------------------------------- hierarchical metrics


def _checked_hierarchical(
    y_true: Sequence[str], y_pred: Sequence[str], hierarchy: Hierarchy
) -> tuple[list[str], list[str]]:
    true_list, pred_list = check_predictions(y_true, y_pred)
    check_labels_in_hierarchy(true_list, hierarchy, "y_true")
    check_labels_in_hierarchy(pred_list, hierarchy, "y_pred")
    return true_list, pred_list


def hierarchical_prf(y_true: Sequence[str], y_pred: Sequence[str], hierarchy: Hierarchy) -> tuple[float, float, float]:
    """Hierarchical precision, recall and F1 ``(hP, hR, hF1)`` (micro sums over samples)."""
    true_list, pred_list = _checked_hierarchical(y_true, y_pred, hierarchy)
    shared = size_pred = size_true = 0
    for (t, p), count in Counter(zip(true_list, pred_list)).items():
        a_true, a_pred = set(hierarchy.ancestors(t)), set(hierarchy.ancestors(p))
        shared += count * len(a_true & a_pred)
        size_pred += count * len(a_pred)
        size_true += count * len(a_true)
    h_p = shared / size_pred
    h_r = shared / size_true
    h_f = 2 * h_p * h_r / (h_p + h_r) if h_p + h_r > 0 else 0.0
    return float(h_p), float(h_r), float(h_f)


def lineage_accuracy(y_true: Sequence[str], y_pred: Sequence[str], hierarchy: Hierarchy) -> float:
    """Fraction of samples whose prediction and truth have the same depth-1 ancestor."""
    true_list, pred_list = _checked_hierarchical(y_true, y_pred, hierarchy)
    lineage = {n: hierarchy.ancestor_at_depth(n, 1) for n in set(true_list) | set(pred_list)}
    return sum(lineage[t] == lineage[p] for t, p in zip(true_list, pred_list)) / len(true_list)


def mistake_severity(y_true: Sequence[str], y_pred: Sequence[str], hierarchy: Hierarchy) -> float:
    """Mean of ``depth(true) - depth(lca(true, pred))`` over misclassified samples; nan if none."""
    true_list, pred_list = _checked_hierarchical(y_true, y_pred, hierarchy)
    total = mistakes = 0
    for (t, p), count in Counter(zip(true_list, pred_list)).items():
        if t != p:
            total += count * (hierarchy.depth(t) - hierarchy.depth(hierarchy.lca(t, p)))
            mistakes += count
    return total / mistakes if mistakes else math.nan


# --------------------------------------------------------------------------- everything


def all_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    hierarchy: Hierarchy | None = None,
) -> dict[str, Any]:
    """:func:`classification_report` plus, with a hierarchy, the hierarchical metrics.

    Added keys: ``hierarchical_precision``, ``hierarchical_recall``, ``hierarchical_f1``,
    ``lineage_accuracy``, ``mistake_severity`` (nan when there is no mistake). With a
    hierarchy every entry of ``labels`` must be a class node of it.
    """
    report = classification_report(y_true, y_pred, labels)
    if hierarchy is not None:
        check_labels_in_hierarchy(report["labels"], hierarchy, "labels")
        h_p, h_r, h_f = hierarchical_prf(y_true, y_pred, hierarchy)
        report["hierarchical_precision"] = h_p
        report["hierarchical_recall"] = h_r
        report["hierarchical_f1"] = h_f
        report["lineage_accuracy"] = float(lineage_accuracy(y_true, y_pred, hierarchy))
        report["mistake_severity"] = float(mistake_severity(y_true, y_pred, hierarchy))
    return report
