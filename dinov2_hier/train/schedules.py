"""Per-iteration schedules: pure functions of the iteration number.

Every schedule is evaluated on demand (no precomputed arrays), so a resumed run gets
exactly the values of an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from ..config import ConfigError


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``start_warmup_value`` to ``base_value`` over ``warmup_iters``,
    then a half cosine from ``base_value`` to ``final_value`` at ``total_iters``; constant
    ``final_value`` afterwards. Iterations ``< freeze_iters`` return 0 (used to freeze the
    last layer of the projection heads)."""

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __call__(self, it: int) -> float:
        if it < self.freeze_iters:
            return 0.0
        if it < self.warmup_iters:
            return self.start_warmup_value + (self.base_value - self.start_warmup_value) * it / self.warmup_iters
        span = self.total_iters - self.warmup_iters
        if span <= 0 or it >= self.total_iters:
            return self.final_value
        progress = (it - self.warmup_iters) / span
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LinearWarmupSchedule:
    """Linear from ``start`` to ``end`` over ``warmup_iters``, then constant ``end``."""

    start: float
    end: float
    warmup_iters: int

    def __call__(self, it: int) -> float:
        if self.warmup_iters <= 0 or it >= self.warmup_iters:
            return self.end
        return self.start + (self.end - self.start) * it / self.warmup_iters


def scaled_lr(base_lr: float, total_batch: int, reference_batch: int, rule: str) -> float:
    """Learning rate for ``total_batch`` images per step (all ranks together)."""
    ratio = total_batch / reference_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "linear":
        return base_lr * ratio
    if rule == "none":
        return base_lr
    raise ConfigError(f"optim.lr_scaling must be sqrt, linear or none, got '{rule}'")


@dataclass(frozen=True)
class TrainingSchedules:
    """All schedules of a run; ``values(it)`` gives the numbers one step uses."""

    lr: CosineSchedule
    last_layer_lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: LinearWarmupSchedule
    #: ``supervision.start_iteration``: the supervised terms weigh 0 before it, 1 from it on.
    supervision_start: int = 0

    def values(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr(it),
            "last_layer_lr": self.last_layer_lr(it),
            "wd": self.weight_decay(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
            "supervision_weight": self.supervision_weight(it),
        }

    def supervision_weight(self, it: int) -> float:
        """Multiplier of every supervised term's weight at iteration ``it``: 0.0 or 1.0."""
        return 1.0 if it >= self.supervision_start else 0.0


def build_schedules(cfg: DictConfig, world_size: int) -> TrainingSchedules:
    """Schedules from the config; ``*_epochs`` keys are multiplied by ``train.epoch_length``."""
    epoch = cfg.train.epoch_length
    total = cfg.train.iterations
    lr = scaled_lr(
        cfg.optim.base_lr,
        cfg.train.batch_size_per_gpu * world_size,
        cfg.optim.reference_batch_size,
        cfg.optim.lr_scaling,
    )
    min_lr = cfg.optim.min_lr
    warmup = round(cfg.optim.warmup_epochs * epoch)
    lr_schedule = CosineSchedule(lr, min_lr, total, warmup_iters=warmup)
    return TrainingSchedules(
        lr=lr_schedule,
        last_layer_lr=CosineSchedule(
            lr, min_lr, total, warmup_iters=warmup, freeze_iters=round(cfg.optim.freeze_last_layer_epochs * epoch)
        ),
        weight_decay=CosineSchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=CosineSchedule(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        teacher_temp=LinearWarmupSchedule(
            cfg.teacher.warmup_teacher_temp,
            cfg.teacher.teacher_temp,
            round(cfg.teacher.warmup_teacher_temp_epochs * epoch),
        ),
        supervision_start=int(cfg.supervision.start_iteration),
    )
