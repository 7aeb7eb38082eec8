"""Biologically constrained multi-label classification on frozen features.

Mouadden et al., "Biologically-Constrained Multi-Label Classification with Learnable Domain
Knowledge" (section 3; hyperparameters 3.4; ablations 4.3). Shapes: ``B`` images, ``d``
feature width (the backbone's ``embed_dim``), ``K`` classes, ``M`` Monte-Carlo dropout
passes, ``h`` relation token width.

This module trains, applies, saves and loads the head; the head itself (configuration,
blocks, decoding) is :mod:`dinov2_hier.heads.constrained_head` and its loss
:mod:`dinov2_hier.heads.constrained_loss`. Every public name of both is re-exported here.

Optimiser (:func:`fit_constrained_head`): AdamW with three groups, the constraint module
(projection and relation module, lr ``1e-4``), the uncertainty parts (``alpha``, ``beta``,
``delta``, lr ``5e-5``, no weight decay so they are not pulled to 0) and the classifier
(lr ``1e-4``); weight decay on weight matrices only. The backbone is frozen: the head
trains on cached features.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dinov2_hier.heads.constrained_head as _head_module
import dinov2_hier.heads.constrained_loss as _loss_module
from dinov2_hier.constraints import ConstraintMatrix
from dinov2_hier.heads.constrained_head import (  # noqa: F401 (re-exported: see __all__)
    CONSTRAINT_MODES,
    HEAD_FORMAT,
    THRESHOLD_MODES,
    AdaptiveThresholds,
    ConstrainedConfig,
    ConstrainedHeadError,
    ConstrainedMultiLabelHead,
    FeatureProjection,
    HeadOutput,
    RelationModule,
    class_weights,
    decode_exclusive,
    impossible_mask,
)
from dinov2_hier.heads.constrained_loss import (  # noqa: F401 (re-exported: see __all__)
    bernoulli_kl,
    constrained_loss,
    relation_entropy,
    relation_loss,
    uncertainty_loss,
    weighted_bce,
)
from dinov2_hier.io import load_error_message

# This module's names, then every public name of the head and of its loss (re-exported).
__all__ = [
    "FitResult",
    "MultiLabelPrediction",
    "fit_constrained_head",
    "load_head",
    "predict",
    "save_head",
    *_head_module.__all__,
    *_loss_module.__all__,
]


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
