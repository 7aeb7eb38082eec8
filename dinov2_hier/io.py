"""Atomic file writes: a reader never sees a half-written file under the final name."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import RunAborted


def atomic_write_file(path: Path, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` into a temporary file beside ``path``, fsync, then rename.

    ``os.replace`` is atomic on POSIX and Windows when source and target share a
    filesystem, which the temporary file beside the target guarantees.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write_file(path, write)


class WriteFailedError(RunAborted, RuntimeError):
    """A file could not be written (full disk, quota, permissions); the earlier file under
    the same name, if any, is intact."""


def atomic_savez(path: Path, **arrays: Any) -> None:
    """``numpy.savez`` to ``path`` atomically (:func:`atomic_write_file`; written through a file
    object, so numpy does not append ``.npz`` to the temporary name)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write_file(Path(path), write)


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` atomically. A failed write (torch reports a full disk as a
    C++ ``inline_container.cc`` error) raises :class:`WriteFailedError` naming the file, the
    cause and the free space left."""
    try:
        atomic_write_file(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 2**30:.2f} GiB free"
        except OSError:
            free = "free space unknown"
        raise WriteFailedError(
            f"could not write {path} ({free} on its filesystem; a full disk or quota is the usual cause): {cause}"
        ) from None


def read_json_object(path: str | os.PathLike[str], error: type[Exception] = ValueError, what: str = "file") -> dict:
    """The top-level JSON object of ``path``; ``error`` naming the file when it is missing
    (``"<what> not found: PATH"``), unreadable, not JSON (with line and column) or not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: top level must be a JSON object, got {type(doc).__name__}")
    return doc


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes: the fingerprint of weights that evaluation records
    (``metrics.json``: ``checkpoint.fingerprint``) and export checks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_error_message(path: Path, exc: BaseException) -> str:
    """One line on why ``torch.load(path, weights_only=True)`` failed. A file that holds
    pickled Python objects (what the safe load refuses) gets our own advice, never torch's
    suggestion to load it unsafely; other errors keep their first line."""
    if isinstance(exc, pickle.UnpicklingError):
        return (f"{path} holds pickled Python objects, which a safe load refuses: save the tensors alone "
                "(torch.save(model.state_dict(), ...)) or as .safetensors")
    text = str(exc).strip()
    return f"cannot read {path}: {text.splitlines()[0] if text else type(exc).__name__}"


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The JSON records of a JSON-lines file, and the numbers of the lines that are not
    JSON (torn by a full disk or a kill while appending); blank lines are skipped."""
    records, torn = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn.append(number)
    return records, torn
