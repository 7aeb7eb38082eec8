"""Re-export of :mod:`dinov2_hier.render.html` (where the toolkit lives)."""
from __future__ import annotations

from dinov2_hier.render.html import REPORT_CSS, escape_html, html_page, html_table  # noqa: F401
