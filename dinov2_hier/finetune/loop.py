"""One fold of fine-tuning: AdamW with a warmup + cosine schedule, optional class-balanced
sampling, flips and mixup, an atomic checkpoint after every epoch and resume from the last.

Every random draw of epoch ``e`` of fold ``f`` comes from a generator seeded with
``(seed, f, e)`` (order, flips, mixup, dropout of each step), and each checkpoint holds the
model, the optimizer state and the epoch; so a run killed after any epoch and restarted
finishes with the same weights, to the bit on the same machine, as one never stopped.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dinov2_hier.io import atomic_torch_save

from .loss import FinetuneError, FinetuneLoss
from .mixup import mixup_batch
from .model import FinetuneModel, param_groups

__all__ = ["FinetuneConfig", "FinetuneError", "epoch_order", "lr_at", "predict", "train_fold"]

SAMPLINGS = ("none", "class")
#: ``on_epoch_end(fold, epoch)``: called after the epoch's checkpoint is on disk (tests
#: raise from it to simulate a kill).
EpochHook = Callable[[int, int], None]
Normalize = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FinetuneConfig:
    """What one fold trains with (recorded in every checkpoint and in metrics.json)."""

    mode: str = "linear"
    blocks: int = 0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    warmup_epochs: float = 0.0
    sampling: str = "none"
    mixup: float = 0.0
    flips: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise FinetuneError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise FinetuneError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.mixup < 0 or not math.isfinite(self.mixup):
            raise FinetuneError(f"--mixup must be >= 0 (0 = off), got {self.mixup}")
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            raise FinetuneError("--warmup-epochs and --weight-decay must be >= 0")


def _seed(*parts: int) -> int:
    """A 62-bit seed from integers (stable across processes, unlike ``hash``)."""
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 62)
    return value


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(targets: torch.Tensor, sampling: str, generator: torch.Generator) -> torch.Tensor:
    """``[N]`` indices of one epoch: a permutation (``none``) or ``N`` draws with replacement,
    every class equally likely and uniform within a class (``class``)."""
    n = targets.shape[0]
    if sampling == "none":
        return torch.randperm(n, generator=generator)
    _, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    weights = 1.0 / counts.to(torch.float64)[inverse]
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in ckpt_dir.glob("epoch_*.pt") if ckpt_dir.is_dir() else []:
        try:
            found.append((int(path.stem.split("_")[1]), path))
        except ValueError:
            continue
    return sorted(found)


def train_fold(model: FinetuneModel, loss: FinetuneLoss, images: torch.Tensor, boxes: torch.Tensor,
               targets: torch.Tensor, normalize: Normalize, config: FinetuneConfig, *, fold: int = 0,
               ckpt_dir: Path | None = None, on_epoch_end: EpochHook | None = None,
               device: Any = "cpu") -> dict[str, Any]:
    """Train ``model`` (and ``loss``'s head, which is ``model.head``) in place on one fold.

    Args:
        images: uint8 ``[N, 3, S, S]`` from :meth:`EvalTransform.resize`; ``boxes`` int ``[N, 4]``.
        targets: long ``[N]`` node indices of ``loss.hierarchy`` (leaf indices with mixup).
        normalize: ``(uint8 [B, 3, S, S], boxes [B, 4]) -> float [B, 3, S, S]`` on ``device``.
        ckpt_dir: where ``epoch_EEEE.pt`` go (the last one kept); an existing one resumes.

    Returns:
        ``{"epochs_run", "resumed_from", "last_loss"}``.
    """
    config.check()
    num_leaves = loss.hierarchy.num_leaves
    if config.mixup > 0 and bool((targets >= num_leaves).any()):
        raise FinetuneError("--mixup needs leaf labels only; this training data has coarse (internal-node) labels")
    model.to(device)
    loss.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay, config.layer_decay))
    start, resumed = 0, None
    found = _checkpoints(ckpt_dir) if ckpt_dir is not None else []
    if found:
        epoch, path = found[-1]
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, resumed = epoch + 1, str(path)
    n = targets.shape[0]
    steps = math.ceil(n / config.batch_size)
    total, warmup = steps * config.epochs, round(config.warmup_epochs * steps)
    last = float("nan")
    for epoch in range(start, config.epochs):
        model.train()
        g = torch.Generator().manual_seed(_seed(config.seed, fold, epoch))
        order = epoch_order(targets, config.sampling, g)
        for step in range(steps):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            lr = lr_at(epoch * steps + step, total, warmup, config.lr, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x = normalize(images[idx].to(device), boxes[idx].to(device))
            y = targets[idx].to(device)
            step_seed = int(torch.randint(1 << 62, (1,), generator=g))
            if config.flips:
                flip = torch.rand(2, len(idx), generator=g) < 0.5
                x = torch.where(flip[0].to(device)[:, None, None, None], x.flip(-1), x)
                x = torch.where(flip[1].to(device)[:, None, None, None], x.flip(-2), x)
            if config.mixup > 0:
                x, y = mixup_batch(x, y, num_leaves, config.mixup, step_seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed)  # dropout / drop path of this step
                value = loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
            last = float(value.detach())
        if ckpt_dir is not None:
            path = ckpt_dir / f"epoch_{epoch:04d}.pt"
            atomic_torch_save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "config": asdict(config), "fold": fold}, path)
            for _, old in _checkpoints(ckpt_dir):
                if old != path:
                    old.unlink(missing_ok=True)
        if on_epoch_end is not None:
            on_epoch_end(fold, epoch)
    return {"epochs_run": config.epochs - start, "resumed_from": resumed, "last_loss": last}


@torch.no_grad()
def predict(model: FinetuneModel, images: torch.Tensor, boxes: torch.Tensor, normalize: Normalize,
            allowed: torch.Tensor | None = None, batch_size: int = 64, device: Any = "cpu") -> torch.Tensor:
    """Leaf indices ``long [N]``: the argmax of the head's logits over the ``allowed`` leaves
    (bool ``[L]``, e.g. the classes of the data; None = all)."""
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start:start + batch_size].to(device), boxes[start:start + batch_size].to(device))
        logits = model(x).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        out.append(logits.argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
