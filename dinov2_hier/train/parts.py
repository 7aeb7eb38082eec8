"""What one training step needs, built once the way training builds it: the device and
precision that run, the parallel mode, the model and what the step calls (its DDP or FSDP2
wrapping), AdamW with its parameter groups, the loss scaler, the schedules and the
gradient-clipping settings.

:class:`~dinov2_hier.train.loop.Trainer` builds its step from :func:`build_step_parts`, and
so does ``bench/train_step.py``: a change to how training builds its step reaches the
benchmark by itself. Nothing here writes files, takes locks or builds data loaders.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError
from ..hierarchy import Hierarchy
from ..paths import resolve_resource
from .meta_arch import SSLMetaArch
from .optim import build_optimizer, build_param_groups, clip_grad_per_module
from .parallel import resolve_parallel, wrap_model
from .pretrained import head_warmup_iterations, heads_mode, load_pretrained, log_pretrained
from .schedules import TrainingSchedules, build_schedules
from .step import Precision

logger = logging.getLogger("dinov2_hier.train")


def resolve_compute(cfg: DictConfig) -> tuple[torch.device, Precision]:
    """Fix ``compute.device`` and ``compute.dtype`` to what will actually run, in ``cfg``
    itself, so the saved config records it (CPU always runs fp32)."""
    requested = cfg.compute.device
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("compute.device=cuda but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"compute.device must be auto, cpu or cuda, got '{requested}'")
    if cfg.compute.dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"compute.dtype must be bf16, fp16 or fp32, got '{cfg.compute.dtype}'")
    dtype = cfg.compute.dtype if requested == "cuda" else "fp32"
    cfg.compute.device = requested
    cfg.compute.dtype = dtype
    if cfg.optim.fused == "auto":
        cfg.optim.fused = requested == "cuda"
    if requested == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.compute.allow_tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.compute.allow_tf32)
    device = torch.device("cuda", torch.cuda.current_device()) if requested == "cuda" else torch.device("cpu")
    return device, Precision(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class StepCompute:
    """Where and how the step runs: device, precision and parallel mode (``"none"``,
    ``"ddp"`` or ``"fsdp"``)."""

    device: torch.device
    precision: Precision
    parallel: str


def resolve_step_compute(cfg: DictConfig, world_size: int) -> StepCompute:
    """:func:`resolve_compute` (fixes ``compute.*`` in ``cfg``) and the parallel mode."""
    device, precision = resolve_compute(cfg)
    return StepCompute(device, precision, resolve_parallel(cfg, world_size))


@dataclass
class StepParts:
    """Everything :func:`~dinov2_hier.train.step.train_step` is called with, but the batch,
    the schedule values and the per-step flags."""

    compute: StepCompute
    model: SSLMetaArch
    #: What the step calls: a DDP wrapper, the FSDP2-sharded model itself, or the model.
    engine: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: TrainingSchedules
    #: ``SSLMetaArch.gradient_groups()``: clipped and reported per group.
    grad_groups: dict[str, list[torch.Tensor]]
    #: ``optim.clip_grad``: the norm clipped to (0: no clipping).
    clip_grad: float
    #: Each group clipped on its own (``optim.clip_grad_per_module``), else all together.
    clip_per_group: bool
    #: Iterations at the start with the backbone frozen (fresh heads on a pretrained backbone).
    head_warmup_iterations: int = 0


def build_step_parts(
    cfg: DictConfig,
    compute: StepCompute,
    hierarchy: Hierarchy | None,
    world_size: int,
    rank: int,
    pretrained: bool = True,
) -> StepParts:
    """Build the step's parts from a config whose ``compute`` :func:`resolve_step_compute`
    resolved. Seeds the global RNG: the same initial weights on every rank, then (several
    ranks) each rank's own stochastic-depth draws. ``pretrained``: load
    ``student.pretrained_weights`` when set (training; the benchmark times the step from
    the initial weights)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = SSLMetaArch(cfg, hierarchy).to(compute.device)
    warmup = 0
    if pretrained and cfg.student.pretrained_weights:
        warmup = _load_pretrained(model, cfg)
    if world_size > 1:
        torch.manual_seed(cfg.seed + rank)  # own stochastic-depth draws per rank
    # The optimizer must be built after wrapping (FSDP2 replaces the parameters).
    engine = wrap_model(model, compute.parallel, cfg, compute.device)
    groups = build_param_groups(model.trainable_modules(), model.n_blocks, cfg.optim.layerwise_decay,
                                cfg.optim.patch_embed_lr_mult)
    return StepParts(
        compute=compute,
        model=model,
        engine=engine,
        optimizer=build_optimizer(groups, tuple(cfg.optim.betas), bool(cfg.optim.fused)),
        scaler=compute.precision.grad_scaler(),
        schedules=build_schedules(cfg, world_size),
        grad_groups=model.gradient_groups(),
        clip_grad=cfg.optim.clip_grad,
        clip_per_group=clip_grad_per_module(cfg),
        head_warmup_iterations=warmup,
    )


def _load_pretrained(model: SSLMetaArch, cfg: DictConfig) -> int:
    """Backbone and fitting heads from ``student.pretrained_weights`` (:mod:`.pretrained`);
    returns the head warm-up's length in iterations."""
    resolved = resolve_resource(cfg.student.pretrained_weights, "student.pretrained_weights")
    start = load_pretrained(model.student, model.teacher, str(resolved), heads_mode(cfg), head_warmup_iterations(cfg))
    log_pretrained(str(resolved), start)
    return start.head_warmup_iterations
