"""How many CPU threads and loader processes a phase uses: one policy for training and evaluation.

On a CPU that other work keeps busy, PyTorch's default of one intra-op thread per core is
the slowest choice: its OpenMP threads wait for each other at every parallel region (they
spin), and a thread whose core runs someone else's process holds all of them up. Measured
on this project's 2-core machine under a load of 7-9 (other jobs): one fold of the batched
PyTorch logistic regression (1,288 x 192 features of a demo checkpoint) took 227-262 s
with 2 threads and 18-21 s with 1, the same chosen C and predictions; on the idle machine
2 threads gained little (7.9-8.1 s against 8.3-9.1 s). So:

* **cores** (:func:`available_cores`): the CPUs this process may run on (its affinity
  mask, which SLURM and ``taskset`` set), else ``os.cpu_count()``.
* **loader workers** (:func:`loader_workers`): feature extraction at most ``cores - 1``
  (at least 1 when any were asked for; the main process needs a core for the model),
  training at most ``cores``. Torch warns at every loader start when the workers exceed
  the cores; a lowering is logged once instead.
* **torch intra-op threads of a phase** (:func:`thread_plan`): the *idle* cores, measured
  over :data:`IDLE_SAMPLE_S` from ``/proc/stat`` when the phase starts (a core counts when
  at least 75% idle), less the phase's loader workers, less one spare core
  (:data:`SPARE_CORES`), at least 1 and at most ``cores``; without ``/proc/stat`` the
  1-minute load average stands in. An idle 16-core machine gets 15 threads (11 beside 4
  loader workers), a busy machine and any 2-core machine one.
* **BLAS threads** (numpy/scipy's OpenBLAS, which scikit-learn's logistic regression
  uses) in the probe phase: 1. Its products are small: on a 16-core GPU machine
  scikit-learn's C sweep took 44.4 s with one BLAS thread against more than 170 s with
  the default (docs/evaluation.md).
* **The user decides** when ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set (torch
  threads left as they are; BLAS too when ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS``
  is set) or when a face passes an explicit count (``--threads N`` of the ``eval`` faces:
  torch and BLAS both ``N``).

The thread count does not change the results: the batched logistic regression gave the
same bits with 1 and 2 threads (MKL splits the products along rows and columns, not
along the reduction).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

logger = logging.getLogger("dinov2_hier.cpu")

#: Seconds over which the idle cores are sampled at the start of a phase.
IDLE_SAMPLE_S = 0.3
#: A core counts as free when at least ``1 - IDLE_SLACK`` of it was idle: a thread on a core
#: that another process uses part of the time still holds every other thread up.
IDLE_SLACK = 0.25
#: Idle cores left without a torch thread: a process that starts on the machine during the
#: phase (they last minutes) runs there instead of stalling every thread. On 2 cores this
#: means one thread: idle, one fold of the demo checkpoint's logistic regression took 7.9-8.1 s
#: with 2 threads and 8.3-9.1 s with 1; busy, 227-262 s against 18-21 s.
SPARE_CORES = 1
#: Environment variables that fix torch's intra-op threads (the user's choice wins).
TORCH_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Environment variables that fix the BLAS threads of numpy/scipy.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_LOWERED: set[tuple[str, int, int]] = set()


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, else ``os.cpu_count()``, else 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_ids() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _read_proc_stat(cpus: set[int] | None) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over ``cpus`` (all when None); None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    idle = total = 0.0
    seen = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            fields = [float(x) for x in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus or len(fields) < 5:
            continue
        idle += fields[3] + fields[4]
        total += sum(fields)
        seen = True
    return (idle, total) if seen else None


def idle_cores(interval: float = IDLE_SAMPLE_S) -> float | None:
    """Idle cores among :func:`available_cores` (a fraction), measured over ``interval``
    seconds from ``/proc/stat``; else ``cores - load average`` (1 minute, which counts this
    process too); None when neither is there."""
    cores = available_cores()
    cpus = _cpu_ids()
    first = _read_proc_stat(cpus)
    if first is not None:
        time.sleep(interval)
        second = _read_proc_stat(cpus)
        if second is not None and second[1] > first[1]:
            share = (second[0] - first[0]) / (second[1] - first[1])
            return max(0.0, min(1.0, share)) * cores
    try:
        return max(0.0, cores - os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def loader_workers(requested: int, what: str, cores: int | None = None, reserve: int = 1) -> int:
    """``requested`` DataLoader workers, lowered to ``cores - reserve`` (at least 1); a
    lowering is logged once per process for each ``what``, ``requested`` and cap.

    ``reserve``: cores left to the main process: 1 for feature extraction (the main process
    runs the model, and on the default 4 workers a 2-core machine thrashes); 0 for training,
    whose ``data.num_workers`` is a deliberate setting that only loses the workers torch
    itself calls too many (more than the cores; it warns at every loader start then)."""
    requested = int(requested)
    cores = available_cores() if cores is None else int(cores)
    cap = max(1, cores - int(reserve))
    if requested <= cap:
        return requested
    key = (what, requested, cap)
    if key not in _LOWERED:
        _LOWERED.add(key)
        logger.info("%s: %d loader workers lowered to %d (%d CPU core(s) available%s)", what, requested, cap, cores,
                    "; one stays for the main process" if reserve else "")
    return cap


def user_threads(env: Mapping[str, str] | None = None, names: tuple[str, ...] = TORCH_THREAD_VARS) -> str | None:
    """``NAME=value`` of the first of ``names`` set in ``env`` (default ``os.environ``), else None."""
    env = os.environ if env is None else env
    for name in names:
        if env.get(name, "").strip():
            return f"{name}={env[name].strip()}"
    return None


_MEASURE = object()


@dataclass(frozen=True)
class ThreadPlan:
    """Threads of one phase: torch intra-op ``threads`` and ``blas`` (numpy/scipy) threads
    to set, None = leave as they are; ``why`` says how they were chosen (for the log)."""

    threads: int | None
    blas: int | None
    why: str

    @contextlib.contextmanager
    def applied(self) -> Iterator[ThreadPlan]:
        """Set the counts inside the block and restore the previous ones after it."""
        import torch

        before = torch.get_num_threads()
        limits = None
        if self.threads is not None and self.threads != before:
            torch.set_num_threads(self.threads)
        if self.blas is not None:
            try:
                from threadpoolctl import threadpool_limits

                limits = threadpool_limits(limits=self.blas, user_api="blas")
            except ImportError:  # scikit-learn depends on it; without it BLAS keeps its default
                limits = None
        try:
            yield self
        finally:
            if limits is not None:
                limits.restore_original_limits()
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


def thread_plan(workers: int = 0, *, threads: int | None = None, blas: int | None = None,
                cores: int | None = None, idle: float | None | object = _MEASURE,
                env: Mapping[str, str] | None = None) -> ThreadPlan:
    """The threads of a phase that runs ``workers`` loader processes beside the main one.

    ``threads``: an explicit count (``--threads``), used for torch and BLAS alike. Else the
    environment (:data:`TORCH_THREAD_VARS`, :data:`BLAS_THREAD_VARS`) wins where set, and
    otherwise torch gets ``floor(idle + IDLE_SLACK) - workers - SPARE_CORES`` threads (1 to
    ``cores``; ``idle`` defaults to :func:`idle_cores`, measured now; None = unknown = all
    cores) and BLAS gets ``blas`` (None = leave).
    """
    if threads is not None:
        n = max(1, int(threads))
        return ThreadPlan(n, n, f"{n} (--threads)")
    pinned = user_threads(env)
    blas_pinned = user_threads(env, BLAS_THREAD_VARS)
    blas = None if blas_pinned is not None else blas
    if pinned is not None:
        return ThreadPlan(None, blas, f"as set by {pinned}")
    cores = available_cores() if cores is None else int(cores)
    if idle is _MEASURE:
        idle = idle_cores()
    free = cores if idle is None else min(cores, int(float(idle) + IDLE_SLACK))
    n = max(1, free - int(workers) - SPARE_CORES)
    seen = "idle unknown" if idle is None else f"{float(idle):.1f} idle"
    return ThreadPlan(n, blas, f"{n} ({seen} of {cores} core(s), {int(workers)} loader worker(s))")
