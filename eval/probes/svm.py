"""The linear support-vector-machine probe (:class:`LinearSVMProbe`), as Gräbel et al. use on
their embeddings.

Features standardised with a ``StandardScaler`` fitted on the training rows, then
scikit-learn's ``LinearSVC`` (squared hinge loss, L2 penalty, one-vs-rest; ``C`` its
inverse regularisation strength). ``C`` is fixed, or chosen from ``C_grid`` (default
:data:`DEFAULT_SVM_C_GRID`) exactly as :class:`~eval.probes.logreg.LogRegProbe` chooses its
C: inner seeded stratified 3-fold cross-validation on the training rows maximising balanced
accuracy, ties -> the smaller C (the stronger regularisation), then one fit on all training
rows with the chosen C. When no class has 3 training samples, ``C = 1``.

The solver's coordinate descent is seeded (``random_state=seed``), so a fit is a pure
function of the data, the grid and the seed. ``converged_`` says whether the final fit
converged within ``max_iter`` (a warning when not; inner fits that stop short are not).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import _as_features, _as_labels, balanced_accuracy, check_C_search, inner_splits

logger = logging.getLogger("dinov2_hier.eval")

#: Inverse regularisation strengths searched when ``C`` is not fixed (one per decade).
DEFAULT_SVM_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: ``C`` used when the classes are too small for the inner cross-validation.
_FALLBACK_C = 1.0


class _Constant:
    """A training set with a single class predicts it."""

    def __init__(self, label: str) -> None:
        self.label = label

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.full(X.shape[0], self.label)


class LinearSVMProbe:
    """Linear SVM on standardised features (see module docstring).

    Args:
        C: fixed ``C``; None = choose from ``C_grid`` by inner stratified 3-fold CV.
        C_grid: candidate values (default :data:`DEFAULT_SVM_C_GRID`).
        max_iter: ``LinearSVC``'s iteration limit.
        seed: seed of the inner folds and of the solver.

    After ``fit``: ``classes_``, ``chosen_C_`` (recorded as ``chosen_C`` in the fit info of
    metrics.json), ``cv_scores_`` ({C: mean inner balanced accuracy}; empty when ``C`` is
    fixed or the classes are too small) and ``converged_``.
    """

    name = "svm"

    def __init__(self, C: float | None = None, C_grid: Sequence[float] | None = None, max_iter: int = 5000,
                 seed: int = 0, name: str | None = None) -> None:
        self.C, self.C_grid, max_iter = check_C_search(C, C_grid, DEFAULT_SVM_C_GRID, max_iter)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.name = name or "svm"
        self.chosen_C_: float | None = None
        self.cv_scores_: dict[float, float] = {}

    def __repr__(self) -> str:
        return f"LinearSVMProbe(C={self.C}, C_grid={self.C_grid}, max_iter={self.max_iter})"

    def _fit_one(self, X: np.ndarray, y: np.ndarray, C: float) -> tuple[Any, bool]:
        """A fitted model on ``(X, y)`` and whether the solver converged."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        if len(np.unique(y)) == 1:
            return _Constant(str(y[0])), True
        model = LinearSVC(C=float(C), max_iter=self.max_iter, random_state=self.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(X, y)
        return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    def fit(self, X: Any, y: Any) -> LinearSVMProbe:
        from sklearn.preprocessing import StandardScaler

        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        self.classes_ = np.unique(y)
        self._scaler = StandardScaler().fit(X)
        Xs = self._scaler.transform(X).astype(np.float64)
        self.cv_scores_ = {}
        splits = inner_splits(y, self.seed, self.name) if self.C is None else None
        if self.C is not None:
            self.chosen_C_ = self.C
        elif splits is None:
            self.chosen_C_ = _FALLBACK_C
        else:
            scores = np.zeros(len(self.C_grid))
            for train, val in splits:
                for j, C in enumerate(self.C_grid):
                    model, _ = self._fit_one(Xs[train], y[train], C)
                    scores[j] += balanced_accuracy(y[val], model.predict(Xs[val]))
            scores /= len(splits)
            self.cv_scores_ = {C: float(s) for C, s in zip(self.C_grid, scores)}
            self.chosen_C_ = self.C_grid[int(np.argmax(scores))]  # first maximum: the smallest C
        self._model, self.converged_ = self._fit_one(Xs, y, self.chosen_C_)
        if not self.converged_:
            logger.warning("svm: LinearSVC reached max_iter=%d before converging (C=%g)", self.max_iter,
                           self.chosen_C_)
        return self

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "_model"):
            raise RuntimeError(f"{self.name}: fit() before predict()")
        Xs = self._scaler.transform(_as_features(X))
        return np.asarray(self._model.predict(Xs)).astype(str)
