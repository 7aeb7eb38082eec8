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

from ..distributed import all_reduce_max, all_reduce_sum, get_world_size


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
    n_samples: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp normalisation of teacher logits (DINOv2 / SwAV), in float32.

    Args:
        teacher_logits: ``[n, K]`` logits of this rank's ``n`` samples (any float dtype;
            ``n`` may be 0 on a rank, e.g. no masked patch, the collectives still run).
        teacher_temp: softmax temperature (> 0).
        n_iterations: number of (row, column) normalisation rounds (>= 1).
        n_samples: the number of samples over *all* ranks, ``B_global``. Default
            ``n * world_size`` (equal split). Pass the all-reduced count when ranks hold
            different numbers of rows (iBOT masked patches). Note that every step
            normalises by actual sums, so ``B_global`` only sets the scale of the
            intermediate column marginals (``1 / B_global``) and cancels in the output;
            it is kept for parity with the reference algorithm.

    Returns:
        ``[n, K]`` float32 target distributions: each row sums to 1 and, as the
        iterations converge, each prototype receives ``n_global / K`` total mass.
    """
    _check_logits_2d("teacher_logits", teacher_logits)
    _check_positive("teacher_temp", teacher_temp)
    if n_iterations < 1:
        raise LossInputError(f"n_iterations must be >= 1, got {n_iterations!r}")
    n_local, n_prototypes = teacher_logits.shape
    scaled = teacher_logits.float() / teacher_temp  # [n, K]

    # Numerical stability: subtract, for every prototype k, the maximum of scaled
    # logits over the *global* batch before exp. This multiplies row k of Q = [K, n]
    # by a positive constant, which the first row normalisation below cancels exactly
    # (a per-sample shift would scale columns, and columns are only normalised after
    # the row step, so it would change finite-iteration results). The maximum must be
    # the same on every rank (row sums are summed over ranks), hence the MAX reduce.
    if n_local > 0:
        row_max = scaled.amax(dim=0)  # [K]
    else:  # an empty rank contributes nothing but must join the collective
        row_max = torch.full((n_prototypes,), float("-inf"), device=scaled.device)
    all_reduce_max(row_max)
    q = torch.exp(scaled - row_max).t()  # [K, n], entries in [0, 1]

    if n_samples is None:
        b_global = torch.tensor(float(n_local * get_world_size()), device=q.device)
    elif isinstance(n_samples, torch.Tensor):
        # No positivity check here: it would force a device -> host sync.
        b_global = n_samples.detach().to(device=q.device, dtype=torch.float32)
    else:
        if n_samples < 0 or n_samples < n_local:
            raise LossInputError(
                f"n_samples must be the global sample count (>= local n={n_local}), "
                f"got {n_samples!r}"
            )
        b_global = torch.tensor(float(n_samples), device=q.device)

    # Global sum: mathematically redundant after the row step (one scalar shared by all
    # ranks), kept for the reference's scale. A per-rank sum would NOT be harmless.
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        row_sums = all_reduce_sum(q.sum(dim=1, keepdim=True))  # [K, 1]
        q /= row_sums
        q /= n_prototypes  # every prototype gets total mass 1/K
        q /= q.sum(dim=0, keepdim=True)  # [1, n]; columns are local to the rank
        q /= b_global  # every sample gets mass 1/B_global
    q *= b_global  # each sample's distribution sums to 1
    return q.t()


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
    def update(self, teacher_logits: torch.Tensor) -> None:
        """EMA update ``center <- m * center + (1 - m) * mean`` from ``[n, K]`` logits.

        The mean is over the rows of all ranks (sum and count are all-reduced together,
        so ranks may hold different ``n``). If the global batch is empty the centre is
        left unchanged (decided on device, no host sync).
        """
        _check_logits_2d("teacher_logits", teacher_logits, self.out_dim)
        logits = teacher_logits.float()
        sum_and_count = torch.empty(self.out_dim + 1, device=logits.device)
        sum_and_count[:-1] = logits.sum(dim=0)
        sum_and_count[-1] = logits.shape[0]
        all_reduce_sum(sum_and_count)
        count = sum_and_count[-1]
        batch_mean = (sum_and_count[:-1] / count.clamp(min=1.0)).unsqueeze(0)  # [1, K]
        center = self.center.float()
        updated = self.momentum * center + (1.0 - self.momentum) * batch_mean
        self.center.copy_(torch.where(count > 0, updated, center))
