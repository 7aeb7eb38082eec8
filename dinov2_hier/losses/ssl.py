"""Self-supervised losses of the DINOv2 recipe with two global crops (and optional local crops).

* :class:`DINOLoss` -- image-level ([CLS]) distillation between *cross-view* pairs, plus
  each local crop against both global crops when local crops are given.
* :class:`iBOTPatchLoss` -- patch-level distillation on the student's masked patches.
* :class:`KoLeoLoss` -- Kozachenko-Leonenko entropy regulariser that spreads features.

Each distillation loss owns its teacher normalisation (``teacher_probs``): Sinkhorn-Knopp
or softmax centring. Tensors may be bf16/fp16; every intermediate is float32 and the
losses are float32 scalars.
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dinov2_hier.losses.centering import (
    LossInputError,
    SoftmaxCentering,
    _check_logits_2d,
    _check_positive,
    sinkhorn_knopp,
)

Centering = Literal["sinkhorn_knopp", "softmax"]
_CENTERINGS = ("sinkhorn_knopp", "softmax")


def _soft_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Per-row ``-sum_k t_k log_softmax(s / student_temp)_k``; two ``[n, K]`` -> ``[n]`` float32
    (or any leading shapes that broadcast, e.g. ``[m, n, K]`` and ``[n, K]`` -> ``[m, n]``)."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


class _TeacherNormalisation(nn.Module):
    """Shared constructor / ``teacher_probs`` logic of the two distillation losses."""

    def __init__(
        self,
        out_dim: int,
        student_temp: float,
        centering: Centering,
        center_momentum: float,
        sk_iterations: int,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise LossInputError(f"out_dim must be >= 1, got {out_dim!r}")
        _check_positive("student_temp", student_temp)
        if centering not in _CENTERINGS:
            raise LossInputError(f"centering must be one of {_CENTERINGS}, got {centering!r}")
        if sk_iterations < 1:
            raise LossInputError(f"sk_iterations must be >= 1, got {sk_iterations!r}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.centering = centering
        self.sk_iterations = sk_iterations
        # Only softmax centring has state (the EMA centre, saved in checkpoints).
        self.softmax_centering = (
            SoftmaxCentering(out_dim, center_momentum) if centering == "softmax" else None
        )

    @torch.no_grad()
    def _normalise(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        _check_logits_2d("teacher_logits", teacher_logits, self.out_dim)
        if self.softmax_centering is None:
            return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=self.sk_iterations, valid=valid)
        probs = self.softmax_centering.probs(teacher_logits, teacher_temp)
        # Update after computing the targets: this step uses the centre of past steps.
        self.softmax_centering.update(teacher_logits, valid)
        if valid is not None:  # padding rows get all-zero targets, as with Sinkhorn-Knopp
            probs = torch.where(valid[:, None], probs, torch.zeros_like(probs))
        return probs


class DINOLoss(_TeacherNormalisation):
    """DINO [CLS] loss over the two global crops, cross-view pairs only, and optionally
    DINOv2's local crops (multi-crop).

    Rows are crop-major: ``[:B]`` is crop 0 of the ``B`` images, ``[B:]`` crop 1. The
    student's crop 0 is matched to the teacher's crop 1 and vice versa; matching a view
    with itself is excluded (the teacher sees the same crop, the task would be trivial).
    The student's local crops (the teacher never sees them) are matched to both teacher
    global crops of their image.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        centering: Centering = "sinkhorn_knopp",
        center_momentum: float = 0.9,
        sk_iterations: int = 3,
    ) -> None:
        super().__init__(out_dim, student_temp, centering, center_momentum, sk_iterations)

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``[2B, K]`` teacher logits -> ``[2B, K]`` float32 targets (rows sum to 1).

        With softmax centring this also updates the centre (after computing the targets).
        """
        return self._normalise(teacher_logits, teacher_temp, valid=None)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        local_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-view DINO loss, with the local-crop terms of DINOv2 when ``local_logits`` is given.

        Args:
            student_logits: ``[2B, K]`` student head outputs, crop-major.
            teacher_probs: ``[2B, K]`` targets from :meth:`teacher_probs`, crop-major
                (treated as constants).
            local_logits: optional ``[nL*B, K]`` student head outputs of ``nL`` local crops
                per image, crop-major (local crop 0 of the ``B`` images, then local crop 1, ...).

        Returns:
            float32 scalar. With ``CE(s, t)`` the batch-mean cross-entropy
            ``-sum_k t_k log_softmax(s / student_temp)_k`` of a pair of crops:

            * without ``local_logits``: the mean over the 2 cross-view pairs,
              ``(CE(s_0, t_1) + CE(s_1, t_0)) / 2``;
            * with them (DINOv2's ``ssl_meta_arch``: every local crop against both teacher
              global crops): ``(CE(s_0, t_1) + CE(s_1, t_0) + sum_{j < nL, c < 2}
              CE(l_j, t_c)) / (2 + 2 nL)``, the mean over all ``2 + 2 nL`` terms; ``nL = 0``
              (an empty ``[0, K]``) gives exactly the value without.
        """
        _check_logits_2d("student_logits", student_logits, self.out_dim)
        if teacher_probs.shape != student_logits.shape:
            raise LossInputError(
                f"teacher_probs shape {tuple(teacher_probs.shape)} != student_logits shape "
                f"{tuple(student_logits.shape)}"
            )
        n_rows = student_logits.shape[0]
        if n_rows == 0 or n_rows % 2 != 0:
            raise LossInputError(
                f"DINOLoss expects 2B > 0 rows (two crops per image, crop-major), got {n_rows}"
            )
        batch = n_rows // 2
        # Swap the crop halves of the targets: student crop c <-> teacher crop 1 - c.
        swapped = torch.cat([teacher_probs[batch:], teacher_probs[:batch]], dim=0)
        per_row = _soft_cross_entropy(student_logits, swapped, self.student_temp)  # [2B]
        # Both pairs have B rows, so the mean of the two batch means is the mean of all rows.
        if local_logits is None:
            return per_row.mean()
        _check_logits_2d("local_logits", local_logits, self.out_dim)
        if local_logits.shape[0] % batch != 0:
            raise LossInputError(
                f"local_logits must have nL*B rows (B={batch}, crop-major), got {local_logits.shape[0]}"
            )
        n_local = local_logits.shape[0] // batch
        # CE is linear in the targets: CE(l, t_0) + CE(l, t_1) = CE(l, t_0 + t_1). Each local
        # crop's [B, K] rows broadcast against the image's summed targets.
        both = teacher_probs[:batch] + teacher_probs[batch:]  # [B, K]
        local = _soft_cross_entropy(local_logits.unflatten(0, (n_local, batch)), both, self.student_temp)  # [nL, B]
        # 2 * mean = the sum of the 2 cross-view batch means; local.sum() / B that of the 2 nL local ones.
        return (2.0 * per_row.mean() + local.sum() / batch) / (2 + 2 * n_local)


class iBOTPatchLoss(_TeacherNormalisation):  # noqa: N801 (name used by DINOv2 / the paper)
    """iBOT masked-patch loss: the student's masked patches predict the teacher's
    (unmasked) patch distributions of the same crop."""

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        centering: Centering = "sinkhorn_knopp",
        center_momentum: float = 0.9,
        sk_iterations: int = 3,
    ) -> None:
        super().__init__(patch_out_dim, student_temp, centering, center_momentum, sk_iterations)

    @torch.no_grad()
    def teacher_probs(
        self,
        teacher_patch_logits: torch.Tensor,
        teacher_temp: float,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[M, K]`` teacher logits of the masked patches -> ``[M, K]`` float32 targets.

        ``valid`` (bool ``[M]``, default all True) marks the real masked patches of a
        fixed-size, padded buffer: padding rows neither shape the normalisation nor the
        softmax centre, and get all-zero targets.
        """
        return self._normalise(teacher_patch_logits, teacher_temp, valid=valid)

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        masks_weight: torch.Tensor,
        n_crops: int,
    ) -> torch.Tensor:
        """Weighted cross-entropy over masked patches.

        Args:
            student_patch_logits: ``[M, K]`` student head outputs of the masked patches
                gathered over all crops of this rank.
            teacher_probs: ``[M, K]`` targets for the same patches.
            masks_weight: ``[M]``, ``1 / (number of masked patches of the patch's crop)``;
                0 for padding rows of a fixed-size buffer (their targets are all-zero,
                so they add exactly 0).
            n_crops: number of crops the patches were gathered from (``2B``), including
                crops without any masked patch.

        Returns:
            float32 scalar ``sum_j w_j CE_j / n_crops``: the mean over crops of each crop's
            mean CE over its masked patches (a crop without masks contributes 0). With
            ``M = 0`` this is exactly 0 and still connected to ``student_patch_logits``.
        """
        _check_logits_2d("student_patch_logits", student_patch_logits, self.out_dim)
        if teacher_probs.shape != student_patch_logits.shape:
            raise LossInputError(
                f"teacher_probs shape {tuple(teacher_probs.shape)} != student_patch_logits "
                f"shape {tuple(student_patch_logits.shape)}"
            )
        n_masked = student_patch_logits.shape[0]
        if masks_weight.shape != (n_masked,):
            raise LossInputError(
                f"masks_weight must have shape [M]=({n_masked},), got {tuple(masks_weight.shape)}"
            )
        if isinstance(n_crops, bool) or not _is_integer(n_crops) or n_crops < 1:
            raise LossInputError(f"n_crops must be an int >= 1, got {n_crops!r}")
        per_patch = _soft_cross_entropy(student_patch_logits, teacher_probs, self.student_temp)
        # A sum over M = 0 rows is an exact 0 with a grad_fn (no 0/0 anywhere).
        return (per_patch * masks_weight.float()).sum() / n_crops


def _is_integer(value: object) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """Keep matmuls in float32 inside an autocast region (autocast would cast them down)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko differential-entropy regulariser (Sablayrolles et al., 2019).

    ``loss = -mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows, where
    ``nn(i)`` is the other row with the highest cosine similarity.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        _check_positive("eps", eps)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[n, D]`` features (e.g. student [CLS] tokens of one crop) -> float32 scalar.

        ``n < 2`` has no neighbour: returns an exact 0 connected to ``x``. Duplicate rows
        give distance 0, i.e. a finite ``-log(eps)`` term with zero (finite) gradient.
        """
        if x.dim() != 2:
            raise LossInputError(f"KoLeoLoss expects x of shape [n, D], got {tuple(x.shape)}")
        n = x.shape[0]
        if n < 2:
            # Sum over an empty slice: exactly 0 even if x holds inf/nan, and keeps a grad_fn.
            return x.float().flatten()[:0].sum()
        with _autocast_disabled(x.device):
            unit = F.normalize(x.float(), p=2.0, dim=-1, eps=self.eps)  # [n, D]
            with torch.no_grad():  # the neighbour choice is not differentiated
                cosine = unit @ unit.t()  # [n, n]
                self_mask = torch.eye(n, dtype=torch.bool, device=x.device)
                nn_index = cosine.masked_fill(self_mask, -math.inf).argmax(dim=1)  # [n]
            squared = (unit - unit[nn_index]).pow(2).sum(dim=-1)  # [n]
            # sqrt has an infinite derivative at 0; take it only where the distance is
            # positive (the double `where` keeps the unused branch's gradient finite).
            positive = squared > 0
            safe_squared = torch.where(positive, squared, torch.ones_like(squared))
            distance = torch.where(positive, safe_squared.sqrt(), torch.zeros_like(squared))
            return -torch.log(distance + self.eps).mean()
