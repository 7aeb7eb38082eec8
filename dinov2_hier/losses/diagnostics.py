"""Numbers that tell a learning self-distillation run from a collapsed one.

All functions take a step's tensors and return detached float32 0-d tensors (no host
synchronisation), computed in float32 whatever the input dtype. The training step logs
them (``metrics.jsonl``, docs/training-dynamics.md says how to read them):

* :func:`mean_entropy` of the teacher targets and of the student predictions, in nats.
  The DINO / iBOT loss is a cross-entropy, ``H(teacher) + KL(teacher || student)``, so
  the two entropies split the loss into what the targets carry and how far the student
  is from them. Both at ``ln K`` means a student that predicts the uniform distribution
  from targets that carry no information about the image.
* :func:`prototypes_used`: how many of the ``K`` prototypes are the most likely one of
  at least one row.
* :func:`token_spread` of CLS tokens across the batch: 0 when every image gives the same
  direction, 1 for directions that cancel out on average.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def mean_entropy(probs: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over rows of ``-sum_k p_k ln p_k`` (nats) of ``[n, K]`` probabilities.

    ``weights`` (``[n]``, >= 0) weighs the rows (0 leaves a row out, e.g. padding);
    with no weight left, or ``n = 0``, the result is 0.
    """
    p = probs.float()
    per_row = -torch.special.xlogy(p, p).sum(dim=-1)  # 0 * ln 0 = 0
    return _weighted_mean(per_row, weights)


@torch.no_grad()
def mean_entropy_of_logits(logits: Tensor, temperature: float, weights: Tensor | None = None) -> Tensor:
    """:func:`mean_entropy` of ``softmax(logits / temperature)``, ``[n, K]`` -> 0-d."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    per_row = -(log_p.exp() * log_p).sum(dim=-1)
    return _weighted_mean(per_row, weights)


@torch.no_grad()
def prototypes_used(probs: Tensor, weights: Tensor | None = None) -> Tensor:
    """Number of distinct prototypes that are the argmax of at least one row of ``[n, K]``
    (rows with weight 0 are left out). At most ``min(n, K)``; a float32 0-d tensor."""
    n, k = probs.shape
    hit = torch.zeros(k, device=probs.device, dtype=torch.float32)
    if n == 0:
        return hit.sum()
    ones = torch.ones(n, device=probs.device) if weights is None else (weights > 0).float()
    hit.scatter_reduce_(0, probs.argmax(dim=-1), ones, reduce="amax")
    return hit.sum()


@torch.no_grad()
def token_spread(tokens: Tensor) -> Tensor:
    """``sqrt(1 - ||mean_i u_i||^2)`` for the unit vectors ``u_i`` of ``[n, D]`` tokens.

    ``1 - ||mean u||^2`` is the total variance of the unit vectors over the batch, so this
    is their root-mean-square distance from their mean direction: 0 when all tokens point
    the same way (a collapsed representation), near 1 when they spread over the sphere.
    """
    if tokens.shape[0] == 0:
        return tokens.float().sum() * 0.0
    unit = F.normalize(tokens.float(), dim=-1)
    return (1.0 - unit.mean(dim=0).pow(2).sum()).clamp_min(0.0).sqrt()


@torch.no_grad()
def mean_norm(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean L2 norm of the rows of ``[n, D]`` (e.g. a head's bottleneck before
    normalisation), weighted as :func:`mean_entropy`."""
    return _weighted_mean(x.float().norm(dim=-1), weights)


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return values.mean() if values.numel() else values.sum()
    w = weights.float()
    return (values * w).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
