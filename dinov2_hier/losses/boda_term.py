"""BoDA as a pretraining supervised term (issue 21, item 3b): ``supervision.losses: [{name: boda}]``.

The term sees the CLS tokens of the two global crops (``[2B, D]``, crop-major), the batch's
targets (hierarchy node indices, ``-1`` unlabelled) and the batch's *domains* (``long [B]``
or ``[2B]``: the index of each image's dataset name in ``supervision.domains``, the domain
vocabulary fixed at start-up, see :mod:`dinov2_hier.train.supervision`). It declares
``uses_domains = True``, so ``train/meta_arch.py`` calls it as
``term(cls_tokens, targets, domains=...)``; other terms keep the two-argument call.

Per step, with ``z`` the (optionally projected) CLS tokens in float32:

* **class of a row**: by default (``level: null``) the leaf index of its target (leaves come
  first in the node order, so a leaf's node index *is* its leaf index). Rows labelled at a
  coarse (internal) node and unlabelled rows take no part in BoDA nor in the centroids: BoDA
  needs a class that is the same in every domain, and a coarse label says less than that.
  With ``level: L`` the classes are the tree cut at depth ``L``: a row's class is its label's
  ancestor-or-self at depth ``L``, or the label itself when it is a leaf shallower than ``L``;
  labels at an internal node shallower than ``L`` are left out. Use it when a source labels
  coarser than the others (bccd's ``neutrophil``, ``eosinophil``, ``lymphocyte`` are depth-3
  internal nodes of ``hierarchies/wbc.json``: with the default only its monocytes and
  basophils take part; with ``level: 3`` all five classes do).
* ``loss = boda_loss(z_leaf, leaf, domain, centroids, counts / mean(present counts),
  form, temperature, nu) + macro * macro_alignment_loss(z_all, domain)``. The counts are
  divided by the mean of the present pairs' counts: :class:`DomainCentroids` sums counts over
  every update, and the released form divides each distance by the own pair's count, so raw
  counts would shrink every logit towards 0 as training goes on; the ratios ``nu`` reads are
  unchanged. The macro term aligns the domains' first and second moments on *every* row
  (labelled or not): it needs no class.
* then, in training mode, ``DomainCentroids.update`` (``no_grad``) folds the step's leaf rows
  into the centroids (momentum ``momentum``, every ``every`` steps from step ``warmup``): the
  loss of a step reads the centroids of the steps before it, never its own batch's means.

Across ranks (DDP / FSDP): the loss is computed **per rank** on that rank's rows (BoDA against
the shared centroids, the macro term between the domains of that rank's batch only) and the
gradients are averaged as for every term; the centroids and counts are **global**: the
per-pair sums and counts are all-reduced inside ``DomainCentroids.update``, so every rank
holds the same state, and every rank must run the term on every step (it does: each rank
computes every term). The term is not ``pairwise`` (rows are compared with centroids, not
with each other), so ``supervision.contrast_across_ranks`` does not gather for it.

Host synchronisation and ``torch.compile``: not free of either. ``DomainCentroids.update``
reads its step counter (``int(step)``) and indexes with boolean masks; ``boda_loss`` tests
``rows.any()`` and indexes the rows that have a positive; ``macro_alignment_loss`` calls
``torch.unique`` and ``.tolist()``; the term picks the leaf rows with a boolean mask. That is a
handful of small device-to-host reads per step on a GPU. Under ``compute.compile=forward``
these are data-dependent shapes and Python branches: dynamo breaks the graph around them (the
backbones and the other losses still compile) -- not run here (no GPU, no compiler on the
test machine), so unmeasured.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.centering import LossInputError, _check_positive
from dinov2_hier.losses.domain import BODA_FORMS, DomainCentroids, boda_loss, macro_alignment_loss
from dinov2_hier.losses.inputs import check_2d, check_targets
from dinov2_hier.losses.ssl import _autocast_disabled
from dinov2_hier.losses.term_base import HeadKind, SupervisedTerm, build_projection

__all__ = ["BodaTerm"]


def _number(name: str, value: object, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or value == float("inf"):
        raise LossInputError(f"{name} must be a finite number >= {low}, got {value!r}")
    return float(value)


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LossInputError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _class_table(hierarchy: Hierarchy, level: int | None) -> torch.Tensor:
    """``long [num_nodes]``: the BoDA class of each node index, ``-1`` for none (see the module doc)."""
    nodes = hierarchy.nodes
    if level is None:
        return torch.tensor([i if i < hierarchy.num_leaves else -1 for i in range(len(nodes))], dtype=torch.long)
    cut: dict[str, int] = {}
    table = []
    for node in nodes:
        depth = hierarchy.depth(node)
        if depth >= level:
            top = hierarchy.ancestor_at_depth(node, level)
        else:
            top = node if hierarchy.is_leaf(node) else None
        table.append(-1 if top is None else cut.setdefault(top, len(cut)))
    return torch.tensor(table, dtype=torch.long)


class BodaTerm(SupervisedTerm):
    """``boda``: BoDA (balanced domain-class alignment) + ``macro`` x the CORAL-like term.

    Args (config keys): ``temperature`` (T > 0, default 1.0), ``nu`` (calibration exponent,
    default 0.5), ``form`` (``released``, the default, or ``paper``), ``macro`` (weight of
    :func:`~dinov2_hier.losses.domain.macro_alignment_loss`, >= 0, default 1.0),
    ``momentum``/``every``/``warmup`` (of :class:`DomainCentroids`; defaults 0.9, 1, 0),
    ``level`` (null = leaf classes, the default; an int >= 1 = the tree cut at that depth),
    ``projection_dim`` (0 = BoDA on the CLS tokens themselves, the default), ``head`` and
    ``hidden_dim`` (of that projection). ``domains`` is not a config key of the entry: it is
    ``supervision.domains``, passed by :func:`~dinov2_hier.losses.supervised.build_supervised_terms`.
    """

    name = "boda"
    uses_domains = True

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        domains: Sequence[str] = (),
        temperature: float = 1.0,
        nu: float = 0.5,
        form: str = "released",
        macro: float = 1.0,
        momentum: float = 0.9,
        every: int = 1,
        warmup: int = 0,
        level: int | None = None,
        projection_dim: int = 0,
        head: HeadKind = "linear",
        hidden_dim: int = 2048,
    ) -> None:
        super().__init__(hierarchy, embed_dim)
        self.level = None if level is None else _count("level", level, 1)
        class_of = _class_table(hierarchy, self.level)
        self.num_classes = int(class_of.max()) + 1
        if self.num_classes < 1:
            raise LossInputError(f"level {level!r}: no node of the hierarchy is a class at that depth")
        # Non-persistent: a function of the hierarchy and level (in the saved config).
        self.register_buffer("class_of", class_of, persistent=False)
        if isinstance(domains, str) or not all(isinstance(d, str) for d in domains) or len(domains) < 1:
            raise LossInputError(f"domains must be a non-empty list of dataset names, got {domains!r}")
        if len(set(domains)) != len(domains):
            raise LossInputError(f"domains must not repeat a name, got {list(domains)!r}")
        self.domains = list(domains)
        self.temperature = _number("temperature", temperature)
        _check_positive("temperature", self.temperature)
        self.nu = _number("nu", nu)
        if form not in BODA_FORMS:
            raise LossInputError(f"form must be one of {BODA_FORMS}, got {form!r}")
        self.form = form
        self.macro = _number("macro", macro)
        _number("momentum", momentum)
        self.projection = build_projection(embed_dim, projection_dim, head, hidden_dim)
        dim = projection_dim or embed_dim
        self.centroids = DomainCentroids(
            len(self.domains), self.num_classes, dim, momentum=float(momentum),
            every=_count("every", every, 1), warmup=_count("warmup", warmup, 0),
        )

    def forward(self, cls_tokens: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        """``cls_tokens [2B, D]`` crop-major, ``targets`` and ``domains`` ``[B]`` (per image)
        or ``[2B]`` (per row) -> scalar."""
        check_2d("cls_tokens", cls_tokens, self.embed_dim)
        n_rows = cls_tokens.shape[0]
        if domains is None:
            raise LossInputError("the boda term needs the batch's domains (batch['domains'], from supervision.domains)")
        for name, t in (("targets", targets), ("domains", domains)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] not in (n_rows // 2, n_rows) or n_rows % 2:
                raise LossInputError(
                    f"{name} must be [B] or [2B] for {n_rows} crop-major rows, got {tuple(getattr(t, 'shape', ()))}"
                )
        targets = targets.to(cls_tokens.device)
        domains = domains.to(cls_tokens.device).long()
        targets = targets if targets.shape[0] == n_rows else targets.repeat(2)
        domains = domains if domains.shape[0] == n_rows else domains.repeat(2)
        if domains.device.type == "cpu" and domains.numel() and not torch.compiler.is_compiling():
            low, high = int(domains.min()), int(domains.max())
            if low < 0 or high >= len(self.domains):
                raise LossInputError(f"domains must be in [0, {len(self.domains)}) (supervision.domains), got {low}..{high}")
        return self.domain_loss(cls_tokens, targets, domains)

    def domain_loss(self, tokens: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """``tokens [n, D]``, ``targets [n]`` node indices, ``domains [n]`` -> scalar; updates the
        centroids afterwards in training mode."""
        targets = check_targets("targets", targets, tokens.shape[0], self.hierarchy.num_nodes)
        with _autocast_disabled(tokens.device):
            z = self.projection(tokens).float()
            classes = torch.where(targets >= 0, self.class_of[targets.clamp(min=0)], -1)
            leaf = classes >= 0  # rows with a class (leaves by default)
            z_leaf, labels, doms = z[leaf], classes[leaf], domains[leaf]
            counts = self.centroids.counts
            present = counts > 0
            scale = counts.sum() / present.sum().clamp(min=1)  # mean of the present pairs' counts
            loss = boda_loss(
                z_leaf, labels, doms, self.centroids.centroids, counts / scale.clamp(min=1e-12),
                temperature=self.temperature, form=self.form, nu=self.nu,
            )
            if self.macro > 0:
                loss = loss + self.macro * macro_alignment_loss(z, domains)
            else:
                loss = loss + z.sum() * 0.0  # connected to every row, as with the macro term
        if self.training:
            self.centroids.update(z_leaf.detach(), labels, doms)
        return loss

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise LossInputError("the boda term needs the batch's domains: call term(cls_tokens, targets, domains=...)")

    def extra_repr(self) -> str:
        return (f"domains={self.domains}, classes={self.num_classes} (level={self.level}), form={self.form}, "
                f"temperature={self.temperature}, nu={self.nu}, macro={self.macro}")
