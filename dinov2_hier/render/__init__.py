"""The HTML/SVG toolkit of the reports (``report.html`` of :mod:`eval.report_html` and of
:mod:`eval.multilabel.report`, ``training.html`` of :mod:`dinov2_hier.report`):
self-contained pages (inline CSS, no scripts, no external references, no plotting library),
escaping, tables, colours and the SVG pieces and charts they draw with.

* :mod:`dinov2_hier.render.html`: :data:`REPORT_CSS`, :func:`escape_html`, :func:`html_table`,
  :func:`html_page`;
* :mod:`dinov2_hier.render.svg`: colours (:func:`palette`, :func:`blues`, :func:`diverging`),
  chart pieces (:func:`svg_open`, :func:`svg_title`, :func:`svg_text`, cells, point groups,
  legends, :func:`svg_legend_and_ticks`), :func:`svg_bar_groups` and :func:`svg_line_chart`.

On the lowest floor (docs/architecture.md) so that the library's reports and eval's use it.
"""
from __future__ import annotations

from .html import REPORT_CSS, escape_html, html_page, html_table
from .svg import (
    TAB20,
    LineScale,
    LineSeries,
    blues,
    diverging,
    line_scale,
    nice_ticks,
    palette,
    svg_bar_groups,
    svg_cell,
    svg_column_label,
    svg_dot_legend,
    svg_legend_and_ticks,
    svg_line_chart,
    svg_open,
    svg_points,
    svg_text,
    svg_title,
    text_width,
)

__all__ = [
    "REPORT_CSS",
    "TAB20",
    "LineScale",
    "LineSeries",
    "blues",
    "diverging",
    "escape_html",
    "html_page",
    "html_table",
    "line_scale",
    "nice_ticks",
    "palette",
    "svg_bar_groups",
    "svg_cell",
    "svg_column_label",
    "svg_dot_legend",
    "svg_legend_and_ticks",
    "svg_line_chart",
    "svg_open",
    "svg_points",
    "svg_text",
    "svg_title",
    "text_width",
]
