"""One fold of fine-tuning: AdamW with a warmup + cosine schedule, optional class-balanced
sampling, flips and mixup, an atomic checkpoint after every epoch and resume from the last.

With ``head_epochs`` (LP-FT, Kumar et al. 2022) a partial or full fine-tuning first trains
the head alone on the frozen backbone for ``head_epochs`` epochs (its own AdamW at
``head_lr``, cosine to ``min_lr``), then everything the mode trains for ``epochs`` epochs.
Without it the randomly initialised head's first gradients reach the pretrained blocks
and can undo what pretraining learned (docs/finetune.md has the measurement).

Every random draw of epoch ``e`` of fold ``f`` comes from a generator seeded with
``(seed, f, e)`` (order, flips, mixup, dropout of each step), and each checkpoint holds the
model, the optimizer state and the epoch; so a run killed after any epoch and restarted
finishes with the same weights, to the bit on the same machine, as one never stopped.
"""
from __future__ import annotations

import contextlib
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

__all__ = ["FinetuneConfig", "FinetuneError", "epoch_length", "epoch_order", "lr_at", "predict", "train_fold"]

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
    samples_per_class: int = 0
    head_epochs: int = 0
    head_lr: float | None = None

    @property
    def head_phase_lr(self) -> float:
        """Learning rate of the head-only epochs: ``head_lr``, else ``lr``."""
        return self.lr if self.head_lr is None else self.head_lr

    @property
    def head_phase_epochs(self) -> int:
        """Epochs of head-only training before the backbone trains (0 for ``linear``)."""
        return 0 if self.mode == "linear" else self.head_epochs

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
        if self.samples_per_class < 0:
            raise FinetuneError(f"--samples-per-class must be >= 0 (0 = rows / classes), got {self.samples_per_class}")
        if self.samples_per_class and self.sampling != "class":
            raise FinetuneError("--samples-per-class applies to --sampling class only")
        if self.head_epochs < 0:
            raise FinetuneError(f"--head-epochs must be >= 0, got {self.head_epochs}")
        if self.head_epochs and self.mode == "linear":
            raise FinetuneError("--head-epochs applies to --mode partial or full (linear trains the head only anyway)")
        if self.head_lr is not None and not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            raise FinetuneError(f"--head-lr must be a finite number > 0, got {self.head_lr}")


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


def epoch_length(targets: torch.Tensor, sampling: str, samples_per_class: int = 0) -> int:
    """Rows per epoch of :func:`epoch_order`: ``N``, or ``C * N_c`` for ``class``."""
    n = targets.shape[0]
    if sampling == "none":
        return n
    n_classes = len(torch.unique(targets))
    return n_classes * (samples_per_class or math.ceil(n / n_classes))


def epoch_order(targets: torch.Tensor, sampling: str, generator: torch.Generator,
                samples_per_class: int = 0) -> torch.Tensor:
    """Indices of one epoch: a permutation of the ``N`` rows (``none``), or for ``class``
    every class exactly ``N_c`` times (Fazeli et al.'s balanced sampling: an epoch of
    ``C * N_c`` rows), shuffled. ``N_c`` is ``samples_per_class``, or ``ceil(N / C)`` when 0.
    A class's rows are taken in fresh permutations, so each row of a class with ``n`` rows
    appears ``floor(N_c / n)`` or ``ceil(N_c / n)`` times."""
    n = targets.shape[0]
    if sampling == "none":
        return torch.randperm(n, generator=generator)
    classes = torch.unique(targets)
    per_class = epoch_length(targets, sampling, samples_per_class) // len(classes)
    parts = []
    for c in classes.tolist():
        rows = torch.nonzero(targets == c).flatten()
        cycles = [rows[torch.randperm(len(rows), generator=generator)] for _ in range(math.ceil(per_class / len(rows)))]
        parts.append(torch.cat(cycles)[:per_class])
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=generator)]


def _autocast(device: Any) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as training and feature extraction), nothing on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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

    Coarse (internal-node) labels train only with ``hierce``; with ``ce``, which gives them
    no gradient, their rows are left out of the fold's training (counted in the result).

    Returns:
        ``{"epochs_run", "resumed_from", "last_loss", "n_coarse_left_out"}``.
    """
    config.check()
    num_leaves = loss.hierarchy.num_leaves
    coarse = targets >= num_leaves  # internal-node labels (leaves are the first node indices)
    n_coarse = int(coarse.sum())
    if n_coarse and loss.name == "ce":
        # CE gives coarse labels no gradient: leave them out, so that class sampling, class
        # weights and mixup's soft targets see the leaf classes only.
        images, boxes, targets = images[~coarse], boxes[~coarse], targets[~coarse]
        if targets.numel() == 0:
            raise FinetuneError("--loss ce: no training image of this fold has a leaf label")
    model.to(device)
    loss.to(device)
    head_epochs = config.head_phase_epochs
    n_epochs = head_epochs + config.epochs
    n = epoch_length(targets, config.sampling, config.samples_per_class)
    steps = math.ceil(n / config.batch_size)  # per epoch

    def phase_of(epoch: int) -> str:
        return "head" if epoch < head_epochs else "all"

    def optimizer_for(phase: str) -> torch.optim.Optimizer:
        # The groups of what trains now: in the head phase the backbone is frozen, so only
        # the head's groups (at scale 1, its bias without weight decay).
        model.head_only(phase == "head")
        return torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay, config.layer_decay))

    def lr_of(epoch: int, step: int) -> float:
        if phase_of(epoch) == "head":
            return lr_at(epoch * steps + step, head_epochs * steps, 0, config.head_phase_lr, config.min_lr)
        return lr_at((epoch - head_epochs) * steps + step, config.epochs * steps,
                     round(config.warmup_epochs * steps), config.lr, config.min_lr)

    start, resumed = 0, None
    found = _checkpoints(ckpt_dir) if ckpt_dir is not None else []
    phase = phase_of(0)
    if found:
        epoch, path = found[-1]
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        start, resumed = epoch + 1, str(path)
        phase = phase_of(min(start, n_epochs - 1))
        optimizer = optimizer_for(phase)
        # The optimizer state belongs to the saved epoch's phase; a new phase starts afresh.
        if state.get("phase", "all") == phase:
            optimizer.load_state_dict(state["optimizer"])
    else:
        optimizer = optimizer_for(phase)
    last = float("nan")
    for epoch in range(start, n_epochs):
        if phase_of(epoch) != phase:
            phase = phase_of(epoch)
            optimizer = optimizer_for(phase)
        model.train()
        g = torch.Generator().manual_seed(_seed(config.seed, fold, epoch))
        order = epoch_order(targets, config.sampling, g, config.samples_per_class)
        for step in range(steps):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            lr = lr_of(epoch, step)
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
                with _autocast(device):
                    logits = model(x)
                value = loss(logits, y)  # in float32 (FinetuneLoss casts)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
            last = float(value.detach())
        if ckpt_dir is not None:
            path = ckpt_dir / f"epoch_{epoch:04d}.pt"
            atomic_torch_save({"epoch": epoch, "phase": phase, "model": model.state_dict(),
                               "optimizer": optimizer.state_dict(), "config": asdict(config), "fold": fold}, path)
            for _, old in _checkpoints(ckpt_dir):
                if old != path:
                    old.unlink(missing_ok=True)
        if on_epoch_end is not None:
            on_epoch_end(fold, epoch)
    model.head_only(False)
    return {"epochs_run": n_epochs - start, "resumed_from": resumed, "last_loss": last,
            "n_coarse_left_out": n_coarse if loss.name == "ce" else 0}


@torch.no_grad()
def predict(model: FinetuneModel, images: torch.Tensor, boxes: torch.Tensor, normalize: Normalize,
            allowed: torch.Tensor | None = None, batch_size: int = 64, device: Any = "cpu") -> torch.Tensor:
    """Leaf indices ``long [N]``: the argmax of the head's logits over the ``allowed`` leaves
    (bool ``[L]``, e.g. the classes of the data; None = all)."""
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start:start + batch_size].to(device), boxes[start:start + batch_size].to(device))
        with _autocast(device):
            logits = model(x).float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        out.append(logits.argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
