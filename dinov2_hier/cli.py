"""Shared plumbing of the command-line faces: logging set-up and exit codes.

Exit codes: 0 success, 2 a user error (bad config, tree, manifest, label, checkpoint or
path: one message, no traceback), 3 training stopped on repeated non-finite losses,
too many unreadable images, a collapse (``train.stop_on_collapse``) or a checkpoint that
could not be written (full disk), 1 anything else (a bug: the traceback is printed).
Which is which is decided by the error's base in :mod:`dinov2_hier.errors`
(:class:`~dinov2_hier.errors.UserError`, :class:`~dinov2_hier.errors.RunAborted`), so this
module knows no concrete error class and imports nothing above the lowest floor.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import EXIT_RUN_ABORTED, EXIT_USER_ERROR, RunAborted, UserError

__all__ = ["EXIT_RUN_ABORTED", "EXIT_USER_ERROR", "OutputDirError", "prepare_output_dir", "run_cli", "setup_logging"]


class OutputDirError(UserError, ValueError):
    """An output directory cannot be created or written to (exit 2)."""


def prepare_output_dir(path: Path, flag: str = "--output-dir") -> Path:
    """Create ``path`` (with its parents) and check that a file can be written in it.

    Without the check an unwritable directory (read-only file system, no permission, a
    file in the way) fails later with a PermissionError traceback at the first log line,
    after the data was read. The check writes and removes a ``.NAME.tmp`` file, the
    pattern of interrupted atomic writes that a resuming trainer deletes, because
    ``os.access`` answers yes to root on a read-only mount's files and to ACL-denied paths.

    Raises:
        OutputDirError: naming ``flag`` and the directory, and why.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"{flag} {path} exists and is not a directory") from None
    except OSError as exc:
        raise OutputDirError(f"{flag} {path}: cannot create the directory: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_check.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"{flag} {path} is not writable: {exc.strerror or exc}") from None
    return path


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, if given, to ``log_file`` (appending, so resumed runs keep history)."""
    root = logging.getLogger("dinov2_hier")
    root.setLevel(level)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def run_cli(job: Callable[[], None]) -> int:
    """Run ``job`` and turn known failures into one-line messages and exit codes: a
    :class:`~dinov2_hier.errors.UserError` is ``error: MESSAGE`` and 2, a
    :class:`~dinov2_hier.errors.RunAborted` ``training stopped: MESSAGE`` and 3; anything
    else propagates (a bug: traceback, exit code 1)."""
    try:
        job()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunAborted as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return EXIT_RUN_ABORTED
    return 0
