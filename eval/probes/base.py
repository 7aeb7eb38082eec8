"""What both probes check and score: feature and label arrays, balanced accuracy."""
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
