"""Shared plumbing of the command-line faces: logging set-up and exit codes.

Exit codes: 0 success, 2 a user error (bad config, tree, manifest, label, checkpoint or
path: one message, no traceback), 3 training stopped on repeated non-finite losses,
too many unreadable images, a collapse (``train.stop_on_collapse``) or a checkpoint that
could not be written (full disk), 1 anything else (a bug: the traceback is printed).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_TRAINING_ABORTED = 3


class OutputDirError(ValueError):
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


#: User-error types registered by faces above the library (the eval package); see
#: :func:`register_user_errors`. Kept here so that the library never imports its faces.
_REGISTERED_USER_ERRORS: list[type[BaseException]] = []


def register_user_errors(*types: type[BaseException]) -> None:
    """Add exception types that :func:`run_cli` reports as one-line user errors (exit 2)."""
    for error_type in types:
        if error_type not in _REGISTERED_USER_ERRORS:
            _REGISTERED_USER_ERRORS.append(error_type)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input is wrong', gathered from the library and the
    faces that registered theirs (:func:`register_user_errors`)."""
    from .config import ConfigError
    from .data import DataSourceError, ManifestError
    from .hierarchy import HierarchyError
    from .labels import LabelMapError
    from .losses import SupervisedConfigError
    from .models import WeightsError
    from .paths import ResourceNotFoundError
    from .train.checkpoint import CheckpointError
    from .train.run_lock import RunDirectoryBusy

    return (
        RunDirectoryBusy, OutputDirError,
        ConfigError, ManifestError, HierarchyError, LabelMapError, WeightsError,
        ResourceNotFoundError, CheckpointError, SupervisedConfigError, DataSourceError,
        *_REGISTERED_USER_ERRORS,
    )


def aborted_types() -> tuple[type[BaseException], ...]:
    from .data import TooManyUnreadableImages
    from .io import WriteFailedError
    from .train.collapse import CollapseError
    from .train.loop import NonFiniteLossError

    return (NonFiniteLossError, TooManyUnreadableImages, CollapseError, WriteFailedError)


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
    """Run ``job`` and turn known failures into one-line messages and exit codes."""
    try:
        job()
    except user_error_types() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except aborted_types() as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return EXIT_TRAINING_ABORTED
    return 0
