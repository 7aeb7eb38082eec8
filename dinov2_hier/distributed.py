"""Thin, stateless helpers around ``torch.distributed``.

Every function works unchanged in a single process (no process group): it then
behaves as a world of size 1. Losses call :func:`all_reduce_sum` so that
Sinkhorn-Knopp and centre updates see the whole global batch on several ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (no-op on one process) and return it."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place (no-op on one process)."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
