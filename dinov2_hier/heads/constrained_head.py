"""The constrained multi-label head: its configuration, blocks and decoding (the model of
:mod:`dinov2_hier.heads.constrained`, which trains, applies, saves and loads it; the paper
and the shapes ``B``, ``d``, ``K``, ``M``, ``h`` are described there).

Blocks (:class:`ConstrainedMultiLabelHead`):

* **Projection** (:class:`FeatureProjection`): ``f = LayerNorm(GELU(W_p x + b_p))``,
  ``x [B, d]`` the frozen feature (mean of the backbone's patch tokens, see
  ``eval.multilabel``), standardised with the training set's mean and std first (a
  buffer; ``standardize=False`` switches it off).
* **Relation matrix** (:class:`RelationModule`): ``R = softmax(Q K^T / sqrt(h)) V``, a
  ``K x K`` matrix per image. *Interpretation*: the paper writes ``Q = W_q f`` with
  ``W_q in R^{K x d}``, which makes ``Q``, ``K``, ``V`` vectors in ``R^K`` and
  ``softmax(Q K^T) V`` a vector, not the ``K x K`` matrix the paper describes; with literal
  vectors and ``R = softmax(QK^T) diag(V)`` the Gram matrix ``R R^T`` is entrywise
  non-negative and could never approach the ``-1`` entries of ``C``. We therefore read
  ``Q``, ``K`` as ``K`` class tokens of width ``h`` (``Q = (W_q f).view(K, h)``,
  ``W_q in R^{K h x d}``; ``h = 1`` is the paper's literal ``W_q in R^{K x d}``) and ``V`` as
  ``K`` value tokens of width ``K`` (``V = (W_v f).view(K, K)``), so that ``R`` is
  ``K x K`` and ``R R^T`` can take either sign. The scale is ``1/sqrt(h)``, the width of
  the dot product (the paper's ``1/sqrt(d)`` for its ``d``-wide projections). No biases, as
  in the paper (``relation_bias=True`` adds them). ``A = softmax(Q K^T / sqrt(h))`` is
  returned too (row-stochastic ``[B, K, K]``).
* **Classifier**: ``y^(m) = sigmoid(W_c Dropout(f) + b_c)``; ``M`` stochastic passes give the
  mean ``y_bar`` and the per-class variance ``U = mean_m (y^(m) - y_bar)^2`` (the
  population variance, as in section 3.2). Dropout masks come from a seeded ``torch.Generator``, so results
  are reproducible and the global RNG is untouched. With dropout 0 or one pass ``U`` is 0.
* **Adaptive thresholds** (:class:`AdaptiveThresholds`):
  ``t_i = alpha_i t_base + beta_i U_i + delta_i p_i``, ``p_i`` the class frequency of the
  training set; ``alpha = 1``, ``beta = delta = 0`` at the start (every threshold starts at
  ``t_base = 0.5``). A class is predicted when ``y_bar_i >= t_i``.
* **Decoding** (:func:`decode_exclusive`): after thresholding, classes are accepted in
  order of decreasing ``y_bar`` (ties: lower index first) and a class that is exclusive
  (``-1`` in either direction of ``C``) with an accepted one is dropped, so the more
  confident class of every conflicting pair is kept and no prediction holds an exclusive
  pair.

Ablation switches (:class:`ConstrainedConfig`), the paper's "Constraint Layer Variants" and
"Threshold Mechanism" (section 4.3):

* ``constraints="off"``: no relation module, no ``L_con``/``L_ent``, no decoding (base model);
* ``constraints="fixed"``: no relation module; the exclusive pairs of ``C`` as fixed
  decoding rules ("hard-coding that hyper/hyposegmentation cannot co-occur");
* ``constraints="binary"``: relation module learning ``sign(C)`` (-1 / 0 / 1), decoding;
* ``constraints="soft"``: relation module learning ``C`` as given, decoding (the paper's);
* ``thresholds="static"``: ``t_i = t_base`` (0.5), no ``L_unc``;
* ``thresholds="class"``: ``t_i = alpha_i t_base`` learned per class, ``L_unc`` = the KL only;
* ``thresholds="uncertainty"``: ``t_i = alpha_i t_base + beta_i U_i + delta_i p_i``, full ``L_unc``.

"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2_hier.errors import UserError

__all__ = [
    "CONSTRAINT_MODES",
    "HEAD_FORMAT",
    "THRESHOLD_MODES",
    "AdaptiveThresholds",
    "ConstrainedConfig",
    "ConstrainedHeadError",
    "ConstrainedMultiLabelHead",
    "FeatureProjection",
    "HeadOutput",
    "RelationModule",
    "class_weights",
    "decode_exclusive",
    "impossible_mask",
]

CONSTRAINT_MODES = ("off", "fixed", "binary", "soft")
THRESHOLD_MODES = ("static", "class", "uncertainty")
HEAD_FORMAT = "dinov2_hier.constrained_head/1"


class ConstrainedHeadError(UserError, ValueError):
    """A configuration value or input that the constrained head cannot use; the message
    names the key or the input."""


@dataclass
class ConstrainedConfig:
    """Every setting of the head, its loss and its training; defaults from the paper (3.4)
    where it gives them. ``l1_weight`` is eq. 3's alpha, ``hinge_weight`` eq. 4's beta."""

    constraints: str = "soft"
    thresholds: str = "uncertainty"
    dropout: float = 0.5
    mc_samples: int = 50
    mc_samples_train: int = 8
    token_dim: int = 32
    relation_bias: bool = False
    t_base: float = 0.5
    lambda_con: float = 0.1
    lambda_unc: float = 0.1
    lambda_ent: float = 0.01
    l1_weight: float = 0.01
    hinge_weight: float = 0.1
    tau: float = 0.2
    temperature: float = 0.05
    constraint_diagonal: bool = False
    relation_reduction: str = "mean"
    class_weighting: str = "balanced"
    standardize: bool = True
    lr_constraint: float = 1e-4
    lr_uncertainty: float = 5e-5
    lr_classifier: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 100
    batch_size: int = 64

    def validate(self) -> ConstrainedConfig:
        """Return self; raise :class:`ConstrainedHeadError` naming the first bad key."""
        if self.constraints not in CONSTRAINT_MODES:
            raise ConstrainedHeadError(f"constraints must be one of {CONSTRAINT_MODES}, got {self.constraints!r}")
        if self.thresholds not in THRESHOLD_MODES:
            raise ConstrainedHeadError(f"thresholds must be one of {THRESHOLD_MODES}, got {self.thresholds!r}")
        if self.relation_reduction not in ("mean", "sum"):
            raise ConstrainedHeadError(f"relation_reduction must be 'mean' or 'sum', got {self.relation_reduction!r}")
        if self.class_weighting not in ("balanced", "none"):
            raise ConstrainedHeadError(f"class_weighting must be 'balanced' or 'none', got {self.class_weighting!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConstrainedHeadError(f"dropout must be in [0, 1), got {self.dropout}")
        for key in ("mc_samples", "mc_samples_train", "token_dim", "epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConstrainedHeadError(f"{key} must be an integer >= 1, got {value!r}")
        for key in ("lambda_con", "lambda_unc", "lambda_ent", "l1_weight", "hinge_weight", "tau", "weight_decay",
                    "lr_uncertainty"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ConstrainedHeadError(f"{key} must be a finite number >= 0, got {getattr(self, key)!r}")
        for key in ("temperature", "lr_constraint", "lr_classifier"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConstrainedHeadError(f"{key} must be a finite number > 0, got {getattr(self, key)!r}")
        return self

    @property
    def uses_relation(self) -> bool:
        """The learnable relation module (and ``L_con``, ``L_ent``) is on."""
        return self.constraints in ("binary", "soft")

    @property
    def decodes(self) -> bool:
        """Exclusive pairs are removed after thresholding."""
        return self.constraints != "off"

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ConstrainedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ConstrainedHeadError(f"unknown constrained-head setting(s) {unknown}; known: {sorted(known)}")
        return cls(**obj).validate()


# --------------------------------------------------------------------------- blocks


class FeatureProjection(nn.Module):
    """``[B, d] -> [B, d]``: ``LayerNorm(GELU(Linear(d, d)))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.linear(x)))


class RelationModule(nn.Module):
    """``f [B, d] -> (R [B, K, K], A [B, K, K])`` with ``R = A V``,
    ``A = softmax(Q K^T / sqrt(h))`` over the last axis, ``Q, K [B, K, h]``, ``V [B, K, K]``."""

    def __init__(self, dim: int, num_classes: int, token_dim: int = 32, bias: bool = False) -> None:
        super().__init__()
        self.num_classes, self.token_dim = int(num_classes), int(token_dim)
        self.query = nn.Linear(dim, num_classes * token_dim, bias=bias)
        self.key = nn.Linear(dim, num_classes * token_dim, bias=bias)
        self.value = nn.Linear(dim, num_classes * num_classes, bias=bias)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, h = f.shape[0], self.num_classes, self.token_dim
        q = self.query(f).view(b, k, h)
        key = self.key(f).view(b, k, h)
        v = self.value(f).view(b, k, k)
        attn = torch.softmax(q @ key.transpose(1, 2) / math.sqrt(h), dim=-1)
        return attn @ v, attn


class AdaptiveThresholds(nn.Module):
    """``U [..., K] -> t [..., K]`` per ``mode`` (see the module docstring).

    ``alpha``, ``beta``, ``delta`` are parameters in every mode (one state-dict layout);
    those a mode does not use have ``requires_grad=False`` and keep their initial values.
    """

    def __init__(self, num_classes: int, mode: str = "uncertainty", t_base: float = 0.5,
                 class_frequency: torch.Tensor | None = None) -> None:
        super().__init__()
        if mode not in THRESHOLD_MODES:
            raise ConstrainedHeadError(f"thresholds must be one of {THRESHOLD_MODES}, got {mode!r}")
        self.mode = mode
        self.alpha = nn.Parameter(torch.ones(num_classes), requires_grad=mode in ("class", "uncertainty"))
        self.beta = nn.Parameter(torch.zeros(num_classes), requires_grad=mode == "uncertainty")
        self.delta = nn.Parameter(torch.zeros(num_classes), requires_grad=mode == "uncertainty")
        self.register_buffer("t_base", torch.tensor(float(t_base)))
        freq = torch.zeros(num_classes) if class_frequency is None else torch.as_tensor(class_frequency).float()
        self.register_buffer("class_frequency", freq.clone())

    def forward(self, uncertainty: torch.Tensor) -> torch.Tensor:
        if self.mode == "static":
            return self.t_base.expand_as(uncertainty)
        if self.mode == "class":
            return (self.alpha * self.t_base).expand_as(uncertainty)
        return self.alpha * self.t_base + self.beta * uncertainty + self.delta * self.class_frequency


@dataclass
class HeadOutput:
    """One forward pass: ``logits [M, B, K]``, ``mean``/``uncertainty``/``thresholds``
    ``[B, K]``, ``relation``/``attention`` ``[B, K, K]`` (None without the relation module),
    ``embedding`` ``f [B, d]``."""

    logits: torch.Tensor
    mean: torch.Tensor
    uncertainty: torch.Tensor
    thresholds: torch.Tensor
    relation: torch.Tensor | None
    attention: torch.Tensor | None
    embedding: torch.Tensor


def class_weights(class_frequency: torch.Tensor, mode: str = "balanced",
                  n_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_pos [K], w_neg [K])``: ``1/(2p)`` and ``1/(2(1-p))`` with ``p`` clipped to
    ``[1/N, 1 - 1/N]`` (``N = n_samples``, default 1000) for ``"balanced"``; ones for ``"none"``."""
    p = torch.as_tensor(class_frequency).float()
    if mode == "none":
        return torch.ones_like(p), torch.ones_like(p)
    if mode != "balanced":
        raise ConstrainedHeadError(f"class_weighting must be 'balanced' or 'none', got {mode!r}")
    eps = 1.0 / float(n_samples or 1000)
    p = p.clamp(eps, 1.0 - eps)
    return 0.5 / p, 0.5 / (1.0 - p)


class ConstrainedMultiLabelHead(nn.Module):
    """Projection, relation module, MC-dropout classifier and adaptive thresholds.

    Args:
        in_dim: feature width ``d``.
        num_classes: ``K``.
        config: the :class:`ConstrainedConfig` (validated here).
        prior: ``[K, K]`` learning target of ``L_con`` (``effective()`` or ``binary()`` of a
            :class:`ConstraintMatrix`); needed for ``binary``/``soft``.
        exclusive: bool ``[K, K]`` exclusive pairs for decoding; needed unless ``off``.
        class_frequency: ``[K]`` training frequencies ``p_i`` (thresholds and class weights).
    """

    def __init__(self, in_dim: int, num_classes: int, config: ConstrainedConfig | None = None, *,
                 prior: Any = None, exclusive: Any = None, class_frequency: Any = None) -> None:
        super().__init__()
        self.config = (config or ConstrainedConfig()).validate()
        k = int(num_classes)
        self.in_dim, self.num_classes = int(in_dim), k
        cfg = self.config
        if cfg.uses_relation and prior is None:
            raise ConstrainedHeadError(f"constraints={cfg.constraints!r} needs a prior constraint matrix")
        if cfg.decodes and exclusive is None:
            raise ConstrainedHeadError(f"constraints={cfg.constraints!r} needs the exclusive pairs for decoding")
        for name, value, dtype in (("prior", prior, torch.float32), ("exclusive", exclusive, torch.bool)):
            t = torch.zeros(k, k, dtype=dtype) if value is None else torch.as_tensor(np.asarray(value)).to(dtype)
            if t.shape != (k, k):
                raise ConstrainedHeadError(f"{name} must be [{k}, {k}], got {tuple(t.shape)}")
            self.register_buffer(name, t.clone())
        freq = torch.zeros(k) if class_frequency is None else torch.as_tensor(np.asarray(class_frequency)).float()
        if freq.shape != (k,):
            raise ConstrainedHeadError(f"class_frequency must be [{k}], got {tuple(freq.shape)}")
        self.projection = FeatureProjection(in_dim)
        self.classifier = nn.Linear(in_dim, k)
        self.thresholds = AdaptiveThresholds(k, cfg.thresholds, cfg.t_base, freq)
        # Built last, so projection and classifier start from the same weights with or without it.
        self.relation = RelationModule(in_dim, k, cfg.token_dim, cfg.relation_bias) if cfg.uses_relation else None
        w_pos, w_neg = class_weights(freq, cfg.class_weighting)
        self.register_buffer("pos_weight", w_pos)
        self.register_buffer("neg_weight", w_neg)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    def set_standardization(self, features: torch.Tensor) -> None:
        """Store the mean and std ``[d]`` of the training ``features [N, d]`` (std floored at 1e-6)."""
        if self.config.standardize:
            self.feature_mean.copy_(features.mean(0))
            self.feature_std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, d]`` -> ``f [B, d]``."""
        return self.projection((x.float() - self.feature_mean) / self.feature_std)

    def forward(self, x: torch.Tensor, mc_samples: int | None = None, *, mc_dropout: bool = True,
                generator: torch.Generator | None = None) -> HeadOutput:
        """``x [B, d]`` -> :class:`HeadOutput` with ``M = mc_samples`` (default
        ``config.mc_samples``) dropout passes; ``mc_dropout=False`` (or dropout 0) is one
        deterministic pass with ``U = 0``."""
        f = self.embed(x)
        p = self.config.dropout
        m = int(mc_samples or self.config.mc_samples)
        if mc_dropout and p > 0:
            keep = torch.rand((m, *f.shape), device=f.device, generator=generator) >= p
            logits = self.classifier(f.unsqueeze(0) * keep / (1.0 - p))
        else:
            logits = self.classifier(f).unsqueeze(0)
        probs = torch.sigmoid(logits)
        mean = probs.mean(0)
        if probs.shape[0] > 1:
            uncertainty = ((probs - mean) ** 2).mean(0)
        else:
            uncertainty = torch.zeros_like(mean)
        relation, attention = self.relation(f) if self.relation is not None else (None, None)
        return HeadOutput(logits, mean, uncertainty, self.thresholds(uncertainty), relation, attention, f)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: constraint module (projection + relation), uncertainty parts
        (alpha/beta/delta that train in this mode), classifier; weight decay on matrices only."""
        cfg = self.config
        groups = []

        def split(module: nn.Module, lr: float, name: str) -> None:
            decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim >= 2]
            rest = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim < 2]
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "name": f"{name}_decay"})
            if rest:
                groups.append({"params": rest, "lr": lr, "weight_decay": 0.0, "name": name})

        constraint = nn.ModuleList([self.projection] + ([self.relation] if self.relation is not None else []))
        split(constraint, cfg.lr_constraint, "constraint")
        unc = [p for p in self.thresholds.parameters() if p.requires_grad]
        if unc:
            groups.append({"params": unc, "lr": cfg.lr_uncertainty, "weight_decay": 0.0, "name": "uncertainty"})
        split(self.classifier, cfg.lr_classifier, "classifier")
        return groups


# --------------------------------------------------------------------------- decoding


def decode_exclusive(decisions: torch.Tensor, scores: torch.Tensor, exclusive: torch.Tensor) -> torch.Tensor:
    """bool ``[B, K]`` decisions without exclusive pairs.

    Classes are visited in order of decreasing ``scores [B, K]`` (stable: lower index first
    on ties); a positive class is kept unless it is exclusive (``exclusive [K, K]`` bool,
    symmetric) with a class kept before it.
    """
    decisions = decisions.bool()
    ex = exclusive.bool().to(decisions.device)
    order = torch.sort(-scores.float(), dim=1, stable=True).indices
    kept = torch.zeros_like(decisions)
    for r in range(decisions.shape[1]):
        c = order[:, r]
        candidate = decisions.gather(1, c[:, None]).squeeze(1)
        conflict = (kept & ex[c]).any(1)
        kept.scatter_(1, c[:, None], (candidate & ~conflict)[:, None])
    return kept


def impossible_mask(decisions: Any, exclusive: Any) -> np.ndarray:
    """bool ``[B]``: the row holds at least one exclusive pair (numpy or torch inputs)."""
    d = np.asarray(decisions.cpu() if isinstance(decisions, torch.Tensor) else decisions).astype(np.float64)
    ex = np.asarray(exclusive.cpu() if isinstance(exclusive, torch.Tensor) else exclusive).astype(np.float64)
    np.fill_diagonal(ex, 0.0)
    return ((d @ ex) * d).sum(1) > 0
