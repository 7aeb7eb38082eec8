"""Inline SVG for the evaluation reports, hand-written (no plotting library): colours, the
pieces every chart repeats (frame, title, labels, legends, cells, point groups) and one
chart, horizontal grouped bars on a [0, 1] axis.

Coordinates are pixels, formatted as the charts always wrote them (one decimal for computed
positions); text passed as ``text``, ``title`` or ``label`` is escaped here, arguments named
``markup`` are inserted as they are.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .html import escape_html

TAB20 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)


# --------------------------------------------------------------------------- colours


def palette(n: int) -> list[str]:
    """``n`` distinguishable colours: tab20, then golden-angle hues."""
    colours = list(TAB20[:n])
    for i in range(len(colours), n):
        hue = (i * 137.508) % 360
        colours.append(f"hsl({hue:.0f},65%,{45 + 10 * (i % 3)}%)")
    return colours


def blues(t: float) -> str:
    """White (t=0) to dark blue (t=1)."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (255 - (255 - 8) * t, 255 - (255 - 48) * t, 255 - (255 - 107) * t)
    return f"rgb({r:.0f},{g:.0f},{b:.0f})"


def diverging(v: float, vmax: float) -> str:
    """Blue (negative) - white (0) - red (positive), saturating at ``|v| = vmax``."""
    t = max(-1.0, min(1.0, v / vmax)) if vmax > 0 else 0.0
    if t >= 0:
        r, g, b = 255 - 75 * t, 255 - 225 * t, 255 - 215 * t
    else:
        r, g, b = 255 + 222 * t, 255 + 150 * t, 255 + 75 * t
    return f"rgb({r:.0f},{g:.0f},{b:.0f})"


# --------------------------------------------------------------------------- pieces


def text_width(text: str, font_px: float) -> float:
    """Estimated width in px of ``text`` at ``font_px``."""
    return 0.6 * font_px * len(text)


def svg_open(css_class: str, width: float, height: float, label: str) -> str:
    """The opening ``<svg>`` tag of a chart (``label``: its accessible name)."""
    return (f'<svg class="{css_class}" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape_html(label)}">')


def svg_title(title: str) -> str:
    """A chart's bold title at its top left corner."""
    return f'<text x="4" y="16" font-size="13" font-weight="bold">{escape_html(title)}</text>'


def svg_text(x: float, y: float, text: Any, size: str = "11", anchor: str = "", attrs: str = "") -> str:
    """``text`` at ``(x, y)``; ``size`` is written as given, ``anchor`` is the text-anchor
    (start when empty), ``attrs`` more attributes (markup)."""
    anchor_attr = f' text-anchor="{anchor}"' if anchor else ""
    more = f" {attrs}" if attrs else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}"{anchor_attr}{more}>{escape_html(text)}</text>'


def svg_column_label(x: float, y: float, text: str, size: str = "11") -> str:
    """A column label at ``(x, y)``, rotated 45 degrees up and to the right."""
    return svg_text(x, y, text, size, attrs=f'transform="rotate(-45 {x:.1f} {y:.1f})"')


def svg_cell(x: float, y: float, size: float, fill: str, title_markup: str) -> str:
    """A square cell of a matrix with its tooltip."""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{size:.1f}" height="{size:.1f}" '
            f'fill="{fill}" stroke="#ddd"><title>{title_markup}</title></rect>')


def svg_points(xs: Sequence[float], ys: Sequence[float], radius: Any, colour: str, opacity: str,
               title: str) -> str:
    """One group of dots of one colour, with a tooltip naming the group."""
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}"/>' for x, y in zip(xs, ys))
    return f'<g fill="{colour}" fill-opacity="{opacity}"><title>{escape_html(title)}</title>{dots}</g>'


def svg_dot_legend(x: float, y: int, colour: str, text: str) -> str:
    """A legend entry: a dot at ``(x, y)`` and ``text`` to its right."""
    return (f'<circle cx="{x:.0f}" cy="{y}" r="5" fill="{colour}"/>'
            f'<text x="{x + 10:.0f}" y="{y + 4}" font-size="11">{escape_html(text)}</text>')


def svg_legend_and_ticks(
    names: Sequence[str], colours: Mapping[str, str], left: float, top: float, plot_w: float, height: float
) -> list[str]:
    """SVG pieces shared by the horizontal bar charts on a [0, 1] axis: one legend row
    per name (16 px apart from y = 8) and grid lines with labels at 0, 0.25, ..., 1 from
    ``left`` to ``left + plot_w`` (pixels), between ``top - 4`` and ``height - 24``."""
    parts = []
    for i, name in enumerate(names):
        y = 8 + 16 * i
        parts.append(f'<rect x="{left:.1f}" y="{y}" width="12" height="10" fill="{colours[name]}"/>'
                     f'<text x="{left + 16:.1f}" y="{y + 9}" font-size="11">{escape_html(name)}</text>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4:.1f}" x2="{x:.1f}" y2="{height - 24:.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{x:.1f}" y="{height - 10:.1f}" font-size="10" text-anchor="middle">{tick:g}</text>')
    return parts


# --------------------------------------------------------------------------- the bar chart


def svg_bar_groups(
    labels: Sequence[str],
    series: Sequence[str],
    colours: Mapping[str, str],
    bar: Callable[[str, str], tuple[float | None, float | None, str]],
    *,
    left: float,
    css_class: str,
    label: str,
    label_size: str = "11",
    whisker: str = 'stroke="#333"',
    missing: bool = False,
    reference: tuple[float, str] | None = None,
) -> str:
    """Horizontal grouped bars on a [0, 1] axis: a group per entry of ``labels`` (written
    right-aligned in the ``left`` px before the axis), a bar per ``series`` in its colour,
    legend above, grid lines at 0, 0.25, ..., 1.

    ``bar(label, series)`` gives ``(mean, std, markup)``: the bar's length (clipped to
    [0, 1]), a whisker of ± ``std`` unless it is 0 or None (drawn with the attributes
    ``whisker``) and the tooltip after ``"series, label: "``. A None mean draws nothing, or
    "n/a" when ``missing``. ``reference = (value, title)`` adds a dashed vertical line.
    """
    bar_h, plot_w = 9.0, 360.0
    group = bar_h * len(series) + 8
    top = 24 + 16 * len(series)
    width, height = left + plot_w + 60, top + group * len(labels) + 30
    parts = [svg_open(css_class, width, height, label)]
    parts += svg_legend_and_ticks(series, colours, left, top, plot_w, height)
    if reference is not None:
        xb = left + min(max(reference[0], 0.0), 1.0) * plot_w
        parts.append(f'<line x1="{xb:.1f}" y1="{top - 4:.1f}" x2="{xb:.1f}" y2="{height - 24:.1f}" stroke="#555" '
                     f'stroke-dasharray="4 3"><title>{escape_html(reference[1])}</title></line>')
    for i, name in enumerate(labels):
        y0 = top + i * group
        parts.append(svg_text(left - 4, y0 + bar_h * len(series) / 2 + 4, name, label_size, anchor="end"))
        for p, key in enumerate(series):
            mean, std, text = bar(name, key)
            y = y0 + p * bar_h
            if mean is None:
                if missing:
                    parts.append(svg_text(left + 2, y + bar_h - 1, "n/a", "9", attrs='fill="#888"'))
                continue
            w = max(0.0, min(1.0, mean)) * plot_w
            parts.append(f'<rect x="{left:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_h - 1:.1f}" '
                         f'fill="{colours[key]}"><title>{escape_html(key)}, {escape_html(name)}: {text}</title></rect>')
            if std:
                lo = left + max(0.0, mean - std) * plot_w
                hi = left + min(1.0, mean + std) * plot_w
                parts.append(f'<line x1="{lo:.1f}" y1="{y + bar_h / 2:.1f}" x2="{hi:.1f}" y2="{y + bar_h / 2:.1f}" '
                             f'{whisker}/>')
    parts.append("</svg>")
    return "".join(parts)
