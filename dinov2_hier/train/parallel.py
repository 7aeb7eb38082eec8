"""Data-parallel wrapping of the training model and its full (world-size independent) state.

``compute.parallel`` chooses, for runs of several processes:

* ``ddp`` (default): :class:`torch.nn.parallel.DistributedDataParallel` around the whole
  :class:`~dinov2_hier.train.meta_arch.SSLMetaArch`, whose ``forward`` is one step's loss
  computation. Only parameters with ``requires_grad`` (student and supervised heads) are
  all-reduced; the EMA teacher is a frozen replica updated identically on every rank.
* ``fsdp``: FSDP2 :func:`torch.distributed.fsdp.fully_shard` (public since torch 2.6).
  Each transformer block and each backbone (student *and* teacher) is its own shard
  group with the backbone :class:`~torch.distributed.fsdp.MixedPrecisionPolicy`; the
  root group (the SSLMetaArch: DINO/iBOT heads, supervised heads, loss buffers) uses the
  heads policy. Parameters, gradients and AdamW state are sharded over the ranks; the
  teacher EMA runs on the local shards.

A single process is never wrapped. Checkpoints hold *full* state dicts, gathered on
rank 0 (:func:`gather_model_state`, :func:`gather_optimizer_state`), with the same keys
and the same index-keyed optimizer format as a single-process run, so any checkpoint
resumes on any number of GPUs and with either mode. No private FSDP internals are used.
"""
from __future__ import annotations

import inspect
import logging
import math

import torch
from omegaconf import DictConfig
from torch import nn

from .. import distributed
from ..config import ConfigError
from ..models.heads import upgrade_last_layer_keys
from .checkpoint import CheckpointError, check_state_dict_matches, load_model_state
from .meta_arch import SSLMetaArch

logger = logging.getLogger("dinov2_hier.train")

NONE, DDP, FSDP = "none", "ddp", "fsdp"
PARALLEL_MODES = (DDP, FSDP)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # FSDP parameter / reduce dtypes


def _fsdp_api():
    """``(fully_shard, MixedPrecisionPolicy, FSDPModule)`` or a ConfigError on old torch."""
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise ConfigError(
            f"compute.parallel=fsdp needs torch >= 2.6 (public torch.distributed.fsdp.fully_shard); "
            f"this is torch {torch.__version__}. Use compute.parallel=ddp"
        ) from None
    return fully_shard, MixedPrecisionPolicy, FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was converted by ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> SSLMetaArch:
    """The SSLMetaArch inside a DDP wrapper (FSDP2 converts in place: returned as is)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def resolve_parallel(cfg: DictConfig, world_size: int) -> str:
    """Validate ``compute.parallel`` / ``compute.fsdp.*`` and return the mode that runs:
    ``"none"`` on one process, else ``"ddp"`` or ``"fsdp"``.

    Call after ``resolve_compute`` (which fixes ``compute.dtype``). With fp32 compute the
    FSDP parameter dtypes are set to fp32 in ``cfg`` (the saved config records it);
    fp16 with FSDP is refused (its loss scaler would need sharded-gradient support).
    """
    mode = cfg.compute.parallel
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"compute.parallel must be one of {', '.join(PARALLEL_MODES)}, got '{mode}'")
    fsdp = cfg.compute.fsdp
    for key in ("backbone_param_dtype", "heads_param_dtype", "reduce_dtype"):
        if fsdp[key] not in _DTYPES:
            raise ConfigError(f"compute.fsdp.{key} must be one of {', '.join(_DTYPES)}, got '{fsdp[key]}'")
    if mode == FSDP:
        _fsdp_api()
        if cfg.compute.dtype == "fp16":
            raise ConfigError("compute.parallel=fsdp does not support compute.dtype=fp16; use bf16 (or fp32)")
        if cfg.compute.dtype == "fp32":
            fsdp.backbone_param_dtype = "fp32"
            fsdp.heads_param_dtype = "fp32"
    if world_size == 1:
        return NONE
    return mode


def wrap_model(model: SSLMetaArch, mode: str, cfg: DictConfig, device: torch.device) -> nn.Module:
    """Wrap ``model`` (already on ``device``, identical on every rank) for ``mode``.

    Returns what the training step calls: the DDP wrapper, or ``model`` itself (sharded
    in place by FSDP2, or untouched for ``"none"``). Build the optimizer *after* this:
    FSDP2 replaces the parameters by sharded ones.
    """
    how = check_compile_mode(cfg.compute.compile, mode)
    if how == "backbone":
        compile_backbones(model)
    engine = _wrap(model, mode, cfg, device)
    if how == "forward":
        # The whole step's forward (backbones, heads, losses, Sinkhorn-Knopp). Its shapes
        # are fixed (the masked patches sit in a buffer of fixed size), so it compiles
        # once; a batch that lost unreadable images recompiles with dynamic sizes.
        engine.compile()
    return engine


def _wrap(model: SSLMetaArch, mode: str, cfg: DictConfig, device: torch.device) -> nn.Module:
    if mode == NONE:
        return model
    if mode == DDP:
        # No buffer broadcast before each forward: there is no BatchNorm, and the softmax
        # centres are all-reduced by the losses. Newer torch renames the switch.
        ddp_class = nn.parallel.DistributedDataParallel
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters
            else {"broadcast_buffers": False}
        )
        return ddp_class(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    if mode == FSDP:
        return _fully_shard(model, cfg, device)
    raise ConfigError(f"unknown parallel mode '{mode}'")


COMPILE_MODES = ("none", "backbone", "forward")


def check_compile_mode(how: object, mode: str) -> str:
    """Validate ``compute.compile``: ``none``, ``backbone`` (student and teacher backbones,
    fixed shapes) or ``forward`` (the whole forward of a step, fixed shapes). Neither is
    combined with FSDP2 yet (per-block compile under ``fully_shard`` is not measured)."""
    if how not in COMPILE_MODES:
        raise ConfigError(f"compute.compile must be one of {', '.join(COMPILE_MODES)}, got {how!r}")
    if how != "none" and mode == FSDP:
        raise ConfigError(f"compute.compile={how} is not supported with compute.parallel=fsdp yet; use ddp")
    return str(how)


def compile_backbones(model: SSLMetaArch) -> None:
    """``torch.compile`` the student and teacher backbones in place; ``nn.Module.compile``
    keeps parameter names, so checkpoints are unchanged."""
    for which in (model.student, model.teacher):
        which["backbone"].compile()


def _fully_shard(model: SSLMetaArch, cfg: DictConfig, device: torch.device) -> SSLMetaArch:
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy, _ = _fsdp_api()
    fsdp = cfg.compute.fsdp
    mesh = init_device_mesh(device.type, (distributed.get_world_size(),))
    backbone_policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[fsdp.backbone_param_dtype], reduce_dtype=_DTYPES[fsdp.reduce_dtype]
    )
    heads_policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[fsdp.heads_param_dtype], reduce_dtype=_DTYPES[fsdp.reduce_dtype]
    )
    reshard = bool(fsdp.reshard_after_forward)
    for which in (model.student, model.teacher):
        backbone = which["backbone"]
        for block in backbone.blocks:
            fully_shard(block, mesh=mesh, mp_policy=backbone_policy, reshard_after_forward=reshard)
        fully_shard(backbone, mesh=mesh, mp_policy=backbone_policy, reshard_after_forward=reshard)
    # Root group: heads (the shared DINO/iBOT head may run twice per step, so it is not a
    # group of its own), supervised heads and the loss buffers.
    fully_shard(model, mesh=mesh, mp_policy=heads_policy)
    return model


# --------------------------------------------------------------------------------------
# Step helpers
# --------------------------------------------------------------------------------------


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` returning the total norm as a plain (replicated) 0-d tensor,
    also for sharded (DTensor) gradients; no host synchronisation.

    Under DDP the gradients are already averaged, so every rank computes the same norm;
    under FSDP the norm of the sharded gradients is reduced over the ranks.
    """
    if params and all(p.grad is None for p in params):  # e.g. the backbone frozen in the head warm-up
        return torch.zeros((), device=params[0].device)  # clip_grad_norm_ would give a CPU 0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def clip_grad_norms(groups: dict[str, list[torch.Tensor]], max_norm: float, per_group: bool) -> dict[str, torch.Tensor]:
    """Clip gradients to ``max_norm`` and return each group's norm before clipping.

    ``per_group``: each group is clipped on its own (DINOv2 clips its backbone and each
    head separately, so one large norm does not shrink the others' steps); otherwise one
    norm over all groups decides a common factor, as ``clip_grad_norm_`` over everything.
    """
    if per_group:
        return {name: clip_grad_norm(params, max_norm) for name, params in groups.items()}
    norms = {name: clip_grad_norm(params, math.inf) for name, params in groups.items()}  # measures only
    total = torch.stack(list(norms.values())).square().sum().sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s factor
    grads = [p.grad for params in groups.values() for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)
    return norms


# --------------------------------------------------------------------------------------
# Full state dicts (checkpoints that load on any world size)
# --------------------------------------------------------------------------------------


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_model_state(model: nn.Module) -> dict:
    """Full model state dict on rank 0 (``{}`` on the other ranks).

    Collective under FSDP (every rank must call it); keys as ``SSLMetaArch.state_dict()``.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    if not distributed.is_main_process():
        return {}
    return unwrap(model).state_dict()


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified name of every optimizer parameter, in the optimizer's order."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise RuntimeError("the optimizer holds a parameter that is not part of the model") from None


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state on rank 0 in ``torch.optim.Optimizer.state_dict()`` form
    (parameters numbered in group order), ``{}`` elsewhere. Collective under FSDP.

    The numbering depends only on the model and the param-group rules, not on the number
    of ranks, so the state loads into a run on any world size and either parallel mode.
    """
    if not is_sharded(model):
        return optimizer.state_dict() if distributed.is_main_process() else {}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not distributed.is_main_process():
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]],
    }


def load_model_state_any(model: nn.Module, state_dict: dict, source) -> None:
    """Load a full model state dict (from any world size) into ``model``, checking keys and
    shapes first (:class:`~dinov2_hier.train.checkpoint.CheckpointError` names the first
    mismatch). Every rank passes the full dict. State dicts from before the heads' trainable
    gain (``last_layer.weight``) are upgraded first (:func:`upgrade_last_layer_keys`)."""
    state_dict = upgrade_last_layer_keys(dict(state_dict))
    if not is_sharded(model):
        load_model_state(unwrap(model), state_dict, source)
        return
    # DTensor values report their global shapes, so the full dict is checked as it is.
    check_state_dict_matches(model.state_dict(), state_dict, source)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state_any(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state written by :func:`gather_optimizer_state` (any world size).
    Every rank passes the full state."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    n_saved = sum(len(g["params"]) for g in state["param_groups"])
    if n_saved != len(names):
        raise CheckpointError(f"optimizer state holds {n_saved} parameters, the model has {len(names)}")
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
