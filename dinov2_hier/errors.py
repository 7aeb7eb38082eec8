"""The error layer: what a failure means to the person who ran the command.

Two bases, one per way a command fails without a bug:

* :class:`UserError`: the input is wrong (a config value, a file, a path, a label, a
  command-line value). :func:`dinov2_hier.cli.run_cli` prints ``error: MESSAGE`` (one
  line, no traceback) and returns exit code 2.
* :class:`RunAborted`: the run itself had to stop (repeated non-finite losses, too many
  unreadable images, ``train.stop_on_collapse``, a checkpoint that could not be written).
  ``run_cli`` prints ``training stopped: MESSAGE`` and returns exit code 3.

Anything else that reaches a command line is a bug: the traceback is printed, exit code 1.
Every error class that a user can meet subclasses one of the two, usually together with
the built-in type callers catch (``class ConfigError(UserError, ValueError)``), so that
``except ValueError`` keeps working. Errors about arguments of the library's own calls
(a tensor of the wrong shape, a sampler size out of range) are plain ``ValueError`` s:
reaching a command line, they are bugs.

The module sits on the lowest floor (docs/architecture.md) and imports nothing of the
project, so every module may define its errors on these bases.
"""
from __future__ import annotations

import difflib
from typing import Any

__all__ = ["EXIT_RUN_ABORTED", "EXIT_USER_ERROR", "LocatedError", "RunAborted", "UserError", "suggest"]

EXIT_USER_ERROR = 2
EXIT_RUN_ABORTED = 3


class UserError(Exception):
    """Bad input: a config, file, path or command-line value that cannot work (exit code 2).
    The message says what is wrong and where."""


class RunAborted(Exception):
    """A run that had to stop before its end (exit code 3); the message says why."""


class LocatedError(UserError, ValueError):
    """A bad-input error that knows where it happened: ``source:line:column: message``.

    Attributes ``source`` (file name or ``"<dict>"``), ``line`` / ``column`` (1-based,
    or None when unknown) and ``message`` (without the location prefix) are kept for
    programs that want to present the error themselves.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        location = ""
        if source is not None:
            location = source
            if line is not None:
                location += f":{line}"
                if column is not None:
                    location += f":{column}"
            location += ": "
        super().__init__(location + message)


def suggest(word: str, candidates: Any, n: int = 3) -> str:
    """``"; did you mean 'x' or 'y'?"`` for close matches of ``word``, or ``""``."""
    if not isinstance(word, str):
        return ""
    # cutoff 0.5 (difflib's default is 0.6) so that short codes like 'X2' still suggest 'X1'.
    matches = difflib.get_close_matches(word, [c for c in candidates if isinstance(c, str)], n=n, cutoff=0.5)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"
