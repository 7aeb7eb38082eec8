"""Paired stratified bootstrap of metric differences between two models on the same samples.

The protocol of the paper's Appendix B: each resample draws, within every true class
separately, as many samples as the class has, with replacement (so class sizes stay as they
are); both models are scored on the same resample and the difference ``metric(A) -
metric(B)`` is recorded. The observed difference is computed on the original samples; the
interval is the 2.5th and 97.5th percentiles of the resampled differences (numpy's default
linear interpolation); the difference is called significant when the interval excludes 0.

Resampling is seeded (``numpy.random.default_rng(seed)``): the classes are taken in sorted
order and for each one an ``[n_resamples, n_class]`` array of indices is drawn at once. The
same seed gives the same resamples for every metric and every classifier, so all the numbers
of one comparison are paired.

Speed: a metric built by :func:`bootstrap_metric` (every entry of
``dinov2_hier.metrics.SCALAR_METRICS``) depends on the samples only through how often each
(true, predicted) pair occurs, so all resamples are scored at once from a
``[n_resamples, n_pairs]`` count table. Any other callable ``metric(y_true, y_pred) -> float``
works too and is called once per resample and model (a plain loop).

A metric value that is undefined on a resample (``mistake_severity`` of a resample without
mistakes is nan) gives a nan difference; the interval is taken over the finite differences,
and ``n_valid`` says how many there were.

:func:`compare_prediction_tables` runs it on two tables of predictions; reading and pairing
those tables is :mod:`eval.predictions_csv` (its names are re-exported here).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.metrics import (
    FLAT_SCALAR_METRICS,
    HIERARCHICAL_SCALAR_METRICS,
    SCALAR_METRICS,
    MetricInputError,
    accuracy,
    check_labels_in_hierarchy,
    check_predictions,
    classification_report,
    hierarchical_prf,
    lineage_accuracy,
    mistake_severity,
)

from .predictions_csv import (
    RESERVED_COLUMNS,
    PredictionTableError,
    _check_same_samples,
    prediction_columns,
    read_predictions_csv,
)

__all__ = [
    "RESERVED_COLUMNS",
    "PairCountMetric",
    "PredictionTableError",
    "bootstrap_metric",
    "compare_prediction_tables",
    "paired_bootstrap",
    "prediction_columns",
    "read_predictions_csv",
    "stratified_resample_indices",
]


# --------------------------------------------------------------------------- metrics on pair counts


class PairCountMetric:
    """A scalar metric of ``dinov2_hier.metrics`` that can score many resamples at once.

    ``metric(y_true, y_pred)`` computes it with ``dinov2_hier.metrics`` (the reference);
    :meth:`from_pair_counts` computes the same number for every row of a count table of
    (true, predicted) pairs, which is how :func:`paired_bootstrap` scores all resamples.
    """

    def __init__(self, name: str, labels: Sequence[str], hierarchy: Hierarchy | None = None) -> None:
        if name not in SCALAR_METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(SCALAR_METRICS)}")
        if name in HIERARCHICAL_SCALAR_METRICS and hierarchy is None:
            raise ValueError(f"metric {name!r} needs a hierarchy")
        self.name = name
        self.labels = [str(x) for x in labels]
        self.hierarchy = hierarchy
        self._index = {label: i for i, label in enumerate(self.labels)}

    def __repr__(self) -> str:
        return f"PairCountMetric({self.name!r}, {len(self.labels)} labels)"

    def __call__(self, y_true: Sequence[str], y_pred: Sequence[str]) -> float:
        name = self.name
        if name == "accuracy":
            return float(accuracy(y_true, y_pred))
        if name in FLAT_SCALAR_METRICS:
            return float(classification_report(y_true, y_pred, self.labels)[name])
        assert self.hierarchy is not None
        if name == "lineage_accuracy":
            return float(lineage_accuracy(y_true, y_pred, self.hierarchy))
        if name == "mistake_severity":
            return float(mistake_severity(y_true, y_pred, self.hierarchy))
        h_p, h_r, h_f = hierarchical_prf(y_true, y_pred, self.hierarchy)
        return {"hierarchical_precision": h_p, "hierarchical_recall": h_r, "hierarchical_f1": h_f}[name]

    def from_pair_counts(self, true_u: Sequence[str], pred_u: Sequence[str], counts: np.ndarray) -> np.ndarray:
        """Metric value per row of ``counts [R, U]``: how often pair ``(true_u[j], pred_u[j])`` occurs."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim == 1:
            counts = counts[None, :]
        name = self.name
        with np.errstate(divide="ignore", invalid="ignore"):
            if name in FLAT_SCALAR_METRICS:
                return self._flat(true_u, pred_u, counts)
            return self._hierarchical(true_u, pred_u, counts)

    def _flat(self, true_u: Sequence[str], pred_u: Sequence[str], counts: np.ndarray) -> np.ndarray:
        for values, what in ((true_u, "y_true"), (pred_u, "y_pred")):
            for value in values:
                if value not in self._index:
                    raise MetricInputError(f"{what} label {value!r} is not in labels", label=value)
        n_labels = len(self.labels)
        t_idx = np.array([self._index[t] for t in true_u], dtype=np.int64)
        p_idx = np.array([self._index[p] for p in pred_u], dtype=np.int64)
        onehot_true = np.zeros((len(t_idx), n_labels))
        onehot_true[np.arange(len(t_idx)), t_idx] = 1.0
        onehot_pred = np.zeros((len(p_idx), n_labels))
        onehot_pred[np.arange(len(p_idx)), p_idx] = 1.0
        support = counts @ onehot_true  # [R, L] row sums of the confusion matrix
        predicted = counts @ onehot_pred  # [R, L] column sums
        hits = counts @ (onehot_true * (t_idx == p_idx)[:, None])  # [R, L] diagonal
        total = counts.sum(axis=1)
        if self.name == "accuracy":
            return hits.sum(axis=1) / total
        if self.name == "balanced_accuracy":
            present = support > 0
            recall = np.where(present, hits / np.where(present, support, 1.0), 0.0)
            return recall.sum(axis=1) / present.sum(axis=1)
        denominator = support + predicted  # 2 TP + FP + FN
        if self.name == "macro_precision":
            precision = np.where(predicted > 0, hits / np.where(predicted > 0, predicted, 1.0), 0.0)
            present = denominator > 0
            return (precision * present).sum(axis=1) / present.sum(axis=1)
        f1 = np.where(denominator > 0, 2.0 * hits / np.where(denominator > 0, denominator, 1.0), 0.0)
        if self.name == "weighted_f1":
            return (f1 * support).sum(axis=1) / support.sum(axis=1)
        present = denominator > 0
        return (f1 * present).sum(axis=1) / present.sum(axis=1)  # macro_f1

    def _hierarchical(self, true_u: Sequence[str], pred_u: Sequence[str], counts: np.ndarray) -> np.ndarray:
        hierarchy = self.hierarchy
        assert hierarchy is not None
        check_labels_in_hierarchy(true_u, hierarchy, "y_true")
        check_labels_in_hierarchy(pred_u, hierarchy, "y_pred")
        name = self.name
        if name == "lineage_accuracy":
            same = np.array(
                [hierarchy.ancestor_at_depth(t, 1) == hierarchy.ancestor_at_depth(p, 1) for t, p in zip(true_u, pred_u)],
                dtype=np.float64,
            )
            return counts @ same / counts.sum(axis=1)
        if name == "mistake_severity":
            wrong = np.array([t != p for t, p in zip(true_u, pred_u)], dtype=np.float64)
            severity = np.array(
                [hierarchy.depth(t) - hierarchy.depth(hierarchy.lca(t, p)) for t, p in zip(true_u, pred_u)],
                dtype=np.float64,
            )
            n_wrong = counts @ wrong
            return np.where(n_wrong > 0, counts @ (wrong * severity) / np.where(n_wrong > 0, n_wrong, 1.0), np.nan)
        shared, size_true, size_pred = (np.zeros(len(true_u)) for _ in range(3))
        for j, (t, p) in enumerate(zip(true_u, pred_u)):
            a_true, a_pred = set(hierarchy.ancestors(t)), set(hierarchy.ancestors(p))
            shared[j], size_true[j], size_pred[j] = len(a_true & a_pred), len(a_true), len(a_pred)
        h_p = counts @ shared / (counts @ size_pred)
        h_r = counts @ shared / (counts @ size_true)
        if name == "hierarchical_precision":
            return h_p
        if name == "hierarchical_recall":
            return h_r
        both = h_p + h_r
        return np.where(both > 0, 2.0 * h_p * h_r / np.where(both > 0, both, 1.0), 0.0)


def bootstrap_metric(name: str, labels: Sequence[str], hierarchy: Hierarchy | None = None) -> PairCountMetric:
    """The scalar metric ``name`` (an entry of ``SCALAR_METRICS``) as a vectorised bootstrap metric."""
    return PairCountMetric(name, labels, hierarchy)


# --------------------------------------------------------------------------- resampling


def _check_n_resamples(n_resamples: Any) -> int:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    return int(n_resamples)


def _class_blocks(y_true: Sequence[str], n_resamples: int, seed: Any) -> Iterator[np.ndarray]:
    """Per true class (sorted): the drawn sample positions, an ``[n_resamples, n_class]`` array.

    The draws of all classes consume one seeded generator in class order, so the resamples
    are a pure function of ``(y_true, n_resamples, seed)``.
    """
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(np.asarray(y_true, dtype=object).astype(str), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    for positions in np.split(order, bounds):
        draws = rng.integers(0, len(positions), size=(n_resamples, len(positions)))
        yield positions[draws]


def stratified_resample_indices(y_true: Sequence[str], n_resamples: int = 1000, seed: Any = 0) -> np.ndarray:
    """All resamples as one ``[n_resamples, n]`` array of sample positions.

    Row ``r`` holds, for each true class in sorted order, ``n_class`` positions of that class
    drawn with replacement: every row keeps the class sizes of ``y_true``. These are exactly
    the resamples :func:`paired_bootstrap` uses for the same ``seed``.
    """
    true_list = check_predictions(y_true, y_true)[0]
    n_resamples = _check_n_resamples(n_resamples)
    return np.concatenate(list(_class_blocks(true_list, n_resamples, seed)), axis=1)


def _pair_table(y_true: list[str], y_pred: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """Unique (true, pred) pairs and, per sample, the index of its pair."""
    pair_index: dict[tuple[str, str], int] = {}
    codes = np.fromiter(
        (pair_index.setdefault(pair, len(pair_index)) for pair in zip(y_true, y_pred)),
        dtype=np.int64,
        count=len(y_true),
    )
    true_u = [t for t, _ in pair_index]
    pred_u = [p for _, p in pair_index]
    return true_u, pred_u, codes


def _resampled_pair_counts(
    y_true: list[str], preds: Sequence[list[str]], n_resamples: int, seed: Any
) -> list[tuple[list[str], list[str], np.ndarray]]:
    """For each prediction list: (true_u, pred_u, counts [n_resamples, U]) over the same resamples."""
    tables = [_pair_table(y_true, pred) for pred in preds]
    counts = [np.zeros(n_resamples * len(t[0])) for t in tables]
    for drawn in _class_blocks(y_true, n_resamples, seed):
        for (true_u, _, codes), acc in zip(tables, counts):
            n_pairs = len(true_u)
            flat = codes[drawn] + (np.arange(n_resamples) * n_pairs)[:, None]
            acc += np.bincount(flat.ravel(), minlength=n_resamples * n_pairs)
    return [(t[0], t[1], c.reshape(n_resamples, len(t[0]))) for t, c in zip(tables, counts)]


def _summary(a: float, b: float, diffs: np.ndarray, n_resamples: int, confidence: float) -> dict[str, Any]:
    finite = diffs[np.isfinite(diffs)]
    if finite.size:
        tail = 100.0 * (1.0 - confidence) / 2.0
        low, high = (float(x) for x in np.percentile(finite, [tail, 100.0 - tail]))
    else:
        low = high = math.nan
    return {
        "observed": float(a - b),
        "ci_low": low,
        "ci_high": high,
        "excludes_zero": bool(finite.size > 0 and (low > 0.0 or high < 0.0)),
        "n_resamples": n_resamples,
        "n_valid": int(finite.size),
        "a": float(a),
        "b": float(b),
    }


def _check_confidence(confidence: Any) -> float:
    if not isinstance(confidence, (int, float)) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    return float(confidence)


def paired_bootstrap(
    y_true: Sequence[str],
    pred_a: Sequence[str],
    pred_b: Sequence[str],
    metric: Callable[[Sequence[str], Sequence[str]], float],
    n_resamples: int = 1000,
    seed: Any = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Stratified paired bootstrap of ``metric(y_true, pred_a) - metric(y_true, pred_b)``.

    Returns ``{"observed", "ci_low", "ci_high", "excludes_zero", "n_resamples", "n_valid",
    "a", "b"}``: the observed difference, the percentile interval (95% by default) of the
    resampled differences, whether it excludes 0, the number of resamples, how many of them
    gave a finite difference, and the two observed metric values.

    ``metric`` is any ``f(y_true, y_pred) -> float`` (called once per resample and model on
    numpy object arrays), or a :class:`PairCountMetric` (from :func:`bootstrap_metric`),
    which scores all resamples at once.
    """
    true_list, list_a = check_predictions(y_true, pred_a)
    _, list_b = check_predictions(true_list, pred_b)
    n_resamples = _check_n_resamples(n_resamples)
    confidence = _check_confidence(confidence)
    a = float(metric(true_list, list_a))
    b = float(metric(true_list, list_b))
    if isinstance(metric, PairCountMetric):
        (tu_a, pu_a, counts_a), (tu_b, pu_b, counts_b) = _resampled_pair_counts(
            true_list, [list_a, list_b], n_resamples, seed
        )
        diffs = metric.from_pair_counts(tu_a, pu_a, counts_a) - metric.from_pair_counts(tu_b, pu_b, counts_b)
    else:
        rows = np.concatenate(list(_class_blocks(true_list, n_resamples, seed)), axis=1)
        arr_true, arr_a, arr_b = (np.array(x, dtype=object) for x in (true_list, list_a, list_b))
        diffs = np.empty(n_resamples)
        for r, row in enumerate(rows):
            diffs[r] = float(metric(arr_true[row], arr_a[row])) - float(metric(arr_true[row], arr_b[row]))
    return _summary(a, b, diffs, n_resamples, confidence)


# --------------------------------------------------------------------------- comparing prediction tables


def _sorted_labels(values: set[str], hierarchy: Hierarchy | None) -> list[str]:
    if hierarchy is None:
        return sorted(values)
    return sorted(values, key=hierarchy.index)


def compare_prediction_tables(
    table_a: Mapping[str, Sequence[str]],
    table_b: Mapping[str, Sequence[str]],
    hierarchy: Hierarchy | None = None,
    n_resamples: int = 1000,
    seed: Any = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Paired bootstrap of every scalar metric for each classifier column present in both tables.

    The tables (dict column -> list, as :func:`read_predictions_csv` returns) must hold the
    same samples in the same order with the same ``y_true`` (``sample`` and ``path`` are
    compared too when both have them); otherwise :class:`PredictionTableError` names the
    first mismatching row. Returns ``{classifier: {metric: paired_bootstrap result}}`` with
    the classifiers in table A's column order and the metrics in ``SCALAR_METRICS`` order
    (the hierarchical ones only when ``hierarchy`` is given); differences are A - B. The
    class list is every label seen in ``y_true`` and in the compared predictions; the same
    resamples (one ``seed``) are used for every classifier and metric.
    """
    _check_same_samples(table_a, table_b)
    n_resamples = _check_n_resamples(n_resamples)
    classifiers = [c for c in prediction_columns(table_a) if c in table_b]
    if not classifiers:
        raise PredictionTableError(
            "the tables have no classifier column in common (A: "
            f"{', '.join(prediction_columns(table_a)) or 'none'}; B: {', '.join(prediction_columns(table_b)) or 'none'})"
        )
    y_true = check_predictions(table_a["y_true"], table_a["y_true"])[0]
    predictions: dict[str, tuple[list[str], list[str]]] = {}
    for column in classifiers:
        try:
            _, pred_a = check_predictions(y_true, table_a[column])
            _, pred_b = check_predictions(y_true, table_b[column])
        except MetricInputError as exc:
            raise PredictionTableError(f"classifier column {column!r}: {exc}", label=exc.label) from None
        predictions[column] = (pred_a, pred_b)
    if hierarchy is not None:
        check_labels_in_hierarchy(y_true, hierarchy, "y_true")
        for column, (pred_a, pred_b) in predictions.items():
            check_labels_in_hierarchy(pred_a, hierarchy, f"table A {column}")
            check_labels_in_hierarchy(pred_b, hierarchy, f"table B {column}")
    seen = set(y_true)
    for pred_a, pred_b in predictions.values():
        seen.update(pred_a)
        seen.update(pred_b)
    labels = _sorted_labels(seen, hierarchy)
    names = FLAT_SCALAR_METRICS + (HIERARCHICAL_SCALAR_METRICS if hierarchy is not None else ())
    metrics = [PairCountMetric(name, labels, hierarchy) for name in names]

    result: dict[str, dict[str, dict[str, Any]]] = {}
    for column, (pred_a, pred_b) in predictions.items():
        (tu_a, pu_a, counts_a), (tu_b, pu_b, counts_b) = _resampled_pair_counts(
            y_true, [pred_a, pred_b], n_resamples, seed
        )
        result[column] = {}
        for metric in metrics:
            diffs = metric.from_pair_counts(tu_a, pu_a, counts_a) - metric.from_pair_counts(tu_b, pu_b, counts_b)
            result[column][metric.name] = _summary(
                metric(y_true, pred_a), metric(y_true, pred_b), diffs, n_resamples, 0.95
            )
    return result
