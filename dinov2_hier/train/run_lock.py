"""One training run per output directory: an advisory lock on ``OUTPUT_DIR/.lock``.

The lock is ``flock`` on an open file: the kernel releases it when the holder exits, is
killed or crashes, so a leftover ``.lock`` file never blocks a later run (no stale lock to
clean up). The file records who holds it (host, pid, start time) for the refusal message.
On a shared filesystem the lock works where ``flock`` does across nodes (local disks,
Lustre with ``-o flock``, NFS with lockd); elsewhere it protects one node only.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

LOCK_FILE = ".lock"


class RunDirectoryBusy(UserError, RuntimeError):
    """Another live process trains into the same output directory (exit code 2)."""


class RunLock:
    """Hold ``directory/.lock`` exclusively until :meth:`release` (or this process ends).

    Raises :class:`RunDirectoryBusy` naming the holder when another process has it.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open on purpose)
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown process"
            self._file.close()
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by another training run ({holder}); wait for it to end "
                "or use another --output-dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._file.flush()

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
