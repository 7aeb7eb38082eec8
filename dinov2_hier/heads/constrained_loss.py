"""The training loss of the constrained multi-label head of
:mod:`dinov2_hier.heads.constrained_head` (Mouadden et al., section 3; eqs. 2-5).

Loss (:func:`constrained_loss`), ``L = L_BCE + l1 L_con + l2 L_unc + l3 L_ent``:

* ``L_BCE``: binary cross-entropy summed over classes, averaged over images and the
  ``M_train`` dropout passes (eq. 2). Class weights inverse to frequency
  (``class_weighting="balanced"``; the head's buffers, from
  :func:`~dinov2_hier.heads.constrained_head.class_weights`): positives of class ``k`` weigh ``1 / (2 p_k)``,
  negatives ``1 / (2 (1 - p_k))`` (each outcome inversely to its frequency, ``p_k``
  clipped to ``[1/N, 1 - 1/N]``); ``"none"`` weighs all by 1.
* ``L_con = ||R R^T - C||_F^2 + a ||R||_1`` per image, averaged over images (eq. 3).
  ``C`` is :meth:`ConstraintMatrix.effective` (symmetric, -1 where either direction is -1)
  or its sign for the binary ablation. *Choice*: the diagonal is left out of the Frobenius
  term by default (``constraint_diagonal=False``): by Cauchy-Schwarz
  ``|(R R^T)_ij| <= sqrt((R R^T)_ii (R R^T)_jj)``, so the zero diagonal of the paper's tables
  (reached only by ``R = 0``) pulls against every ``-1`` and ``c > 0`` off-diagonal target;
  ``constraint_diagonal=True`` gives the literal formula. *Choice*:
  ``relation_reduction="mean"`` (default) divides the Frobenius sum by its number of entries
  (``K(K-1)``) and ``||R||_1`` by ``K^2``, so that ``lambda1 = 0.1`` weighs the term alike for
  7 and 21 classes (the printed sums grow with ``K^2``: at ``R = 0``, ``lambda1 ||C||_F^2`` is
  1.8 for GR-Neutro but 23.5 for BMC, above the initial BCE of ``21 ln 2 = 14.6``; on the
  synthetic problem of the tests the sums cost 0.003 weighted F1); ``"sum"`` is eq. 3 as
  printed.
* ``L_unc = mean_{b,k} [KL(p_bk || p_hat_bk) + b max(0, U_bk - tau)]`` (eq. 4). *Choice*:
  ``p_bk = Bernoulli(y_bk)`` is the label and ``p_hat_bk = Bernoulli(sigmoid((y_bar_bk -
  t_bk) / T))`` the soft decision under the adaptive threshold (temperature
  ``T = temperature``), so the KL is the cross-entropy of the thresholded decision and is
  what trains ``alpha``, ``beta``, ``delta``; ``y_bar`` and ``U`` enter the KL detached
  (the KL moves thresholds, not the classifier), while the hinge acts on ``U`` with
  gradients (it trains the projection and classifier to keep the variance below ``tau``).
* ``L_ent = -(1/K^2) sum_ij A_ij log A_ij`` per image, averaged (eq. 5). *Choice*: ``R`` has
  negative entries where ``R_ij log R_ij`` is undefined, so the entropy is taken of the
  row-stochastic attention ``A`` of ``R = A V`` (``0 log 0 = 0``); minimising it sharpens
  the relations, as the sparsity term does.

"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov2_hier.heads.constrained_head import ConstrainedHeadError, ConstrainedMultiLabelHead, HeadOutput

__all__ = [
    "bernoulli_kl",
    "constrained_loss",
    "relation_entropy",
    "relation_loss",
    "uncertainty_loss",
    "weighted_bce",
]


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor,
                 neg_weight: torch.Tensor) -> torch.Tensor:
    """``logits [M, B, K]``, ``targets [B, K]`` in [0, 1] -> scalar: sum over classes, mean
    over passes and images of ``-(w_pos y log s + w_neg (1 - y) log(1 - s))``, ``s = sigmoid``."""
    y = targets.unsqueeze(0).float()
    per = -(pos_weight * y * F.logsigmoid(logits) + neg_weight * (1.0 - y) * F.logsigmoid(-logits))
    return per.sum(-1).mean()


def relation_loss(relation: torch.Tensor, prior: torch.Tensor, l1_weight: float = 0.01,
                  include_diagonal: bool = False, reduction: str = "mean") -> torch.Tensor:
    """``R [B, K, K]``, ``C [K, K]`` -> mean over images of
    ``F + l1_weight * L1`` with ``F = sum_(i,j) ((R R^T)_ij - C_ij)^2`` over the off-diagonal
    pairs (all pairs with ``include_diagonal``) and ``L1 = sum_ij |R_ij|``; with
    ``reduction="mean"`` both sums are divided by their number of entries (``K(K-1)`` or
    ``K^2`` for ``F``, ``K^2`` for ``L1``), with ``"sum"`` they are eq. 3 as printed."""
    k = prior.shape[-1]
    gram = relation @ relation.transpose(1, 2)
    sq = (gram - prior) ** 2
    n_sq = k * k
    if not include_diagonal:
        sq = sq * (1.0 - torch.eye(k, device=sq.device, dtype=sq.dtype))
        n_sq = k * (k - 1)
    fro, l1 = sq.sum((1, 2)), relation.abs().sum((1, 2))
    if reduction == "mean":
        fro, l1 = fro / max(n_sq, 1), l1 / (k * k)
    elif reduction != "sum":
        raise ConstrainedHeadError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return (fro + l1_weight * l1).mean()


def relation_entropy(attention: torch.Tensor) -> torch.Tensor:
    """``A [B, K, K]`` (rows sum to 1) -> mean over images of ``-(1/K^2) sum_ij A_ij log A_ij``."""
    k = attention.shape[-1]
    return (-torch.special.xlogy(attention, attention).sum((1, 2)) / (k * k)).mean()


def bernoulli_kl(p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(Bernoulli(p) || Bernoulli(sigmoid(logit_q)))`` (``0 log 0 = 0``)."""
    return (torch.special.xlogy(p, p) - p * F.logsigmoid(logit_q)
            + torch.special.xlogy(1.0 - p, 1.0 - p) - (1.0 - p) * F.logsigmoid(-logit_q))


def uncertainty_loss(mean: torch.Tensor, uncertainty: torch.Tensor, thresholds: torch.Tensor,
                     targets: torch.Tensor, *, temperature: float = 0.05, hinge_weight: float = 0.1,
                     tau: float = 0.2, use_kl: bool = True, use_hinge: bool = True) -> torch.Tensor:
    """``[B, K]`` inputs -> ``mean_{b,k}[KL(y || sigmoid((y_bar - t)/T)) + b max(0, U - tau)]``
    with ``y_bar`` and ``U`` detached inside the KL (see the module docstring)."""
    total = torch.zeros((), device=mean.device)
    if use_kl:
        z = (mean.detach() - thresholds) / temperature
        total = total + bernoulli_kl(targets.float(), z).mean()
    if use_hinge:
        total = total + hinge_weight * F.relu(uncertainty - tau).mean()
    return total


def constrained_loss(head: ConstrainedMultiLabelHead, out: HeadOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """All terms of the total loss for one batch: ``total``, ``bce``, ``con``, ``unc``, ``ent``
    (terms the configuration switches off are exact zeros)."""
    cfg = head.config
    zero = torch.zeros((), device=out.mean.device)
    bce = weighted_bce(out.logits, targets, head.pos_weight, head.neg_weight)
    con = ent = unc = zero
    if out.relation is not None:
        con = relation_loss(out.relation, head.prior, cfg.l1_weight, cfg.constraint_diagonal, cfg.relation_reduction)
        ent = relation_entropy(out.attention)
    if cfg.thresholds != "static":
        unc = uncertainty_loss(out.mean, out.uncertainty, head.thresholds(out.uncertainty.detach()), targets,
                               temperature=cfg.temperature, hinge_weight=cfg.hinge_weight, tau=cfg.tau,
                               use_kl=True, use_hinge=cfg.thresholds == "uncertainty")
    total = bce + cfg.lambda_con * con + cfg.lambda_unc * unc + cfg.lambda_ent * ent
    return {"total": total, "bce": bce, "con": con, "unc": unc, "ent": ent}
