"""Where the project's own files live and how relative resource paths resolve."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError

#: The source checkout (``dinov2_hier/`` sits directly under it).
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ResourceNotFoundError(UserError, FileNotFoundError):
    """A file named in a config or on the command line does not exist."""


def resolve_resource(path: str | Path, what: str = "file") -> Path:
    """Resolve ``path`` to an existing absolute path.

    Absolute paths are taken as they are. A relative path is tried against the
    current directory first and then against the project checkout, so that
    ``hierarchies/wbc.json`` works from any directory. The rule is documented in
    the README; the resolved absolute path is what the saved config records.
    """
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ResourceNotFoundError(f"{what} not found: '{path}' (tried {tried})")
