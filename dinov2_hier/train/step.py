"""One optimizer step: schedules -> forward -> backward -> clip -> finite check -> update -> EMA."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from .optim import apply_schedule
from .parallel import clip_grad_norm, unwrap

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """Autocast settings. ``dtype`` is one of bf16, fp16, fp32 (fp32 = no autocast)."""

    device_type: str
    dtype: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=_DTYPES[self.dtype])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only; a disabled scaler is a no-op."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == "fp16")


@dataclass
class StepOutput:
    """What a step reports. ``losses`` holds Python floats, averaged over the ranks;
    ``applied`` is False when the step was skipped because the loss or the gradient was
    not finite (on any rank: the decision is the same on every rank)."""

    losses: dict[str, float]
    applied: bool
    grad_norm: float | None


GRAD_NORM = "grad_norm"


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict,
    schedule: dict[str, float],
    precision: Precision,
    clip_grad: float,
) -> StepOutput:
    """Run one training step on ``batch`` (already on the model's device).

    ``model`` is an :class:`~dinov2_hier.train.meta_arch.SSLMetaArch` or what
    :func:`~dinov2_hier.train.parallel.wrap_model` made of it (DDP wrapper, FSDP2
    module); its ``forward`` computes the losses.

    The step synchronises with the host once, after backward: the losses and the
    gradient norm are averaged over the ranks in one all-reduce and read together, so
    the CPU can queue the backward while the forward still runs, and the finite check
    is collective (every rank takes the same decision). A non-finite total loss, or a
    non-finite gradient norm without fp16 loss scaling, skips the update; the backward
    of such a step is wasted work, which is cheaper than a synchronisation every step.
    With fp16 the scaler skips non-finite gradients itself and lowers its scale, which
    is its normal operation.
    """
    apply_schedule(optimizer, schedule["lr"], schedule["last_layer_lr"], schedule["wd"])
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        losses = model(batch, schedule["teacher_temp"])
    if GRAD_NORM in losses:
        raise ValueError(f"a loss may not be named '{GRAD_NORM}'")
    scaler.scale(losses["total"]).backward()
    scalars = dict(losses)
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        scalars[GRAD_NORM] = clip_grad_norm(params, clip_grad)  # identical on every rank
    values = distributed.mean_over_ranks(scalars)
    grad_norm = values.pop(GRAD_NORM, None)
    finite_grad = grad_norm is None or math.isfinite(grad_norm) or scaler.is_enabled()
    if not (math.isfinite(values["total"]) and finite_grad):
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled() and clip_grad > 0:
            # The scaler unscaled this step's gradients: let it finish the step's bookkeeping
            # (it lowers its scale when it found inf/NaN), or the next unscale_ refuses to run.
            scaler.update()
        return StepOutput(losses=values, applied=False, grad_norm=grad_norm)
    scaler.step(optimizer)
    scaler.update()
    unwrap(model).update_teacher(schedule["momentum"])
    return StepOutput(losses=values, applied=True, grad_norm=grad_norm)
