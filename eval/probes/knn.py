"""The k-nearest-neighbour probe (:class:`KNNProbe`).

Cosine similarity of L2-normalised features (default) or negative Euclidean distance; the
``k`` most similar training samples vote, one vote each. Ties are broken deterministically:

1. neighbours with equal similarity are ranked by training row (lower row first), so the
   ``k`` neighbours themselves are well defined;
2. among classes with the most votes, the class with the largest summed similarity of its
   voting neighbours wins (for Euclidean: the smallest summed distance);
3. if that sum is also exactly equal, the class whose best neighbour ranks first wins
   (for ``k=1`` this is simply the nearest neighbour).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import _as_features, _as_labels

# Query rows x training rows per similarity block of the kNN search.
_KNN_BLOCK_ELEMENTS = 1 << 24


class KNNProbe:
    """k-nearest-neighbour classifier on frozen features (tie rules: module docstring)."""

    def __init__(self, k: int, metric: str = "cosine", name: str | None = None) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.k = int(k)
        self.metric = metric
        self.name = name or f"knn_k{self.k}"

    def __repr__(self) -> str:
        return f"KNNProbe(k={self.k}, metric={self.metric!r})"

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
        votes = onehot.sum(axis=1)
        summed = np.where(onehot, sims[:, :, None].astype(np.float64), 0.0).sum(axis=1)
        first = np.where(onehot, np.arange(k)[None, :, None], k).min(axis=1)
        candidates = votes == votes.max(axis=1, keepdims=True)
        best_sum = np.where(candidates, summed, -np.inf).max(axis=1, keepdims=True)
        candidates &= summed == best_sum
        return np.where(candidates, first, k + 1).argmin(axis=1)

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
