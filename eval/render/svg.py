"""Re-export of :mod:`dinov2_hier.render.svg` (where the toolkit lives)."""
from __future__ import annotations

from dinov2_hier.render.svg import *  # noqa: F401,F403
