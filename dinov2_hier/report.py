"""``python -m dinov2_hier.report RUN_DIR [--eval EVAL_DIR] [--output FILE]``: a training
run's curves as one self-contained page, ``RUN_DIR/training.html`` (inline SVG and CSS, no
scripts, no external references: it opens offline and can be mailed or archived).

What the page shows, all read from the run directory (docs/training-dynamics.md says how
to read it):

* the run (architecture, iterations done, records) and the collapse verdict of
  ``run_summary.json`` (replayed from ``metrics.jsonl`` by
  :func:`~dinov2_hier.train.collapse.run_collapse_status` while the run has not written one);
* the losses, one panel per term (``loss_dino``, ``loss_ibot``, ``loss_koleo``, the
  supervised terms, ``loss_total``), the validation losses (``val_*``) dashed in the panel
  of their term, ``ln K`` (from the number of prototypes in the run's ``config.yaml``, else
  from ``run_summary.json``) as a reference line on the DINO and iBOT panels, and the
  checkpoints present as dotted vertical markers;
* the schedules (learning rate, weight decay, teacher momentum and temperature, the
  supervision weight);
* the diagnostics of ``losses/diagnostics.py``: teacher and student entropies against
  ``ln K``, prototypes used against ``K``, bottleneck norms, CLS spread, gradient norms;
* images/s, ETA, unreadable images, GPU memory; the validation passes' sizes and times;
* every other numeric key in a panel of its own, and a table of every key of
  ``metrics.jsonl`` (records with a value, first, last, min, max), so nothing logged is
  left out;
* the checkpoints, and with ``--eval EVAL_DIR`` (an output of ``python -m eval.run --ckpt
  RUN_DIR``: ``summary.json``, or ``metrics.json`` for one checkpoint) the balanced
  accuracy of each probe at each evaluated checkpoint.

Drawn with :mod:`dinov2_hier.render`, the toolkit of the evaluation reports. A series longer
than :data:`MAX_POINTS` records is drawn from every n-th record (and the last). A missing
run directory, one without ``metrics.jsonl`` or with a torn last line is one line, exit 2.

Length (~470 lines): one page whose sections share the records read once and the panel
layout; the drawing primitives are :mod:`dinov2_hier.render`'s.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .cli import run_cli
from .errors import UserError
from .eval_results import METRICS_FILE as EVAL_METRICS_FILE
from .eval_results import SUMMARY_FILE as EVAL_SUMMARY_FILE
from .eval_results import EvalResultsError, read_json_object
from .io import atomic_write_text, read_jsonl
from .models.artifacts import RUN_CONFIG_FILE, list_checkpoints
from .render import LineSeries, escape_html, html_page, html_table, palette, svg_line_chart
from .train.checkpoint import METRICS_FILE
from .train.collapse import DOCS, ln_k_of, run_collapse_status

#: The page written into the run directory.
REPORT_FILE = "training.html"
#: The run summary the trainer writes at its end (:data:`dinov2_hier.train.loop.SUMMARY_FILE`).
RUN_SUMMARY_FILE = "run_summary.json"
#: Most points drawn per series: longer ones are thinned to every n-th record.
MAX_POINTS = 1500
#: Validation records carry ``"split": "val"`` (:data:`dinov2_hier.train.validation.VAL_SPLIT`).
SPLIT_KEY, VAL_SPLIT, VAL_PREFIX = "split", "val", "val_"
EVAL_METRIC = "balanced_accuracy"

CSS_EXTRA = """
.chart{border:1px solid #eee;background:#fff}
.ok{background:#e8f5e9;border:1px solid #a5d6a7;padding:8px 12px}
.panels{display:flex;flex-wrap:wrap;gap:14px}
"""


class RunReportError(UserError, ValueError):
    """A run directory the report cannot read (exit 2)."""


@dataclass
class Run:
    """What the report reads from a run directory."""

    path: Path
    train: list[dict]
    val: list[dict]
    config: Any = None  # the run's config.yaml (DictConfig) or None
    summary: dict | None = None  # run_summary.json or None
    checkpoints: list[int] = field(default_factory=list)
    ln_k: dict[str, float] = field(default_factory=dict)

    def keys(self, split: str) -> list[str]:
        """The keys of the records of ``split`` (``train`` / ``val``), in order of first appearance."""
        seen: dict[str, None] = {}
        for record in self.train if split == "train" else self.val:
            seen.update(dict.fromkeys(record))
        return [k for k in seen if k not in ("iteration", SPLIT_KEY)]


def read_run(run_dir: str | Path) -> Run:
    """The records, config, summary, checkpoints and ``ln K`` of a training run directory;
    :class:`RunReportError` when it is not one or its ``metrics.jsonl`` is torn."""
    from omegaconf import OmegaConf

    path = Path(run_dir)
    if not path.is_dir():
        raise RunReportError(f"{path}: no such directory (give a training run's --output-dir)")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise RunReportError(f"{path}: no {METRICS_FILE} (not a training run's output directory, or no step logged yet)")
    try:
        records, torn = read_jsonl(metrics)
    except (OSError, UnicodeDecodeError) as exc:
        raise RunReportError(f"{metrics}: cannot be read: {exc}") from None
    if torn:
        raise RunReportError(f"{metrics}: line {torn[0]} is not a JSON record (torn by a kill or a full disk "
                             "while appending?); resuming the run drops it, or delete the line")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise RunReportError(f"{metrics}: record {number} is not an object with an integer 'iteration'")
    if not records:
        raise RunReportError(f"{metrics}: no records yet")
    run = Run(path, [r for r in records if r.get(SPLIT_KEY) != VAL_SPLIT],
              [r for r in records if r.get(SPLIT_KEY) == VAL_SPLIT])
    if (path / RUN_CONFIG_FILE).is_file():
        try:
            run.config = OmegaConf.load(path / RUN_CONFIG_FILE)
            run.ln_k = ln_k_of(run.config)
        except Exception:  # noqa: BLE001 (an old or hand-edited config: ln K from the summary below)
            run.config = None
    if (path / RUN_SUMMARY_FILE).is_file():
        try:
            run.summary = read_json_object(path / RUN_SUMMARY_FILE)
        except EvalResultsError:
            run.summary = None
    if not run.ln_k and run.summary:
        last = (run.summary.get("collapse") or {}).get("last") or {}
        run.ln_k = {loss: float(v["ln_k"]) for loss, v in last.items() if isinstance(v, dict) and "ln_k" in v}
    run.checkpoints = [it for it, _ in list_checkpoints(path)]
    return run


# ------------------------------------------------------------------------------ series


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _thin(records: list[dict]) -> list[dict]:
    if len(records) <= MAX_POINTS:
        return records
    stride = math.ceil(len(records) / MAX_POINTS)
    kept = records[::stride]
    return kept if kept[-1] is records[-1] else kept + [records[-1]]


@dataclass
class Panel:
    """One chart: ``(key, split)`` series, reference lines, checkpoint markers."""

    title: str
    series: list[tuple[str, str]]
    hlines: list[tuple[float, str]] = field(default_factory=list)
    checkpoints: bool = False
    log_y: bool | None = None
    note: str = ""


def _line_series(run: Run, panel: Panel) -> list[LineSeries]:
    colours = palette(max(len({k for k, _ in panel.series}), 1))
    colour_of: dict[str, str] = {}
    out = []
    for key, split in panel.series:
        # A validation loss takes the colour of its training term (val_dino: loss_dino's).
        base = "loss_" + key[len(VAL_PREFIX):] if split == "val" and key.startswith(VAL_PREFIX) else key
        colour = colour_of.setdefault(base, colours[len(colour_of) % len(colours)])
        records = _thin([r for r in (run.train if split == "train" else run.val) if key in r])
        name = key if split == "train" else (key if key.startswith(VAL_PREFIX) else f"{key} (validation)")
        out.append(LineSeries(name, [r["iteration"] for r in records], [_number(r[key]) for r in records], colour,
                              dashed=split == "val", markers=split == "val"))
    return out


def _has_numbers(run: Run, key: str, split: str) -> bool:
    return any(_number(r.get(key)) is not None for r in (run.train if split == "train" else run.val))


def build_panels(run: Run) -> list[tuple[str, list[Panel]]]:
    """The report's sections and their panels; every numeric ``(key, split)`` of the run
    is in exactly one panel (the ones no rule places: "Other logged values")."""
    train_keys, val_keys = run.keys("train"), run.keys("val")
    placed: set[tuple[str, str]] = set()

    def take(keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [(k, s) for k, s in keys if (k, s) not in placed and _has_numbers(run, k, s)]
        placed.update(out)
        return out

    def with_val(keys: Sequence[str]) -> list[tuple[str, str]]:
        return [(k, "train") for k in keys] + [(k, "val") for k in keys if k in val_keys]

    sections: list[tuple[str, list[Panel]]] = []
    # Losses: one panel per term, its validation loss dashed, ln K on DINO and iBOT.
    losses = []
    for key in [k for k in train_keys if k.startswith("loss_")]:
        term = key[len("loss_"):]
        series = take([(key, "train"), (VAL_PREFIX + term, "val")])
        if not series:
            continue
        hlines = []
        if term in run.ln_k:
            hlines.append((run.ln_k[term], f"ln K = {run.ln_k[term]:.4f}"))
        note = ("iBOT's loss averages over all crops, the unmasked ones adding 0: it sits below ln K even when "
                "uniform; its entropies (Diagnostics) compare to ln K" if term == "ibot" else "")
        losses.append(Panel(f"{term} loss", series, hlines, checkpoints=True, log_y=False, note=note))
    for key in val_keys:  # validation losses without a training term of the same name
        if key.startswith(VAL_PREFIX) and key not in ("val_images", "val_skipped", "val_s"):
            series = take([(key, "val")])
            if series:
                losses.append(Panel(f"{key} (validation)", series, checkpoints=True))
    sections.append(("Losses", losses))

    schedules = []
    for title, keys in (("learning rate", ["lr", "last_layer_lr"]), ("weight decay", ["wd"]),
                        ("teacher momentum", ["momentum"]), ("teacher temperature", ["teacher_temp"]),
                        ("supervision weight", ["supervision_weight"])):
        series = take(with_val([k for k in keys if k in train_keys or k in val_keys]))
        if series:
            schedules.append(Panel(title, series, log_y=False))
    sections.append(("Schedules", schedules))

    diagnostics = []
    for loss in [k[: -len("_teacher_entropy")] for k in train_keys if k.endswith("_teacher_entropy")]:
        series = take(with_val([f"{loss}_teacher_entropy", f"{loss}_student_entropy"]))
        hlines = [(run.ln_k[loss], f"ln K = {run.ln_k[loss]:.4f}")] if loss in run.ln_k else []
        if series:
            diagnostics.append(Panel(f"{loss} entropies (nats)", series, hlines, log_y=False))
    groups = (
        ("prototypes used", lambda k: k.endswith("_prototypes_used")),
        ("bottleneck norms", lambda k: k.endswith("_bottleneck_norm")),
        ("CLS spread", lambda k: k.startswith("cls_spread")),
        ("gradient norms", lambda k: k == "grad_norm" or k.startswith("grad_norm_")),
    )
    for title, match in groups:
        series = take(with_val([k for k in train_keys if match(k)]))
        if not series:
            continue
        hlines = []
        if title == "prototypes used":
            ks = sorted({round(math.exp(v)) for v in run.ln_k.values()})
            hlines = [(float(k), f"K = {k}") for k in ks]
        diagnostics.append(Panel(title, series, hlines))
    sections.append(("Diagnostics", diagnostics))

    speed = []
    for title, keys in (("images / s", ["images_per_s"]), ("ETA (s)", ["eta_s"]),
                        ("unreadable images (total)", ["skipped_images"]), ("peak GPU memory (GiB)", ["max_memory_gib"])):
        series = take(with_val(keys))
        if series:
            speed.append(Panel(title, series, log_y=False))
    for title, keys in (("validation pass: images", ["val_images", "val_skipped"]), ("validation pass: seconds", ["val_s"])):
        series = take([(k, "val") for k in keys])
        if series:
            speed.append(Panel(title, series, log_y=False))
    sections.append(("Throughput", speed))

    other = []
    for split, keys in (("train", train_keys), ("val", val_keys)):
        for key in keys:
            series = take([(key, split)])
            if series:
                title = key if split == "train" else f"{key} (validation)"
                note = "1 = the step was applied, 0 = skipped (non-finite loss)" if key == "applied" else ""
                other.append(Panel(title, series, log_y=False, note=note))
    sections.append(("Other logged values", other))
    return sections


def _panel_svg(run: Run, panel: Panel) -> str:
    vlines = [(float(it), f"checkpoint at iteration {it}") for it in run.checkpoints] if panel.checkpoints else []
    svg = svg_line_chart(panel.title, _line_series(run, panel), hlines=panel.hlines, vlines=vlines,
                         vline_label="checkpoints" if vlines else "", log_y=panel.log_y)
    if panel.note:
        return f'<div style="width:420px">{svg}<div style="font-size:11px;color:#666">{escape_html(panel.note)}</div></div>'
    return svg


# ------------------------------------------------------------------------------ tables


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def series_table(run: Run) -> str:
    """Every key of ``metrics.jsonl``: split, records with a value, first, last, min, max."""
    rows = []
    for split, records in (("train", run.train), ("val", run.val)):
        for key in run.keys(split):
            values = [r[key] for r in records if key in r]
            numbers = [v for v in (_number(x) for x in values) if v is not None and math.isfinite(v)]
            present = [v for v in values if v is not None]
            rows.append([key, "training" if split == "train" else "validation", f"{len(present)} / {len(records)}",
                         _fmt(values[0]) if values else "", _fmt(values[-1]) if values else "",
                         _fmt(min(numbers)) if numbers else "", _fmt(max(numbers)) if numbers else ""])
    return html_table(["key", "records", "with a value / records", "first", "last", "min", "max"], rows)


def _collapse_html(run: Run) -> str:
    source = RUN_SUMMARY_FILE
    collapse = (run.summary or {}).get("collapse") if run.summary else None
    if not isinstance(collapse, dict):
        collapse = run_collapse_status(run.path)
        source = f"replayed from {METRICS_FILE} ({RUN_SUMMARY_FILE} not written yet)"
    if not collapse:
        return '<p class="note">No collapse verdict: the run has no config.yaml to replay it from.</p>'
    detected = collapse.get("detected_at_iteration")
    if collapse.get("checked") is False:
        verdict, cls = "collapse checks skipped: the run computes no DINO / iBOT loss (ln K checks apply only to them)", "note"
    elif collapse.get("collapsed"):
        verdict, cls = f"COLLAPSED since iteration {detected}: DINO / iBOT teach the backbone nothing (see {DOCS})", "warn"
    elif detected is not None:
        verdict, cls = f"collapsed at iteration {detected}, not any more", "note"
    else:
        verdict, cls = "no collapse detected", "ok"
    threshold = collapse.get("uniform_kl_threshold_nats")
    rows = [[loss, _fmt(v.get("ln_k")), _fmt(v.get("teacher_kl_to_uniform")), _fmt(v.get("student_kl_to_uniform"))]
            for loss, v in (collapse.get("last") or {}).items() if isinstance(v, dict)]
    table = html_table(["loss", "ln K", "teacher KL to uniform (nats)", "student KL to uniform (nats)"], rows) if rows else ""
    limit = f" A loss counts as collapsed below {threshold:g} nats." if isinstance(threshold, (int, float)) else ""
    return (f'<p class="{cls}"><b>Collapse verdict</b> ({escape_html(source)}): {escape_html(verdict)}</p>'
            f"<p>At the last logged step:{escape_html(limit)}</p>{table}")


def _run_table(run: Run) -> str:
    cfg, summary = run.config, run.summary or {}
    last = run.train[-1] if run.train else run.val[-1]
    rows = [["run directory", str(run.path)]]
    if cfg is not None:
        arch = OmegaConf.select(cfg, "student.arch")
        patch = OmegaConf.select(cfg, "student.patch_size")
        rows.append(["student", f"{arch}, patch {patch}"])
        rows.append(["prototypes", ", ".join(f"{loss}: K = {round(math.exp(v))} (ln K = {v:.4f})"
                                             for loss, v in run.ln_k.items()) or "none (no DINO / iBOT loss)"])
        rows.append(["batch per rank", str(OmegaConf.select(cfg, "train.batch_size_per_gpu"))])
    total = summary.get("iterations") or (OmegaConf.select(cfg, "train.iterations") if cfg is not None else None)
    done = summary.get("iteration", last["iteration"])
    rows.append(["iterations", f"{done} of {total}" if total else str(done)])
    rows.append(["records", f"{len(run.train)} training, {len(run.val)} validation"])
    if summary:
        rows.append(["interrupted", _fmt(summary.get("interrupted"))])
        best = summary.get("best_val")
        if isinstance(best, dict):
            rows.append(["best validation checkpoint", f"iteration {best.get('iteration')} "
                                                      f"(val_total {_fmt(best.get('val_total'))})"])
    else:
        rows.append(["state", f"no {RUN_SUMMARY_FILE} yet (running, or killed)"])
    return html_table(["", ""], rows, cls="meta")


# ------------------------------------------------------------------------------ eval


def read_eval(eval_dir: str | Path) -> list[dict[str, Any]]:
    """``[{"name", "iteration", "scores": {probe: balanced accuracy}, "best"}]`` of an
    ``eval.run`` output directory: its ``summary.json`` (a run's checkpoints) or its
    ``metrics.json`` (one checkpoint). :class:`EvalResultsError` otherwise (exit 2)."""
    path = Path(eval_dir)
    if (path / EVAL_SUMMARY_FILE).is_file():
        doc = read_json_object(path / EVAL_SUMMARY_FILE)
        rows = doc.get("checkpoints")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise EvalResultsError(f"{path / EVAL_SUMMARY_FILE}: 'checkpoints' must be a list of objects")
        return [{"name": r.get("name"), "iteration": r.get("iteration"),
                 "scores": dict(r.get(EVAL_METRIC) or {}), "best": r.get("name") == doc.get("best")} for r in rows]
    if (path / EVAL_METRICS_FILE).is_file():
        doc = read_json_object(path / EVAL_METRICS_FILE)
        probes = doc.get("probes") if isinstance(doc.get("probes"), dict) else {}
        ckpt = doc.get("checkpoint") if isinstance(doc.get("checkpoint"), dict) else {}
        scores = {p: (m.get(EVAL_METRIC) or {}).get("mean") for p, m in probes.items() if isinstance(m, dict)}
        return [{"name": ckpt.get("name"), "iteration": ckpt.get("iteration"), "scores": scores, "best": True}]
    raise EvalResultsError(f"{path}: no {EVAL_SUMMARY_FILE} or {EVAL_METRICS_FILE} (an output directory of "
                           "python -m eval.run --ckpt RUN_DIR)")


def _eval_html(rows: list[dict[str, Any]], run: Run) -> str:
    probes = list(dict.fromkeys(p for r in rows for p in r["scores"]))
    table = html_table(["checkpoint", "iteration"] + [f"{p} balanced accuracy" for p in probes] + ["best"],
                       [[r["name"], _fmt(r["iteration"])] + [_fmt(r["scores"].get(p)) for p in probes]
                        + ["best" if r["best"] else ""] for r in rows])
    points = sorted((r for r in rows if isinstance(r["iteration"], int)), key=lambda r: r["iteration"])
    chart = ""
    if points:
        colours = palette(max(len(probes), 1))
        series = [LineSeries(p, [r["iteration"] for r in points], [_number(r["scores"].get(p)) for r in points],
                             colours[i], markers=True) for i, p in enumerate(probes)]
        vlines = [(float(it), f"checkpoint at iteration {it}") for it in run.checkpoints]
        chart = svg_line_chart("balanced accuracy of the checkpoints", series, vlines=vlines,
                               vline_label="checkpoints" if vlines else "", log_y=False, width=560)
    return f'<div class="row">{chart}{table}</div>'


# ------------------------------------------------------------------------------ page


def render_training_report(run: Run, eval_rows: list[dict[str, Any]] | None = None) -> str:
    """The whole page of a run (:func:`read_run`) and its evaluation (:func:`read_eval`)."""
    body = [f"<style>{CSS_EXTRA}</style>", _run_table(run), "<h2>Collapse</h2>", _collapse_html(run)]
    for title, panels in build_panels(run):
        if panels:
            body.append(f"<h2>{escape_html(title)}</h2><div class=\"panels\">"
                        + "".join(_panel_svg(run, p) for p in panels) + "</div>")
    body.append("<h2>Checkpoints</h2>")
    if run.checkpoints:
        body.append(f"<p>In {escape_html(str(run.path / 'checkpoints'))} (older ones pruned by "
                    f"train.keep_checkpoints are not listed): iterations "
                    f"{escape_html(', '.join(str(it) for it in run.checkpoints))}; dotted lines in the loss panels.</p>")
    else:
        body.append("<p>No checkpoint in the run directory.</p>")
    if eval_rows is not None:
        body.append("<h2>Evaluation of the checkpoints</h2>" + _eval_html(eval_rows, run))
    body.append(f"<h2>Every logged key ({escape_html(METRICS_FILE)})</h2>" + series_table(run))
    return html_page(f"Training run {run.path.name or run.path}", body)


def write_report(run_dir: str | Path, eval_dir: str | Path | None = None, output: str | Path | None = None) -> Path:
    """Write the page (default ``RUN_DIR/training.html``) and return its path."""
    run = read_run(run_dir)
    eval_rows = read_eval(eval_dir) if eval_dir is not None else None
    target = Path(output) if output is not None else run.path / REPORT_FILE
    try:
        atomic_write_text(target, render_training_report(run, eval_rows))
    except OSError as exc:
        raise RunReportError(f"{target}: cannot be written: {exc.strerror or exc}") from None
    return target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2_hier.report",
        description="A training run's curves (losses with ln K, schedules, diagnostics, images/s, checkpoints, "
                    "evaluation) as one self-contained HTML page.",
    )
    parser.add_argument("run_dir", type=Path, help="a training run's output directory (metrics.jsonl, config.yaml)")
    parser.add_argument("--eval", dest="eval_dir", type=Path, default=None,
                        help="an output directory of python -m eval.run --ckpt RUN_DIR: its checkpoints' scores")
    parser.add_argument("--output", type=Path, default=None, help=f"the page (default: RUN_DIR/{REPORT_FILE})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job() -> None:
        print(write_report(args.run_dir, args.eval_dir, args.output))

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
