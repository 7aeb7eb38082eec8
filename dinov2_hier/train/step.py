"""One optimizer step: schedules -> forward -> backward -> clip -> finite check -> update -> EMA,
queued without waiting for the GPU where the optimizer allows it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .. import distributed
from .optim import apply_schedule
from .parallel import clip_grad_norms, unwrap

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
    """What a step reports, on the host. ``losses`` holds Python floats, averaged over the
    ranks; ``applied`` is False when the update was skipped because the loss or the
    gradient was not finite (on any rank: the decision is the same on every rank).
    ``stats``: the model's diagnostics and each gradient group's norm before clipping
    (``grad_norm_<group>``), rank-averaged; ``grad_norm``: their combined norm."""

    losses: dict[str, float]
    applied: bool
    grad_norm: float | None
    stats: dict[str, float] = field(default_factory=dict)


class PendingStep:
    """A launched step's report while it may still be computed on the device.

    ``values``: ``float32 [k]`` on the step's device, the rank-averaged losses in the
    order of ``names``, then the stats in the order of ``stat_names``, then the gradient
    norm when ``with_grad_norm``; ``applied``: a 0-d bool tensor or a bool. On a CUDA
    device the copy to pinned host memory is
    queued at construction, behind the step's kernels, so :meth:`read` after the next
    step was queued waits for nothing but this step: the training loop reads each step
    one step late and never leaves the GPU idle for the host.
    """

    def __init__(
        self,
        names: list[str],
        values: torch.Tensor,
        applied: torch.Tensor | bool,
        with_grad_norm: bool,
        stat_names: Sequence[str] = (),
    ):
        self.names = list(names)
        self.stat_names = list(stat_names)
        self.with_grad_norm = with_grad_norm
        flag = applied if isinstance(applied, torch.Tensor) else torch.tensor(bool(applied), device=values.device)
        packed = torch.cat([values.detach().float(), flag.to(values.device, torch.float32).reshape(1)])
        self._event = None
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = packed
        self._read: StepOutput | None = None

    @property
    def on_host(self) -> bool:
        """Whether the report was complete when the step returned (a CPU step: the step ran
        synchronously), so that the step finished then, not when it is read."""
        return self._event is None

    def read(self) -> StepOutput:
        """Wait for the step (a host synchronisation unless it is done) and return its report."""
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            values = self._host.tolist()
            applied = values.pop() > 0.5
            grad_norm = values.pop() if self.with_grad_norm else None
            n = len(self.names)
            self._read = StepOutput(
                losses=dict(zip(self.names, values[:n])),
                applied=applied,
                grad_norm=grad_norm,
                stats=dict(zip(self.stat_names, values[n:])),
            )
        return self._read


GRAD_NORM = "grad_norm"


def skips_on_device(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Whether ``optimizer`` can skip a non-finite step on the device, without a host sync.

    True for the fused Adam/AdamW kernels (``optim.fused``), which accept a ``found_inf``
    flag tensor: when it is 1 they leave parameters, moments and step count unchanged.
    That is the protocol ``torch.amp.GradScaler`` drives them with; with an enabled
    (fp16) scaler the scaler owns the flag, so the step decides on the host instead.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and not scaler.is_enabled()


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` that does nothing, on the device, where ``found_inf`` (a 0-d
    float32 tensor on the parameters' device) is 1. Needs :func:`skips_on_device`."""
    optimizer.found_inf, optimizer.grad_scale = found_inf, None
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict,
    schedule: dict[str, float],
    precision: Precision,
    clip_grad: float,
    grad_groups: dict[str, list[torch.Tensor]] | None = None,
    clip_per_group: bool = True,
    with_stats: bool = True,
    frozen: Sequence[torch.Tensor] = (),
) -> PendingStep:
    """Queue one training step on ``batch`` (already on the model's device); read the
    report with ``.read()``.

    ``model`` is an :class:`~dinov2_hier.train.meta_arch.SSLMetaArch` or what
    :func:`~dinov2_hier.train.parallel.wrap_model` made of it (DDP wrapper, FSDP2
    module); its ``forward`` returns ``(losses, stats)`` or the losses alone.
    ``grad_groups`` (``SSLMetaArch.gradient_groups()``; default: one group ``all`` of the
    optimizer's parameters) are the parameter groups whose gradient norms are clipped
    (each on its own with ``clip_per_group``, else together) and reported.
    ``with_stats=False`` skips the model's diagnostics (the report's ``stats`` then hold
    the gradient norms only): the trainer computes them only on the steps it logs.
    ``frozen`` parameters get no update in this step (their gradients are dropped before
    clipping, so AdamW leaves them, their moments and their weight decay alone): the
    head warm-up freezes the backbone this way.

    A non-finite total loss, or a non-finite gradient norm without fp16 loss scaling,
    skips the update of the student (weights, AdamW moments and step count unchanged);
    the teacher's EMA step runs in every step (towards the unchanged student after a
    skip), so the result does not depend on how the skip is taken. The decision uses the
    losses and gradient norm averaged over the ranks (one all-reduce), so every rank takes
    the same one. With a fused AdamW (:func:`skips_on_device`) it is taken on the device
    and the step never waits for the GPU: the host can queue the next step while this
    one runs. Otherwise the step reads the flag after backward (one host sync). With
    fp16 the scaler also skips non-finite gradients itself and lowers its scale, which
    is its normal operation and is not reported as a skip.
    """
    apply_schedule(optimizer, schedule["lr"], schedule["last_layer_lr"], schedule["wd"])
    optimizer.zero_grad(set_to_none=True)
    if "supervision_weight" in schedule:
        # A plain Python float in the batch (SSLMetaArch.compute_losses reads it): the
        # model's call signature, and every wrapper or test double of it, stay the same.
        batch = {**batch, "supervision_weight": float(schedule["supervision_weight"])}
    with precision.autocast():
        output = model(batch, schedule["teacher_temp"], with_stats)
    losses, stats = output if isinstance(output, tuple) else (output, {})
    if GRAD_NORM in losses:
        raise ValueError(f"a loss may not be named '{GRAD_NORM}'")
    scaler.scale(losses["total"]).backward()
    for param in frozen:
        param.grad = None
    scalars = dict(losses)
    stats = dict(stats)
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        if grad_groups is None:
            grad_groups = {"all": [p for g in optimizer.param_groups for p in g["params"]]}
        norms = clip_grad_norms(grad_groups, clip_grad, clip_per_group)
        stats.update({f"{GRAD_NORM}_{name}": norm for name, norm in norms.items()})
        total_norm = torch.stack(list(norms.values())).square().sum().sqrt()
    names, stat_names = list(losses), list(stats)
    scalars.update(stats)
    if clip_grad > 0:
        scalars[GRAD_NORM] = total_norm  # identical on every rank
    values = distributed.mean_over_ranks_tensor(scalars)
    finite = torch.isfinite(values[names.index("total")])
    if clip_grad > 0 and not scaler.is_enabled():
        finite = finite & torch.isfinite(values[-1])
    if skips_on_device(optimizer, scaler):
        step_unless(optimizer, (~finite).float())
        applied: torch.Tensor | bool = finite
    else:
        applied = bool(finite)  # host sync
        if applied:
            scaler.step(optimizer)
            scaler.update()
        elif scaler.is_enabled() and clip_grad > 0:
            # The scaler unscaled this step's gradients: let it finish the step's bookkeeping
            # (it lowers its scale when it found inf/NaN), or the next unscale_ refuses to run.
            scaler.update()
    unwrap(model).update_teacher(schedule["momentum"])
    return PendingStep(names, values, applied, with_grad_norm=clip_grad > 0, stat_names=stat_names)
