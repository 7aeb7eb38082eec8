"""The reports' HTML/SVG toolkit, re-exported: it lives in :mod:`dinov2_hier.render` (the
lowest floor, docs/architecture.md) so that the library's training report draws with it too."""
from __future__ import annotations

from dinov2_hier.render import *  # noqa: F401,F403
from dinov2_hier.render import __all__  # noqa: F401
