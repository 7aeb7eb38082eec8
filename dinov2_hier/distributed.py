"""Thin helpers around ``torch.distributed``: process-group set-up from launcher
variables, and the few collectives the losses and the training loop use.

Every collective works unchanged in a single process (no process group): it then
behaves as a world of size 1. Losses call :func:`all_reduce_sum` so that
Sinkhorn-Knopp and centre updates see the whole global batch on several ranks.

Reading the launcher's variables (torchrun, srun, neither) is :mod:`dinov2_hier.launch_env`;
its names are re-exported here.
"""
from __future__ import annotations

import datetime
import gc
import os
from typing import Mapping

import torch
import torch.distributed as dist

from .launch_env import (  # noqa: F401 (re-exported: the launcher's side of the set-up)
    PORT_BASE,
    PORT_SPAN,
    SINGLE,
    SLURM,
    TORCHRUN,
    DistInfo,
    DistributedSetupError,
    LaunchEnv,
    first_host,
    port_from_job_id,
    read_launch_env,
)

# --------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------


def init_distributed(
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
    env: Mapping[str, str] | None = None,
) -> DistInfo:
    """Create the default process group the launcher asks for and return this process's place.

    * A world of one (no launcher, or ``--nproc_per_node=1``) creates no process group:
      every helper of this module then acts as a single process.
    * ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``. With
      NCCL the current CUDA device is set first: GPU ``local_rank``, or the only GPU the
      process sees when the launcher gave each task one (one GPU per process).
    * torchrun: ``init_method="env://"`` (the rendezvous torchrun prepared). SLURM:
      ``tcp://MASTER_ADDR:MASTER_PORT`` with explicit rank and world size; the
      environment is not modified.
    * Calling it again while a group exists returns the existing group's info.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (choose as above).
        timeout: collective timeout (default: torch's, 10 min for NCCL, 30 min for gloo).
        env: variables to read instead of ``os.environ`` (tests).
    """
    launch = read_launch_env(env)
    if is_enabled():
        return DistInfo(get_rank(), get_world_size(), launch.local_rank, dist.get_backend(), launch.launcher)
    if launch.world_size == 1:
        return DistInfo(0, 1, launch.local_rank, None, launch.launcher)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_cuda_device_index(launch))
    kwargs = {} if timeout is None else {"timeout": timeout}
    if launch.launcher == TORCHRUN:
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    else:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            **kwargs,
        )
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, backend, launch.launcher)


def _cuda_device_index(launch: LaunchEnv) -> int:
    """GPU ``local_rank`` of the node's GPUs, or the only GPU a process sees (``srun
    --gpus-per-task=1`` gives each task its own ``CUDA_VISIBLE_DEVICES``)."""
    n_gpus = torch.cuda.device_count()
    if launch.local_rank < n_gpus:
        return launch.local_rank
    if n_gpus == 1:
        return 0
    var = "LOCAL_RANK" if launch.launcher == TORCHRUN else "SLURM_LOCALID"
    raise DistributedSetupError(
        f"{var}={launch.local_rank} but this process sees {n_gpus} CUDA device(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
        "start one process per GPU"
    )


def destroy_distributed() -> None:
    """Destroy the default process group if there is one (safe to call always)."""
    if is_enabled():
        dist.destroy_process_group()


def settle_before_destroy() -> None:
    """Collect the garbage (the caller has just dropped its DDP / FSDP wrappers, whose
    communication state must go before the group does) and wait for every rank, so no rank
    destroys the process group while another still uses it. Call it on the normal path
    just before :func:`destroy_distributed`; after an error the other ranks may be gone."""
    gc.collect()
    barrier()


# --------------------------------------------------------------------------------------
# Queries and collectives (all no-ops on one process)
# --------------------------------------------------------------------------------------


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _multi() -> bool:
    return is_enabled() and get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (no-op on one process) and return it.
    ``group``: e.g. :func:`new_host_group` for a CPU tensor; default: the default group."""
    if _multi():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def new_host_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for small collectives of host values (image counts,
    stop flags) that the training loop needs every iteration.

    With NCCL such a value would travel as a CUDA tensor, and reading the result on the
    host waits for every kernel queued before it: the host could not queue the next step
    while the GPU runs this one. A gloo all-reduce of a CPU tensor does not touch the GPU.
    Collective (every rank calls it at the same point). None on one process; the default
    group when that is gloo already.
    """
    if not _multi():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place (no-op on one process)."""
    if _multi():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _multi():
        dist.barrier()


def mean_over_ranks_tensor(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Scalar tensors -> ``float32 [len(values)]`` on their device: their means over ranks,
    in one all-reduce, in the order of ``values``. No host synchronisation.

    Every rank must pass the same keys in the same order. A non-finite value on any
    rank makes the mean non-finite on every rank, so a decision taken on the result
    (skip a step) is the same everywhere.
    """
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if _multi():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= get_world_size()
    return stacked


def mean_over_ranks(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """:func:`mean_over_ranks_tensor` read as Python floats (host-synchronising)."""
    if not values:
        return {}
    return dict(zip(values, mean_over_ranks_tensor(values).tolist()))


def any_rank(flag: bool, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank if ``flag`` is True on at least one (e.g. a stop request that
    only some ranks received). ``device`` must suit the group's backend (CUDA for NCCL,
    CPU for gloo, e.g. :func:`new_host_group`)."""
    if not _multi():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order."""
    if not _multi():
        return [int(n)]
    value = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.zeros_like(value) for _ in range(get_world_size())]
    dist.all_gather(out, value)
    return [int(v.item()) for v in out]


class _GatherRows(torch.autograd.Function):
    """All-gather of equally shaped tensors whose backward sums every rank's gradient
    of the gathered result and returns this rank's slice (the adjoint of a gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = get_world_size()
        ctx.rank, ctx.rows = get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_rows(x: torch.Tensor, sizes: list[int] | None = None, differentiable: bool = False) -> list[torch.Tensor]:
    """Every rank's ``x [n_r, ...]`` (the ``n_r`` may differ), in rank order.

    Rows are padded to the largest ``n_r`` for the collective and trimmed after.
    With ``differentiable=True`` the gradient of a loss computed from the gathered
    pieces on every rank flows back to each rank's own ``x`` summed over the ranks
    (so a loss that every rank computes identically on the gathered batch, averaged
    by DDP, has exactly the single-process gradient). One process: ``[x]``.

    Args:
        x: ``[n, ...]`` tensor of this rank (same trailing shape and dtype everywhere).
        sizes: every rank's ``n`` if already known (saves one collective), see :func:`gather_sizes`.
        differentiable: keep the autograd graph through the gather.
    """
    if not _multi():
        return [x]
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    if differentiable:
        gathered = _GatherRows.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        gathered = torch.cat(parts)
    return [gathered[r * longest:r * longest + n] for r, n in enumerate(sizes)]


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` on one process). For small
    host-side state such as RNG states; uses the current CUDA device with NCCL."""
    if not _multi():
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
