"""Biologically constrained multi-label classification on frozen features.

Mouadden et al., "Biologically-Constrained Multi-Label Classification with Learnable Domain
Knowledge" (section 3; hyperparameters 3.4; ablations 4.3). Shapes: ``B`` images, ``d``
feature width (the backbone's ``embed_dim``), ``K`` classes, ``M`` Monte-Carlo dropout
passes, ``h`` relation token width.

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

Loss (:func:`constrained_loss`), ``L = L_BCE + l1 L_con + l2 L_unc + l3 L_ent``:

* ``L_BCE``: binary cross-entropy summed over classes, averaged over images and the
  ``M_train`` dropout passes (eq. 2). Class weights inverse to frequency
  (``class_weighting="balanced"``): positives of class ``k`` weigh ``1 / (2 p_k)``,
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

Optimiser (:func:`fit_constrained_head`): AdamW with three groups, the constraint module
(projection and relation module, lr ``1e-4``), the uncertainty parts (``alpha``, ``beta``,
``delta``, lr ``5e-5``, no weight decay so they are not pulled to 0) and the classifier
(lr ``1e-4``); weight decay on weight matrices only. The backbone is frozen: the head
trains on cached features.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2_hier.io import load_error_message
from dinov2_hier.constraints import ConstraintMatrix
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
    "FitResult",
    "HeadOutput",
    "MultiLabelPrediction",
    "RelationModule",
    "bernoulli_kl",
    "class_weights",
    "constrained_loss",
    "decode_exclusive",
    "fit_constrained_head",
    "impossible_mask",
    "load_head",
    "predict",
    "relation_entropy",
    "relation_loss",
    "save_head",
    "uncertainty_loss",
    "weighted_bce",
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


# --------------------------------------------------------------------------- losses


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


# --------------------------------------------------------------------------- training and prediction


@dataclass
class FitResult:
    """A trained head (eval mode), per-epoch mean loss terms and the training time in s."""

    head: ConstrainedMultiLabelHead
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    n_train: int = 0


def _as_tensor(x: Any, dtype: torch.dtype, device: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device=device, dtype=dtype)


def fit_constrained_head(features: Any, targets: Any, config: ConstrainedConfig | None = None,
                         constraints: ConstraintMatrix | None = None, *, seed: int = 0, device: Any = "cpu",
                         log: Any = None) -> FitResult:
    """Train a :class:`ConstrainedMultiLabelHead` on frozen ``features [N, d]`` and binary
    ``targets [N, K]`` (columns in ``constraints.classes`` order).

    Deterministic for a given ``seed`` on CPU (initialisation under a forked RNG, shuffling
    and dropout from seeded generators). ``log``: optional ``callable(str)`` called once per
    epoch with the mean loss terms.
    """
    cfg = (config or ConstrainedConfig()).validate()
    x = _as_tensor(features, torch.float32, device)
    y = _as_tensor(targets, torch.float32, device)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConstrainedHeadError(f"features [N, d] and targets [N, K] must be 2-D with the same N > 0, "
                                   f"got {tuple(x.shape)} and {tuple(y.shape)}")
    n, k = y.shape
    if constraints is not None and constraints.num_classes != k:
        raise ConstrainedHeadError(f"targets have {k} classes, constraint matrix '{constraints.name}' "
                                   f"{constraints.num_classes}")
    if constraints is None and cfg.constraints != "off":
        raise ConstrainedHeadError(f"constraints={cfg.constraints!r} needs a constraint matrix")
    prior = exclusive = None
    if constraints is not None:
        prior = constraints.binary() if cfg.constraints == "binary" else constraints.effective()
        exclusive = constraints.exclusive_mask()
    freq = y.mean(0).cpu()
    dev = torch.device(device)
    cuda_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        head = ConstrainedMultiLabelHead(x.shape[1], k, cfg, prior=prior, exclusive=exclusive, class_frequency=freq)
    w_pos, w_neg = class_weights(freq, cfg.class_weighting, n_samples=n)
    head.pos_weight.copy_(w_pos)
    head.neg_weight.copy_(w_neg)
    head.to(dev)
    head.set_standardization(x)
    optimizer = torch.optim.AdamW(head.parameter_groups())
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    drop = torch.Generator(device=dev).manual_seed(seed + 1)
    head.train()
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=shuffle).to(dev)
        sums = {key: 0.0 for key in ("total", "bce", "con", "unc", "ent")}
        steps = 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            out = head(x[idx], cfg.mc_samples_train, mc_dropout=True, generator=drop)
            losses = constrained_loss(head, out, y[idx])
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            for key in sums:
                sums[key] += float(losses[key].detach())
            steps += 1
        record = {"epoch": epoch + 1, **{key: v / steps for key, v in sums.items()}}
        history.append(record)
        if log is not None:
            log(" ".join(f"{key}={v:.4f}" if isinstance(v, float) else f"{key}={v}" for key, v in record.items()))
    head.eval()
    return FitResult(head, history, time.perf_counter() - start, n)


@dataclass
class MultiLabelPrediction:
    """Predictions for ``n`` images (numpy): ``probabilities``, ``uncertainty``,
    ``thresholds`` float ``[n, K]``; ``raw`` (after thresholding) and ``decoded`` (after
    removing exclusive pairs; equal to ``raw`` when the head does not decode) bool
    ``[n, K]``; ``relation_mean`` and ``gram_mean`` (mean ``R`` and ``R R^T`` over the
    images) float ``[K, K]`` or None without the relation module."""

    probabilities: np.ndarray
    uncertainty: np.ndarray
    thresholds: np.ndarray
    raw: np.ndarray
    decoded: np.ndarray
    relation_mean: np.ndarray | None
    gram_mean: np.ndarray | None

    def __len__(self) -> int:
        return len(self.probabilities)


@torch.no_grad()
def predict(head: ConstrainedMultiLabelHead, features: Any, *, mc_samples: int | None = None,
            mc_dropout: bool = True, batch_size: int = 512, seed: int = 0) -> MultiLabelPrediction:
    """MC-dropout predictions of ``features [n, d]`` in batches (seeded dropout masks)."""
    head.eval()
    dev = head.feature_mean.device
    x = _as_tensor(features, torch.float32, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("p", "u", "t", "raw", "dec")}
    rel_sum = gram_sum = None
    for i in range(0, x.shape[0], batch_size):
        out = head(x[i:i + batch_size], mc_samples, mc_dropout=mc_dropout, generator=gen)
        raw = out.mean >= out.thresholds
        dec = decode_exclusive(raw, out.mean, head.exclusive) if head.config.decodes else raw
        for key, value in (("p", out.mean), ("u", out.uncertainty), ("t", out.thresholds), ("raw", raw), ("dec", dec)):
            parts[key].append(value.cpu().numpy())
        if out.relation is not None:
            r = out.relation.double()
            rs, gs = r.sum(0), (r @ r.transpose(1, 2)).sum(0)
            rel_sum = rs if rel_sum is None else rel_sum + rs
            gram_sum = gs if gram_sum is None else gram_sum + gs
    k = head.num_classes
    cat = {key: np.concatenate(v) if v else np.zeros((0, k)) for key, v in parts.items()}
    n = max(int(x.shape[0]), 1)
    return MultiLabelPrediction(
        cat["p"].astype(np.float64), cat["u"].astype(np.float64), cat["t"].astype(np.float64),
        cat["raw"].astype(bool), cat["dec"].astype(bool),
        None if rel_sum is None else (rel_sum / n).cpu().numpy(),
        None if gram_sum is None else (gram_sum / n).cpu().numpy(),
    )


# --------------------------------------------------------------------------- saving


def save_head(path: str | Path, head: ConstrainedMultiLabelHead, classes: Sequence[str],
              constraints: ConstraintMatrix | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the head (state dict, config, classes, constraint matrix, ``extra`` JSON-like
    metadata) atomically; :func:`load_head` reads it with ``weights_only=True``."""
    from dinov2_hier.io import atomic_torch_save

    payload = {
        "format": HEAD_FORMAT,
        "config": asdict(head.config),
        "in_dim": head.in_dim,
        "classes": list(classes),
        "constraints": constraints.to_dict() if constraints is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "extra": dict(extra or {}),
    }
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def load_head(path: str | Path, device: Any = "cpu") -> tuple[ConstrainedMultiLabelHead, dict[str, Any]]:
    """``(head in eval mode, payload)`` from a :func:`save_head` file.

    Raises:
        ConstrainedHeadError: not such a file, or weights that do not fit.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refusals, truncated or foreign files
        raise ConstrainedHeadError(f"constrained head: {load_error_message(path, err)}") from None
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise ConstrainedHeadError(f"{path}: not a constrained head file (format {HEAD_FORMAT!r})")
    cfg = ConstrainedConfig.from_dict(dict(payload["config"]))
    state = payload["state_dict"]
    k = len(payload["classes"])
    # Shapes before building: a recorded in_dim or class list that does not fit the weights
    # would otherwise size a [in_dim, in_dim] projection and [K*K, in_dim] relation first.
    weight = state.get("classifier.weight") if isinstance(state, dict) else None
    in_dim = payload.get("in_dim")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (k, in_dim):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else "missing"
        raise ConstrainedHeadError(
            f"{path}: weights do not fit the recorded configuration: 'classifier.weight' is {shape}, "
            f"the recorded {k} classes and in_dim {in_dim!r} need ({k}, {in_dim!r}) (the head was not built)"
        )
    head = ConstrainedMultiLabelHead(int(payload["in_dim"]), k, cfg, prior=state["prior"],
                                     exclusive=state["exclusive"], class_frequency=state["thresholds.class_frequency"])
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ConstrainedHeadError(f"{path}: weights do not fit the recorded configuration: {err}") from None
    return head.to(device).eval(), payload
