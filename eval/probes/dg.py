"""Domain-generalisation probes on frozen features (issue 21; Umer et al.):
:class:`DGProbe` trains a small MLP head on source-domain features with one of

* ``"erm"``   -- cross-entropy only (Vapnik's empirical risk minimisation);
* ``"coral"`` -- CE + ``lambd`` * the CORAL alignment of the source domains' hidden features
  (:func:`~dinov2_hier.losses.domain.macro_alignment_loss`: Deep CORAL + the mean offset);
* ``"dann"``  -- CE + a domain classifier behind a gradient-reversal layer (Ganin et al.,
  2016), with its own optimiser; both follow DANN's schedules (below);
* ``"boda"``  -- CE + ``lambd`` * (BoDA + ``macro`` * the CORAL-like macro term), the
  centroids in a :class:`~dinov2_hier.losses.domain.DomainCentroids`;
* ``"boda+"`` -- the paper's decoupled "Ours+": ``"boda"``, then the classifier layer alone
  is re-initialised and re-trained on the frozen hidden features with class-balanced
  sampling.

Arrays in, predictions out (scikit-learn style: ``fit(X, y, domains)``, ``predict``,
``predict_proba``, ``classes_``). Features are standardised inside with the training rows'
mean and standard deviation. Everything random (initialisation, batch order, sampling)
comes from ``seed``, and the CPU run is deterministic.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2_hier.losses.domain import DomainCentroids, boda_loss, grad_reverse, macro_alignment_loss

from .base import _as_features, _as_labels

__all__ = ["DG_METHODS", "DGProbe"]

DG_METHODS = ("erm", "coral", "dann", "boda", "boda+")

#: Default ``lambd`` per method. CORAL and BoDA: 1, the weight the CORAL and BoDA papers
#: train with (neither Umer et al. nor our measurements gave a reason to move it; the
#: synthetic test of tests/test_dg_probe.py gains at 1). DANN: 1 is the final coefficient
#: of the gradient-reversal ramp, as in Ganin et al.
DEFAULT_LAMBDA = {"erm": 0.0, "coral": 1.0, "dann": 1.0, "boda": 1.0, "boda+": 1.0}


class DGProbe:
    """A small MLP head (``Linear -> ReLU -> Linear``) trained for domain generalisation.

    Args:
        method: one of :data:`DG_METHODS`.
        hidden: width of the hidden layer, whose activations ``z`` are aligned.
        lambd: weight of the domain term (None: :data:`DEFAULT_LAMBDA`).
        epochs, lr, batch_size, weight_decay: Adam on shuffled mini-batches.
        temperature, form, nu: passed to :func:`~dinov2_hier.losses.domain.boda_loss`
            (defaults: T = 1, the released form, nu = 0.5).
        macro: weight of the macro alignment term inside ``"boda"`` (1: the released code
            adds it at the BoDA term's weight; 0: BoDA alone).
        momentum: of the centroids (:class:`DomainCentroids`; updated every step).
        rt_epochs: epochs of ``"boda+"``'s classifier re-training (None: ``epochs``).
        seed: the one source of randomness.

    BoDA's counts are the training rows per (domain, class) divided by their mean over the
    present pairs: the calibration ratios are unchanged and the released form's ``1/N_own``
    stays near 1 (with raw counts of hundreds it would shrink every logit towards 0). A pair
    joins the loss once its centroid has been updated.

    DANN: at progress ``p`` in [0, 1] the reversal coefficient is
    ``lambd * (2 / (1 + exp(-10 p)) - 1)`` and both optimisers' learning rate is
    ``lr / (1 + 10 p)^0.75`` (Ganin et al.'s schedules); the domain classifier
    (``Linear -> ReLU -> Linear``) has its own Adam.
    """

    #: :func:`eval.crossval.run_probes` passes the training rows' groups (domains) to ``fit``.
    uses_groups = True

    def __init__(
        self,
        method: str = "erm",
        *,
        hidden: int = 128,
        lambd: float | None = None,
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 64,
        weight_decay: float = 1e-4,
        temperature: float = 1.0,
        form: str = "released",
        nu: float = 0.5,
        macro: float = 1.0,
        momentum: float = 0.9,
        rt_epochs: int | None = None,
        seed: int = 0,
    ) -> None:
        if method not in DG_METHODS:
            raise ValueError(f"method must be one of {DG_METHODS}, got {method!r}")
        self.method, self.hidden, self.epochs, self.lr = method, int(hidden), int(epochs), float(lr)
        self.lambd = DEFAULT_LAMBDA[method] if lambd is None else float(lambd)
        self.batch_size, self.weight_decay, self.seed = int(batch_size), float(weight_decay), int(seed)
        self.temperature, self.form, self.nu, self.macro = float(temperature), form, float(nu), float(macro)
        self.momentum = float(momentum)
        self.rt_epochs = self.epochs if rt_epochs is None else int(rt_epochs)

    def settings(self) -> dict[str, Any]:
        """The hyper-parameters, as metrics.json records them."""
        return {"method": self.method, "hidden": self.hidden, "lambd": self.lambd, "epochs": self.epochs,
                "lr": self.lr, "batch_size": self.batch_size, "weight_decay": self.weight_decay,
                "temperature": self.temperature, "form": self.form, "nu": self.nu, "macro": self.macro,
                "momentum": self.momentum, "rt_epochs": self.rt_epochs, "seed": self.seed}

    @property
    def name(self) -> str:
        """The probe's name in metrics.json and predictions.csv: ``dg_erm``, ..., ``dg_boda_plus``."""
        return "dg_" + self.method.replace("+", "_plus")

    # -- fitting --------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, domains: Any) -> "DGProbe":
        """Train on rows ``X`` ``[n, F]`` with labels ``y`` ``[n]`` and domains ``[n]``
        (any hashable values; classes and domains are their sorted unique values)."""
        X = _as_features(X).astype(np.float64)
        y = _as_labels(y, X.shape[0])
        dom = _as_labels(domains, X.shape[0])
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.domains_, d_idx = np.unique(dom, return_inverse=True)
        self.mean_ = X.mean(0)
        std = X.std(0)
        self.scale_ = np.where(std > 0, std, 1.0)
        Xt = torch.as_tensor((X - self.mean_) / self.scale_, dtype=torch.float32)
        yt, dt = torch.as_tensor(y_idx, dtype=torch.long), torch.as_tensor(d_idx, dtype=torch.long)
        n_cls, n_dom = len(self.classes_), len(self.domains_)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.encoder_ = nn.Sequential(nn.Linear(Xt.shape[1], self.hidden), nn.ReLU())
            self.classifier_ = nn.Linear(self.hidden, n_cls)
            disc = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_dom))
            gen = torch.Generator().manual_seed(self.seed)
            self._train(Xt, yt, dt, n_cls, n_dom, disc, gen)
            if self.method == "boda+":
                self._retrain_classifier(Xt, yt, n_cls, gen)
        return self

    def _train(self, X, y, d, n_cls, n_dom, disc, gen) -> None:
        head = list(self.encoder_.parameters()) + list(self.classifier_.parameters())
        opt = torch.optim.Adam(head, lr=self.lr, weight_decay=self.weight_decay)
        opt_d = torch.optim.Adam(disc.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        boda = self.method in ("boda", "boda+")
        if boda:
            self.centroids_ = DomainCentroids(n_dom, n_cls, self.hidden, momentum=self.momentum)
            pair_counts = torch.zeros(n_dom * n_cls).index_add_(0, d * n_cls + y, torch.ones(len(y)))
            pair_counts = pair_counts.view(n_dom, n_cls)
            pair_counts = pair_counts / pair_counts[pair_counts > 0].mean()
        per_epoch = math.ceil(len(y) / self.batch_size)
        total = max(self.epochs * per_epoch, 1)
        step = 0
        for _ in range(self.epochs):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), self.batch_size):
                idx = order[start : start + self.batch_size]
                xb, yb, db = X[idx], y[idx], d[idx]
                z = self.encoder_(xb)
                loss = F.cross_entropy(self.classifier_(z), yb)
                if self.method == "coral":
                    loss = loss + self.lambd * macro_alignment_loss(z, db)
                elif boda:
                    self.centroids_.update(z, yb, db)
                    counts = torch.where(self.centroids_.counts > 0, pair_counts, torch.zeros_like(pair_counts))
                    term = boda_loss(
                        z, yb, db, self.centroids_.centroids, counts,
                        temperature=self.temperature, form=self.form, nu=self.nu,
                    )
                    loss = loss + self.lambd * (term + self.macro * macro_alignment_loss(z, db))
                elif self.method == "dann":
                    p = step / total
                    coef = self.lambd * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)
                    for o in (opt, opt_d):
                        for group in o.param_groups:
                            group["lr"] = self.lr / (1.0 + 10.0 * p) ** 0.75
                    loss = loss + F.cross_entropy(disc(grad_reverse(z, coef)), db)
                opt.zero_grad(set_to_none=True)
                opt_d.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if self.method == "dann":
                    opt_d.step()
                step += 1

    def _retrain_classifier(self, X, y, n_cls, gen) -> None:
        """"Ours+": a fresh classifier layer on the frozen hidden features, each batch drawn
        with replacement so that every class is equally likely (weight 1 / n_class per row);
        as many steps per epoch as the first stage."""
        with torch.no_grad():
            Z = self.encoder_(X)
        self.classifier_ = nn.Linear(self.hidden, n_cls)
        opt = torch.optim.Adam(self.classifier_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        weights = (1.0 / torch.bincount(y, minlength=n_cls).float())[y]
        per_epoch = math.ceil(len(y) / self.batch_size)
        for _ in range(self.rt_epochs * per_epoch):
            idx = torch.multinomial(weights, self.batch_size, replacement=True, generator=gen)
            loss = F.cross_entropy(self.classifier_(Z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    # -- prediction -----------------------------------------------------------------------
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, n_classes]``, columns in the order of ``classes_``."""
        if not hasattr(self, "classifier_"):
            raise RuntimeError("DGProbe: call fit() before predict")
        X = _as_features(X).astype(np.float64)
        Xt = torch.as_tensor((X - self.mean_) / self.scale_, dtype=torch.float32)
        with torch.no_grad():
            return torch.softmax(self.classifier_(self.encoder_(Xt)), dim=1).numpy().astype(np.float64)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row (labels as strings, like the other probes)."""
        return self.classes_[self.predict_proba(X).argmax(1)]
