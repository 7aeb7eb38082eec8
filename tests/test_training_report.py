"""Training curves a person can look at (issue 23, part 3): ``train.tensorboard`` writes every
value of every ``metrics.jsonl`` record, and ``python -m dinov2_hier.report RUN_DIR`` draws
them in one self-contained ``training.html``."""
from __future__ import annotations

import json
import math
import re
import sys

import pytest

from dinov2_hier.config import load_config, save_config
from dinov2_hier.io import read_jsonl
from dinov2_hier.report import main as report_main
from dinov2_hier.report import read_run, render_training_report
from dinov2_hier.train import tensorboard as tb
from tests.conftest import TINY_OVERRIDES

LN_256 = math.log(256)  # TINY_OVERRIDES: 256 DINO and iBOT prototypes


# ----------------------------------------------------------------------------- helpers


class FakeWriter:
    """Records what the trainer hands to ``SummaryWriter``."""

    instances: list["FakeWriter"] = []

    def __init__(self, log_dir: str, **kwargs):
        self.log_dir, self.kwargs = log_dir, kwargs
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        assert not self.closed
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def _record(it: int) -> dict:
    """A training record with the keys a real one has (values made up, non-trivial)."""
    return {
        "iteration": it, "loss_dino": 5.5 - 0.1 * it + 0.01 * it * it, "loss_ibot": 3.0 - 0.05 * it,
        "loss_koleo": 20.0 / it, "loss_hierce": 2.0 - 0.1 * it, "loss_total": 11.0 - 0.2 * it, "lr": 1e-4 * it,
        "last_layer_lr": 1e-4 * it, "wd": 0.04 + 0.01 * it, "momentum": 0.992 + 0.0001 * it, "teacher_temp": 0.04,
        "supervision_weight": 1.0, "grad_norm": 1000.0 / it, "dino_teacher_entropy": 5.5 - 0.02 * it,
        "dino_student_entropy": 4.8, "dino_prototypes_used": 7.0 + it, "dino_bottleneck_norm": 0.03 * it,
        "cls_spread_student": 0.001 * it, "cls_spread_teacher": 0.0, "ibot_teacher_entropy": 4.7,
        "ibot_student_entropy": 4.79, "ibot_prototypes_used": 30.0, "ibot_bottleneck_norm": 0.031,
        "grad_norm_backbone": 900.0 / it, "grad_norm_dino_head": 40.0 + it, "applied": it != 4,
        "images_per_s": 10.0 + it, "eta_s": 60.0 - 10 * it, "skipped_images": 0, "max_memory_gib": None,
    }


def _val_record(it: int) -> dict:
    return {"iteration": it, "split": "val", "val_dino": 5.4 - 0.05 * it, "val_ibot": 2.9, "val_koleo": 14.0,
            "val_hierce": 1.9, "val_total": 10.0 - 0.1 * it, "val_images": 22, "val_skipped": 0, "val_s": 0.5,
            "teacher_temp": 0.04}


@pytest.fixture
def handmade_run(tmp_path):
    """A run directory as the trainer leaves it: config.yaml, metrics.jsonl (six training
    records, two validation ones), run_summary.json, checkpoint files."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, TINY_OVERRIDES), run / "config.yaml")
    records = []
    for it in range(1, 7):
        records.append(_record(it))
        if it % 3 == 0:
            records.append(_val_record(it))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "run_summary.json").write_text(json.dumps({
        "iteration": 6, "iterations": 6, "interrupted": False,
        "collapse": {"collapsed": False, "detected_at_iteration": None, "uniform_kl_threshold_nats": 0.01,
                     "last": {"dino": {"ln_k": LN_256, "student_kl_to_uniform": 0.35, "teacher_kl_to_uniform": 0.0}}},
        "last_record": records[-2],
    }))
    (run / "checkpoints").mkdir()
    for it in (3, 6):
        (run / "checkpoints" / f"ckpt_{it:08d}.pt").write_bytes(b"")
    return run, records


def _svg(html: str, label: str) -> str:
    match = re.search(rf'<svg [^>]*aria-label="{re.escape(label)}">.*?</svg>', html)
    assert match, f"no chart {label!r}"
    return match.group(0)


def _polylines(svg: str, series: str) -> list[dict]:
    found = []
    for tag in re.findall(r"<polyline [^>]*>", svg):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        if attrs.get("data-series") == series:
            found.append(attrs)
    return found


def _affine(pairs: list[tuple[float, float]], tol: float = 0.011) -> tuple[float, float]:
    """Slope and offset of pixel = a * value + b through the extremes; every pair on it."""
    (v0, p0), (v1, p1) = min(pairs), max(pairs)
    a = (p1 - p0) / (v1 - v0)
    b = p0 - a * v0
    for v, p in pairs:
        assert abs(a * v + b - p) <= tol, (v, p, a * v + b)
    return a, b


def _check_series_plotted(html: str, chart: str, key: str, records: list[dict]) -> tuple[float, float]:
    """The polyline of ``key`` in ``chart`` holds exactly the records' values, and its pixels
    are an affine (up = larger) image of them (of their log10 on a log axis); returns the y map."""
    svg = _svg(html, chart)
    (line,) = _polylines(svg, key)
    xs = [float(v) for v in line["data-x"].split()]
    ys = [float(v) for v in line["data-y"].split()]
    expected = [r for r in records if r.get(key) is not None and r.get("split") != "val"]
    assert xs == [r["iteration"] for r in expected]
    assert ys == [r[key] for r in expected]
    pixels = [tuple(float(c) for c in p.split(",")) for p in line["points"].split()]
    assert len(pixels) == len(ys)
    ax, _ = _affine([(x, px) for x, (px, _) in zip(xs, pixels)])
    f = math.log10 if ">log scale<" in svg else float
    ay, by = _affine([(f(y), py) for y, (_, py) in zip(ys, pixels)])
    assert ax > 0 and ay < 0
    return ay, by


def _check_every_key_named_and_ln_k(html: str, records: list[dict], ln_k: float) -> None:
    keys = {k for r in records for k in r if k not in ("iteration", "split")}
    missing = sorted(k for k in keys if k not in html)
    assert not missing, f"keys of metrics.jsonl not named in the page: {missing}"
    for chart in ("dino loss", "ibot loss"):
        refs = re.findall(r'data-reference="([^"]+)"', _svg(html, chart))
        assert [float(r) for r in refs] == [ln_k]
        assert f"ln K = {ln_k:.4f}" in _svg(html, chart)


def _check_self_contained(html: str) -> None:
    lowered = html.lower()
    for bad in ("http://", "https://", "src=", "<script", "<link", "@import", "url("):
        assert bad not in lowered, bad


# ----------------------------------------------------------------------------- the report (fast)


def test_report_names_every_key_marks_ln_k_and_plots_the_records(handmade_run):
    run_dir, records = handmade_run
    assert report_main([str(run_dir)]) == 0
    html = (run_dir / "training.html").read_text()
    _check_every_key_named_and_ln_k(html, records, LN_256)
    _check_self_contained(html)
    ay, by = _check_series_plotted(html, "dino loss", "loss_dino", records)
    # The ln K line sits where the dino panel's scale puts ln K.
    (ref,) = re.findall(r'<line [^>]*data-reference="[^"]+"', _svg(html, "dino loss"))
    y_ref = float(re.search(r'y1="([^"]+)"', ref).group(1))
    assert y_ref == pytest.approx(ay * LN_256 + by, abs=0.011)
    # Validation losses dashed in their term's panel, with exactly their values.
    (val,) = _polylines(_svg(html, "total loss"), "val_total")
    assert [float(v) for v in val["data-y"].split()] == [r["val_total"] for r in records if "val_total" in r]
    assert "stroke-dasharray" in str(val)
    # Schedules, diagnostics and throughput have their panels; the supervised term its own.
    for chart in ("hierce loss", "learning rate", "weight decay", "teacher momentum", "teacher temperature",
                  "dino entropies (nats)", "prototypes used", "bottleneck norms", "CLS spread", "gradient norms",
                  "images / s"):
        _svg(html, chart)
    _check_series_plotted(html, "learning rate", "lr", records)
    # Checkpoints as markers on the loss panels; the collapse verdict of run_summary.json.
    assert _svg(html, "dino loss").count("checkpoint at iteration") == 2
    assert "no collapse detected" in html and "run_summary.json" in html
    # A None (max_memory_gib on CPU) is listed, not drawn.
    assert "null" in html and 'data-series="max_memory_gib"' not in html


def test_ln_k_comes_from_the_config_and_k_marks_the_prototypes_panel(handmade_run):
    run_dir, _ = handmade_run
    cfg = load_config(None, TINY_OVERRIDES + ["dino.head_n_prototypes=512", "ibot.head_n_prototypes=128",
                                              "ibot.separate_head=true"])
    save_config(cfg, run_dir / "config.yaml")
    html = render_training_report(read_run(run_dir))
    assert float(re.search(r'data-reference="([^"]+)"', _svg(html, "dino loss")).group(1)) == math.log(512)
    assert float(re.search(r'data-reference="([^"]+)"', _svg(html, "ibot loss")).group(1)) == math.log(128)
    assert "K = 512" in _svg(html, "prototypes used") and "K = 128" in _svg(html, "prototypes used")


def test_report_without_config_takes_ln_k_from_the_summary(handmade_run):
    run_dir, _ = handmade_run
    (run_dir / "config.yaml").unlink()
    html = render_training_report(read_run(run_dir))
    assert float(re.search(r'data-reference="([^"]+)"', _svg(html, "dino loss")).group(1)) == LN_256


def test_report_shows_the_eval_results_of_the_checkpoints(handmade_run, tmp_path):
    run_dir, _ = handmade_run
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    rows = [{"name": f"iter_{it:08d}", "checkpoint": f"{run_dir}/checkpoints/ckpt_{it:08d}.pt", "iteration": it,
             "output_dir": str(eval_dir / f"iter_{it:08d}"), "score": 0.5 + 0.01 * it,
             "balanced_accuracy": {"logreg": 0.5 + 0.01 * it, "knn": 0.4 + 0.02 * it}} for it in (3, 6)]
    (eval_dir / "summary.json").write_text(json.dumps({
        "criterion": {"probe": "logreg", "metric": "balanced_accuracy", "statistic": "mean over folds"},
        "best": "iter_00000006", "best_checkpoint": rows[1]["checkpoint"], "best_score": 0.56, "checkpoints": rows}))
    assert report_main([str(run_dir), "--eval", str(eval_dir), "--output", str(tmp_path / "out.html")]) == 0
    html = (tmp_path / "out.html").read_text()
    svg = _svg(html, "balanced accuracy of the checkpoints")
    (knn,) = _polylines(svg, "knn")
    assert [float(v) for v in knn["data-y"].split()] == [0.46, 0.52]
    assert [float(v) for v in knn["data-x"].split()] == [3, 6]
    assert "iter_00000006" in html and "0.56" in html
    assert not (run_dir / "training.html").exists()  # --output


@pytest.mark.parametrize("case", ["missing", "no_metrics", "torn", "bad_eval"])
def test_bad_run_directory_is_one_line_exit_2(handmade_run, tmp_path, capsys, case):
    run_dir, _ = handmade_run
    args = [str(run_dir)]
    if case == "missing":
        args = [str(tmp_path / "nowhere")]
    elif case == "no_metrics":
        (run_dir / "metrics.jsonl").unlink()
    elif case == "torn":
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('{"iteration": 7, "loss_di')
    else:
        args += ["--eval", str(tmp_path)]
    capsys.readouterr()
    assert report_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert {"missing": "no such directory", "no_metrics": "no metrics.jsonl", "torn": "line 9 is not a JSON record",
            "bad_eval": "no summary.json"}[case] in err
    assert not (run_dir / "training.html").exists()


# ----------------------------------------------------------------------------- tensorboard (fast)


def test_record_scalars_tags_values_and_steps():
    assert tb.record_scalars({"iteration": 5, "loss_dino": 1.5, "applied": False, "max_memory_gib": None,
                              "skipped_images": 2}, val=False) == [
        ("loss_dino", 1.5, 5), ("applied", 0.0, 5), ("skipped_images", 2.0, 5)]
    assert tb.record_scalars({"iteration": 3, "split": "val", "val_total": 2.0, "teacher_temp": 0.04}, val=True) == [
        ("val/val_total", 2.0, 3), ("val/teacher_temp", 0.04, 3)]


def test_tensorboard_without_the_package_stops_before_training(tmp_path, capsys, monkeypatch):
    from dinov2_hier.train.__main__ import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    out = tmp_path / "run"
    rc = main(["--output-dir", str(out), *TINY_OVERRIDES, "train.tensorboard=true"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0] and "train.tensorboard" in lines[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- a real tiny run (slow)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run with validation and train.tensorboard=true, stopped at its checkpoint and
    resumed, with a fake SummaryWriter."""
    from dinov2_hier.train.loop import Trainer

    run_dir = tmp_path_factory.mktemp("tb") / "run"
    overrides = TINY_OVERRIDES + ["train.tensorboard=true", "data.val_fraction=0.1", "train.val_every=3"]
    FakeWriter.instances.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "summary_writer_class", lambda: FakeWriter)
        Trainer(load_config(None, overrides), run_dir).run(stop_at=3)
        Trainer(load_config(None, overrides), run_dir).run()
    return run_dir, list(FakeWriter.instances)


@pytest.mark.slow
def test_tensorboard_gets_every_value_of_metrics_jsonl(tiny_run):
    run_dir, writers = tiny_run
    records, torn = read_jsonl(run_dir / "metrics.jsonl")
    assert not torn and any(r.get("split") == "val" for r in records)
    assert [w.log_dir for w in writers] == [str(run_dir / "tensorboard")] * 2
    assert writers[0].kwargs == {} and writers[1].kwargs == {"purge_step": 4}  # resumed after iteration 3
    assert all(w.closed for w in writers)
    expected = []
    for r in records:
        prefix = "val/" if r.get("split") == "val" else ""
        for key, value in r.items():
            if key in ("iteration", "split") or value is None:
                continue
            expected.append((prefix + key, float(value), r["iteration"]))
    written = [s for w in writers for s in w.scalars]
    assert written == expected
    tags = {t for t, _, _ in written}
    assert {"loss_dino", "dino_teacher_entropy", "ibot_prototypes_used", "cls_spread_student",
            "grad_norm_backbone", "val/val_total", "lr"} <= tags


@pytest.mark.slow
def test_report_of_a_tiny_run(tiny_run):
    run_dir, _ = tiny_run
    assert report_main([str(run_dir)]) == 0
    html = (run_dir / "training.html").read_text()
    records, _ = read_jsonl(run_dir / "metrics.jsonl")
    _check_every_key_named_and_ln_k(html, records, LN_256)
    _check_self_contained(html)
    _check_series_plotted(html, "dino loss", "loss_dino", records)
    _check_series_plotted(html, "gradient norms", "grad_norm_backbone", records)  # a log axis


def test_line_chart_breaks_at_missing_values_and_keeps_counts_above_zero():
    from dinov2_hier.render import LineSeries, svg_line_chart

    svg = svg_line_chart("c", [LineSeries("s", [1, 2, 3, 4, 5], [0.1, float("nan"), 2.0, None, 3.0], "#000")],
                         log_y=False)
    assert [p["data-y"] for p in _polylines(svg, "s")] == ["0.1", "2.0", "3.0"]  # three one-point pieces
    ticks = [float(t) for t in re.findall(r'text-anchor="end">([^<]+)</text>', svg)]
    assert min(ticks) == 0.0  # values >= 0, padded: the axis stops at 0, not below
    auto = svg_line_chart("c", [LineSeries("s", [1, 2, 3], [1000.0, 10.0, 1.0], "#000")], log_y=None)
    assert ">log scale<" in auto  # every value positive, the largest over 50 times the smallest
    assert ">log scale<" not in svg_line_chart("c", [LineSeries("s", [1, 2], [100.0, 0.0], "#000")])
    log = svg_line_chart("c", [LineSeries("s", [1, 2, 3], [1000.0, 0.0, 1.0], "#000")], log_y=True)
    assert [p["data-y"] for p in _polylines(log, "s")] == ["1000.0", "1.0"]  # 0 has no place on a log axis
