"""Submit pretraining to SLURM through submitit; the job checkpoints, requeues and resumes.

``python -m dinov2_hier.run.submit --config FILE --output-dir DIR --nodes N --ngpus G
[--partition P --timeout MIN --account A --qos Q ...] [key=value ...]``

What happens (docs/slurm.md has the long version):

1. Here, on the login node: the configuration is loaded with the overrides
   (:func:`dinov2_hier.config.load_config`), so a typo exits with code 2 before anything is
   submitted. Then ``submitit.AutoExecutor(folder=DIR/submitit)`` gets the parameters of
   :func:`executor_parameters` and submits a :class:`TrainingJob`: ``N`` nodes x ``G``
   tasks, one process per GPU. submitit adds ``#SBATCH --signal=USR2@<signal delay>``;
   we add ``#SBATCH --requeue``.
2. In every task: :meth:`TrainingJob.__call__` trains in a worker thread (process group,
   config, :class:`~dinov2_hier.train.loop.Trainer` resuming from ``DIR``) while the main
   thread only waits, so that it stays free to run signal handlers.
3. Near the time limit (or on preemption when the cluster sends the user signal), SLURM
   signals every task. submitit's handler runs in each main thread; on global rank 0 it
   calls :meth:`TrainingJob.checkpoint`, which sets the :class:`StopFlag` and waits (at
   most ``stop_timeout_s``) for the worker: the loop notices the flag after the current
   iteration (a checkpoint being written finishes first, in the worker, untouched by the
   signal), all ranks agree (the loop all-reduces its stop poll), rank 0 writes the
   checkpoint, the worker returns. Only then does ``checkpoint`` return a
   ``DelayedSubmission`` of an equal job; submitit pickles it, runs ``scontrol requeue``
   and exits. Ranks > 0 ignore the signal (submitit's rule) and stop through the
   all-reduce. The requeued job starts from the top and the Trainer resumes from the
   newest checkpoint in ``DIR``.

Length (~460 lines): one SLURM job's whole life (submission, the training thread, signals,
checkpoint and requeue) in the order it happens.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli import run_cli
from ..config import load_config
from ..errors import UserError
from .signals import StopFlag

logger = logging.getLogger("dinov2_hier.run")

CLUSTERS = ("slurm", "local", "debug")
#: Seconds between two looks at the worker thread; bounds how late a signal handler runs.
POLL_S = 0.2
#: How many times the job may be requeued after hitting its time limit (preemptions do
#: not count; submitit's own default of 3 is too few for a multi-day ViT-L run).
DEFAULT_MAX_TIMEOUTS = 20
#: What `scontrol requeue` and submitit's pickling need after our checkpoint is written.
REQUEUE_MARGIN_S = 30

# AutoExecutor's shared parameter names -> the sbatch option names submitit writes.
_SBATCH_NAMES = {
    "name": "job_name",
    "timeout_min": "time",
    "mem_gb": "mem",
    "nodes": "nodes",
    "cpus_per_task": "cpus_per_task",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "ntasks_per_node",
}


class SubmitError(UserError, ValueError):
    """The job cannot be submitted as asked (no SLURM here, a parameter the executor
    rejects, a signal delay longer than the time limit)."""


# -- command line ---------------------------------------------------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dinov2_hier.run.submit",
        description="Submit dinov2_hier pretraining with submitit (SLURM); the job checkpoints and "
        "requeues itself on preemption or near its time limit and resumes from DIR.",
    )
    p.add_argument("--config", type=Path, required=True, help="training yaml, e.g. configs/train/vitl14_hierce.yaml")
    p.add_argument("--output-dir", type=Path, required=True, help="run directory (shared file system); resumed if it holds checkpoints")
    p.add_argument("--nodes", type=_int_at_least(1), default=1, help="number of nodes (default 1)")
    p.add_argument("--ngpus", type=_int_at_least(0), default=1, help="GPUs per node; one task per GPU (0: one CPU task per node)")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. a100")
    p.add_argument("--timeout", type=_int_at_least(1), default=1440, metavar="MIN", help="time limit per attempt in minutes (default 1440)")
    p.add_argument("--cpus-per-task", type=_int_at_least(1), default=10, help="CPUs per task (data loader workers + 1; default 10)")
    p.add_argument("--mem-gb", type=_positive_float, default=None, help="memory per node in GB (default: the cluster's)")
    p.add_argument("--job-name", default=None, help="default: dinov2_hier-<config file stem>")
    p.add_argument(
        "--signal-delay-s", type=_int_at_least(1), default=180,
        help="SLURM signals the job this many seconds before its time limit (default 180); "
        f"the checkpoint must be written within it minus {REQUEUE_MARGIN_S} s",
    )
    p.add_argument(
        "--max-timeouts", type=_int_at_least(0), default=DEFAULT_MAX_TIMEOUTS,
        help=f"requeues allowed after reaching the time limit (default {DEFAULT_MAX_TIMEOUTS}; preemptions do not count)",
    )
    p.add_argument("--setup", action="append", default=[], metavar="CMD", help="shell line run before the job (repeatable), e.g. 'module load cuda'")
    p.add_argument("--cluster", choices=CLUSTERS, default="slurm", help="slurm (default), local (this machine, background) or debug (in this process)")
    p.add_argument("--dry-run", action="store_true", help="print the parameters and the sbatch lines; submit nothing")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.train=[wbc.csv]")
    return p.parse_args(argv)


def default_job_name(config: str | Path) -> str:
    return f"dinov2_hier-{Path(config).stem}"


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Our flags in submitit's ``AutoExecutor.update_parameters`` vocabulary.

    Shared names (``nodes``, ``gpus_per_node``, ``tasks_per_node`` = one task per GPU,
    ``cpus_per_task``, ``timeout_min``, ``mem_gb``, ``name``) plus ``slurm_``-prefixed ones,
    which the local and debug executors ignore. Flags left unset are left out, so the
    cluster's defaults apply. ``--requeue`` lets ``scontrol requeue`` (and a preemption in
    REQUEUE mode) put the job back in the queue.
    """
    params: dict[str, Any] = {
        "name": args.job_name or default_job_name(args.config),
        "nodes": args.nodes,
        "tasks_per_node": max(args.ngpus, 1),
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout,
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_additional_parameters": {"requeue": True},
    }
    if args.ngpus > 0:
        params["gpus_per_node"] = args.ngpus
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    for flag in ("partition", "account", "qos", "constraint"):
        value = getattr(args, flag)
        if value is not None:
            params[f"slurm_{flag}"] = value
    if args.setup:
        params["slurm_setup"] = list(args.setup)
    return params


def stop_timeout_s(signal_delay_s: int) -> float:
    """How long the checkpoint hook waits for the training to write its checkpoint: the
    signal delay minus a margin for the requeue, at least 10 s."""
    return float(max(signal_delay_s - REQUEUE_MARGIN_S, 10))


# -- what `sbatch` will see -----------------------------------------------------------------
def _mem_string(mem_gb: float) -> str:
    """submitit's rendering of ``mem_gb``: whole GB as ``64GB``, otherwise MB."""
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def sbatch_lines(params: dict[str, Any], signal_name: str | None = None) -> list[str]:
    """The ``#SBATCH`` lines that ``params`` (from :func:`executor_parameters`) become on a
    SLURM cluster, in submitit's spelling and order (sorted). submitit adds ``--output``,
    ``--error``, ``--open-mode=append`` and ``--wckey`` on top. ``signal_name`` defaults to
    submitit's preemption signal (``USR2`` unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise).
    """
    if signal_name is None:
        import submitit

        signal_name = submitit.JobEnvironment.USR_SIG
    flags: dict[str, Any] = {}
    delay = 90  # submitit's default
    for key, value in params.items():
        if key in _SBATCH_NAMES:
            flags[_SBATCH_NAMES[key]] = _mem_string(value) if key == "mem_gb" else value
        elif key == "slurm_signal_delay_s":
            delay = value
        elif key == "slurm_additional_parameters":
            flags.update(value)
        elif key.startswith("slurm_") and key != "slurm_setup":
            flags[key[len("slurm_"):]] = value
    flags["signal"] = f"{signal_name}@{delay}"
    lines = []
    for key in sorted(flags):
        option = key.replace("_", "-")
        value = flags[key]
        lines.append(f"#SBATCH --{option}" if value is True else f"#SBATCH --{option}={shlex.quote(str(value))}")
    return lines


# -- the job --------------------------------------------------------------------------------
class _Run:
    """Run-time state of one :meth:`TrainingJob.__call__` (never pickled)."""

    def __init__(self) -> None:
        self.stop = StopFlag()
        self.finished = threading.Event()
        self.thread: threading.Thread | None = None
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None


@dataclass
class TrainingJob:
    """The callable submitit pickles and runs in every task: one training process per GPU.

    Holds only paths and strings, so it pickles anywhere; the run-time state (stop flag,
    worker thread) is dropped when pickled and not compared by ``==``.

    Args:
        config: training yaml (absolute, or relative to the job's working directory).
        output_dir: run directory; every start resumes from its newest checkpoint.
        overrides: ``key=value`` strings applied on top of ``config``.
        stop_timeout_s: longest wait of :meth:`checkpoint` for the checkpoint to be
            written, in seconds (the signal delay minus a margin, see :func:`stop_timeout_s`).
    """

    config: str
    output_dir: str
    overrides: tuple[str, ...] = ()
    stop_timeout_s: float = 150.0
    _run: _Run | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.config = str(self.config)
        self.output_dir = str(self.output_dir)
        self.overrides = tuple(self.overrides)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_run"] = None
        return state

    @property
    def stop_flag(self) -> StopFlag | None:
        """The flag of the run in progress (None before the first call)."""
        return None if self._run is None else self._run.stop

    def __call__(self) -> dict[str, Any]:
        """Train (resuming from ``output_dir``) until the end or a stop request.

        Returns ``{"output_dir", "rank", "world_size", "start_iteration", "iteration",
        "interrupted"}``. The training runs in a worker thread; this (main) thread only
        waits, so that signal handlers, which Python runs in the main thread, run promptly
        and can wait for the worker without blocking it.
        """
        run = _Run()
        self._run = run
        # Daemon: should submitit exit the process while the worker is stuck (e.g. a rank
        # that died mid-collective), the exit is not blocked. Files are written atomically.
        run.thread = threading.Thread(target=self._work, args=(run,), name="dinov2_hier-train", daemon=True)
        run.thread.start()
        try:
            while not run.finished.is_set():
                run.thread.join(timeout=POLL_S)
        finally:
            if not run.finished.is_set():  # leaving early (SystemExit, KeyboardInterrupt)
                run.stop.set("the job's main thread is exiting")
        if run.error is not None:
            raise run.error
        assert run.summary is not None
        return run.summary

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's preemption / time-limit hook; returns ``DelayedSubmission(self)``.

        Called by submitit's signal handler in the main thread of global rank 0. Sets the
        stop flag, then waits until the worker has written its checkpoint and returned
        (at most ``stop_timeout_s``; polling with sleeps, no lock, as it runs in a signal
        handler). submitit requeues only after this returns, so the requeued job finds the
        checkpoint. If the wait times out, the job still requeues and resumes from the
        previous periodic checkpoint (checkpoints are written atomically, never half).
        """
        import submitit

        run = self._run
        if run is not None and run.thread is not None and not run.finished.is_set():
            if threading.current_thread() is run.thread:
                raise RuntimeError("TrainingJob.checkpoint() called from its own training thread would wait forever")
            run.stop.set("submitit checkpoint: preemption or time limit")
            deadline = time.monotonic() + self.stop_timeout_s
            while not run.finished.is_set() and time.monotonic() < deadline:
                time.sleep(POLL_S / 4)
            if not run.finished.is_set():
                logger.warning(
                    "no checkpoint within %.0f s of the stop request; requeueing anyway, the next start "
                    "resumes from the previous checkpoint", self.stop_timeout_s,
                )
        return submitit.helpers.DelayedSubmission(self)

    def _work(self, run: _Run) -> None:
        try:
            run.summary = self._train(run.stop)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            run.error = exc
        finally:
            run.finished.set()

    def _train(self, stop: StopFlag) -> dict[str, Any]:
        from .. import distributed
        from ..cli import setup_logging
        from ..train.loop import Trainer

        _export_torch_distributed_env()
        info = distributed.init_distributed()  # in this thread: it also selects the CUDA device
        try:
            out = Path(self.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            setup_logging(out / "log.txt" if info.rank == 0 else None)
            if info.world_size > 1:
                logger.info("distributed: %d ranks, backend %s", info.world_size, info.backend)
            cfg = load_config(self.config, self.overrides)
            trainer = Trainer(cfg, out, resume=True)
            start = trainer.state.iteration
            # Every rank polls once before training (collective): a stop requested while the
            # model was being built returns at once; the newest checkpoint is already current.
            if stop.any_rank():
                trainer.state.interrupted = True
            else:  # the loop polls the flag after every iteration and agrees across ranks
                trainer.run(should_stop=stop)
            state = trainer.state
            if state.interrupted:
                logger.warning(
                    "stopped at iteration %d (%s); the next start resumes from %s", state.iteration, stop.reason, out
                )
            del trainer  # its DDP / FSDP wrappers go before the process group does
            distributed.settle_before_destroy()
            return {
                "output_dir": str(out),
                "rank": info.rank,
                "world_size": info.world_size,
                "start_iteration": start,
                "iteration": state.iteration,
                "interrupted": state.interrupted,
            }
        finally:
            distributed.destroy_distributed()


def _export_torch_distributed_env() -> None:
    """For submitit's local executor with several tasks: export ``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from submitit's description of
    the job (``submitit.helpers.TorchDistributedEnvironment``), which
    :func:`dinov2_hier.distributed.init_distributed` then reads as torchrun's. Under SLURM
    (``SLURM_PROCID`` set by srun) or torchrun (``RANK`` set) nothing is exported: those
    variables are read directly. ``CUDA_VISIBLE_DEVICES`` is left alone: the process group
    set-up picks the GPU from the local rank."""
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
        return
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (called directly)
        return
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


# -- submission -----------------------------------------------------------------------------
def make_executor(folder: Path, cluster: str = "slurm", max_timeouts: int = DEFAULT_MAX_TIMEOUTS):
    """``submitit.AutoExecutor`` for ``cluster``; a missing SLURM becomes a :class:`SubmitError`."""
    import submitit

    try:
        return submitit.AutoExecutor(
            folder=folder, cluster=cluster, slurm_max_num_timeout=max_timeouts, local_max_num_timeout=max_timeouts
        )
    except RuntimeError as exc:
        raise SubmitError(
            f"cannot submit to '{cluster}': {exc} (run this on a SLURM login node, or pass --dry-run, "
            "or --cluster local to train on this machine)"
        ) from None


def submit(job: TrainingJob, params: dict[str, Any], folder: Path, cluster: str = "slurm",
           max_timeouts: int = DEFAULT_MAX_TIMEOUTS):
    """Submit ``job`` with ``params`` (:func:`executor_parameters`); returns the submitit job."""
    executor = make_executor(folder, cluster, max_timeouts)
    try:
        executor.update_parameters(**params)
    except (ValueError, NameError, AssertionError) as exc:  # submitit's ways of rejecting a value
        raise SubmitError(f"submitit rejected the job parameters for '{cluster}': {exc}") from None
    return executor.submit(job)


def dry_run_text(params: dict[str, Any], job: TrainingJob, folder: Path, cluster: str, max_timeouts: int) -> str:
    lines = [
        f"# submitit.AutoExecutor(folder={str(folder)!r}, cluster={cluster!r}, slurm_max_num_timeout={max_timeouts})",
        "# executor.update_parameters(**parameters) with parameters =",
        json.dumps(params, indent=2, sort_keys=True),
        "# equivalent sbatch lines (submitit adds --output, --error, --open-mode=append, --wckey):",
        *sbatch_lines(params),
    ]
    if params.get("slurm_setup"):
        lines += ["# setup lines, run before srun:", *params["slurm_setup"]]
    lines += [
        f"# job: {type(job).__module__}.{job!r}",
        "# srun then starts one task per GPU: python -u -m submitit.core._submit " + shlex.quote(str(folder)),
        "# dry run: nothing was submitted",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job() -> None:
        load_config(args.config, args.overrides)  # a bad config or override exits 2 here, before submitting
        if args.signal_delay_s >= 60 * args.timeout:
            raise SubmitError(
                f"--signal-delay-s {args.signal_delay_s} is not shorter than --timeout {args.timeout} min: "
                "the job would be told to stop as soon as it starts"
            )
        params = executor_parameters(args)
        folder = args.output_dir.resolve() / "submitit"
        train_job = TrainingJob(
            config=str(args.config.resolve()),
            output_dir=str(args.output_dir.resolve()),
            overrides=tuple(args.overrides),
            stop_timeout_s=stop_timeout_s(args.signal_delay_s),
        )
        if args.dry_run:
            print(dry_run_text(params, train_job, folder, args.cluster, args.max_timeouts))
            return
        submitted = submit(train_job, params, folder, args.cluster, args.max_timeouts)
        print(f"submitted job {submitted.job_id} ({args.cluster}); submitit logs in {folder}; run directory {train_job.output_dir}")
        if args.cluster == "debug":  # the debug executor runs the job here, when asked for its result
            print(json.dumps(submitted.result(), sort_keys=True))

    return run_cli(job)


if __name__ == "__main__":
    # Import the module under its package name: the pickled job must name
    # dinov2_hier.run.submit.TrainingJob, which the job can import, not __main__.TrainingJob.
    from dinov2_hier.run.submit import main as _main

    sys.exit(_main())
