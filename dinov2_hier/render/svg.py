"""Inline SVG for the reports, hand-written (no plotting library): colours, the pieces every
chart repeats (frame, title, labels, legends, cells, point groups) and two charts:
horizontal grouped bars on a [0, 1] axis (the evaluation reports) and lines over
iterations (the training report, :mod:`dinov2_hier.report`).

Coordinates are pixels, formatted as the charts always wrote them (one decimal for computed
positions); text passed as ``text``, ``title`` or ``label`` is escaped here, arguments named
``markup`` are inserted as they are.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- the line chart


@dataclass(frozen=True)
class LineSeries:
    """One line of :func:`svg_line_chart`: ``ys[i]`` at ``xs[i]``; a None or non-finite
    value (or a non-positive one on a log axis) breaks the line there. ``dashed``: a dashed
    line (a validation series beside its training one); ``markers``: a dot at every point."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    colour: str
    dashed: bool = False
    markers: bool = False


@dataclass(frozen=True)
class LineScale:
    """Data -> pixel mapping of a line chart: ``x`` linear over ``[x0, x1]`` onto
    ``[left, left + width]``, ``y`` linear (or logarithmic, ``log_y``) over ``[y0, y1]``
    onto ``[top + height, top]`` (up is larger)."""

    x0: float
    x1: float
    y0: float
    y1: float
    left: float
    top: float
    width: float
    height: float
    log_y: bool = False

    def x(self, value: float) -> float:
        span = self.x1 - self.x0
        return self.left + ((value - self.x0) / span if span else 0.5) * self.width

    def y(self, value: float) -> float:
        f = math.log10 if self.log_y else float
        lo, hi = f(self.y0), f(self.y1)
        return self.top + (1.0 - ((f(value) - lo) / (hi - lo) if hi != lo else 0.5)) * self.height

    def y_ticks(self) -> list[float]:
        if self.log_y:
            first, last = math.floor(math.log10(self.y0)), math.ceil(math.log10(self.y1))
            ticks = [10.0 ** e for e in range(first, last + 1) if self.y0 <= 10.0 ** e <= self.y1]
            return ticks if len(ticks) >= 2 else [self.y0, self.y1]
        return nice_ticks(self.y0, self.y1)

    def x_ticks(self) -> list[float]:
        return nice_ticks(self.x0, self.x1)


def _plottable(value: Any, log_y: bool) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 or not log_y))


def nice_step(span: float, n: int = 5) -> float:
    """A step of 1, 2, 2.5 or 5 times a power of ten giving about ``n`` intervals over ``span``."""
    raw = span / max(n, 1)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * power:
            return m * power
    return 10.0 * power


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Tick values, multiples of :func:`nice_step`, inside ``[lo, hi]``."""
    step = nice_step(hi - lo, n)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step and len(ticks) < 4 * n:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks


def line_scale(xs: Sequence[float], ys: Sequence[float], *, left: float, top: float, width: float,
               height: float, log_y: bool = False) -> LineScale:
    """The scale of a chart whose points (and reference values) are ``xs`` / ``ys``: x over
    their exact range, y padded by 5 % of the range (a single value: by 10 % of it, or 1)
    and, linear, widened to the neighbouring multiples of its tick step."""
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if log_y:
        ys = [y for y in ys if y > 0] or [1.0]
        lo, hi = math.log10(min(ys)), math.log10(max(ys))
        pad = (hi - lo) * 0.05 or 0.5
        return LineScale(x0, x1, 10 ** (lo - pad), 10 ** (hi + pad), left, top, width, height, True)
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or (abs(hi) * 0.1 or 1.0)
    step = nice_step(hi - lo + 2 * pad)
    # Values that are never negative (counts, norms, rates) keep the axis at or above 0.
    lo = max(math.floor((lo - pad) / step) * step, 0.0) if lo >= 0 else math.floor((lo - pad) / step) * step
    hi = math.ceil((hi + pad) / step) * step
    return LineScale(x0, x1, lo, hi, left, top, width, height, False)


def format_tick(value: float) -> str:
    """A tick label: 4 significant digits, no trailing zeros."""
    if value == 0:
        return "0"
    return f"{value:.4g}"


def svg_line_chart(
    title: str,
    series: Sequence[LineSeries],
    *,
    width: float = 420,
    height: float = 250,
    log_y: bool | None = None,
    hlines: Sequence[tuple[float, str]] = (),
    vlines: Sequence[tuple[float, str]] = (),
    vline_label: str = "",
    x_label: str = "iteration",
    css_class: str = "chart",
) -> str:
    """A line chart of ``series`` over a shared x axis, with a legend under the title.

    ``log_y``: a logarithmic y axis; None picks one when every value is positive and the
    largest is over 50 times the smallest. ``hlines``: ``(value, label)`` dashed reference
    lines labelled at their right end (they widen the y range so that they show);
    ``vlines``: ``(x, tooltip)`` dotted vertical markers, named in the legend by
    ``vline_label``. Each polyline carries ``data-series`` (its name) and ``data-x`` /
    ``data-y`` (its values as Python writes them), so that a reader (or a test) finds the
    numbers behind the pixels; ``points`` are :class:`LineScale`'s pixels to 0.01 px.
    """
    values = [y for s in series for y in s.ys if _plottable(y, False)]
    if log_y is None:
        positive = [v for v in values] + [v for v, _ in hlines]
        log_y = bool(positive) and min(positive) > 0 and max(positive) > 50 * min(positive)
    xs = [x for s in series for x, y in zip(s.xs, s.ys) if _plottable(y, log_y)]
    ys = [y for s in series for y in s.ys if _plottable(y, log_y)] + [v for v, _ in hlines if _plottable(v, log_y)]
    # Legend rows under the title, entries left to right, wrapped at the chart's width.
    entries = [(s.name, s.colour, s.dashed) for s in series]
    if vlines and vline_label:
        entries.append((vline_label, "#999", None))
    rows: list[list[tuple[float, str, str, bool | None]]] = [[]]
    x = 8.0
    for name, colour, dashed in entries:
        w = 26 + text_width(name, 11)
        if x + w > width - 4 and rows[-1]:
            rows.append([])
            x = 8.0
        rows[-1].append((x, name, colour, dashed))
        x += w + 10
    legend_top = 24
    top = legend_top + 15 * len(rows) + 8
    left, right, bottom = 62.0, 16.0, 38.0
    plot_w, plot_h = width - left - right, height - top - bottom
    scale = line_scale(xs, ys, left=left, top=top, width=plot_w, height=plot_h, log_y=log_y)
    parts = [svg_open(css_class, width, height, title), svg_title(title)]
    for r, row in enumerate(rows):
        y = legend_top + 15 * r + 4
        for x, name, colour, dashed in row:
            if dashed is None:
                parts.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 18:.1f}" y2="{y:.1f}" stroke="{colour}" '
                             'stroke-dasharray="2 2"/>')
            else:
                dash = ' stroke-dasharray="5 3"' if dashed else ""
                parts.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 18:.1f}" y2="{y:.1f}" stroke="{colour}" '
                             f'stroke-width="2"{dash}/>')
            parts.append(svg_text(x + 22, y + 4, name, "11"))
    # Frame, grid and ticks.
    parts.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{plot_w:.1f}" height="{plot_h:.1f}" fill="none" '
                 'stroke="#bbb"/>')
    for tick in scale.y_ticks():
        y = scale.y(tick)
        parts.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{left + plot_w:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(svg_text(left - 4, y + 3.5, format_tick(tick), "10", anchor="end"))
    for tick in scale.x_ticks():
        x = scale.x(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{top + plot_h:.1f}" stroke="#eee"/>')
        parts.append(svg_text(x, top + plot_h + 13, format_tick(tick), "10", anchor="middle"))
    if x_label:
        parts.append(svg_text(left + plot_w / 2, height - 6, x_label, "10", anchor="middle", attrs='fill="#555"'))
    if log_y:
        parts.append(svg_text(width - 6, 16, "log scale", "10", anchor="end", attrs='fill="#888"'))
    for at, tip in vlines:
        if scale.x0 <= at <= scale.x1:
            x = scale.x(at)
            parts.append(f'<line x1="{x:.2f}" y1="{top:.1f}" x2="{x:.2f}" y2="{top + plot_h:.1f}" stroke="#999" '
                         f'stroke-dasharray="2 2"><title>{escape_html(tip)}</title></line>')
    for value, label in hlines:
        if not _plottable(value, log_y):
            continue
        y = scale.y(value)
        parts.append(f'<line x1="{left:.1f}" y1="{y:.2f}" x2="{left + plot_w:.1f}" y2="{y:.2f}" stroke="#555" '
                     f'stroke-dasharray="6 3" data-reference="{value!r}"><title>{escape_html(label)}</title></line>')
        parts.append(svg_text(left + plot_w - 4, y - 4, label, "10", anchor="end",
                              attrs='fill="#333" paint-order="stroke" stroke="#fff" stroke-width="3"'))
    for i, s in enumerate(series):
        # Earlier lines wider, so that a line another one covers (lr under last_layer_lr,
        # grad_norm under grad_norm_backbone) still shows at its edges.
        stroke = 1.6 if len(series) == 1 else max(1.2, 3.2 - 0.7 * i)
        segments: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(s.xs, s.ys):
            if _plottable(y, log_y):
                segments[-1].append((x, y))
            elif segments[-1]:
                segments.append([])
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        for points in (p for p in segments if p):
            pixels = " ".join(f"{scale.x(x):.2f},{scale.y(y):.2f}" for x, y in points)
            data_x = " ".join(repr(x) for x, _ in points)
            data_y = " ".join(repr(y) for _, y in points)
            parts.append(f'<polyline fill="none" stroke="{s.colour}" stroke-width="{stroke:.1f}"{dash} '
                         f'data-series="{escape_html(s.name)}" data-x="{data_x}" data-y="{data_y}" '
                         f'points="{pixels}"><title>{escape_html(s.name)}</title></polyline>')
            if s.markers or len(points) == 1:
                parts.append(svg_points([scale.x(x) for x, _ in points], [scale.y(y) for _, y in points], 3,
                                        s.colour, "1", s.name))
    parts.append("</svg>")
    return "".join(parts)
