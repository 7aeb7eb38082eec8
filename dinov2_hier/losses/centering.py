"""Teacher normalisations for the self-supervised losses.

Two ways of turning teacher logits into target distributions:

* :func:`sinkhorn_knopp` -- the SwAV / DINOv2 batch normalisation: every sample
  gets a distribution over the ``K`` prototypes and, over the global batch, the
  prototypes are used (approximately) uniformly.
* :class:`SoftmaxCentering` -- the original DINO recipe: softmax of the logits
  minus an exponential moving average ("centre") of past teacher logits.

Both reduce over all ranks through :mod:`dinov2_hier.distributed`, so results on
``R`` ranks holding a split batch equal the single-process result on the whole
batch; on one process the reductions are no-ops. All arithmetic is float32
whatever the input dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import all_reduce_max, all_reduce_sum


class LossInputError(ValueError):
    """A loss or teacher normalisation received a tensor or argument it cannot handle."""


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise LossInputError(f"{name} must be > 0, got {value!r}")


def _check_logits_2d(name: str, logits: torch.Tensor, n_classes: int | None = None) -> None:
    if logits.dim() != 2:
        raise LossInputError(f"{name} must be 2-D [n, K], got shape {tuple(logits.shape)}")
    if n_classes is not None and logits.shape[1] != n_classes:
        raise LossInputError(
            f"{name} has {logits.shape[1]} columns but the loss was built for K={n_classes} "
            f"(shape {tuple(logits.shape)})"
        )


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp normalisation of teacher logits (DINOv2 / SwAV), in float32.

    Args:
        teacher_logits: ``[n, K]`` logits of this rank's ``n`` samples (any float dtype;
            ``n`` may be 0 on a rank, e.g. no masked patch: the collectives still run).
        teacher_temp: softmax temperature (> 0).
        n_iterations: number of (prototype, sample) normalisation rounds (>= 1).
        valid: optional bool ``[n]``; False marks padding rows (a fixed-size buffer of
            masked patches). Padding takes no prototype mass and gets an all-zero row.

    Returns:
        ``[n, K]`` float32 target distributions: each valid row sums to 1 and, as the
        iterations converge, each prototype receives ``n_valid_global / K`` total mass.

    The reference algorithm rescales the whole ``[K, n]`` matrix ``Q = exp(logits / T)``
    in place, alternately by prototype sums and by sample sums. Every such step only
    multiplies rows or columns by positive factors, so ``Q_t = diag(a) Q_0 diag(b)``:
    here only the two scale vectors are iterated (``a = 1 / (Q_0^T b)`` over the global
    batch, ``b = 1 / (Q_0 a)``), each step one matrix-vector product that reads ``Q_0``
    once instead of several read-write passes over it, and ``Q_0`` is scaled once at
    the end. The reference's constant factors (``1/K``, ``1/B``, the initial total)
    only rescale ``a`` and ``b`` by scalars, which cancel in the row-normalised output,
    so no global sample count is needed.
    """
    _check_logits_2d("teacher_logits", teacher_logits)
    _check_positive("teacher_temp", teacher_temp)
    if n_iterations < 1:
        raise LossInputError(f"n_iterations must be >= 1, got {n_iterations!r}")
    n_local, n_prototypes = teacher_logits.shape
    if valid is not None and valid.shape != (n_local,):
        raise LossInputError(f"valid must have shape [n]=({n_local},), got {tuple(valid.shape)}")
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):  # keep the products in float32
        scaled = teacher_logits.float() / teacher_temp  # [n, K]
        if valid is not None:
            scaled = scaled.masked_fill(~valid[:, None], float("-inf"))
        # Numerical stability: subtract, for every prototype k, the maximum of the scaled
        # logits over the *global* batch before exp. This only rescales prototype k, which
        # the first prototype step cancels (a per-sample shift would not be cancelled),
        # and must be the same on every rank, hence the MAX reduce. A prototype with no
        # valid row anywhere (no masked patch in the whole batch) gets shift 0, so its
        # column stays exp(-inf) = 0 instead of NaN.
        col_max = scaled.amax(dim=0) if n_local > 0 else scaled.new_full((n_prototypes,), float("-inf"))
        all_reduce_max(col_max)
        col_max = torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max))
        q = torch.exp(scaled - col_max)  # [n, K], entries in [0, 1]; padding rows are 0
        sample_scale = torch.ones(n_local, device=q.device)  # b
        for _ in range(n_iterations):
            proto_mass = all_reduce_sum(q.t() @ sample_scale)  # [K], over the global batch
            # Zero mass only when no rank has a valid row: those prototypes stay at 0.
            proto_scale = torch.where(proto_mass > 0, proto_mass.reciprocal(), torch.zeros_like(proto_mass))  # a
            # The scales drift by a constant factor per round (the reference's 1/K and 1/B
            # are left out); rescaling a to max 1 keeps them in range over many rounds.
            # a is the same on every rank, so this scalar is too, and it cancels below.
            proto_scale = proto_scale / proto_scale.amax().clamp_min(torch.finfo(torch.float32).tiny)
            sample_scale = (q @ proto_scale).reciprocal()  # [n]; rows are local to the rank
            if valid is not None:
                sample_scale = torch.where(valid, sample_scale, torch.zeros_like(sample_scale))
        q *= proto_scale
        q *= sample_scale[:, None]  # each valid row sums to 1
    return q


class SoftmaxCentering(nn.Module):
    """DINO teacher centring: ``softmax((logits - center) / temp)`` with an EMA centre.

    Buffer ``center`` is ``[1, K]`` float32, zeros at start. DINOv2 updates the centre
    asynchronously (the all-reduce overlaps the next step); here :meth:`update` is
    synchronous and meant to be called right after :meth:`probs`, so a step's targets
    use the centre accumulated up to the previous step, as in DINO.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise LossInputError(f"out_dim must be >= 1, got {out_dim!r}")
        if not 0.0 <= momentum <= 1.0:
            raise LossInputError(f"center momentum must be in [0, 1], got {momentum!r}")
        self.out_dim = out_dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))

    @torch.no_grad()
    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``[n, K]`` logits -> ``[n, K]`` float32 probabilities (rows sum to 1)."""
        _check_logits_2d("teacher_logits", teacher_logits, self.out_dim)
        _check_positive("teacher_temp", teacher_temp)
        centred = teacher_logits.float() - self.center.float()
        return torch.softmax(centred / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """EMA update ``center <- m * center + (1 - m) * mean`` from ``[n, K]`` logits.

        The mean is over the valid rows (``valid`` bool ``[n]``, default all) of all ranks
        (sum and count are all-reduced together, so ranks may hold different ``n``). If
        the global batch has no valid row the centre is left unchanged (decided on
        device, no host sync).
        """
        _check_logits_2d("teacher_logits", teacher_logits, self.out_dim)
        logits = teacher_logits.float()
        sum_and_count = torch.empty(self.out_dim + 1, device=logits.device)
        if valid is None:
            sum_and_count[:-1] = logits.sum(dim=0)
            sum_and_count[-1] = logits.shape[0]
        else:
            sum_and_count[:-1] = torch.where(valid[:, None], logits, torch.zeros_like(logits)).sum(dim=0)
            sum_and_count[-1] = valid.sum()
        all_reduce_sum(sum_and_count)
        count = sum_and_count[-1]
        batch_mean = (sum_and_count[:-1] / count.clamp(min=1.0)).unsqueeze(0)  # [1, K]
        center = self.center.float()
        updated = self.momentum * center + (1.0 - self.momentum) * batch_mean
        self.center.copy_(torch.where(count > 0, updated, center))
