"""Seeded stratified cross-validation (or a fixed split) of frozen-feature probes.

The class list is fixed once for the whole dataset by the caller and passed to every fold,
so a class absent from one fold's training or test rows never shifts the meaning of the
others: probes predict label strings, and metrics are computed against ``classes``.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError

__all__ = [
    "NOT_TESTED",
    "EvalDataError",
    "ProbeResult",
    "run_probes",
    "stratified_folds",
]

logger = logging.getLogger("dinov2_hier.eval")

#: ``ProbeResult.fold`` of a row that was in no test set (training rows of a fixed split,
#: rows excluded by ``ok``); its predictions are ``""``.
NOT_TESTED = -2
#: ``ProbeResult.fold`` of a test row of a fixed train/test split.
FIXED_SPLIT = -1


class EvalDataError(UserError, ValueError):
    """Evaluation input that cannot give a meaningful number (too few samples of a class
    for the folds, unlabelled rows, bad split indices, ...); the message says which."""


def stratified_folds(labels: Sequence[str], n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` ``(train_idx, test_idx)`` pairs of sorted int64 indices.

    ``StratifiedKFold(n_folds, shuffle=True, random_state=seed)``: every sample is in
    exactly one test fold, class proportions are kept per fold, same seed -> same folds.

    Raises:
        EvalDataError: ``n_folds < 2``, or a class has fewer samples than folds (the
            message names each such class and its count).
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray([str(v) for v in labels])
    if int(n_folds) != n_folds or n_folds < 2:
        raise EvalDataError(f"the number of folds must be an integer >= 2, got {n_folds}")
    n_folds = int(n_folds)
    counts = Counter(y.tolist())
    small = sorted(((c, n) for c, n in counts.items() if n < n_folds), key=lambda item: (item[1], item[0]))
    if small:
        listed = ", ".join(f"class {c!r} has {n} sample{'s' if n != 1 else ''}" for c, n in small)
        fewest = small[0][1]
        these = "that class" if len(small) == 1 else "those classes"
        if fewest >= 2:
            fix = (f"lower --folds to {fewest} or fewer (the smallest class has {fewest} samples), "
                   f"or remove or merge {these}")
        else:
            fix = (f"remove or merge {these} (cross-validation needs at least 2 samples per class), "
                   "or test on a fixed split (--test-data)")
        raise EvalDataError(f"{listed}: fewer than the {n_folds} cross-validation folds (--folds {n_folds}); {fix}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [
        (np.sort(train).astype(np.int64), np.sort(test).astype(np.int64))
        for train, test in splitter.split(np.zeros(len(y)), y)
    ]


@dataclass
class ProbeResult:
    """Out-of-fold predictions and per-fold metrics of each probe.

    ``predictions[name][i]`` is the label predicted for sample ``i`` by the fold that held
    it out (``""`` when ``fold[i] == NOT_TESTED``); ``fold[i]`` is that fold's number,
    ``-1`` for the test rows of a fixed split. ``per_fold[name]`` holds one
    ``dinov2_hier.metrics.all_metrics`` dict per fold; ``fit_info[name]`` one dict per fold
    with ``n_train``, ``n_test``, ``fit_s``, ``predict_s`` and probe attributes such as
    ``chosen_C`` (logistic regression, SVM) and ``chosen_k`` (weighted kNN).
    """

    predictions: dict[str, np.ndarray]
    fold: np.ndarray
    per_fold: dict[str, list[dict]]
    fit_info: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def tested(self) -> np.ndarray:
        """bool mask of the rows that were predicted (each exactly once)."""
        return self.fold != NOT_TESTED


def _is_index_array(obj: Any) -> bool:
    arr = np.asarray(obj) if not isinstance(obj, np.ndarray) else obj
    return arr.dtype != object and arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer))


def _as_splits(folds: Any, labels: Sequence[str]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(fold id, train, test)`` from a list of ``(train, test)`` folds or one fixed split."""
    if folds is None:
        return [(i, tr, te) for i, (tr, te) in enumerate(stratified_folds(labels, 5, seed=0))]
    if isinstance(folds, tuple) and len(folds) == 2 and all(_is_index_array(part) for part in folds):
        return [(FIXED_SPLIT, np.asarray(folds[0], dtype=np.int64), np.asarray(folds[1], dtype=np.int64))]
    splits = []
    for i, pair in enumerate(folds):
        if len(pair) != 2 or not all(_is_index_array(part) for part in pair):
            raise EvalDataError(f"fold {i} is not a (train_idx, test_idx) pair of integer index arrays")
        splits.append((i, np.asarray(pair[0], dtype=np.int64), np.asarray(pair[1], dtype=np.int64)))
    return splits


def _default_metrics() -> Callable[..., dict]:
    from dinov2_hier.metrics import all_metrics

    return all_metrics


def run_probes(
    features: np.ndarray,
    labels: Sequence[str],
    classes: Sequence[str],
    probes: Sequence[Any],
    folds: Any = None,
    *,
    hierarchy: Any = None,
    ok: np.ndarray | None = None,
    metric_fn: Callable[..., dict] | None = None,
    groups: Sequence[str] | None = None,
) -> ProbeResult:
    """Fit and test every probe on every split.

    Args:
        features: ``[n, D]`` features.
        labels: ``n`` label strings (node ids), each one of ``classes``.
        classes: the class list fixed once for the dataset; passed to the metrics of every
            fold unchanged.
        probes: objects with ``name``, ``fit(X, y)`` and ``predict(X) -> array[str]``
            (e.g. :class:`~eval.probes.KNNProbe`, :class:`~eval.probes.LogRegProbe`); names
            must be unique. A probe whose class sets ``uses_groups = True`` (a domain-
            generalisation method) is fitted as ``fit(X, y, groups)`` (third positional argument,
            e.g. ``DGProbe.fit(X, y, domains)``) with the group (domain) of each training row,
            or None when ``groups`` is not given.
        folds: a list of ``(train_idx, test_idx)`` (e.g. from :func:`stratified_folds`),
            a single ``(train_idx, test_idx)`` tuple of integer arrays = a fixed split
            (fold ``-1``), or None = 5 stratified folds with seed 0.
        hierarchy: passed to ``all_metrics`` for the hierarchical metrics.
        ok: optional bool ``[n]``; rows with False (unreadable images) are dropped from
            every training and test set and left ``NOT_TESTED``.
        metric_fn: ``f(y_true, y_pred, labels, hierarchy=None) -> dict``; default
            ``dinov2_hier.metrics.all_metrics``.
        groups: optional ``n`` group (domain) labels, one per row: the training rows' groups
            go to the probes that declare ``uses_groups`` (see ``probes``); others never see them.
    """
    X = np.asarray(features)
    y = np.asarray([str(v) for v in labels])
    classes = [str(c) for c in classes]
    n = len(y)
    if X.ndim != 2 or X.shape[0] != n:
        raise EvalDataError(f"features of shape {tuple(X.shape)} do not match {n} labels")
    unknown = sorted(set(y.tolist()) - set(classes))
    if unknown:
        raise EvalDataError(f"labels {unknown[:5]} are not in the class list ({len(classes)} classes)")
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise EvalDataError(f"probe names must be unique, got {names}")
    keep = np.ones(n, dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
    if keep.shape != (n,):
        raise EvalDataError(f"ok mask of shape {keep.shape} does not match {n} samples")
    metric_fn = metric_fn or _default_metrics()
    group_of = None if groups is None else np.asarray([str(g) for g in groups], dtype=object)
    if group_of is not None and group_of.shape != (n,):
        raise EvalDataError(f"groups of shape {group_of.shape} do not match {n} samples")

    fold_of = np.full(n, NOT_TESTED, dtype=np.int64)
    width = max([len(c) for c in classes] + [1])
    predictions = {name: np.full(n, "", dtype=f"<U{width}") for name in names}
    per_fold: dict[str, list[dict]] = {name: [] for name in names}
    fit_info: dict[str, list[dict]] = {name: [] for name in names}
    for fold_id, train, test in _as_splits(folds, y):
        for part, what in ((train, "training"), (test, "test")):
            if part.size and (part.min() < 0 or part.max() >= n):
                raise EvalDataError(f"fold {fold_id}: {what} index out of range for {n} samples")
        train, test = train[keep[train]], test[keep[test]]
        if np.intersect1d(train, test).size:
            raise EvalDataError(f"fold {fold_id}: training and test indices overlap")
        if np.any(fold_of[test] != NOT_TESTED):
            raise EvalDataError(f"fold {fold_id}: a test sample is already tested by another fold")
        if train.size == 0 or test.size == 0:
            raise EvalDataError(f"fold {fold_id}: empty training or test set")
        fold_of[test] = fold_id
        for probe in probes:
            t0 = time.perf_counter()
            if getattr(probe, "uses_groups", False):
                probe.fit(X[train], y[train], None if group_of is None else group_of[train])  # fit(X, y, domains)
            else:
                probe.fit(X[train], y[train])
            t1 = time.perf_counter()
            pred = np.asarray(probe.predict(X[test])).astype(str)
            t2 = time.perf_counter()
            predictions[probe.name][test] = pred
            per_fold[probe.name].append(metric_fn(y[test].tolist(), pred.tolist(), classes, hierarchy=hierarchy))
            info = {"fold": int(fold_id), "n_train": int(train.size), "n_test": int(test.size),
                    "fit_s": t1 - t0, "predict_s": t2 - t1}
            if getattr(probe, "chosen_C_", None) is not None:
                info["chosen_C"] = float(probe.chosen_C_)
            if getattr(probe, "chosen_k_", None) is not None:  # distance-weighted kNN: k chosen by inner CV
                info["chosen_k"] = int(probe.chosen_k_)
            for attribute, key in (("backend_", "backend"), ("converged_", "converged")):
                if hasattr(probe, attribute):  # logistic regression: which solver, and did its final fit converge
                    value = getattr(probe, attribute)
                    info[key] = bool(value) if key == "converged" else str(value)
            if getattr(probe, "inner_unconverged_C_", None) is not None:
                info["inner_unconverged_C"] = [float(C) for C in probe.inner_unconverged_C_]
            fit_info[probe.name].append(info)
            logger.info("fold %d: %s fitted on %d, tested on %d in %.2f s", fold_id, probe.name,
                        train.size, test.size, t2 - t0)
    return ProbeResult(predictions, fold_of, per_fold, fit_info)
