"""SwAV targets (Caron et al., 2020) for the DINO loss: ``dino.targets: swav``.

SwAV is DINO with Sinkhorn-Knopp (``dino.centering: sinkhorn_knopp``) whose targets come
from the *student itself* instead of an EMA teacher. For every global crop the student's
own prototype scores of the same forward pass (cosine similarities ``c = <u, v_j>`` of the
L2-normalised projection ``u`` with the prototypes ``v_j``, eq. 5-7 of the SwAV setup in
docs/swav.md), detached, are turned into codes ``o`` by Sinkhorn-Knopp with
``exp(c / epsilon)``; a queue of the projections of earlier steps enters that
normalisation (it makes the equipartition over few images meaningful) but not the loss.
The loss is :class:`~dinov2_hier.losses.ssl.DINOLoss` unchanged: each view predicts the
*other* view's codes (the "swapped" prediction) with ``p = softmax(c / student_temp)``,
and local crops predict both global crops' codes (SwAV's multi-crop), which with two
global crops is eq. 8-9 (:func:`swapped_prediction_loss` is eq. 9 itself, for the tests).

Written from the paper's equations; no code of the (non-commercial) reference implementation.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2_hier.losses.centering import LossInputError, _check_positive, sinkhorn_knopp

#: ``dino.targets``: where the DINO loss's targets come from.
TARGETS = ("teacher", "swav")


def swapped_prediction_loss(codes: Tensor, scores: Tensor, student_temp: float) -> Tensor:
    """Eq. 9: ``-1 / (N M (M-1)) sum_i sum_{m1} sum_{m2 != m1} sum_j o_i^(m1)[j] ln p_i^(m2)[j]``.

    Args:
        codes: ``[M, N, K]`` targets ``o`` (view-major: view ``m`` of the ``N`` images).
        scores: ``[M, N, K]`` prototype scores ``c``; ``p = softmax(c / student_temp)``
            (the paper writes ``ln c``; SwAV's ``p`` is this softmax of the cosines).
    Returns:
        float32 scalar.
    """
    if codes.dim() != 3 or codes.shape != scores.shape or codes.shape[0] < 2:
        raise LossInputError(f"codes and scores must both be [M >= 2, N, K], got {tuple(codes.shape)} and {tuple(scores.shape)}")
    _check_positive("student_temp", student_temp)
    n_views, n_images = codes.shape[0], codes.shape[1]
    log_p = F.log_softmax(scores.float() / student_temp, dim=-1)  # [M, N, K]
    # sum over m1 != m2 = (sum_m1 o^m1) . (sum_m2 ln p^m2) - sum_m o^m . ln p^m
    all_pairs = (codes.float().sum(0) * log_p.sum(0)).sum()
    same_view = (codes.float() * log_p).sum()
    return -(all_pairs - same_view) / (n_images * n_views * (n_views - 1))


class SwAVTargets(nn.Module):
    """Sinkhorn-Knopp codes of the student's own (detached) scores, with a queue.

    Buffers (persistent: saved in checkpoints, restored on resume):

    * ``queue [L, D]`` float32: L2-normalised projections of the last ``L`` global-crop
      rows, newest first; their scores are recomputed with the *current* prototypes each
      step (SwAV stores the features, not the codes).
    * ``queue_valid [L]`` bool: which rows hold a projection.
    * ``steps`` long scalar: training forward passes seen (the queue is filled from pass
      ``start_step`` on, i.e. from iteration ``dino.swav_queue_start_epochs x
      train.epoch_length``).

    The queue enters the normalisation only once it is full (as SwAV's reference does:
    a half-empty queue would weigh the equipartition towards the current batch); until
    then the codes are those of the batch alone. Everything is on-device tensor
    arithmetic of fixed shapes (no host synchronisation; works under ``torch.compile``).
    Per rank: with several ranks each holds its own ``L`` rows and Sinkhorn-Knopp sums
    over all ranks' batches and queues (``L`` x world size rows of queue in all).
    """

    queue: Tensor
    queue_valid: Tensor
    steps: Tensor

    def __init__(self, queue_length: int, dim: int, start_step: int, sk_iterations: int = 3) -> None:
        super().__init__()
        if isinstance(queue_length, bool) or queue_length < 0:
            raise LossInputError(f"swav_queue_length must be >= 0, got {queue_length!r}")
        if start_step < 0:
            raise LossInputError(f"the queue's start must be >= 0, got {start_step!r}")
        if sk_iterations < 1:
            raise LossInputError(f"sk_iterations must be >= 1, got {sk_iterations!r}")
        self.queue_length = int(queue_length)
        self.start_step = int(start_step)
        self.sk_iterations = int(sk_iterations)
        self.register_buffer("queue", torch.zeros(self.queue_length, dim, dtype=torch.float32))
        self.register_buffer("queue_valid", torch.zeros(self.queue_length, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def codes(
        self,
        projections: Tensor,
        scores: Tensor,
        prototype_scores: Callable[[Tensor], Tensor],
        epsilon: float,
    ) -> Tensor:
        """``[n, K]`` float32 codes of this step's ``n`` rows; then the queue update.

        Args:
            projections: ``[n, D]`` the rows' projections (the DINO head's bottleneck
                output; normalised here).
            scores: ``[n, K]`` their prototype scores (cosine similarities with unit
                prototypes: ``dino.head_norm_last_layer: true``).
            prototype_scores: ``[L, D] -> [L, K]``, the head's prototype layer (scores of
                the queue with the current prototypes).
            epsilon: SwAV's epsilon, the Sinkhorn-Knopp temperature ``exp(c / epsilon)``.

        The queue is updated (newest rows first) only in training mode with gradients
        enabled: a validation pass (``torch.no_grad``) neither fills it nor counts a step.
        """
        _check_positive("epsilon", epsilon)
        # Read before no_grad: a validation pass runs under torch.no_grad and must not push.
        push = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            codes = self._codes(projections, scores, prototype_scores, epsilon, push)
        return codes

    def _codes(
        self, projections: Tensor, scores: Tensor, prototype_scores: Callable[[Tensor], Tensor], epsilon: float, push: bool
    ) -> Tensor:
        n_rows = scores.shape[0]
        unit = F.normalize(projections.detach().float(), dim=-1, p=2, eps=1e-6)
        if self.queue_length == 0:
            codes = sinkhorn_knopp(scores.detach(), epsilon, n_iterations=self.sk_iterations)
        else:
            queue_scores = prototype_scores(self.queue).to(scores.dtype)  # [L, K]
            # The queue counts only when full: its last (oldest) row holds a projection.
            queue_used = self.queue_valid & self.queue_valid[-1]
            valid = torch.cat([torch.ones(n_rows, dtype=torch.bool, device=scores.device), queue_used])
            codes = sinkhorn_knopp(
                torch.cat([scores.detach(), queue_scores]), epsilon, n_iterations=self.sk_iterations, valid=valid
            )[:n_rows]
        if push:
            self._push(unit)
        return codes

    def _push(self, unit: Tensor) -> None:
        """Count a training step; from ``start_step`` on, put ``unit`` at the queue's front."""
        filling = self.steps >= self.start_step  # 0-d bool on the device
        self.steps.add_(1)
        if self.queue_length == 0:
            return
        rows = unit.shape[0]
        keep = self.queue_length - rows
        if keep > 0:
            new_queue = torch.cat([unit, self.queue[:keep]])
            new_valid = torch.cat([torch.ones(rows, dtype=torch.bool, device=unit.device), self.queue_valid[:keep]])
        else:  # a batch at least as long as the queue: its first L rows
            new_queue = unit[: self.queue_length]
            new_valid = torch.ones(self.queue_length, dtype=torch.bool, device=unit.device)
        self.queue.copy_(torch.where(filling, new_queue, self.queue))
        self.queue_valid.copy_(torch.where(filling, new_valid, self.queue_valid))
