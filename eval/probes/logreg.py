"""The multinomial logistic-regression probe (:class:`LogRegProbe`).

Features standardised with a ``StandardScaler`` fitted on the training rows; multinomial
(binary: binomial) L2 logistic regression minimising ``C * sum_i CE_i + 0.5 * ||W||^2`` with
an unpenalised bias, i.e. scikit-learn's ``LogisticRegression(C=C)``. ``C`` is fixed, or
chosen from ``C_grid`` (default ``10^-4 .. 10^2``, one value per decade) by an inner seeded
stratified 3-fold cross-validation on the training rows maximising balanced accuracy (ties
-> the smaller C, i.e. the stronger regularisation); the model is the fit on all training
rows with the chosen C. Two backends solve the same problems:

- scikit-learn: L-BFGS on the CPU in float64, one fit after another; the sweep runs from
  small to large C, warm-starting each fit from the previous solution.
- torch (what runs on a GPU), float32: the whole search is one batched problem
  (:mod:`eval.probes.lbfgs`): every (inner fold, C) fit and one refit on all rows per
  candidate C, solved in lockstep. Once the inner fits have converged their scores choose
  C and the other refits are dropped.

``converged_`` says whether the final fit (all training rows, the chosen C) converged
within ``max_iter``, and only its failure is a warning; inner fits that stopped short
(expected at large C on near-separable features, and not chosen there) are listed in
``inner_unconverged_C_`` and logged at DEBUG.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .base import _as_features, _as_labels, balanced_accuracy, check_C_search
from .lbfgs import _CHECK_EVERY, _BatchedLBFGS, _LinearModel, _logits, _Problems

logger = logging.getLogger("dinov2_hier.eval")

#: Inverse regularisation strengths searched when ``C`` is not fixed.
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
#: Inner cross-validation folds for choosing ``C``.
INNER_FOLDS = 3


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
        self.C, self.C_grid, max_iter = check_C_search(C, C_grid, DEFAULT_C_GRID, max_iter)
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
