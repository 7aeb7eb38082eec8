"""Frozen-feature probes: k-nearest neighbours (uniform or distance-weighted), multinomial
logistic regression and a linear SVM.

All take ``X [n, D]`` features and label strings and predict label strings, so a class
missing from a training fold can never shift the labels of the others (predictions are
mapped back through the probe's own sorted ``classes_``).

* :mod:`eval.probes.knn`: :class:`KNNProbe` (cosine or Euclidean; the tie rules; uniform or
  distance-weighted votes) and :class:`WeightedKNNProbe` (distance-weighted, k chosen by inner CV);
* :mod:`eval.probes.svm`: :class:`LinearSVMProbe` (``LinearSVC``, C chosen by inner CV);
* :mod:`eval.probes.logreg`: :class:`LogRegProbe` (standardised features, the C search by
  inner cross-validation, the scikit-learn and torch backends, convergence reporting);
* :mod:`eval.probes.lbfgs`: the torch backend's batched L-BFGS, every (fold, C) fit of a C
  search as one problem;
* :mod:`eval.probes.base`: the input checks, :func:`balanced_accuracy` and the inner CV folds.

The folds and the runner (:func:`run_probes`, :func:`stratified_folds`) are
:mod:`eval.crossval`'s, re-exported here as before.
"""
from __future__ import annotations

from ..crossval import NOT_TESTED, EvalDataError, ProbeResult, run_probes, stratified_folds
from .base import balanced_accuracy
from .knn import DEFAULT_K_GRID, KNNProbe, WeightedKNNProbe
from .logreg import AUTO_TORCH_MIN_SAMPLES, DEFAULT_C_GRID, INNER_FOLDS, LogRegProbe  # noqa: F401
from .svm import DEFAULT_SVM_C_GRID, LinearSVMProbe

__all__ = [
    "DEFAULT_C_GRID",
    "DEFAULT_K_GRID",
    "DEFAULT_SVM_C_GRID",
    "NOT_TESTED",
    "EvalDataError",
    "KNNProbe",
    "LinearSVMProbe",
    "LogRegProbe",
    "ProbeResult",
    "WeightedKNNProbe",
    "balanced_accuracy",
    "run_probes",
    "stratified_folds",
]
