"""eval.report: fold summaries, metrics.json, predictions.csv and the self-contained report.html."""
from __future__ import annotations

import json
import math
import re
import sys
import types

import numpy as np
import pytest

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.metrics import all_metrics
from dinov2_hier.paths import PROJECT_ROOT
from eval.report import (
    UMAP_MISSING_NOTE,
    PredictionsFileError,
    PredictionTable,
    format_mean_std,
    pooled_confusion,
    read_predictions_csv,
    render_report_html,
    summarize,
    summarize_per_class,
    write_metrics_json,
    write_predictions_csv,
    write_report_html,
)

NAN = float("nan")


def _fold(acc, bal, severity, cm, per_class=None):
    return {
        "accuracy": acc, "balanced_accuracy": bal, "mistake_severity": severity,
        "labels": ["a", "b"], "confusion_matrix": cm,
        "per_class": per_class or {
            "a": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2},
            "b": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1},
        },
    }


PER_FOLD = {
    "logreg": [
        _fold(0.5, 0.4, NAN, [[1, 1], [0, 1]]),
        _fold(0.7, 0.6, 1.0, [[2, 0], [1, 0]], {
            "a": {"precision": 0.5, "recall": 1.0, "f1": 0.5, "support": 2},
            "b": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
        }),
    ],
    "knn_k1": [_fold(0.2, 0.2, 2.0, [[0, 2], [1, 0]]), _fold(0.4, 0.2, 1.0, [[1, 1], [0, 1]])],
}


def test_summarize_mean_std_and_folds_by_hand():
    s = summarize(PER_FOLD)
    assert list(s) == ["logreg", "knn_k1"]
    assert list(s["logreg"]) == ["accuracy", "balanced_accuracy", "mistake_severity"]  # nested entries left out
    acc = s["logreg"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.6) and acc["std"] == pytest.approx(0.1)  # population std
    assert acc["folds"] == [0.5, 0.7] and acc["n"] == 2
    assert s["logreg"]["balanced_accuracy"]["mean"] == pytest.approx(0.5)
    # an undefined fold value (no mistakes: NaN) stays visible as None and is left out of the mean
    sev = s["logreg"]["mistake_severity"]
    assert sev["folds"] == [None, 1.0] and sev["mean"] == 1.0 and sev["std"] == 0.0 and sev["n"] == 1
    knn = s["knn_k1"]["mistake_severity"]
    assert knn["mean"] == pytest.approx(1.5) and knn["std"] == pytest.approx(0.5)
    assert s["knn_k1"]["balanced_accuracy"]["std"] == 0.0


def test_summarize_single_split_and_all_undefined():
    s = summarize({"p": [{"accuracy": 0.25, "mistake_severity": NAN}]})
    assert s["p"]["accuracy"] == {"mean": 0.25, "std": 0.0, "n": 1, "folds": [0.25]}
    assert s["p"]["mistake_severity"] == {"mean": None, "std": None, "n": 0, "folds": [None]}
    assert format_mean_std(s["p"]["mistake_severity"]) == "n/a"
    assert format_mean_std(s["p"]["accuracy"]) == "0.250 ± 0.000"


def test_per_class_and_pooled_confusion():
    pc = summarize_per_class(PER_FOLD)
    a = pc["logreg"]["a"]
    assert a["recall"]["mean"] == pytest.approx(0.75) and a["recall"]["std"] == pytest.approx(0.25)
    assert a["support"] == 4
    # class b has no test sample in fold 1 of logreg: that fold gives no value
    b = pc["logreg"]["b"]
    assert b["f1"]["folds"] == [pytest.approx(2 / 3), None] and b["f1"]["n"] == 1 and b["support"] == 1
    cm = pooled_confusion(PER_FOLD)
    assert cm == {"logreg": [[3, 1], [1, 1]], "knn_k1": [[1, 3], [1, 1]]}


def test_metrics_json_content(tmp_path):
    summary = summarize(PER_FOLD)
    extra = {"settings": {"folds": 2}, "checkpoint": {"name": "x", "iteration": 3}, "classes": ["a", "b"],
             "n_samples": 6, "n_unreadable": 1, "data": {"path": "d.csv"}, "hierarchy": None,
             "confusion_matrix": pooled_confusion(PER_FOLD), "custom": np.float32(0.5)}
    path = write_metrics_json(tmp_path, summary, extra)
    text = path.read_text()
    assert "NaN" not in text  # strict JSON
    doc = json.loads(text)
    assert list(doc)[:4] == ["checkpoint", "data", "n_samples", "n_unreadable"]
    assert doc["probes"]["logreg"]["accuracy"]["mean"] == pytest.approx(0.6)
    assert doc["probes"]["logreg"]["mistake_severity"]["folds"] == [None, 1.0]
    assert doc["n_unreadable"] == 1 and doc["classes"] == ["a", "b"] and doc["custom"] == 0.5
    assert doc["confusion_matrix"]["logreg"] == [[3, 1], [1, 1]]


def test_predictions_csv_roundtrip_and_errors(tmp_path):
    path = write_predictions_csv(
        tmp_path, sample=[0, 2, 5], path=["/d/a.png", "/d/b,c.png", "/d/e.png"], fold=[1, 0, 1],
        y_true=["a", "b", "a"], predictions={"knn_k1": ["a", "a", "b"], "logreg": ["a", "b", "a"]},
    )
    lines = path.read_text().splitlines()
    assert lines[0] == "sample,path,fold,y_true,knn_k1,logreg"
    assert lines[1] == "0,/d/a.png,1,a,a,a" and len(lines) == 4
    assert lines[2] == '2,"/d/b,c.png",0,b,a,b'  # quoted, not split
    table = read_predictions_csv(tmp_path)
    assert table.sample.tolist() == [0, 2, 5] and table.fold.tolist() == [1, 0, 1]
    assert table.path[1] == "/d/b,c.png" and table.classifiers == ["knn_k1", "logreg"]
    assert table.predictions["logreg"].tolist() == ["a", "b", "a"]
    assert table.columns()["fold"] == ["1", "0", "1"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "predictions.csv").write_text("sample,path,fold,y_true,logreg\n0,p,x,a,a\n")
    with pytest.raises(PredictionsFileError, match="'fold' must be an integer"):
        read_predictions_csv(bad)
    (bad / "predictions.csv").write_text("sample,path,fold,y_true,logreg\n0,p,0,a,a\n0,q,1,a,a\n")
    with pytest.raises(PredictionsFileError, match="sample 0 appears more than once"):
        read_predictions_csv(bad)
    (bad / "predictions.csv").write_text("sample,path,y_true,logreg\n0,p,a,a\n")
    with pytest.raises(PredictionsFileError, match="fold"):
        read_predictions_csv(bad)
    with pytest.raises(PredictionsFileError, match="not found"):
        read_predictions_csv(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="rows"):
        write_predictions_csv(tmp_path, [0], ["p"], [0], ["a"], {"logreg": ["a", "b"]})


# --------------------------------------------------------------------------- report.html


@pytest.fixture
def synthetic_tree() -> Hierarchy:
    return Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "synthetic.json")


def _report_inputs(hierarchy):
    classes = ["myeloblast", "promyelocyte", "small_lymphocyte", "monocyte"]
    y_true = np.array(classes * 3, dtype=object)
    preds = {
        "knn_k1": np.array(classes * 2 + ["promyelocyte", "myeloblast", "monocyte", "monocyte"], dtype=object),
        "logreg": y_true.copy(),
    }
    fold = np.array([0] * 6 + [1] * 6)
    per_fold = {name: [all_metrics(list(y_true[fold == f]), list(p[fold == f]), classes, hierarchy) for f in (0, 1)]
                for name, p in preds.items()}
    summary = summarize(per_fold)
    metrics = {"checkpoint": {"name": "iter_<1>", "iteration": 1}, "classes": classes, "n_samples": 12,
               "n_unreadable": 0, "hierarchy": {"name": hierarchy.name, "path": "synthetic.json"},
               "probes": summary, "per_class": summarize_per_class(per_fold),
               "confusion_matrix": pooled_confusion(per_fold), "settings": {"folds": 2}}
    table = PredictionTable(np.arange(12), [f"/img/{i}.png" for i in range(12)], fold, y_true, preds)
    features = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    return metrics, table, features, summary


def _assert_self_contained(html: str) -> None:
    for needle in ("http://", "https://", "src=", "<script", "<link", "url(", "<img"):
        assert needle not in html, needle


def test_report_html_tables_svgs_and_note_without_umap(tmp_path, synthetic_tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    metrics, table, features, summary = _report_inputs(synthetic_tree)
    path = write_report_html(tmp_path, metrics, table, features=features, hierarchy=synthetic_tree)
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    _assert_self_contained(html)
    # knn_k1 is right on 9 of 12: fold 0 all 6, fold 1 3 of 6 -> accuracy 0.750 ± 0.250
    assert summary["knn_k1"]["accuracy"]["folds"] == [1.0, 0.5]
    assert "<td>0.750 ± 0.250</td>" in html
    assert "<td>1.000 ± 0.000</td>" in html  # logreg: perfect
    for name in ("hierarchical_f1", "lineage_accuracy", "mistake_severity (lower better)"):
        assert f"<td>{name}</td>" in html
    # knn_k1's mistakes: myeloblast<->promyelocyte (severity 1 each: siblings at depth 3),
    # small_lymphocyte -> monocyte (severity 3: different lineages); fold 0 has none
    assert summary["knn_k1"]["mistake_severity"]["folds"] == [None, pytest.approx(5 / 3)]
    assert "<td>1.667 ± 0.000</td>" in html
    assert len(re.findall(r'<svg class="confusion"', html)) == 2  # one per probe
    assert len(re.findall(r"<svg", html)) == 3  # + the per-class F1 bars
    assert "iter_&lt;1&gt;" in html and "iter_<1>" not in html  # escaped
    assert UMAP_MISSING_NOTE.split("(")[0].strip() in html and "pip install" in html
    assert 'class="embedding"' not in html


def test_report_html_embedding_with_umap(synthetic_tree, monkeypatch):
    class FakeUMAP:  # stands in for umap.UMAP: a 2D projection is all the report needs
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit_transform(self, x):
            return np.asarray(x)[:, :2] * 3.0

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    metrics, table, features, _ = _report_inputs(synthetic_tree)
    html = render_report_html(metrics, table, features, synthetic_tree)
    _assert_self_contained(html)
    assert len(re.findall(r'<svg class="embedding"', html)) == 2  # by class and by lineage
    assert "coloured by lineage" in html
    for lineage in ("myeloid", "lymphoid", "monocytic"):
        assert f"<title>{lineage}</title>" in html
    assert html.count("<circle") >= 2 * 12
    # without a hierarchy: only the by-class plot
    html = render_report_html(metrics, table, features, None)
    assert len(re.findall(r'<svg class="embedding"', html)) == 1


def test_report_never_crashes_on_a_failing_embedding(synthetic_tree, monkeypatch):
    class Broken:
        def __init__(self, **kwargs):
            pass

        def fit_transform(self, x):
            raise RuntimeError("numba exploded")

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=Broken))
    metrics, table, features, _ = _report_inputs(synthetic_tree)
    html = render_report_html(metrics, table, features, synthetic_tree)
    assert "UMAP embedding failed" in html and "numba exploded" in html
    # nothing to embed: a note, not an error
    html = render_report_html(metrics, None, None, None)
    assert "No features" in html
    assert math.isfinite(len(html))
