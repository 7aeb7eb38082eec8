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
scikit-learn's ``LogisticRegression(C=C)``. ``C`` is fixed, or chosen from ``C_grid``
(default ``10^-4 .. 10^2``, one value per decade) by an inner seeded stratified 3-fold
cross-validation on the training rows maximising balanced accuracy (ties -> the smaller C,
i.e. the stronger regularisation); the model is the fit on all training rows with the
chosen C. Two backends solve the same problems:

- scikit-learn: L-BFGS on the CPU in float64, one fit after another; the sweep runs from
  small to large C, warm-starting each fit from the previous solution.
- torch (what runs on a GPU), float32: the whole search is one batched problem. Every
  (inner fold, C) fit and one refit on all rows per candidate C are independent problems
  on the same rows, stacked so that one ``[n, D] x [D, P K]`` matmul gives the logits of
  all ``P`` of them; a problem sees only its own training rows (row weights) and classes
  (absent ones are masked out). The objectives are separable, so :class:`_BatchedLBFGS`
  runs one L-BFGS per problem in lockstep, each with its own correction pairs, step size
  and line search, and waits for the device only every ``_CHECK_EVERY`` iterations, to
  retire the problems whose gradient is below ``_GTOL``.
  Once the inner fits have converged their scores choose C and the other refits are
  dropped.

``converged_`` says whether the final fit (all training rows, the chosen C) converged
within ``max_iter``, and only its failure is a warning; inner fits that stopped short
(expected at large C on near-separable features, and not chosen there) are listed in
``inner_unconverged_C_`` and logged at DEBUG.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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


# -- logistic regression: scikit-learn backend ----------------------------------------------
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


# -- logistic regression: torch backend, the whole C sweep as one batched problem -----------
#: A problem has converged when every entry of its gradient (of the objective divided by
#: ``C n``, as in scikit-learn, whose default ``tol`` is the same test at 1e-4) is below this.
_GTOL = 1e-5
#: L-BFGS correction pairs kept per problem.
_HISTORY = 10
#: Iterations between convergence checks: the only points where the solver waits for the device.
_CHECK_EVERY = 10
#: Logit offset of a class that a problem does not model (absent from its training rows).
_ABSENT = -1e30
#: Line search: sufficient decrease (Armijo) constant, Hager-Zhang's delta of the approximate
#: Wolfe condition, and the loss slack (relative) under which that condition may accept.
_ARMIJO, _HZ_DELTA, _LOSS_SLACK = 1e-4, 0.1, 1e-6


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner products ``[P]`` of two ``[P, ...]`` tensors."""
    return torch.einsum("pi,pi->p", a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


@dataclass
class _Problems:
    """``P`` independent logistic regressions over the rows of one ``X [n, D]``, ``K`` classes.

    Problem ``p`` minimises scikit-learn's objective divided by ``C_p n_p``::

        sum_i weight[i, p] * CE(softmax(W_p x_i + b_p + offset[p]), y_i) + 0.5 * l2[p] * ||W_p||^2

    Attributes:
        weight: ``[n, P]`` ``1 / n_p`` on the ``n_p`` training rows of problem ``p``, else 0.
        l2: ``[P]`` ``1 / (C_p n_p)``.
        offset: ``[P, K]`` 0 for the classes ``p`` models, ``_ABSENT`` for classes missing
            from its training rows (probability 0, as in a model fitted without them).
        free: ``[P, K, 1]`` 1 where a class's weights and bias are trained, 0 for absent
            classes and, in a two-class problem, for the first class, whose logit stays 0:
            scikit-learn's binomial model ``[0, x.w + b]``.
    """

    weight: torch.Tensor
    l2: torch.Tensor
    offset: torch.Tensor
    free: torch.Tensor

    @classmethod
    def build(cls, codes: np.ndarray, n_classes: int, rows: Sequence[np.ndarray], Cs: Sequence[float],
              device: torch.device) -> _Problems:
        """One problem per ``(rows[p], Cs[p])``; ``codes [n]`` are the class indices."""
        P = len(rows)
        weight = np.zeros((len(codes), P), dtype=np.float32)
        offset = np.full((P, n_classes), _ABSENT, dtype=np.float32)
        free = np.zeros((P, n_classes, 1), dtype=np.float32)
        for p, idx in enumerate(rows):
            weight[idx, p] = 1.0 / len(idx)
            present = np.unique(codes[idx])
            offset[p, present] = 0.0
            free[p, present[1:] if len(present) == 2 else present] = 1.0
        l2 = np.array([1.0 / (C * len(idx)) for C, idx in zip(Cs, rows)], dtype=np.float32)
        return cls(*(torch.as_tensor(a, device=device) for a in (weight, l2, offset, free)))

    def take(self, keep: torch.Tensor) -> _Problems:
        """The problems selected by ``keep`` (indices or a ``[P]`` mask)."""
        return _Problems(self.weight[:, keep], self.l2[keep], self.offset[keep], self.free[keep])


def _logits(X: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[n, P, K]`` logits (without offsets) of ``X [n, D]`` under ``theta [P, K, D + 1]``
    (weights, then the bias in the last column): one ``[n, D] x [D, P K]`` matmul."""
    P, K, D1 = theta.shape
    W = theta[..., :-1].reshape(P * K, D1 - 1)  # a strided view, no copy
    return torch.addmm(theta[..., -1].reshape(-1), X, W.T).view(-1, P, K)


def _loss_and_grad(X: torch.Tensor, y: torch.Tensor, problems: _Problems,
                   theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Objectives ``[P]`` and gradients ``[P, K, D + 1]`` of all problems at ``theta``;
    ``y [n]`` holds class indices. Two matmuls of ``[n, D]`` by ``[D, P K]`` in all."""
    n, D = X.shape
    logp = torch.log_softmax(_logits(X, theta) + problems.offset, dim=2)
    target = y.view(n, 1, 1).expand(n, logp.shape[1], 1)
    w = problems.weight.unsqueeze(2)  # [n, P, 1]
    W = theta[..., :D]
    loss = -(w * logp.gather(2, target)).sum((0, 2)) + 0.5 * problems.l2 * W.square().sum((1, 2))
    dlogits = logp.exp_().mul_(w).scatter_add_(2, target, -w)  # w * (softmax - onehot)
    grad_W = (dlogits.view(n, -1).T @ X).view_as(W) + problems.l2[:, None, None] * W
    grad = torch.cat((grad_W, dlogits.sum(0).unsqueeze(2)), dim=2)
    return loss, grad * problems.free


class _BatchedLBFGS:
    """L-BFGS on ``P`` independent problems advanced in lockstep (Nocedal & Wright, Alg. 7.4).

    Each problem has its own correction pairs, step size and acceptance test, so the coupling
    of one shared line search is avoided; one iteration is one batched loss and gradient
    evaluation at every problem's trial point ``theta + alpha d``, and nothing in
    :meth:`step` waits for the device. A trial point is accepted when it satisfies the
    Armijo condition or, robust to float32 rounding of the loss near a minimum, Hager and
    Zhang's approximate Wolfe condition; after a rejection the problem retries along the same
    direction with a step shrunk by secant interpolation of the directional derivative (a
    rejection costs that problem one iteration and one history slot).

    State, ``P`` active problems, parameters ``[P, K, D + 1]``: ``theta``, ``loss [P]``,
    ``grad``, direction ``d``, its slope ``grad . d [P]``, step ``alpha [P]``, correction pairs
    ``S, Y [m, P, K, D + 1]`` with ``rho [m, P]`` (a zero pair is a no-op), initial Hessian
    scale ``gamma [P]``. Problems leave the batch through :meth:`retire` (their parameters go
    to ``solution``, indexed by the original problem number).
    """

    _PER_PROBLEM = ("theta", "loss", "grad", "d", "slope", "alpha", "gamma")

    def __init__(self, X: torch.Tensor, y: torch.Tensor, problems: _Problems,
                 history: int = _HISTORY) -> None:
        """``X [n, D]`` float32 features, ``y [n]`` class indices; starts from zero weights."""
        self.X, self.y, self.problems = X, y, problems
        P, K = problems.offset.shape
        self.theta = X.new_zeros(P, K, X.shape[1] + 1)
        self.loss, self.grad = _loss_and_grad(X, y, problems, self.theta)
        self._steepest_descent()
        self.gamma = X.new_ones(P)
        self.S = X.new_zeros(history, *self.theta.shape)
        self.Y = torch.zeros_like(self.S)
        self.rho = X.new_zeros(history, P)
        self.n_iter = 0
        self.ids = np.arange(P)  # original numbers of the active problems
        self.solution = torch.zeros_like(self.theta)
        self.converged = np.zeros(P, dtype=bool)

    def _steepest_descent(self) -> None:
        """Start along ``-grad`` with torch's first L-BFGS step ``min(1, 1 / |grad|_1)``."""
        self.d = -self.grad
        self.slope = _dot(self.grad, self.d)
        self.alpha = torch.clamp(1.0 / self.grad.abs().sum((1, 2)), max=1.0)

    def _direction(self) -> torch.Tensor:
        """``-H grad`` per problem by the two-loop recursion over the stored pairs."""
        m = self.S.shape[0]
        order = [(self.n_iter - 1 - i) % m for i in range(m)]  # newest pair first
        q, a = self.grad.clone(), {}
        for j in order:
            a[j] = self.rho[j] * _dot(self.S[j], q)
            q.addcmul_(a[j][:, None, None], self.Y[j], value=-1)
        r = q.mul_(self.gamma[:, None, None])
        for j in reversed(order):
            b = self.rho[j] * _dot(self.Y[j], r)
            r.addcmul_((a[j] - b)[:, None, None], self.S[j])
        return r.neg_()

    def step(self) -> None:
        """One trial point per problem; accept or shrink the step; the next direction."""
        trial = self.theta + self.alpha[:, None, None] * self.d
        loss, grad = _loss_and_grad(self.X, self.y, self.problems, trial)
        slope = _dot(grad, self.d)
        armijo = loss <= self.loss + _ARMIJO * self.alpha * self.slope
        approx_wolfe = (loss <= self.loss + _LOSS_SLACK * self.loss.abs()) & (
            slope <= (2 * _HZ_DELTA - 1) * self.slope)
        accept = armijo | approx_wolfe
        self._remember(accept, trial - self.theta, grad - self.grad)
        keep = accept[:, None, None]
        self.theta = torch.where(keep, trial, self.theta)
        self.grad = torch.where(keep, grad, self.grad)
        self.loss = torch.where(accept, loss, self.loss)
        d = self._direction()
        d = torch.where((_dot(self.grad, d) < 0)[:, None, None], d, -self.grad)  # not descent: reset
        self.d = torch.where(keep, d, self.d)
        self.slope = torch.where(accept, _dot(self.grad, d), self.slope)
        secant = self.alpha * self.slope / (self.slope - slope)  # zero of the interpolated slope
        shrunk = torch.minimum(torch.clamp(torch.nan_to_num(secant), min=0.1 * self.alpha), 0.5 * self.alpha)
        self.alpha = torch.where(accept, torch.ones_like(self.alpha), shrunk)

    def _remember(self, accept: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        """Store the pair ``(s, y)`` of accepted steps with positive curvature in this
        iteration's history slot; other problems get a zero (no-op) pair there."""
        sy, yy = _dot(s, y), _dot(y, y)
        ok = accept & (sy > 1e-10 * yy)
        slot = self.n_iter % self.S.shape[0]
        self.S[slot] = s * ok[:, None, None]
        self.Y[slot] = y * ok[:, None, None]
        self.rho[slot] = torch.where(ok, 1.0 / sy, torch.zeros_like(sy))
        self.gamma = torch.where(ok, sy / yy, self.gamma)
        self.n_iter += 1

    def run(self, n_iter: int) -> None:
        for _ in range(n_iter):
            self.step()

    def retire_converged(self) -> None:
        """Retire the problems whose largest gradient entry is below ``_GTOL`` (a host sync)."""
        done = (self.grad.abs().amax((1, 2)) <= _GTOL).cpu().numpy()
        self.converged[self.ids[done]] = True
        self.retire(done)

    def retire(self, leave: np.ndarray) -> None:
        """Move the problems of the ``[P]`` boolean mask ``leave`` out of the batch, their
        current parameters into ``solution``."""
        if not leave.any():
            return
        device = self.theta.device
        keep = torch.as_tensor(~leave, device=device)
        self.solution[torch.as_tensor(self.ids[leave], device=device)] = self.theta[~keep]
        for name in self._PER_PROBLEM:
            setattr(self, name, getattr(self, name)[keep])
        self.S, self.Y, self.rho = self.S[:, keep], self.Y[:, keep], self.rho[:, keep]
        self.problems = self.problems.take(keep)
        self.ids = self.ids[~leave]


class _LinearModel:
    """A fitted torch-backend model: ``theta [K, D + 1]`` and the logit ``offset [K]``."""

    def __init__(self, classes: np.ndarray, theta: torch.Tensor, offset: torch.Tensor) -> None:
        self.classes, self.theta, self.offset = classes, theta, offset

    @property
    def coef(self) -> np.ndarray:
        """Weights in scikit-learn's layout: ``[K, D]``, binary ``[1, D]`` (second class)."""
        W = self.theta[:, :-1].cpu().numpy()
        return W[1:] if len(self.classes) == 2 else W

    @property
    def intercept(self) -> np.ndarray:
        b = self.theta[:, -1].cpu().numpy()
        return b[1:] if len(self.classes) == 2 else b

    def decision(self, X: np.ndarray) -> torch.Tensor:
        """Logits ``[m, K]`` of standardised features ``X [m, D]``."""
        Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=self.theta.device)
        with torch.no_grad():
            return _logits(Xt, self.theta[None])[:, 0] + self.offset

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes[self.decision(X).argmax(dim=1).cpu().numpy()]


# Below this many training samples "auto" keeps scikit-learn; from it on, the batched
# PyTorch solver, on the GPU or the CPU. Measured (5 outer folds of an eval.run-style C
# sweep unless noted, same chosen C, balanced accuracy within 0.3 points):
# - one H200 (torch 2.11, 16 CPU cores), pbc_dev features of an untrained ViT-S (training
#   folds of 1,288 x 384, 13 classes): 14.8 s with torch, 44.4 s with scikit-learn on one
#   BLAS thread and over 170 s with its default threads (they oversubscribe the cores);
#   16,000 x 1,024 planted features (one fit): 0.57 s vs 10.9 s / 29.2 s;
# - the 2-core development CPU, torch on the CPU (one fold): 1,288 x 384 as above 9.3 s vs
#   57.5 s; 1,288 x 192 (demo checkpoint) 3.7 s vs 30.9 s; 16,000 x 1,024 planted 8.8 s
#   vs 19.9 s. Below it torch lost: bccd with the demo checkpoint (281 x 192, 5 classes)
#   6.3 s vs 2.7 s over 5 folds, and 1.2 points lower (some fits at large C hit max_iter).
AUTO_TORCH_MIN_SAMPLES = 1000
#: ``C`` used when the classes are too small for the inner cross-validation.
_FALLBACK_C = 1.0


class LogRegProbe:
    """Multinomial L2 logistic regression on standardised features (see module docstring).

    Args:
        C: inverse regularisation strength (scikit-learn's ``C``); None = choose from
            ``C_grid`` by inner stratified 3-fold CV (seeded by ``seed``) on balanced accuracy.
        C_grid: candidate values (default :data:`DEFAULT_C_GRID`).
        backend: ``"sklearn"``, ``"torch"`` or ``"auto"`` (torch on ``device`` for at
            least :data:`AUTO_TORCH_MIN_SAMPLES` training samples, else scikit-learn).
        max_iter: L-BFGS iterations per fit (torch backend: per problem of the batch, one
            loss and gradient evaluation each).
        device: torch backend device (default CUDA if available, else CPU).
        seed: seed of the inner folds.

    After ``fit``: ``classes_``, ``chosen_C_``, ``cv_scores_`` ({C: mean inner balanced
    accuracy}, empty when ``C`` is fixed), ``backend_``, ``converged_`` (the final fit
    converged; a warning when not) and ``inner_unconverged_C_`` (the C values of inner
    fits that reached ``max_iter``, sorted; logged at DEBUG only).
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
        if self.backend == "auto" and n_samples < AUTO_TORCH_MIN_SAMPLES:
            return "sklearn", None
        return "torch", device

    def _inner_splits(self, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """The seeded stratified inner folds, or None (with a warning) when no class has
        ``INNER_FOLDS`` samples."""
        from sklearn.model_selection import StratifiedKFold

        _, counts = np.unique(y, return_counts=True)
        if counts.max() < INNER_FOLDS:
            logger.warning("logreg: too few samples per class for inner %d-fold CV; using C=%g",
                           INNER_FOLDS, _FALLBACK_C)
            return None
        splitter = StratifiedKFold(n_splits=INNER_FOLDS, shuffle=True, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*least populated class.*")
            return list(splitter.split(np.zeros(len(y)), y))

    def _choose(self, scores: np.ndarray) -> int:
        """Record ``cv_scores_``; the index of the first maximum (the smallest C)."""
        self.cv_scores_ = {C: float(s) for C, s in zip(self.C_grid, scores)}
        return int(np.argmax(scores))

    # -- scikit-learn: one fit after another, warm-started along C ---------------------------
    def _sklearn_path(self, X: np.ndarray, y: np.ndarray) -> Any:
        if len(np.unique(y)) == 1:
            return _Constant(str(y[0]))
        return _SklearnPath(X, y, self.max_iter)

    def _fit_sklearn(self, X: np.ndarray, y: np.ndarray) -> None:
        splits = self._inner_splits(y) if self.C is None else None
        if self.C is not None:
            self.chosen_C_ = self.C
        elif splits is None:
            self.chosen_C_ = _FALLBACK_C
        else:
            scores = np.zeros(len(self.C_grid))
            inner: set[float] = set()
            for train, val in splits:
                path = self._sklearn_path(X[train], y[train])
                for j, C in enumerate(self.C_grid):  # ascending: each fit warm-starts the next
                    path.fit(C)
                    if not getattr(path, "converged", True):
                        inner.add(C)
                    scores[j] += balanced_accuracy(y[val], path.predict(X[val]))
            self.chosen_C_ = self.C_grid[self._choose(scores / len(splits))]
            self.inner_unconverged_C_ = sorted(inner)
        self._model = self._sklearn_path(X, y)
        self._model.fit(self.chosen_C_)
        self.converged_ = bool(getattr(self._model, "converged", True))
        self._unconverged = "; ".join(
            ([f"inner CV fits at C={', '.join(f'{C:g}' for C in self.inner_unconverged_C_)}"]
             if self.inner_unconverged_C_ else [])
            + [f"the final fit (C={self.chosen_C_:g})"])

    # -- torch: every (fold, C) fit and the refits as one batched problem --------------------
    def _fit_torch(self, X: np.ndarray, y: np.ndarray) -> None:
        """Problem ``f * G + j`` fits inner fold ``f`` with the ``j``-th of ``G`` candidate C;
        the last ``G`` problems refit all rows, one per candidate (one problem for a fixed C)."""
        classes, codes = np.unique(y, return_inverse=True)
        splits = self._inner_splits(y) if self.C is None else None
        grid = self.C_grid if splits is not None else [self.C if self.C is not None else _FALLBACK_C]
        folds = [train for train, _ in splits or []]
        rows = [train for train in folds for _ in grid] + [np.arange(len(y))] * len(grid)
        Cs = [C for _ in folds for C in grid] + list(grid)
        problems = _Problems.build(codes, len(classes), rows, Cs, self._device)
        Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=self._device)
        solver = _BatchedLBFGS(Xt, torch.as_tensor(codes, device=self._device), problems)

        def score() -> int:
            return self._score_folds(solver.solution, Xt, y, classes, problems.offset, splits)

        n_cv = len(folds) * len(grid)
        chosen = self._solve(solver, n_cv, len(grid), score if splits else lambda: 0)
        final = n_cv + chosen
        self.chosen_C_ = grid[chosen]
        self.converged_ = bool(solver.converged[final])
        inner = sorted({Cs[i] for i in range(n_cv) if not solver.converged[i]})
        self.inner_unconverged_C_ = inner
        self._unconverged = "; ".join(
            ([f"inner CV fits at C={', '.join(f'{C:g}' for C in inner)}"] if inner else [])
            + [f"the final fit at the chosen C={self.chosen_C_:g} "
               + ("converged" if solver.converged[final] else "did not")]
        )
        self._model = _LinearModel(classes, solver.solution[final], problems.offset[final])
        logger.debug("logreg (torch): %d problems, %d iterations", len(rows), solver.n_iter)

    def _solve(self, solver: _BatchedLBFGS, n_cv: int, n_refits: int, score: Callable[[], int]) -> int:
        """Iterate until every needed problem has converged or ``max_iter``; returns the index
        of the chosen refit. ``score()`` picks it from ``solver.solution`` as soon as the
        ``n_cv`` cross-validation problems are done; the other refits then leave unfinished."""
        chosen = None
        while True:
            solver.retire_converged()
            if chosen is None and not (solver.ids < n_cv).any():
                chosen = score()
                unneeded = np.delete(np.arange(n_cv, n_cv + n_refits), chosen)
                solver.retire(np.isin(solver.ids, unneeded))
            if len(solver.ids) == 0 or solver.n_iter >= self.max_iter:
                break
            solver.run(min(_CHECK_EVERY, self.max_iter - solver.n_iter))
        solver.retire(np.ones(len(solver.ids), dtype=bool))
        return score() if chosen is None else chosen  # None: max_iter before the CV converged

    def _score_folds(self, theta: torch.Tensor, X: torch.Tensor, y: np.ndarray, classes: np.ndarray,
                     offset: torch.Tensor, splits: list[tuple[np.ndarray, np.ndarray]]) -> int:
        """Mean balanced accuracy of each C over the inner folds with the fold problems'
        parameters ``theta[f * G + j]``; records ``cv_scores_``, returns the chosen index."""
        G = len(self.C_grid)
        scores = np.zeros(G)
        for f, (_, val) in enumerate(splits):
            ids = slice(f * G, (f + 1) * G)
            with torch.no_grad():
                logits = _logits(X[torch.as_tensor(val, device=X.device)], theta[ids]) + offset[ids]
            pred = logits.argmax(dim=2).cpu().numpy()  # [n_val, G]
            scores += [balanced_accuracy(y[val], classes[pred[:, j]]) for j in range(G)]
        return self._choose(scores / len(splits))

    def fit(self, X: Any, y: Any) -> LogRegProbe:
        from sklearn.preprocessing import StandardScaler

        X = _as_features(X)
        y = _as_labels(y, X.shape[0])
        self.backend_, self._device = self._resolve_backend(X.shape[0])
        self.classes_ = np.unique(y)
        self._scaler = StandardScaler().fit(X)
        Xs = self._scaler.transform(X)
        self.cv_scores_ = {}
        self.inner_unconverged_C_: list[float] = []
        if self.backend_ == "torch":
            self._fit_torch(Xs.astype(np.float32), y)
        else:
            self._fit_sklearn(Xs.astype(np.float64), y)
        if not self.converged_:
            logger.warning("logreg (%s): L-BFGS reached max_iter=%d before converging: %s",
                           self.backend_, self.max_iter, self._unconverged)
        elif self.inner_unconverged_C_:  # expected at large C; the chosen model is fine
            logger.debug("logreg (%s): inner CV fits at C=%s reached max_iter=%d (the final fit converged)",
                         self.backend_, ", ".join(f"{C:g}" for C in self.inner_unconverged_C_), self.max_iter)
        return self

    def predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "_model"):
            raise RuntimeError("logreg: fit() before predict()")
        Xs = self._scaler.transform(_as_features(X))
        return np.asarray(self._model.predict(Xs)).astype(str)
