"""The torch backend of the logistic-regression probe: many L2 logistic regressions on the
rows of one feature matrix, solved together by a batched L-BFGS.

Every (inner fold, C) fit and one refit on all rows per candidate C of
:class:`~eval.probes.logreg.LogRegProbe` are independent problems on the same rows, stacked
(:class:`_Problems`) so that one ``[n, D] x [D, P K]`` matmul gives the logits of all ``P``
of them; a problem sees only its own training rows (row weights) and classes (absent ones
are masked out). The objectives are separable, so :class:`_BatchedLBFGS` runs one L-BFGS per
problem in lockstep, each with its own correction pairs, step size and line search, and the
caller waits for the device only every ``_CHECK_EVERY`` iterations, to retire the problems
whose gradient is below ``_GTOL``. :class:`_LinearModel` is one fitted problem.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

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
