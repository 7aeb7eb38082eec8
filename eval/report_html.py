"""``report.html`` of an evaluation directory, drawn with the :mod:`dinov2_hier.render` toolkit.

One self-contained file: inline CSS and inline SVG only, no scripts, no external references
and no plotting library. It holds the metric table (mean ± std), the per-fold values, one
confusion matrix per probe (pooled over the test folds, colour = share of the true class's
row), per-class F1 bars, and a 2D UMAP of the features coloured by class and by lineage when
``umap-learn`` is installed (otherwise a note saying how to install it).
:func:`eval.report.write_report_html` writes it; this module only renders.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinov2_hier.render import (blues, escape_html, html_page, html_table, palette, svg_bar_groups, svg_cell, svg_column_label,
                     svg_dot_legend, svg_open, svg_points, svg_text, svg_title, text_width)
from .values import PER_CLASS_FIELDS, format_mean_std, format_number, json_safe

__all__ = ["MAX_EMBEDDING_POINTS", "UMAP_MISSING_NOTE", "render_report_html", "svg_confusion_matrix",
           "svg_per_class_bars", "svg_scatter"]

log = logging.getLogger("dinov2_hier.eval.report")

UMAP_MISSING_NOTE = (
    "The feature embedding plot needs umap-learn: install umap-learn "
    "(pip install 'dinov2_hier[umap]') for the embedding plot."
)
#: Most points drawn in one embedding plot (a seeded subsample above this).
MAX_EMBEDDING_POINTS = 5000

_esc = escape_html


# --------------------------------------------------------------------------- charts


def svg_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> str:
    """Heatmap of a confusion matrix: rows true, columns predicted, colour = row share."""
    arr = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    cell = max(14.0, min(40.0, 640.0 / max(n, 1)))
    font = min(11.0, cell * 0.45)
    label_font = "11.0"
    longest = max((text_width(str(l), 11.0) for l in labels), default=0)
    margin_left = 12 + longest + 18
    margin_top = 40 + longest * 0.75
    width = margin_left + n * cell + 10 + max((text_width(str(l), 11.0) for l in labels[-3:]), default=0) * 0.7
    height = margin_top + n * cell + 30
    rows = arr.sum(axis=1)
    middle = margin_top + n * cell / 2
    parts = [svg_open("confusion", width, height, title), svg_title(title),
             f'<text x="{margin_left + n * cell / 2:.1f}" y="32" font-size="11" text-anchor="middle">predicted</text>',
             f'<text x="10" y="{middle:.1f}" font-size="11" text-anchor="middle" '
             f'transform="rotate(-90 10 {middle:.1f})">true</text>']
    parts += [svg_column_label(margin_left + (j + 0.5) * cell, margin_top - 4, label, label_font)
              for j, label in enumerate(labels)]
    for i, label in enumerate(labels):
        y = margin_top + (i + 0.5) * cell
        parts.append(svg_text(margin_left - 4, y + 4, label, label_font, anchor="end"))
        for j in range(n):
            count = int(arr[i, j])
            share = count / rows[i] if rows[i] else 0.0
            x = margin_left + j * cell
            parts.append(svg_cell(x, margin_top + i * cell, cell, blues(share),
                                  f"true {_esc(label)}, predicted {_esc(labels[j])}: {count} "
                                  f"({100 * share:.1f}% of the row)"))
            if count and n <= 30:
                colour = "#fff" if share > 0.5 else "#222"
                parts.append(svg_text(x + cell / 2, y + font / 3, count, f"{font:.1f}", anchor="middle",
                                      attrs=f'fill="{colour}"'))
    parts.append("</svg>")
    return "".join(parts)


def svg_per_class_bars(per_class: Mapping[str, Mapping[str, Mapping[str, Any]]], labels: Sequence[str],
                       metric: str = "f1") -> str:
    """Horizontal grouped bars: one group per class, one bar per probe (mean, whisker ± std)."""
    probes = list(per_class)

    def bar(label: str, probe: str) -> tuple[Any, Any, str]:
        entry = (per_class.get(probe) or {}).get(label, {}).get(metric) or {}
        return entry.get("mean"), entry.get("std"), f"{metric} {format_mean_std(entry)}"

    return svg_bar_groups(labels, probes, dict(zip(probes, palette(len(probes)))), bar,
                          left=12 + max((text_width(str(l), 11.0) for l in labels), default=0),
                          css_class="f1-bars", label=f"per-class {metric}", label_size="11.0",
                          whisker='stroke="#333" stroke-width="1"', missing=True)


def svg_scatter(xy: np.ndarray, groups: Sequence[str], title: str) -> str:
    """2D scatter of points coloured by group, with a legend."""
    xy = np.asarray(xy, dtype=np.float64)
    names = sorted(set(groups))
    colours = dict(zip(names, palette(len(names))))
    size = 420.0
    legend_w = 20 + max((text_width(n, 11) for n in names), default=0)
    width, height = size + legend_w + 30, max(size + 40, 40 + 16 * len(names))
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pts = (xy - lo) / span * (size - 20) + 10
    parts = [svg_open("embedding", width, height, title), svg_title(title),
             f'<rect x="0" y="28" width="{size:.0f}" height="{size:.0f}" fill="none" stroke="#ccc"/>']
    radius = 2.5 if len(pts) <= 2000 else 1.5
    for name in names:
        idx = [i for i, g in enumerate(groups) if g == name]
        parts.append(svg_points(pts[idx, 0], 28 + size - pts[idx, 1], radius, colours[name], "0.75", name))
    parts += [svg_dot_legend(size + 18, 36 + 16 * k, colours[name], name) for k, name in enumerate(names)]
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- embedding


def _embed_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """2D UMAP (cosine metric) of ``features``; raises ImportError when umap-learn is missing."""
    import umap  # optional dependency: pip install 'dinov2_hier[umap]'

    n = len(features)
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), metric="cosine", random_state=seed)
    return np.asarray(reducer.fit_transform(np.asarray(features, dtype=np.float32)), dtype=np.float64)


def _lineage(label: str, hierarchy: Any) -> str:
    if hierarchy is None or label not in hierarchy:
        return label
    if hierarchy.depth(label) < 1:
        return label
    return hierarchy.ancestor_at_depth(label, 1)


def _embedding_section(features: np.ndarray | None, y_true: Sequence[str], hierarchy: Any, seed: int) -> str:
    head = "<h2>Feature embedding (UMAP)</h2>"
    if features is None:
        return head + '<p class="note">No features were passed to the report; embedding omitted.</p>'
    features = np.asarray(features)
    if len(features) != len(y_true):
        return head + (f'<p class="note">Embedding omitted: {len(features)} feature rows for '
                       f'{len(y_true)} predictions.</p>')
    if len(features) < 4:
        return head + '<p class="note">Embedding omitted: fewer than 4 samples.</p>'
    labels = np.asarray([str(v) for v in y_true], dtype=object)
    if len(features) > MAX_EMBEDDING_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), MAX_EMBEDDING_POINTS, replace=False))
        features, labels = features[keep], labels[keep]
        sub = f" (a seeded random subset of {MAX_EMBEDDING_POINTS} of the samples)"
    else:
        sub = ""
    try:
        xy = _embed_2d(features, seed)
    except ImportError:
        return head + f'<p class="note missing-umap">{_esc(UMAP_MISSING_NOTE)}</p>'
    except Exception as exc:  # a plot must never sink the evaluation
        log.warning("UMAP embedding failed: %s", exc)
        return head + f'<p class="note">UMAP embedding failed: {_esc(type(exc).__name__)}: {_esc(exc)}</p>'
    parts = [head, f"<p>Frozen CLS features of the evaluated samples{_esc(sub)}, 2D UMAP (cosine, seed {seed}).</p>",
             '<div class="row">', svg_scatter(xy, list(labels), "coloured by class")]
    if hierarchy is not None:
        parts.append(svg_scatter(xy, [_lineage(l, hierarchy) for l in labels], "coloured by lineage"))
    parts.append("</div>")
    return "".join(parts)


# --------------------------------------------------------------------------- the page


def render_report_html(
    metrics: Mapping[str, Any],
    predictions: Any = None,
    features: np.ndarray | None = None,
    hierarchy: Any = None,
    seed: int = 0,
    title: str | None = None,
) -> str:
    """The report as one HTML string (see the module docstring for its content);
    ``predictions`` is the :class:`eval.report.PredictionTable` whose rows ``features`` align with."""
    from dinov2_hier.metrics import metric_label

    probes: Mapping[str, Mapping[str, Any]] = metrics.get("probes") or {}
    classes = list(metrics.get("classes") or [])
    ckpt = metrics.get("checkpoint") or {}
    ckpt_name = ckpt.get("name") if isinstance(ckpt, Mapping) else ckpt
    title = title or f"Evaluation report: {ckpt_name or 'checkpoint'}"
    parts: list[str] = []

    # -- what was evaluated
    info: list[tuple[str, str]] = []
    if isinstance(ckpt, Mapping):
        for key in ("name", "path", "arch", "iteration", "fingerprint"):
            if ckpt.get(key) is not None:
                info.append((f"checkpoint {key}", str(ckpt[key])))
    elif ckpt:
        info.append(("checkpoint", str(ckpt)))
    data = metrics.get("data")
    if isinstance(data, Mapping):
        info.extend((f"data {k}", str(v)) for k, v in data.items() if v is not None)
    elif data:
        info.append(("data", str(data)))
    for key in ("n_samples", "n_unreadable"):
        if key in metrics:
            info.append((key.replace("_", " "), str(metrics[key])))
    hier = metrics.get("hierarchy")
    if isinstance(hier, Mapping):
        info.append(("hierarchy", f"{hier.get('name')} ({hier.get('path')})"))
    settings = metrics.get("settings") or {}
    for key, value in settings.items():
        info.append((f"setting {key}", json.dumps(json_safe(value)) if not isinstance(value, str) else value))
    training = metrics.get("training")
    if isinstance(training, Mapping):
        info.append(("training run", _collapse_text(training)))
        if training.get("collapsed"):
            parts.append(f"<p class=\"warn\"><b>This checkpoint comes from a collapsed run</b>: "
                         f"{_esc(_collapse_text(training))}. Its DINO / iBOT losses sat at ln K and taught the "
                         "backbone nothing; compare it with <code>--ckpt baseline:colour</code> and see "
                         "docs/training-dynamics.md.</p>")
    parts.append(html_table(["", ""], info, cls="meta"))
    counts = metrics.get("class_counts") or {}
    if classes:
        parts.append("<h2>Classes</h2>")
        parts.append(html_table(["class", "name", "samples"], [
            (c, hierarchy.display_name(c) if hierarchy is not None and c in hierarchy else "", str(counts.get(c, "")))
            for c in classes]))

    # -- metric table: rows = metrics, columns = probes
    probe_names = list(probes)
    metric_names: list[str] = []
    for probe in probe_names:
        for name in probes[probe]:
            if name not in metric_names:
                metric_names.append(name)
    folds_n = max((len(e.get("folds") or []) for p in probes.values() for e in p.values()), default=0)
    split = "fixed train/test split" if folds_n == 1 else f"{folds_n}-fold cross-validation, mean ± std over folds"
    held = (metrics.get("domains") or {}).get("held_out") or {}
    if held:  # eval/domains.py: one fold per held-out group
        split = f"held-out groups {', '.join(held)} (column {metrics['domains']['group_column']}), mean ± std over them"
    parts.append(f"<h2>Metrics</h2><p>{_esc(split)}. Higher is better, except for metrics marked "
                 "(lower better).</p>")
    parts.append(html_table(["metric", *probe_names],
                            [(metric_label(m), *(format_mean_std(probes[p].get(m)) for p in probe_names))
                             for m in metric_names],
                            cls="metrics"))
    if folds_n > 1:
        parts.append("<details><summary>Per-fold values</summary>")
        for probe in probe_names:
            rows = [(metric_label(m), *(format_number(v) for v in (probes[probe][m].get("folds") or [])))
                    for m in probes[probe]]
            parts.append(f"<h3>{_esc(probe)}</h3>")
            parts.append(html_table(["metric", *(f"fold {i}" for i in range(folds_n))], rows))
        parts.append("</details>")

    if held:
        heads = metrics["domains"]["headline_metrics"]
        parts.append("<h2>Held-out domains</h2><p>Out of domain (tested on the held-out group) / in domain "
                     "(cross-validation on the training groups) / gap = in - out.</p>")
        parts.append(html_table(["held out", "probe", *(metric_label(h) if h != "micro_f1" else "micro F1" for h in heads),
                                 "classes absent from training"],
                                [(g, p, *(" / ".join(format_number(r[k].get(h)) for k in ("out_of_domain", "in_domain", "gap"))
                                          for h in heads),
                                  ", ".join(f"{c} ({n})" for c, n in e["classes_absent_from_training"].items()) or "none")
                                 for g, e in held.items() for p, r in e["probes"].items()]))

    # -- confusion matrices, one per probe
    confusion = metrics.get("confusion_matrix") or {}
    if confusion:
        parts.append("<h2>Confusion matrices</h2><p>Pooled over the test folds; rows true class, columns "
                     "predicted; colour is the share of the row (the class's recall on the diagonal).</p>"
                     '<div class="row">')
        for probe, matrix in confusion.items():
            parts.append(svg_confusion_matrix(matrix, classes, probe))
        parts.append("</div>")

    # -- per-class F1
    per_class = metrics.get("per_class") or {}
    if per_class:
        parts.append("<h2>Per-class F1</h2><p>Mean over folds; the whisker spans ± one standard deviation.</p>")
        parts.append(svg_per_class_bars(per_class, classes or list(next(iter(per_class.values()))), "f1"))
        header = ["class", "support"] + [f"{p} {f}" for p in per_class for f in PER_CLASS_FIELDS]
        rows = []
        for c in classes or list(next(iter(per_class.values()))):
            support = next((str(per_class[p][c]["support"]) for p in per_class if c in per_class[p]), "")
            rows.append((c, support, *(format_mean_std((per_class[p].get(c) or {}).get(f))
                                       for p in per_class for f in PER_CLASS_FIELDS)))
        parts.append("<details><summary>Per-class precision, recall and F1</summary>")
        parts.append(html_table(header, rows))
        parts.append("</details>")

    # -- embedding
    y_true = list(predictions.y_true) if predictions is not None else []
    parts.append(_embedding_section(features, y_true, hierarchy, seed))
    return html_page(title, parts)


def _collapse_text(training: Mapping[str, Any]) -> str:
    """One line on a training run's collapse status (metrics.json's ``training``)."""
    last = training.get("last") or {}
    kls = ", ".join(
        f"{loss} KL to uniform: student {v.get('student_kl_to_uniform', float('nan')):.4f}, "
        f"teacher {v.get('teacher_kl_to_uniform', float('nan')):.4f} nats"
        for loss, v in last.items() if isinstance(v, Mapping)
    )
    if training.get("checked") is False:
        head = "no collapse check (the run computes no DINO / iBOT loss)"
    elif training.get("collapsed"):
        head = f"collapsed (detected at iteration {training.get('detected_at_iteration')})"
    elif training.get("detected_at_iteration") is not None:
        head = f"collapsed at iteration {training.get('detected_at_iteration')}, recovered by iteration {training.get('iteration')}"
    else:
        head = f"not collapsed up to iteration {training.get('iteration')}"
    return f"{head}; {kls}" if kls else head
