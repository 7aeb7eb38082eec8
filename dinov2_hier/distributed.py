"""Thin helpers around ``torch.distributed``: process-group set-up from launcher
variables, and the few collectives the losses and the training loop use.

Every collective works unchanged in a single process (no process group): it then
behaves as a world of size 1. Losses call :func:`all_reduce_sum` so that
Sinkhorn-Knopp and centre updates see the whole global batch on several ranks.

Launchers (see :func:`read_launch_env`, docs/distributed.md):

* ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* ``srun`` (one task per GPU, e.g. through submitit) sets ``SLURM_PROCID``,
  ``SLURM_NTASKS`` / ``SLURM_STEP_NUM_TASKS`` and ``SLURM_LOCALID``; the rendezvous
  address is ``MASTER_ADDR`` / ``MASTER_PORT`` when set, else the first host of the
  step's (or job's) node list and a port derived from ``SLURM_JOB_ID``;
* neither: a single process.

When both sets are present, torchrun's win: ``torchrun`` started inside an ``sbatch``
allocation inherits the allocation's ``SLURM_*`` variables, which then describe the
batch step, not the workers torchrun spawned.
"""
from __future__ import annotations

import datetime
import gc
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from .errors import UserError

TORCHRUN = "torchrun"
SLURM = "slurm"
SINGLE = "single"

#: Ports derived from a SLURM job id fall in ``[PORT_BASE, PORT_BASE + PORT_SPAN)``,
#: below Linux's ephemeral range (32768-60999), so they do not collide with outgoing sockets.
PORT_BASE = 10000
PORT_SPAN = 20000


class DistributedSetupError(UserError, ValueError):
    """The launcher's environment variables are missing, malformed or inconsistent."""


# --------------------------------------------------------------------------------------
# Launcher environment
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher says about this process (nothing is initialised yet).

    ``launcher`` is ``"torchrun"``, ``"slurm"`` or ``"single"``; ``master_addr`` /
    ``master_port`` are None for a single process.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job after :func:`init_distributed`.

    ``backend`` is ``"nccl"`` / ``"gloo"`` when a process group exists, None for a
    single process (no process group is created for a world of one).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    launcher: str = SINGLE

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list in its compressed form.

    ``"gpu[003-005,010],cpu1"`` -> ``"gpu003"``; ``"rack[1-2]-n[07-08]"`` -> ``"rack1-n07"``;
    ``"node12"`` -> ``"node12"``. Zero padding of ranges is kept (it is part of the name).
    """
    text = nodelist.strip()
    if not text:
        raise DistributedSetupError("SLURM node list is empty")
    # The first top-level entry: up to the first comma outside brackets.
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    entry = text[:end]
    if entry.count("[") != entry.count("]"):
        raise DistributedSetupError(f"cannot parse SLURM node list {nodelist!r}: unbalanced brackets")

    def first_of_group(match: re.Match) -> str:
        first = match.group(1).split(",")[0]
        return first.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_group, entry)
    if not host or "[" in host or "]" in host:
        raise DistributedSetupError(f"cannot parse SLURM node list {nodelist!r}")
    return host


def port_from_job_id(job_id: str) -> int:
    """A rendezvous port that is a pure function of the SLURM job id (every task of the
    job computes the same one; jobs sharing a node get different ones unless their ids
    are congruent modulo :data:`PORT_SPAN`). Array jobs ``123_4`` use their digits."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise DistributedSetupError(f"SLURM_JOB_ID={job_id!r} holds no digits; set MASTER_PORT")
    return PORT_BASE + int(digits) % PORT_SPAN


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address from the launcher's variables.

    Precedence: torchrun (``RANK`` and ``WORLD_SIZE`` both set) > SLURM (``SLURM_PROCID``
    and ``SLURM_NTASKS`` set) > single process. Under SLURM the world size is
    ``SLURM_STEP_NUM_TASKS`` (the tasks of this ``srun`` step) when set, else
    ``SLURM_NTASKS``. Raises :class:`DistributedSetupError` naming the variable that is
    missing or wrong.

    Args:
        env: the variables to read (default ``os.environ``).
    """
    env = os.environ if env is None else env
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if has_rank != has_world:
        missing = "WORLD_SIZE" if has_rank else "RANK"
        present = "RANK" if has_rank else "WORLD_SIZE"
        raise DistributedSetupError(
            f"{present} is set but {missing} is not: launch with torchrun, which sets both, "
            f"or unset {present}"
        )
    if has_rank:
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        _check_rank(rank, world, "RANK", "WORLD_SIZE")
        if "LOCAL_RANK" in env:
            local = _int_var(env, "LOCAL_RANK")
        elif world == 1:
            local = 0
        else:
            raise DistributedSetupError("RANK and WORLD_SIZE are set but LOCAL_RANK is not (torchrun sets all three)")
        _check_local(local, world, "LOCAL_RANK")
        if world == 1:
            return LaunchEnv(TORCHRUN, rank, world, local)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise DistributedSetupError(f"WORLD_SIZE={world} but {name} is not set (torchrun sets it)")
        return LaunchEnv(TORCHRUN, rank, world, local, env["MASTER_ADDR"], _int_var(env, "MASTER_PORT"))

    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, world_var)
        _check_rank(rank, world, "SLURM_PROCID", world_var)
        local = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        _check_local(local, world, "SLURM_LOCALID")
        if world == 1:
            return LaunchEnv(SLURM, rank, world, local)
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        else:
            list_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None)
            if list_var is None:
                raise DistributedSetupError(
                    f"{world_var}={world} but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set"
                )
            addr = first_host(env[list_var])
        if env.get("MASTER_PORT"):
            port = _int_var(env, "MASTER_PORT")
        elif env.get("SLURM_JOB_ID"):
            port = port_from_job_id(env["SLURM_JOB_ID"])
        else:
            raise DistributedSetupError(f"{world_var}={world} but neither MASTER_PORT nor SLURM_JOB_ID is set")
        return LaunchEnv(SLURM, rank, world, local, addr, port)

    return LaunchEnv(SINGLE, 0, 1, 0)


def _check_rank(rank: int, world: int, rank_var: str, world_var: str) -> None:
    if world < 1:
        raise DistributedSetupError(f"{world_var}={world} must be >= 1")
    if not 0 <= rank < world:
        raise DistributedSetupError(f"{rank_var}={rank} is outside [0, {world_var}={world})")


def _check_local(local: int, world: int, var: str) -> None:
    if not 0 <= local < world:
        raise DistributedSetupError(f"{var}={local} must be in [0, world size {world})")


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
