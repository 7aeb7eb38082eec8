"""Frozen-feature probes: k-nearest neighbours and multinomial logistic regression.

Both take ``X [n, D]`` features and label strings and predict label strings, so a class
missing from a training fold can never shift the labels of the others (predictions are
mapped back through the probe's own sorted ``classes_``).

**kNN** (:class:`KNNProbe`): cosine similarity of L2-normalised features (default) or
negative Euclidean distance; the ``k`` most similar training samples vote, one vote each.
Ties are broken deterministically:

1. neighbours with equal similarity are ranked by training row (lower row first), so the
   ``k`` neighbours themselves are well defined;
2. among classes with the most votes, the class with the largest summed similarity of its
   voting neighbours wins (for Euclidean: the smallest summed distance);
3. if that sum is also exactly equal, the class whose best neighbour ranks first wins
   (for ``k=1`` this is simply the nearest neighbour).

**Logistic regression** (:class:`LogRegProbe`): features standardised with a
``StandardScaler`` fitted on the training rows; multinomial (binary: binomial) L2 logistic
regression minimising ``C * sum_i CE_i + 0.5 * ||W||^2`` with an unpenalised bias, i.e.
scikit-learn's ``LogisticRegression(C=C)``. Two backends solve the same problem:
scikit-learn's L-BFGS on the CPU in float64, and full-batch ``torch.optim.LBFGS`` (strong
Wolfe line search) in float32 on any device, which is what runs on a GPU. ``C`` is fixed,
or chosen from ``C_grid`` (default ``10^-4 .. 10^2``, one value per decade) by an inner
seeded stratified 3-fold cross-validation on the training rows maximising balanced
accuracy (ties -> the smaller C, i.e. the stronger regularisation; the sweep runs from
small to large C, warm-starting each fit from the previous solution); the model is then
refitted on all training rows with the chosen C.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .crossval import NOT_TESTED, EvalDataError, ProbeResult, run_probes, stratified_folds

__all__ = [
    "DEFAULT_C_GRID",
    "NOT_TESTED",
    "EvalDataError",
    "KNNProbe",
    "LogRegProbe",
    "ProbeResult",
    "balanced_accuracy",
    "run_probes",
    "stratified_folds",
]

logger = logging.getLogger("dinov2_hier.eval")

#: Inverse regularisation strengths searched when ``C`` is not fixed.
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
#: Inner cross-validation folds for choosing ``C``.
INNER_FOLDS = 3
# Query rows x training rows per similarity block of the kNN search.
_KNN_BLOCK_ELEMENTS = 1 << 24


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


# -- kNN ------------------------------------------------------------------------------------
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


# -- logistic regression --------------------------------------------------------------------
class _Constant:
    """A training set with a single class predicts it."""

    def __init__(self, label: str) -> None:
        self.label = label

    def fit(self, C: float) -> None:
        pass

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.full(X.shape[0], self.label)


class _SklearnPath:
    """scikit-learn LogisticRegression on fixed training rows, warm-started across C."""

    def __init__(self, X: np.ndarray, y: np.ndarray, max_iter: int) -> None:
        from sklearn.linear_model import LogisticRegression

        self.X, self.y = X, y
        self.model = LogisticRegression(C=1.0, max_iter=max_iter, warm_start=True)
        self.converged = True

    def fit(self, C: float) -> None:
        from sklearn.exceptions import ConvergenceWarning

        self.model.set_params(C=float(C))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.model.fit(self.X, self.y)
        self.converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(X)


class _TorchPath:
    """The same objective minimised with full-batch L-BFGS in float32 on ``device``.

    Minimises ``mean_i CE_i + 0.5 / (C n) * ||W||^2`` (scikit-learn's objective divided by
    ``C n``, hence the same minimiser). Two classes use one weight vector (logits
    ``[0, x.w + b]``), which is scikit-learn's binomial model; more use ``W [D, K]``.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, max_iter: int, device: torch.device) -> None:
        self.classes, codes = np.unique(y, return_inverse=True)
        self.device = device
        self.X = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)
        self.y = torch.as_tensor(codes, dtype=torch.long, device=device)
        outputs = len(self.classes) if len(self.classes) > 2 else 1
        self.W = torch.zeros(self.X.shape[1], outputs, device=device)
        self.b = torch.zeros(outputs, device=device)
        self.max_iter = int(max_iter)
        self.converged = True

    def _logits(self, X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = X @ W + b
        return torch.cat((torch.zeros_like(z), z), dim=1) if W.shape[1] == 1 else z

    def fit(self, C: float) -> None:
        n = self.X.shape[0]
        W = self.W.clone().requires_grad_(True)  # warm start from the previous C
        b = self.b.clone().requires_grad_(True)
        penalty = 0.5 / (float(C) * n)
        optimizer = torch.optim.LBFGS(
            [W, b], lr=1.0, max_iter=self.max_iter, max_eval=int(self.max_iter * 1.25),
            tolerance_grad=1e-5, tolerance_change=1e-9, history_size=50, line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(self._logits(self.X, W, b), self.y) + penalty * W.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        n_iter = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
        self.converged = n_iter < self.max_iter
        self.W, self.b = W.detach(), b.detach()

    def predict(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=self.device)
            codes = self._logits(Xt, self.W, self.b).argmax(dim=1).cpu().numpy()
        return self.classes[codes]


# Below this many training samples "auto" keeps scikit-learn even on a GPU: full-batch
# L-BFGS on a small problem is bound by kernel-launch latency. Measured on one H200
# (torch 2.11): 1,288 x 384 features, 5 folds with the C sweep, torch 180 s, while
# scikit-learn took 53 s on 2 CPU cores; 16,000 x 1,024, torch 6.6 s vs 37 s (16 cores).
AUTO_TORCH_MIN_SAMPLES = 5000


class LogRegProbe:
    """Multinomial L2 logistic regression on standardised features (see module docstring).

    Args:
        C: inverse regularisation strength (scikit-learn's ``C``); None = choose from
            ``C_grid`` by inner stratified 3-fold CV (seeded by ``seed``) on balanced accuracy.
        C_grid: candidate values (default :data:`DEFAULT_C_GRID`).
        backend: ``"sklearn"``, ``"torch"`` or ``"auto"`` (torch for at least
            :data:`AUTO_TORCH_MIN_SAMPLES` training samples when CUDA is available or
            ``device`` names a CUDA device, else scikit-learn).
        max_iter: L-BFGS iterations per fit.
        device: torch backend device (default CUDA if available, else CPU).
        seed: seed of the inner folds.

    After ``fit``: ``classes_``, ``chosen_C_``, ``cv_scores_`` ({C: mean inner balanced
    accuracy}, empty when ``C`` is fixed), ``backend_`` and ``converged_``.
    """

    name = "logreg"

    def __init__(
        self,
        C: float | None = None,
        C_grid: Sequence[float] | None = None,
        backend: str = "auto",
        max_iter: int = 1000,
        device: Any = None,
        seed: int = 0,
    ) -> None:
        if backend not in ("sklearn", "torch", "auto"):
            raise ValueError(f"backend must be 'sklearn', 'torch' or 'auto', got {backend!r}")
        if C is not None and not C > 0:
            raise ValueError(f"C must be > 0, got {C}")
        grid = sorted(float(c) for c in (C_grid if C_grid is not None else DEFAULT_C_GRID))
        if not grid or grid[0] <= 0:
            raise ValueError(f"C_grid must hold positive values, got {C_grid}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.C = None if C is None else float(C)
        self.C_grid = grid
        self.backend = backend
        self.max_iter = int(max_iter)
        self.device = device
        self.seed = int(seed)
        self.chosen_C_: float | None = None
        self.cv_scores_: dict[float, float] = {}

    def __repr__(self) -> str:
        return f"LogRegProbe(C={self.C}, backend={self.backend!r}, max_iter={self.max_iter})"

    def _resolve_backend(self, n_samples: int) -> tuple[str, torch.device | None]:
        if self.backend == "sklearn":
            return "sklearn", None
        if self.device is not None:
            device = torch.device(self.device)
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.backend == "auto" and (device.type != "cuda" or n_samples < AUTO_TORCH_MIN_SAMPLES):
            return "sklearn", None
        return "torch", device

    def _path(self, X: np.ndarray, y: np.ndarray) -> Any:
        if len(np.unique(y)) == 1:
            return _Constant(str(y[0]))
        if self.backend_ == "sklearn":
            return _SklearnPath(X, y, self.max_iter)
        return _TorchPath(X, y, self.max_iter, self._device)

    def _select_C(self, X: np.ndarray, y: np.ndarray) -> float:
        from sklearn.model_selection import StratifiedKFold

        _, counts = np.unique(y, return_counts=True)
        if counts.max() < INNER_FOLDS:
            fallback = 1.0
            logger.warning("logreg: too few samples per class for inner %d-fold CV; using C=%g",
                           INNER_FOLDS, fallback)
            return fallback
        scores = np.zeros(len(self.C_grid))
        splitter = StratifiedKFold(n_splits=INNER_FOLDS, shuffle=True, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*least populated class.*")
            splits = list(splitter.split(np.zeros(len(y)), y))
        for train, val in splits:
            path = self._path(X[train], y[train])
            for j, C in enumerate(self.C_grid):  # ascending: each fit warm-starts the next
                path.fit(C)
                scores[j] += balanced_accuracy(y[val], path.predict(X[val]))
        scores /= len(splits)
        self.cv_scores_ = {C: float(s) for C, s in zip(self.C_grid, scores)}
        return self.C_grid[int(np.argmax(scores))]  # first maximum = smallest C

    def fit(self, X: Any, y: Any) -> LogRegProbe:
        from sklearn.preprocessing import StandardScaler

        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        self.backend_, self._device = self._resolve_backend(X.shape[0])
        self.classes_ = np.unique(y)
        self._scaler = StandardScaler().fit(X)
        Xs = self._scaler.transform(X)
        Xs = Xs.astype(np.float32 if self.backend_ == "torch" else np.float64)
        self.cv_scores_ = {}
        self.chosen_C_ = self.C if self.C is not None else self._select_C(Xs, y)
        self._model = self._path(Xs, y)
        self._model.fit(self.chosen_C_)
        self.converged_ = bool(getattr(self._model, "converged", True))
        if not self.converged_:
            logger.warning("logreg (%s): L-BFGS reached max_iter=%d before converging (C=%g)",
                           self.backend_, self.max_iter, self.chosen_C_)
        return self

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "_model"):
            raise RuntimeError("logreg: fit() before predict()")
        Xs = self._scaler.transform(_as_features(X))
        return np.asarray(self._model.predict(Xs)).astype(str)
