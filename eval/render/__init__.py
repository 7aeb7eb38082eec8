"""The HTML/SVG toolkit of the evaluation reports (``report.html`` of :mod:`eval.report_html`
and of :mod:`eval.multilabel.report`): self-contained pages (inline CSS, no scripts, no
external references, no plotting library), escaping, tables, colours and the SVG pieces and
charts both reports draw with.

* :mod:`eval.render.html`: :data:`REPORT_CSS`, :func:`escape_html`, :func:`html_table`,
  :func:`html_page`;
* :mod:`eval.render.svg`: colours (:func:`palette`, :func:`blues`, :func:`diverging`),
  chart pieces (:func:`svg_open`, :func:`svg_title`, :func:`svg_text`, cells, point groups,
  legends, :func:`svg_legend_and_ticks`) and :func:`svg_bar_groups`.
"""
from __future__ import annotations

from .html import REPORT_CSS, escape_html, html_page, html_table
from .svg import (
    TAB20,
    blues,
    diverging,
    palette,
    svg_bar_groups,
    svg_cell,
    svg_column_label,
    svg_dot_legend,
    svg_legend_and_ticks,
    svg_open,
    svg_points,
    svg_text,
    svg_title,
    text_width,
)

__all__ = [
    "REPORT_CSS",
    "TAB20",
    "blues",
    "diverging",
    "escape_html",
    "html_page",
    "html_table",
    "palette",
    "svg_bar_groups",
    "svg_cell",
    "svg_column_label",
    "svg_dot_legend",
    "svg_legend_and_ticks",
    "svg_open",
    "svg_points",
    "svg_text",
    "svg_title",
    "text_width",
]
