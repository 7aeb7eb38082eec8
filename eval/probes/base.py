"""What the probes check and score: feature and label arrays, balanced accuracy, inner CV folds."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..crossval import EvalDataError


def balanced_accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Mean recall over the classes present in ``y_true``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def _as_features(X: Any) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise EvalDataError(f"features must be a 2-D array [n, D], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise EvalDataError("features contain NaN or infinite values")
    return X


def _as_labels(y: Any, n: int) -> np.ndarray:
    y = np.asarray([str(v) for v in y])
    if y.shape != (n,):
        raise EvalDataError(f"{y.size} labels for {n} feature rows")
    if n == 0:
        raise EvalDataError("cannot fit a probe on zero samples")
    return y


#: Inner cross-validation folds of the probes that choose a hyperparameter on their
#: training rows (the SVM's C, the weighted kNN's k), as :data:`eval.probes.logreg.INNER_FOLDS`.
INNER_CV_FOLDS = 3


def check_C_search(C: float | None, C_grid: Sequence[float] | None, default_grid: Sequence[float],
                   max_iter: int) -> tuple[float | None, list[float], int]:
    """A fixed ``C`` or the sorted grid a C search tries, and the solver's iteration cap,
    checked (``ValueError`` naming the bad value): ``(C or None, grid, max_iter)``."""
    if C is not None and not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    grid = sorted(float(c) for c in (C_grid if C_grid is not None else default_grid))
    if not grid or grid[0] <= 0:
        raise ValueError(f"C_grid must hold positive values, got {C_grid}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    return (None if C is None else float(C)), grid, int(max_iter)


def inner_splits(y: np.ndarray, seed: int, what: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Seeded stratified :data:`INNER_CV_FOLDS`-fold splits of the training labels ``y``
    (as the logistic regression's C search), or None with a warning when no class has
    that many samples (the caller then falls back to a fixed value)."""
    import logging
    import warnings

    from sklearn.model_selection import StratifiedKFold

    _, counts = np.unique(y, return_counts=True)
    if counts.max() < INNER_CV_FOLDS:
        logging.getLogger("dinov2_hier.eval").warning(
            "%s: too few samples per class for inner %d-fold CV; using the fallback value", what, INNER_CV_FOLDS)
        return None
    splitter = StratifiedKFold(n_splits=INNER_CV_FOLDS, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        return list(splitter.split(np.zeros(len(y)), y))
