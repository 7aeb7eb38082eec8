"""Supervised terms: a head on the student's CLS tokens plus one supervised loss.

Each :class:`SupervisedTerm` is called by ``train/meta_arch.py`` as
``term(cls_tokens [2B, D], targets [B])``: the CLS tokens of both global crops,
crop-major (``[:B]`` crop 0 of every image, ``[B:]`` crop 1), and one node index per
image (``-1`` = unlabelled); the targets apply to both crops (or ``targets [2B]``, one
per crop row, when some crops are left out). Classification terms
therefore average over ``2B`` rows; contrastive terms treat the ``2B`` crops as ``2B``
samples, so the two views of a labelled image are positives of each other (as in SupCon).
Terms that declare ``uses_domains`` (``boda``, :mod:`dinov2_hier.losses.boda_term`) are
called as ``term(cls_tokens, targets, domains=long [B])``.

:func:`build_supervised_terms` turns config entries such as
``{"name": "hierce", "weight": 1.0, "alpha": 0.5, "head": "linear"}`` into an
``nn.ModuleDict`` of terms and a ``{key: weight}`` dict; the valid names are the keys of
:data:`SUPERVISED_TERMS`, the valid entry keys are ``name``, ``key``, ``weight`` and the
term's constructor arguments after ``hierarchy, embed_dim``.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from dinov2_hier.errors import UserError, suggest
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses.boda_term import BodaTerm
from dinov2_hier.losses.centering import LossInputError
from dinov2_hier.losses.contrastive import HierSupConLoss, SupConLoss
from dinov2_hier.losses.hierarchical import (
    DistanceLoss,
    FlatCELoss,
    HierCELoss,
    MultiLevelCELoss,
)
from dinov2_hier.losses.guided import Guide2DTerm, GuideDistanceTerm, TripletTerm
from dinov2_hier.losses.term_base import (
    _HEAD_KINDS,
    HeadKind,
    SupervisedTerm,
    _check_dim,
    build_head,
    build_projection,
)

__all__ = [
    "SUPERVISED_TERMS",
    "DistanceTerm",
    "FlatCETerm",
    "HierCETerm",
    "HierSupConTerm",
    "MultiLevelCETerm",
    "SupConTerm",
    "BodaTerm",
    "SupervisedConfigError",
    "SupervisedTerm",
    "build_head",
    "build_supervised_terms",
]

# Loss names SSLMetaArch.compute_losses already uses: a term key must not overwrite them.
_RESERVED_KEYS = frozenset({"dino", "ibot", "koleo", "total"})
_ENTRY_KEYS = ("name", "key", "weight")


class SupervisedConfigError(UserError, ValueError):
    """A supervised-term entry is invalid (unknown name or key, bad value, duplicate key)."""


class _LeafLogitTerm(SupervisedTerm):
    """A head to leaf logits followed by a loss on ``(leaf_logits, targets)``."""

    def __init__(self, hierarchy: Hierarchy, embed_dim: int, head: HeadKind, hidden_dim: int) -> None:
        super().__init__(hierarchy, embed_dim)
        self.head = build_head(embed_dim, hierarchy.num_leaves, head, hidden_dim)
        self.criterion: nn.Module

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.head(tokens), targets)


class HierCETerm(_LeafLogitTerm):
    """Head to leaf logits + :class:`~dinov2_hier.losses.HierCELoss` (coarse labels count)."""

    name = "hierce"

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        alpha: float = 0.5,
        head: HeadKind = "mlp",
        hidden_dim: int = 2048,
        normalize: bool = False,
    ) -> None:
        super().__init__(hierarchy, embed_dim, head, hidden_dim)
        self.criterion = HierCELoss(hierarchy, alpha=alpha, normalize=normalize)


class FlatCETerm(_LeafLogitTerm):
    """Head to leaf logits + :class:`~dinov2_hier.losses.FlatCELoss` (coarse labels dropped).

    ``class_weights``: None (plain CE) or one weight per leaf, a list in leaf order
    (``Hierarchy.leaves``) or a mapping ``{leaf id: weight}``, e.g. in a config
    ``{"name": "ce", "class_weights": {"band": 2.0, ...}}``; "balanced" weights are computed
    from the labels beforehand (:func:`dinov2_hier.losses.class_weights.balanced_class_weights`).
    """

    name = "ce"

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        head: HeadKind = "mlp",
        hidden_dim: int = 2048,
        class_weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(hierarchy, embed_dim, head, hidden_dim)
        self.criterion = FlatCELoss(hierarchy, class_weights=class_weights)


class DistanceTerm(_LeafLogitTerm):
    """Head to leaf logits + :class:`~dinov2_hier.losses.DistanceLoss`."""

    name = "distance"

    def __init__(self, hierarchy: Hierarchy, embed_dim: int, head: HeadKind = "mlp", hidden_dim: int = 2048) -> None:
        super().__init__(hierarchy, embed_dim, head, hidden_dim)
        self.criterion = DistanceLoss(hierarchy)


class MultiLevelCETerm(SupervisedTerm):
    """One classifier per depth + :class:`~dinov2_hier.losses.MultiLevelCELoss`.

    ``head: linear``: one linear layer per level on the CLS token. ``head: mlp``: a
    shared hidden layer (Linear-GELU, ``hidden_dim``) then one linear layer per level,
    the "multi-head MLP classifier" of Chossegros et al. 3.7.1.
    """

    name = "multilevel_ce"

    def __init__(self, hierarchy: Hierarchy, embed_dim: int, head: HeadKind = "mlp", hidden_dim: int = 2048) -> None:
        super().__init__(hierarchy, embed_dim)
        self.criterion = MultiLevelCELoss(hierarchy)
        if head == "linear":
            self.trunk: nn.Module = nn.Identity()
            width = embed_dim
        elif head == "mlp":
            _check_dim("hidden_dim", hidden_dim)
            self.trunk = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU())
            width = hidden_dim
        else:
            raise LossInputError(f"head must be one of {_HEAD_KINDS}, got {head!r}{suggest(head, _HEAD_KINDS)}")
        self.level_heads = nn.ModuleList(nn.Linear(width, size) for size in self.criterion.level_sizes)

    def level_logits(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """``[n, D]`` -> ``[n, level_sizes[d - 1]]`` for ``d = 1 .. max_depth``."""
        hidden = self.trunk(tokens)
        return [head(hidden) for head in self.level_heads]

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.level_logits(tokens), targets)


class _ContrastiveTerm(SupervisedTerm):
    """Optional projection head, then a contrastive loss over the ``2B`` crops."""

    pairwise = True

    def __init__(
        self, hierarchy: Hierarchy, embed_dim: int, projection_dim: int, head: HeadKind, hidden_dim: int
    ) -> None:
        super().__init__(hierarchy, embed_dim)
        self.projection = build_projection(embed_dim, projection_dim, head, hidden_dim)


class SupConTerm(_ContrastiveTerm):
    """Optional projection + :class:`~dinov2_hier.losses.SupConLoss` on leaf labels only."""

    name = "supcon"

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        temperature: float = 0.1,
        projection_dim: int = 0,
        head: HeadKind = "mlp",
        hidden_dim: int = 2048,
    ) -> None:
        super().__init__(hierarchy, embed_dim, projection_dim, head, hidden_dim)
        self.criterion = SupConLoss(temperature, hierarchy=hierarchy)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.projection(tokens), targets)


class HierSupConTerm(_ContrastiveTerm):
    """Optional projection + :class:`~dinov2_hier.losses.HierSupConLoss`."""

    name = "hiersupcon"

    def __init__(
        self,
        hierarchy: Hierarchy,
        embed_dim: int,
        temperature: float = 0.1,
        projection_dim: int = 0,
        head: HeadKind = "mlp",
        hidden_dim: int = 2048,
        level_weights: Sequence[float] | None = None,
        dedup: bool = False,
    ) -> None:
        super().__init__(hierarchy, embed_dim, projection_dim, head, hidden_dim)
        self.criterion = HierSupConLoss(hierarchy, temperature=temperature, level_weights=level_weights, dedup=dedup)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Crop-major rows: row i and row i + B are the two crops of image i (dedup keeps both).
        sample_ids = torch.arange(tokens.shape[0] // 2, device=tokens.device).repeat(2)
        return self.criterion(self.projection(tokens), targets, sample_ids=sample_ids)


# Read-only: the registry is a constant of the module, never mutated.
SUPERVISED_TERMS: Mapping[str, type[SupervisedTerm]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            HierCETerm, FlatCETerm, SupConTerm, HierSupConTerm, MultiLevelCETerm, DistanceTerm,
            Guide2DTerm, GuideDistanceTerm, TripletTerm, BodaTerm,
        )
    }
)


# --------------------------------------------------------------------------- registry


def term_options(cls: type[SupervisedTerm]) -> tuple[str, ...]:
    """The constructor arguments an entry may set for ``cls`` (after ``hierarchy, embed_dim``)."""
    params = list(inspect.signature(cls.__init__).parameters)
    given = ("self", "hierarchy", "embed_dim") + (("domains",) if cls.uses_domains else ())
    return tuple(p for p in params if p not in given)


def build_supervised_terms(
    entries: Sequence[Mapping[str, Any]] | None, hierarchy: Hierarchy, embed_dim: int,
    domains: Sequence[str] | None = None,
) -> tuple[nn.ModuleDict, dict[str, float]]:
    """Build the supervised terms of a run.

    Args:
        entries: one mapping per term: ``name`` (a key of :data:`SUPERVISED_TERMS`),
            optional ``weight`` (finite, >= 0, default 1.0), optional ``key`` (the term's
            name in the ModuleDict and the logged losses; default ``name``, required to
            list the same loss twice) and the term's constructor arguments. ``None`` or
            ``[]``: no supervision.
        hierarchy: the class tree the targets index into.
        embed_dim: width ``D`` of the CLS tokens.
        domains: the domain vocabulary (``supervision.domains``: dataset names, index =
            domain id) given to the terms that declare ``uses_domains`` (``boda``); such a
            term without it is a :class:`SupervisedConfigError`.

    Returns:
        ``(terms, weights)``: ``nn.ModuleDict`` key -> term, in entry order, and key -> weight.

    Raises:
        SupervisedConfigError: naming the entry (position and name) and the valid options.
    """
    terms = nn.ModuleDict()
    weights: dict[str, float] = {}
    if entries is None:
        return terms, weights
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise SupervisedConfigError(f"supervised entries must be a list of mappings, got {type(entries).__name__}")
    for position, entry in enumerate(entries):
        key, weight, term = _build_entry(position, entry, hierarchy, embed_dim, taken=terms.keys(), domains=domains)
        terms[key] = term
        weights[key] = weight
    return terms, weights


def _build_entry(
    position: int, entry: Any, hierarchy: Hierarchy, embed_dim: int, taken: Any, domains: Sequence[str] | None = None
) -> tuple[str, float, SupervisedTerm]:
    where = f"supervised entry #{position}"
    if not isinstance(entry, Mapping):
        raise SupervisedConfigError(f"{where} must be a mapping with a 'name', got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or name not in SUPERVISED_TERMS:
        raise SupervisedConfigError(
            f"{where}: unknown supervised loss name {name!r}; valid names: {', '.join(SUPERVISED_TERMS)}"
            f"{suggest(name, SUPERVISED_TERMS)}"
        )
    where = f"{where} ({name!r})"
    cls = SUPERVISED_TERMS[name]
    options = term_options(cls)
    allowed = _ENTRY_KEYS + options
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        hints = "".join(suggest(k, allowed, n=1) for k in unknown)
        raise SupervisedConfigError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; valid keys: {', '.join(allowed)}{hints}"
        )
    key = _entry_key(where, entry.get("key", name), taken)
    weight = _entry_weight(where, entry.get("weight", 1.0))
    kwargs = {k: _plain(v) for k, v in entry.items() if k in options}
    if cls.uses_domains:
        if not domains:
            raise SupervisedConfigError(
                f"{where}: needs the domain vocabulary supervision.domains (a list of dataset names; the "
                "trainer sets it from the training sources when it is null)"
            )
        kwargs["domains"] = [str(d) for d in domains]
    try:
        term = cls(hierarchy, embed_dim, **kwargs)
    except (ValueError, TypeError) as exc:
        raise SupervisedConfigError(f"{where}: {exc}; valid keys: {', '.join(allowed)}") from exc
    return key, weight, term


def _entry_key(where: str, key: Any, taken: Any) -> str:
    if not isinstance(key, str) or not key or "." in key or key != key.strip():
        raise SupervisedConfigError(
            f"{where}: 'key' must be a non-empty string without '.' or surrounding spaces, got {key!r}"
        )
    if key in _RESERVED_KEYS:
        reserved = ", ".join(sorted(_RESERVED_KEYS))
        raise SupervisedConfigError(f"{where}: key {key!r} is reserved for another loss ({reserved})")
    if key in taken:
        raise SupervisedConfigError(
            f"{where}: key {key!r} is used twice; give each repeated loss its own 'key' (e.g. key: {key}_2)"
        )
    return key


def _entry_weight(where: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise SupervisedConfigError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _plain(value: Any) -> Any:
    """Config containers (e.g. OmegaConf ListConfig) -> plain lists / dicts."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value
