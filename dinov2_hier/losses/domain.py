"""Domain-generalisation losses on tensors: BoDA, CORAL, gradient reversal, and the
per-(domain, class) centroids that BoDA reads (issue 21; Umer et al., eq. 3, after Yang et
al. 2022).

Notation: ``B`` samples, ``F`` feature dimensions, ``D`` domains, ``C`` classes. A
(domain, class) *pair* ``(d, c)`` has a centroid ``psi[d, c]`` (``[F]``, the mean feature
of its samples) and a count ``N[d, c]`` (samples of that pair; only ratios and, in the
released form, the own pair's count enter the loss). A pair with count 0 is *absent*: it
is neither a positive nor a negative. Distances are Euclidean and NOT squared (the reading
of eq. 3 that reproduces the issue's reference number; see :func:`boda_loss`).

* :func:`boda_loss` -- the BoDA loss, ``form="paper"`` (eq. 3) or ``form="released"``
  (the authors' code as the issue describes it; the default).
* :func:`coral_loss` -- Deep CORAL (Sun & Saenko, 2016) between two batches.
* :func:`macro_alignment_loss` -- the released variant's CORAL-like term between the
  domains of one batch (also the CORAL baseline's penalty).
* :func:`grad_reverse` -- DANN's gradient-reversal layer (Ganin et al., 2016).
* :class:`DomainCentroids` -- the centroid/count state, momentum-updated, all-reduced
  across ranks, saved in ``state_dict``.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from dinov2_hier.distributed import all_reduce_sum
from dinov2_hier.losses.centering import LossInputError, _check_positive

__all__ = [
    "BODA_FORMS",
    "DomainCentroids",
    "boda_loss",
    "coral_loss",
    "grad_reverse",
    "macro_alignment_loss",
]

#: The two forms of :func:`boda_loss`; the first is the default.
BODA_FORMS = ("released", "paper")


def _check_inputs(z, labels, domains, centroids, counts) -> None:
    if z.ndim != 2:
        raise LossInputError(f"z must be [B, F], got shape {tuple(z.shape)}")
    if centroids.ndim != 3 or centroids.shape[2] != z.shape[1]:
        raise LossInputError(f"centroids must be [D, C, F={z.shape[1]}], got shape {tuple(centroids.shape)}")
    if tuple(counts.shape) != tuple(centroids.shape[:2]):
        raise LossInputError(f"counts must be [D, C]={tuple(centroids.shape[:2])}, got {tuple(counts.shape)}")
    for name, t in (("labels", labels), ("domains", domains)):
        if t.shape != (z.shape[0],):
            raise LossInputError(f"{name} must be [B={z.shape[0]}], got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise LossInputError(f"{name} must be an integer tensor, got {t.dtype}")


def _distances(z: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[B, K]`` between rows of ``z`` ``[B, F]`` and ``points``
    ``[K, F]``, with a zero (not NaN) gradient where a sample sits on a point: the sqrt's
    derivative is infinite at 0, so the square root is taken of a clamped value and the
    exact zeros are put back with ``where`` (whose untaken branch gets no gradient)."""
    sq = (z[:, None, :] - points[None, :, :]).pow(2).sum(-1)
    return torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), torch.zeros_like(sq))


def boda_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    centroids: torch.Tensor,
    counts: torch.Tensor,
    *,
    temperature: float = 1.0,
    form: str = "released",
    nu: float = 0.5,
) -> torch.Tensor:
    """The BoDA loss of a batch (a scalar tensor, in nats).

    Args:
        z: ``[B, F]`` features (float; gradients flow into it).
        labels: ``[B]`` integer class of each sample, in ``[0, C)``.
        domains: ``[B]`` integer domain of each sample, in ``[0, D)``.
        centroids: ``[D, C, F]`` pair centroids ``psi`` (treated as constants: detached).
        counts: ``[D, C]`` pair counts ``N`` (int or float, >= 0; 0 = pair absent).
        temperature: ``T > 0``; every logit is divided by it (the paper gives none, i.e.
            ``T = 1``, the default).
        form: ``"released"`` (default) or ``"paper"``.
        nu: exponent of the calibration ``w[(d_i,c_i) -> (d',c')] = (N[d',c'] / N[d_i,c_i])^nu``
            (Yang et al.'s balancing weight; eq. 3 only says it depends on the relative
            sample sizes).

    With ``dist_k = ||z_i - psi_k||_2`` (not squared) for every present pair ``k != own``:

    * ``form="paper"`` (eq. 3, read literally): logit ``l_k = -w_k * dist_k / T``;
      ``L = sum_i -1/(|D|-1) * sum_{d != d_i, (d, c_i) present} log softmax_k(l)[(d, c_i)]``,
      the softmax over all present pairs except the own pair ``(d_i, c_i)``; ``|D|`` is
      the number of domains with any present pair. Note the SUM over samples: the loss,
      and so the weight lambda that suits it, grows with the batch size. Distances are not
      squared: with squared ones the issue's reference (z = 0, centroids 1, 4, 5) would give
      ``1 + log(e^-1 + e^-16 + e^-25)`` = 1.5e-7, not 0.065884; unsquared they give it.
    * ``form="released"`` (the authors' code, as issue 21 describes it): the distance is
      also divided by the sample's own pair count, ``l_k = -w_k * dist_k / (N[d_i,c_i] * T)``
      (the ``1/N`` factor the paper shows only in its Mahalanobis variant); the same
      softmax; ``-log p`` averaged over the sample's present positive pairs, then over the
      samples that have at least one.

    The default is ``"released"``: it is the code the paper's numbers came from (the paper
    trains "as done in Yang et al."), it is a mean, so one lambda fits any batch size, and
    a class missing from some source domain does not lower the weight of the others (eq.
    3 divides by ``|D| - 1`` whether or not the positive exists). With the released form
    the unit of ``counts`` matters (it scales the logits); callers that hold data-set
    counts may pass them divided by their mean (what :class:`eval.probes.dg.DGProbe`
    does), which keeps the logits at the scale of the distances.

    Samples whose own pair is absent, or with no present positive (the same class in
    another domain), contribute nothing; a batch with none returns exactly ``0`` still
    connected to ``z`` (``backward()`` gives zero gradients).
    """
    _check_inputs(z, labels, domains, centroids, counts)
    if form not in BODA_FORMS:
        raise LossInputError(f"form must be one of {BODA_FORMS}, got {form!r}")
    _check_positive("temperature", temperature)
    D, C, _ = centroids.shape
    zf = z.float()  # float32 even under autocast: distances of near points lose all digits in half
    n_pairs = counts.reshape(D * C).to(zf.dtype).to(z.device)
    present = n_pairs > 0
    own = domains.long() * C + labels.long()  # [B] flat index of the own pair
    pair_dom = torch.arange(D, device=z.device).repeat_interleave(C)  # [D*C]
    pair_cls = torch.arange(C, device=z.device).repeat(D)
    positive = (
        present[None, :]
        & (pair_cls[None, :] == labels.long()[:, None])
        & (pair_dom[None, :] != domains.long()[:, None])
        & present[own][:, None]
    )  # [B, D*C]
    rows = positive.any(1)
    if not bool(rows.any()):
        return z.sum() * 0.0  # exactly 0, and backward() reaches z (with zero gradients)

    z_r, own_r, pos_r = zf[rows], own[rows], positive[rows]
    flat = centroids.reshape(D * C, -1).detach().to(zf.dtype).to(z.device)
    n_own = n_pairs[own_r][:, None]  # [b, 1]
    calib = (n_pairs[None, :] / n_own).pow(nu)  # [b, D*C]; 0 for absent pairs, masked below
    dist = _distances(z_r, flat) * calib
    if form == "released":
        dist = dist / n_own
    logits = -dist / temperature
    in_denominator = present[None, :] & (torch.arange(D * C, device=z.device)[None, :] != own_r[:, None])
    logits = logits.masked_fill(~in_denominator, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    # where(), not a product: -inf * 0 would be NaN at the masked entries
    pos_log_prob = torch.where(pos_r, log_prob, torch.zeros_like(log_prob)).sum(1)  # [b]
    if form == "released":
        return -(pos_log_prob / pos_r.sum(1)).mean()
    n_domains = int((n_pairs.reshape(D, C) > 0).any(1).sum())
    return -(pos_log_prob / max(n_domains - 1, 1)).sum()


def _covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance ``[F, F]`` of the rows of ``x`` ``[n, F]`` (n >= 2)."""
    xc = x - x.mean(0, keepdim=True)
    return xc.T @ xc / (x.shape[0] - 1)


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko, 2016): ``||Cov(source) - Cov(target)||_F^2 / (4 F^2)``.

    Args:
        source: ``[n_s, F]``, target: ``[n_t, F]`` features, ``n >= 2`` rows each.
    Returns a scalar (squared feature units); exactly 0 for identical batches.
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise LossInputError(f"coral_loss needs [n, F] batches of one F, got {tuple(source.shape)}, {tuple(target.shape)}")
    if source.shape[0] < 2 or target.shape[0] < 2:
        raise LossInputError("coral_loss needs at least 2 rows per batch (a covariance)")
    d = source.shape[1]
    diff = _covariance(source.float()) - _covariance(target.float())
    return diff.pow(2).sum() / (4 * d * d)


def macro_alignment_loss(z: torch.Tensor, domains: torch.Tensor, *, means: bool = True) -> torch.Tensor:
    """The CORAL-like alignment of the domains in one batch (a scalar).

    Mean over unordered pairs of domains with at least 2 samples in the batch of
    ``coral_loss(z_a, z_b)`` plus, with ``means``, ``||mean(z_a) - mean(z_b)||^2 / F``.
    The first-order term is there because a per-domain offset (a colour cast) leaves the
    covariances unchanged, so covariances alone cannot remove it; the widely used DomainBed
    CORAL penalty has the same two parts. The issue describes the released BoDA code's
    macro term only as "CORAL-like"; this is our reading of it, not a transcription.
    Fewer than two such domains: exactly 0, connected to ``z``.

    Args:
        z: ``[B, F]`` features; domains: ``[B]`` integer domain ids.
    """
    if z.ndim != 2 or domains.shape != (z.shape[0],):
        raise LossInputError(f"z must be [B, F] and domains [B], got {tuple(z.shape)}, {tuple(domains.shape)}")
    ids, n = torch.unique(domains, return_counts=True)
    groups = [z[domains == d].float() for d in ids[n >= 2].tolist()]
    if len(groups) < 2:
        return z.sum() * 0.0
    terms = []
    for a, b in itertools.combinations(groups, 2):
        term = coral_loss(a, b)
        if means:
            term = term + (a.mean(0) - b.mean(0)).pow(2).mean()
        terms.append(term)
    return torch.stack(terms).mean()


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * (-ctx.lambd), None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Identity forward; backward multiplies the incoming gradient by ``-lambd`` (DANN's
    gradient-reversal layer: the features are trained to *increase* the domain
    classifier's loss while the classifier decreases it)."""
    return _GradReverse.apply(x, lambd)


class DomainCentroids(nn.Module):
    """Per-(domain, class) centroids and counts: the state that :func:`boda_loss` reads.

    Buffers (persistent, so in ``state_dict`` and checkpoints): ``centroids`` ``[D, C, F]``
    (float32), ``counts`` ``[D, C]`` (float32: samples that went into each centroid, summed
    over ranks and updates) and ``step`` (calls of :meth:`update` so far).

    Args:
        num_domains, num_classes, dim: ``D``, ``C``, ``F``.
        momentum: ``m`` in ``psi <- m * psi + (1 - m) * batch_mean`` (default 0.9: a centroid
            follows the features over about ten updates, fast enough for a head that is
            still training, slow enough to average out the few samples of a rare pair per
            batch). A pair's first update takes the batch mean as is (no pull towards 0).
        every: update on every ``every``-th call (default 1).
        warmup: calls before the first update (default 0); like the authors' code, the
            centroids are not touched while the features are still young.
    """

    def __init__(self, num_domains: int, num_classes: int, dim: int, *, momentum: float = 0.9, every: int = 1, warmup: int = 0) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise LossInputError(f"momentum must be in [0, 1), got {momentum!r}")
        if every < 1 or warmup < 0:
            raise LossInputError(f"every must be >= 1 and warmup >= 0, got {every!r}, {warmup!r}")
        self.momentum, self.every, self.warmup = float(momentum), int(every), int(warmup)
        self.register_buffer("centroids", torch.zeros(num_domains, num_classes, dim))
        self.register_buffer("counts", torch.zeros(num_domains, num_classes))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor) -> bool:
        """Count one training step and, when it is due, fold the batch into the centroids.

        ``z`` ``[B, F]`` (detached here), ``labels``/``domains`` ``[B]``. The per-pair sums and
        counts are all-reduced (summed) over ranks before the update when torch.distributed
        is initialised, so every rank holds the same state; every rank must call this on
        every step. Returns whether an update happened.
        """
        step = int(self.step)
        self.step += 1
        if step < self.warmup or (step - self.warmup) % self.every:
            return False
        D, C, F = self.centroids.shape
        own = domains.long().to(z.device) * C + labels.long().to(z.device)
        sums = torch.zeros(D * C, F, device=z.device).index_add_(0, own, z.detach().float())
        n = torch.zeros(D * C, device=z.device).index_add_(0, own, torch.ones_like(own, dtype=torch.float32))
        all_reduce_sum(sums)
        all_reduce_sum(n)
        sums, n = sums.to(self.centroids.device), n.to(self.centroids.device)
        cent = self.centroids.view(D * C, F)
        seen = n > 0
        first = seen & (self.counts.view(D * C) == 0)
        mean = sums[seen] / n[seen][:, None]
        m = torch.where(first[seen], 0.0, self.momentum)[:, None]
        cent[seen] = m * cent[seen] + (1 - m) * mean
        self.counts.view(D * C).add_(n)
        return True
