"""``report.html`` of ``eval.multilabel``, drawn with the :mod:`dinov2_hier.render` toolkit: setup,
metric table per variant, per-class tables, impossible combinations, heatmaps of the prior
``C`` and of the learned ``R`` and ``R R^T``, threshold bars, and the
uncertainty-vs-confidence scatter of one variant."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinov2_hier.render import (TAB20, diverging, escape_html, html_page, html_table, svg_bar_groups, svg_cell,
                      svg_column_label, svg_dot_legend, svg_open, svg_points, svg_text, svg_title)
from ..values import format_mean_std

__all__ = ["MAX_SCATTER_POINTS", "render_multilabel_report", "scatter_points", "svg_matrix_heatmap",
           "svg_threshold_bars", "svg_uncertainty_scatter"]

#: Most (image, class) points drawn in the uncertainty scatter (a seeded subsample above).
MAX_SCATTER_POINTS = 4000

_esc = escape_html


def scatter_points(prob: np.ndarray, unc: np.ndarray, dec: np.ndarray, truth: np.ndarray, seed: int) -> dict:
    """The (image, class) decisions of the uncertainty scatter: confidence, variance and
    correctness, a seeded subsample of :data:`MAX_SCATTER_POINTS` when there are more."""
    conf = np.where(dec, prob, 1.0 - prob).ravel()
    u = unc.ravel()
    correct = (dec == truth.astype(bool)).ravel()
    idx = np.arange(conf.size)
    if conf.size > MAX_SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(conf.size, MAX_SCATTER_POINTS, replace=False))
    return {"confidence": conf[idx], "uncertainty": u[idx], "correct": correct[idx], "n_total": int(conf.size)}


# --------------------------------------------------------------------------- charts


def svg_matrix_heatmap(values: Any, labels: Sequence[str], title: str, vmax: float | None = None) -> str:
    """Heatmap of a ``K x K`` matrix (rows/columns ``labels``), diverging colours around 0,
    from ``-vmax`` to ``+vmax``; values written in the cells up to K = 25.

    ``vmax`` defaults to the largest absolute value (at least 1e-9); a given ``vmax`` is
    widened to the largest absolute value when an entry exceeds it, so the stated colour
    scale always holds every value (``R R^T`` is not bounded by the ``-1..+1`` of ``C``).
    The caption states the scale and the actual range of the values."""
    arr = np.asarray(values, dtype=np.float64)
    n = len(labels)
    largest = float(np.abs(arr).max(initial=0.0))
    vmax = max(float(vmax) if vmax is not None else 0.0, largest, 1e-9)
    cell = max(14.0, min(36.0, 560.0 / max(n, 1)))
    font = min(10.0, cell * 0.32)
    label_w = 6.6 * max((len(str(x)) for x in labels), default=1)
    left, top = 12 + label_w, 36 + label_w * 0.72
    width, height = left + n * cell + 20 + label_w * 0.5, top + n * cell + 34
    parts = [svg_open("heatmap", width, height, title), svg_title(title)]
    parts += [svg_column_label(left + (j + 0.5) * cell, top - 4, label) for j, label in enumerate(labels)]
    for i, label in enumerate(labels):
        y = top + i * cell
        parts.append(svg_text(left - 4, y + cell / 2 + 4, label, anchor="end"))
        for j in range(n):
            v = float(arr[i, j])
            x = left + j * cell
            parts.append(svg_cell(x, y, cell, diverging(v, vmax), f"{_esc(label)} / {_esc(labels[j])}: {v:.3f}"))
            if n <= 25:
                colour = "#fff" if abs(v) > 0.6 * vmax else "#222"
                parts.append(svg_text(x + cell / 2, y + cell / 2 + font / 3, f"{round(v, 2) + 0.0:g}", f"{font:.1f}",
                                      anchor="middle", attrs=f'fill="{colour}"'))
    span = (f"; values {float(arr.min()):.3g} to {float(arr.max()):.3g}" if arr.size else "")
    parts.append(svg_text(left, height - 10, f"colour scale: -{vmax:.3g} (blue) to +{vmax:.3g} (red){span}", "10"))
    parts.append("</svg>")
    return "".join(parts)


def svg_threshold_bars(thresholds: Mapping[str, Mapping[str, Any]], classes: Sequence[str], t_base: float = 0.5) -> str:
    """Per class, one bar per variant: mean threshold over the tested images (whisker ± std),
    with a dashed line at ``t_base``. ``thresholds[variant]["per_class"][class] = {"mean", "std"}``."""
    variants = list(thresholds)

    def bar(c: str, v: str) -> tuple[Any, float, str]:
        entry = (thresholds[v].get("per_class") or {}).get(c) or {}
        mean, std = entry.get("mean"), entry.get("std") or 0.0
        return mean, std, "" if mean is None else f"threshold {mean:.3f} ± {std:.3f}"

    return svg_bar_groups(classes, variants, {v: TAB20[i % 8] for i, v in enumerate(variants)}, bar,
                          left=12 + 6.6 * max((len(c) for c in classes), default=1), css_class="threshold-bars",
                          label="thresholds", reference=(t_base, f"t_base {t_base:g}"))


def svg_uncertainty_scatter(confidence: Any, uncertainty: Any, correct: Any, title: str) -> str:
    """Scatter of (confidence, MC-dropout variance) per (image, class) decision: blue correct,
    orange incorrect. Confidence is ``y_bar`` for a positive decision, ``1 - y_bar`` for a
    negative one; the y axis spans 0 to the largest variance (at least 0.01)."""
    conf = np.asarray(confidence, dtype=np.float64)
    u = np.asarray(uncertainty, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    size, pad = 380.0, 40.0
    umax = max(float(u.max(initial=0.0)), 0.01)
    width, height = size + pad + 150, size + pad + 30
    parts = [svg_open("uncertainty-scatter", width, height, title), svg_title(title),
             f'<rect x="{pad}" y="24" width="{size}" height="{size}" fill="none" stroke="#ccc"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(svg_text(pad + tick * size, 24 + size + 14, f"{tick:g}", "10", anchor="middle"))
        parts.append(svg_text(pad - 4, 24 + size - tick * size + 3, f"{tick * umax:.2g}", "10", anchor="end"))
    parts.append(svg_text(pad + size / 2, 24 + size + 28, "confidence", anchor="middle"))
    for flag, colour, name in ((True, "#1f77b4", "correct"), (False, "#ff7f0e", "incorrect")):
        sel = np.flatnonzero(ok == flag)
        parts.append(svg_points(pad + conf[sel] * size, 24 + size - u[sel] / umax * size, 2, colour, "0.6",
                                f"{name} ({len(sel)})"))
        parts.append(svg_dot_legend(pad + size + 16, 40 + (0 if flag else 18), colour, f"{name} ({len(sel)})"))
    parts.append(f'<text x="{pad + size + 10:.0f}" y="90" font-size="10">y: MC-dropout</text>'
                 f'<text x="{pad + size + 10:.0f}" y="104" font-size="10">variance U</text></svg>')
    return "".join(parts)


# --------------------------------------------------------------------------- the page


def render_multilabel_report(metrics: Mapping[str, Any], scatter: Mapping[str, Any] | None = None,
                             scatter_variant: str = "") -> str:
    """``report.html`` as one self-contained string (inline CSS and SVG, no scripts): setup,
    metric table per variant, per-class table, impossible combinations, heatmaps of ``C``
    and of the mean ``R`` and ``R R^T`` over the test set, threshold bars, and the
    uncertainty-vs-confidence scatter of ``scatter_variant``."""
    from dinov2_hier.metrics import metric_label

    probes = metrics.get("probes") or {}
    classes = list(metrics.get("classes") or [])
    cons = metrics.get("constraints") or {}
    ckpt = metrics.get("checkpoint") or {}
    title = f"Constrained multi-label evaluation: {ckpt.get('name', 'checkpoint')}"
    parts: list[str] = []
    split = metrics.get("split") or {}
    info = [("checkpoint", ckpt.get("path")), ("architecture", ckpt.get("arch")),
            ("data", (metrics.get("data") or {}).get("path")),
            ("split", json.dumps(split)), ("tested images", metrics.get("n_samples")),
            ("unreadable images", metrics.get("n_unreadable")),
            ("constraint matrix", f"{cons.get('name')} ({cons.get('path')})"),
            ("feature", (metrics.get("settings") or {}).get("feature"))]
    parts.append(html_table(["", ""], [(k, "" if v is None else v) for k, v in info]))
    if cons.get("asymmetries"):
        listed = "; ".join(f"{a}/{b}: {x:g} vs {y:g}" for a, b, x, y in cons["asymmetries"])
        parts.append(f'<p class="note">The constraint matrix is not symmetric: {_esc(listed)}. A pair counts as '
                     "exclusive when either direction is -1.</p>")

    names = list(probes)
    metric_names = [m for m in ("weighted_f1", "macro_f1", "micro_f1", "balanced_accuracy", "auc_roc", "sensitivity",
                                "specificity", "subset_accuracy", "hamming_accuracy", "impossible_rate_before",
                                "impossible_rate") if any(m in probes[v] for v in names)]
    parts.append("<h2>Metrics</h2><p>Mean ± standard deviation over folds; impossible rates are the share of images "
                 "whose predicted label set holds an exclusive pair, before and after decoding. Higher is better, "
                 "except for metrics marked (lower better).</p>")
    parts.append(html_table(["metric", *names], [(metric_label(m), *(format_mean_std(probes[v].get(m)) for v in names))
                                                 for m in metric_names]))
    imp = metrics.get("impossible") or {}
    if imp:
        parts.append("<h2>Impossible combinations</h2>")
        parts.append(html_table(["variant", "images", "before decoding", "after decoding"], [
            (v, e.get("n"), f"{e.get('n_before_decoding')} ({100 * (e.get('before_decoding') or 0):.1f}%)",
             f"{e.get('n_after_decoding')} ({100 * (e.get('after_decoding') or 0):.1f}%)") for v, e in imp.items()]))

    per_class = metrics.get("per_class") or {}
    if per_class:
        parts.append("<h2>Per class</h2>")
        fields = ("f1", "sensitivity", "specificity", "balanced_accuracy", "auc_roc")
        for v, rows in per_class.items():
            parts.append(f"<h3>{_esc(v)}</h3>")
            parts.append(html_table(["class", "positives", *fields],
                                    [(c, rows[c].get("support"), *(format_mean_std(rows[c].get(f)) for f in fields))
                                     for c in classes if c in rows]))

    parts.append("<h2>Relations</h2><p>The prior matrix C as written in the file, and per variant with a relation "
                 "module the learned R and R R<sup>T</sup> averaged over the tested images (R R<sup>T</sup> is what the "
                 "loss compares with C; its entries are not bounded by C's -1..+1, so its colour scale runs to its "
                 "largest absolute value, stated under each map).</p><div class=\"row\">")
    if cons.get("values") is not None:
        parts.append(svg_matrix_heatmap(cons["values"], classes, "prior C", vmax=1.0))
    for v, rel in (metrics.get("relation_matrix") or {}).items():
        parts.append(svg_matrix_heatmap(rel["mean_R"], classes, f"{v}: mean R"))
        parts.append(svg_matrix_heatmap(rel["mean_RRt"], classes, f"{v}: mean R R^T", vmax=1.0))
    parts.append("</div>")

    thresholds = metrics.get("thresholds") or {}
    if thresholds:
        t_base = next(iter(thresholds.values())).get("t_base", 0.5)
        parts.append("<h2>Decision thresholds</h2><p>Mean threshold per class over the tested images (whisker ± std: "
                     "the uncertainty term varies per image); dashed line: t_base.</p>")
        parts.append(svg_threshold_bars(thresholds, classes, t_base))
    if scatter is not None and len(scatter.get("confidence", [])):
        unc = (metrics.get("uncertainty") or {}).get(scatter_variant) or {}
        text = "; ".join(f"{k}: {e.get('n')} decisions, mean variance {e.get('mean_uncertainty') or 0:.4f}, mean "
                         f"confidence {e.get('mean_confidence') or 0:.3f}" for k, e in unc.items())
        sub = (f" (a seeded subset of {len(scatter['confidence'])} of {scatter['n_total']})"
               if scatter["n_total"] > len(scatter["confidence"]) else "")
        parts.append(f"<h2>Uncertainty and confidence</h2><p>{_esc(scatter_variant)}: every (image, class) decision"
                     f"{_esc(sub)}. {_esc(text)}.</p>")
        parts.append(svg_uncertainty_scatter(scatter["confidence"], scatter["uncertainty"], scatter["correct"],
                                             f"{scatter_variant}: MC-dropout variance vs confidence"))
    return html_page(title, parts)
