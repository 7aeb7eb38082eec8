"""Stop training cleanly on a signal: a flag the training loop polls between iterations.

A signal handler must not write a checkpoint itself: it interrupts the main thread at an
arbitrary bytecode, possibly inside an optimizer step or a ``torch.save``. The handlers
here only *set a flag*; :meth:`dinov2_hier.train.loop.Trainer.run` polls it after each
iteration and, when it is set, writes a checkpoint and returns, so a save that was in
progress when the signal arrived finishes first.

On several ranks every process must stop at the same iteration (the checkpoint and the
next step are collective), but the signal may reach the ranks at different moments, or
only rank 0 (submitit calls its checkpoint hook on rank 0 alone). The training loop
therefore all-reduces the answer of its ``should_stop`` poll (max over ranks) after every
iteration, so a plain :class:`StopFlag` is the right ``should_stop`` on any number of
ranks; :meth:`StopFlag.any_rank` is the same agreement for a poll outside the loop.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterable, Iterator

#: What ``python -m dinov2_hier.train`` stops on: SIGUSR1/SIGUSR2 (SLURM ``--signal`` near the
#: time limit, forwarded by ``slurm/common.sh``; submitit's default is USR2), SIGTERM
#: (``scancel``, preemption with a grace time, the end of the time limit, GNU ``timeout``)
#: and SIGINT (Ctrl-C; a second Ctrl-C interrupts at once). The training DataLoader's
#: workers ignore all of them (``dinov2_hier.train.data.LOADER_IGNORED_SIGNALS``), so a
#: signal to the whole process group reaches the trainer alone.
DEFAULT_STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """A one-way "please checkpoint and stop" flag, safe to set from a signal handler or
    another thread (a :class:`threading.Event`) and cheap to poll (no lock taken).

    Calling the flag (``flag()``) is the same as :meth:`is_set`: hand the flag itself to
    ``Trainer.run(should_stop=flag)``, which agrees across ranks by itself.
    There is deliberately no blocking ``wait``: the main thread waiting on the event's
    lock could deadlock with a signal handler setting it; poll with ``time.sleep``.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._reason = ""

    def set(self, reason: str = "requested") -> None:
        """Ask for a stop; the first reason given is kept (later calls change nothing).

        Once set, a call takes no lock (``is_set`` is lock-free), so a second signal
        arriving while the first handler runs cannot deadlock on the event's lock.
        """
        if self._event.is_set():
            return
        self._reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    __call__ = is_set

    @property
    def reason(self) -> str:
        """Why the stop was requested (empty while not set), e.g. ``"signal SIGUSR1"``."""
        return self._reason

    def any_rank(self) -> bool:
        """True if the flag is set on *any* rank; sets it here too when another rank's is.

        Collective when a process group with more than one rank is initialised: every rank
        must call it at the same point. One all-reduce (max) of one number, on the current CUDA device with NCCL and
        on the CPU otherwise (:func:`dinov2_hier.distributed.any_rank`). Without a process
        group this is :meth:`is_set`.
        """
        import torch
        import torch.distributed as dist

        from .. import distributed

        local = self.is_set()
        if not distributed.is_enabled() or distributed.get_world_size() == 1:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        agreed = distributed.any_rank(local, device)
        if agreed and not local:
            self.set("another rank was asked to stop")
        return agreed


@contextlib.contextmanager
def stop_on_signals(
    signals: Iterable[int] = DEFAULT_STOP_SIGNALS, flag: StopFlag | None = None
) -> Iterator[StopFlag]:
    """Within the block, each of ``signals`` sets the returned :class:`StopFlag` (and does
    nothing else: no exit, no I/O). The previous handlers are restored on exit, also when
    the block raises. Must be entered in the main thread (Python delivers signals there).

    Example (the training CLI)::

        with stop_on_signals() as stop:
            Trainer(cfg, out).run(should_stop=stop)
    """
    flag = StopFlag() if flag is None else flag

    def handler(signum: int, frame) -> None:  # noqa: ARG001 (signature fixed by `signal`)
        if signum == signal.SIGINT and flag.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        flag.set(f"signal {signal.Signals(signum).name}")

    previous: dict[int, object] = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
        yield flag
    finally:
        for signum, old in previous.items():
            # None: the old handler was not installed from Python; SIG_DFL is the closest.
            signal.signal(signum, signal.SIG_DFL if old is None else old)
