"""The k-nearest-neighbour probe (:class:`KNNProbe`).

Cosine similarity of L2-normalised features (default) or negative Euclidean distance; the
``k`` most similar training samples vote, one vote each. Ties are broken deterministically:

1. neighbours with equal similarity are ranked by training row (lower row first), so the
   ``k`` neighbours themselves are well defined;
2. among classes with the most votes, the class with the largest summed similarity of its
   voting neighbours wins (for Euclidean: the smallest summed distance);
3. if that sum is also exactly equal, the class whose best neighbour ranks first wins
   (for ``k=1`` this is simply the nearest neighbour).

``weights="distance"`` (the distance-weighted kNN of Gräbel et al., scikit-learn's
``KNeighborsClassifier(weights="distance")``): each of the ``k`` neighbours votes with
``1 / d``, ``d`` its distance (Euclidean, or ``1 - cosine similarity``); when a query has
neighbours at distance 0 only those vote, with weight 1 each (as scikit-learn). The class
with the largest summed weight wins; an exact tie goes to the class whose best neighbour
ranks first. :class:`WeightedKNNProbe` chooses ``k`` from a small grid by inner seeded
stratified 3-fold cross-validation on the training rows (balanced accuracy; ties -> the
smaller k) and refits on all training rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import _as_features, _as_labels, balanced_accuracy, inner_splits

# Query rows x training rows per similarity block of the kNN search.
_KNN_BLOCK_ELEMENTS = 1 << 24


class KNNProbe:
    """k-nearest-neighbour classifier on frozen features (tie rules: module docstring)."""

    def __init__(self, k: int, metric: str = "cosine", name: str | None = None, weights: str = "uniform") -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        if weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {weights!r}")
        self.k = int(k)
        self.metric = metric
        self.weights = weights
        self.name = name or (f"knn_k{self.k}" if weights == "uniform" else f"wknn_k{self.k}")

    def __repr__(self) -> str:
        extra = "" if self.weights == "uniform" else f", weights={self.weights!r}"
        return f"KNNProbe(k={self.k}, metric={self.metric!r}{extra})"

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            X = X.astype(np.float32, copy=True)
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            return X / np.maximum(norms, 1e-12)
        return X.astype(np.float64, copy=False)  # Euclidean via |q|^2 - 2 q.t + |t|^2: float64

    def fit(self, X: Any, y: Any) -> KNNProbe:
        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        self.classes_, self._codes = np.unique(y, return_inverse=True)
        self._train = self._prepare(X)
        if self.metric == "euclidean":
            self._train_sq = np.einsum("ij,ij->i", self._train, self._train)
        return self

    def _similarity(self, Q: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return Q @ self._train.T
        sq = np.einsum("ij,ij->i", Q, Q)[:, None] - 2.0 * (Q @ self._train.T) + self._train_sq[None, :]
        return -np.sqrt(np.maximum(sq, 0.0))

    def _neighbours(self, S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices ``[m, k]`` and similarities of the ``k`` most similar training rows per
        query, most similar first, equal similarities by lower training row."""
        m, n = S.shape
        if k == n:
            selected = np.ones_like(S, dtype=bool)
        else:
            kth = -np.partition(-S, k - 1, axis=1)[:, k - 1]  # k-th largest per row
            above = S > kth[:, None]
            at = S == kth[:, None]
            room = k - above.sum(axis=1)
            selected = above | (at & (np.cumsum(at, axis=1, dtype=np.int64) <= room[:, None]))
        idx = np.nonzero(selected)[1].reshape(m, k)  # ascending training row within each query
        sims = np.take_along_axis(S, idx, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")  # stable: equal sims keep row order
        return np.take_along_axis(idx, order, axis=1), np.take_along_axis(sims, order, axis=1)

    def _vote(self, idx: np.ndarray, sims: np.ndarray) -> np.ndarray:
        m, k = idx.shape
        n_classes = len(self.classes_)
        codes = self._codes[idx]  # [m, k]
        onehot = codes[:, :, None] == np.arange(n_classes)[None, None, :]  # [m, k, C]
        if self.weights == "distance":
            return self._vote_distance(onehot, sims)
        votes = onehot.sum(axis=1)
        summed = np.where(onehot, sims[:, :, None].astype(np.float64), 0.0).sum(axis=1)
        first = np.where(onehot, np.arange(k)[None, :, None], k).min(axis=1)
        candidates = votes == votes.max(axis=1, keepdims=True)
        best_sum = np.where(candidates, summed, -np.inf).max(axis=1, keepdims=True)
        candidates &= summed == best_sum
        return np.where(candidates, first, k + 1).argmin(axis=1)

    def _vote_distance(self, onehot: np.ndarray, sims: np.ndarray) -> np.ndarray:
        """Distance-weighted vote (module docstring): class codes ``[m]``."""
        sims = sims.astype(np.float64)
        dist = np.maximum(-sims if self.metric == "euclidean" else 1.0 - sims, 0.0)
        zero = dist == 0.0
        exact = zero.any(axis=1, keepdims=True)
        weight = np.where(exact, zero.astype(np.float64), 1.0 / np.where(zero, 1.0, dist))
        score = np.where(onehot, weight[:, :, None], 0.0).sum(axis=1)  # [m, C]
        k = onehot.shape[1]
        first = np.where(onehot, np.arange(k)[None, :, None], k).min(axis=1)
        candidates = score == score.max(axis=1, keepdims=True)
        return np.where(candidates, first, k + 1).argmin(axis=1)

    def _query_neighbours(self, X: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and similarities ``[m, k]`` of the ``k`` nearest training rows of each query."""
        Q = self._prepare(_as_features(X))
        n_train = self._train.shape[0]
        idx = np.empty((Q.shape[0], k), dtype=np.int64)
        sims = np.empty((Q.shape[0], k), dtype=np.float64)
        block = max(1, _KNN_BLOCK_ELEMENTS // max(n_train, 1))
        for start in range(0, Q.shape[0], block):
            idx[start:start + block], sims[start:start + block] = self._neighbours(
                self._similarity(Q[start:start + block]), k)
        return idx, sims

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "_train"):
            raise RuntimeError(f"{self.name}: fit() before predict()")
        Q = self._prepare(_as_features(X))
        n_train = self._train.shape[0]
        k = min(self.k, n_train)
        out = np.empty(Q.shape[0], dtype=np.int64)
        block = max(1, _KNN_BLOCK_ELEMENTS // max(n_train, 1))
        for start in range(0, Q.shape[0], block):
            S = self._similarity(Q[start:start + block])
            out[start:start + block] = self._vote(*self._neighbours(S, k))
        return self.classes_[out]


#: Neighbour counts :class:`WeightedKNNProbe` chooses from by default.
DEFAULT_K_GRID = (1, 3, 5, 10, 20)


class WeightedKNNProbe:
    """Distance-weighted kNN with ``k`` chosen on the training rows (module docstring).

    Args:
        k_grid: candidate neighbour counts (default :data:`DEFAULT_K_GRID`).
        metric: ``"cosine"`` (default) or ``"euclidean"``, as :class:`KNNProbe`.
        seed: seed of the inner folds.

    After ``fit``: ``classes_``, ``chosen_k_`` (recorded as ``chosen_k`` in the fit info of
    metrics.json) and ``cv_scores_`` ({k: mean inner balanced accuracy}; empty when the
    classes are too small for the inner folds, in which case the smallest k of the grid is used).
    """

    name = "wknn"

    def __init__(self, k_grid: Any = None, metric: str = "cosine", seed: int = 0, name: str | None = None) -> None:
        values = list(k_grid if k_grid is not None else DEFAULT_K_GRID)
        if not values or any(isinstance(k, bool) or int(k) != k or k < 1 for k in values):
            raise ValueError(f"k_grid must hold positive integers, got {k_grid}")
        grid = sorted({int(k) for k in values})
        KNNProbe(1, metric=metric)  # validates the metric
        self.k_grid = grid
        self.metric = metric
        self.seed = int(seed)
        self.name = name or "wknn"
        self.chosen_k_: int | None = None
        self.cv_scores_: dict[int, float] = {}

    def __repr__(self) -> str:
        return f"WeightedKNNProbe(k_grid={self.k_grid}, metric={self.metric!r})"

    def fit(self, X: Any, y: Any) -> WeightedKNNProbe:
        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        self.classes_ = np.unique(y)
        self.cv_scores_ = {}
        splits = inner_splits(y, self.seed, self.name)
        if splits is None:
            self.chosen_k_ = self.k_grid[0]
        else:
            scores = np.zeros(len(self.k_grid))
            for train, val in splits:
                inner = KNNProbe(self.k_grid[-1], metric=self.metric, weights="distance").fit(X[train], y[train])
                k_max = min(self.k_grid[-1], len(train))
                idx, sims = inner._query_neighbours(X[val], k_max)  # one search for every k of the grid
                for j, k in enumerate(self.k_grid):
                    k = min(k, k_max)
                    pred = inner.classes_[inner._vote(idx[:, :k], sims[:, :k])]
                    scores[j] += balanced_accuracy(y[val], pred)
            scores /= len(splits)
            self.cv_scores_ = {k: float(s) for k, s in zip(self.k_grid, scores)}
            self.chosen_k_ = self.k_grid[int(np.argmax(scores))]  # first maximum: the smallest k
        self._model = KNNProbe(self.chosen_k_, metric=self.metric, weights="distance").fit(X, y)
        return self

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "_model"):
            raise RuntimeError(f"{self.name}: fit() before predict()")
        return self._model.predict(X)
