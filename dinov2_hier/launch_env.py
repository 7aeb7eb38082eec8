"""Where this process stands in a job, from the launcher's environment variables.

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

import os
import re
from dataclasses import dataclass
from typing import Mapping

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
