"""Domain-aware evaluation (eval/domains.py): group splits, the groups hook of run_probes,
classes absent from training, the in- vs out-of-domain gap, --classes shared and the flags.

Feature-level tests run on synthetic arrays; the command-line tests on generated images with
the colour baseline (no training). With $DINOV2_HIER_TEST_DATA also pbc_dev + bccd.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest

from dinov2_hier.data import write_synthetic_dataset
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from eval.compare import main as compare_main
from eval.crossval import run_probes
from eval.domains import DomainPlan, group_kfold, group_splits, parse_split, shared_class_map
from eval.probes import KNNProbe
from eval.run import main as run_main
from tests.conftest import real_data_dir

SYNTHETIC = str(PROJECT_ROOT / "hierarchies" / "synthetic.json")
WBC = str(PROJECT_ROOT / "hierarchies" / "wbc.json")


class RecordingProbe:
    """Declares ``uses_groups``: records the groups of every fit, predicts the first class."""

    name = "recording"
    uses_groups = True

    def __init__(self):
        self.seen = []

    def fit(self, X, y, domains):
        self.seen.append(None if domains is None else list(domains))
        self.first = sorted(set(y))[0]

    def predict(self, X):
        return np.full(len(X), self.first)


class ConstantProbe:
    """A plain probe (``fit(X, y)`` only: passing groups would fail) predicting one class."""

    name = "const"

    def __init__(self, label):
        self.label = label

    def fit(self, X, y):
        pass

    def predict(self, X):
        return np.full(len(X), self.label)


class ThresholdProbe:
    """Predicts "a" for x < 5, "b" for x < 15, else "c" (no fitting)."""

    name = "threshold"

    def fit(self, X, y):
        pass

    def predict(self, X):
        return np.array(["a" if x < 5 else "b" if x < 15 else "c" for x in X[:, 0]])


def _three_groups():
    groups = np.array(["a", "b", "c"] * 6)
    labels = np.array(["x", "y"] * 9)
    X = np.arange(len(labels), dtype=np.float64)[:, None]
    return X, labels, groups


def test_leave_one_group_out_tests_every_row_once_and_never_trains_on_its_group():
    X, y, groups = _three_groups()
    folds, names = group_splits(groups, "leave-one-group-out")
    assert names == ["a", "b", "c"]
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(len(y)))  # every row exactly once
    for name, (train, test) in zip(names, folds):
        assert set(groups[test].tolist()) == {name}
        assert name not in set(groups[train].tolist())
        assert train.size + test.size == len(y)
    result = run_probes(X, y, ["x", "y"], [KNNProbe(1)], folds)
    assert (result.fold == np.array([{"a": 0, "b": 1, "c": 2}[g] for g in groups])).all()


def test_holdout_tests_only_that_group():
    _, _, groups = _three_groups()
    folds, names = group_splits(groups, "holdout", "b")
    assert names == ["b"] and len(folds) == 1
    train, test = folds[0]
    assert set(groups[test].tolist()) == {"b"} and set(groups[train].tolist()) == {"a", "c"}
    assert parse_split("holdout=b") == ("holdout", "b")


def test_groups_hook_passes_exactly_the_training_rows_groups():
    X, y, groups = _three_groups()
    folds, _ = group_splits(groups, "leave-one-group-out")
    probe, plain = RecordingProbe(), ConstantProbe("x")
    run_probes(X, y, ["x", "y"], [probe, plain], folds, groups=groups)
    assert probe.seen == [groups[train].tolist() for train, _ in folds]
    assert probe.seen[0] == ["b", "c"] * 6
    probe.seen.clear()
    run_probes(X, y, ["x", "y"], [probe], folds)  # no groups given: the probe gets None
    assert probe.seen == [None, None, None]


def _plan(groups, kind="leave-one-group-out", holdout=None, folds=2):
    return DomainPlan("dataset", kind, holdout, np.asarray(groups), folds=folds, seed=0)


def test_gap_is_in_domain_minus_out_of_domain_by_hand():
    # training group t: 4 x "a", 4 x "b"; held-out group h: 3 x "a", 1 x "b"; a probe always saying "a".
    y = np.array(["a", "b"] * 4 + ["a", "a", "a", "b"])
    groups = np.array(["t"] * 8 + ["h"] * 4)
    X = np.zeros((12, 1))
    plan = _plan(groups, "holdout", "h")
    folds, test_rows, fold_of, info = plan.split(np.arange(12))
    assert test_rows.tolist() == [8, 9, 10, 11] and info["groups"] == ["h"]
    probe = ConstantProbe("a")
    result = run_probes(X, y, ["a", "b"], [probe], folds)
    doc = plan.report(X, y, groups, folds, ["a", "b"], [probe], result.per_fold)
    r = doc["held_out"]["h"]["probes"]["const"]
    # out of domain: accuracy 3/4; recall a = 1, b = 0 -> balanced 1/2; F1 a = 2*.75/1.75 = 6/7, b = 0
    assert r["out_of_domain"]["micro_f1"] == pytest.approx(0.75)
    assert r["out_of_domain"]["balanced_accuracy"] == pytest.approx(0.5)
    assert r["out_of_domain"]["macro_f1"] == pytest.approx(3 / 7)
    # in domain (2 stratified folds of t, 2 a + 2 b each): accuracy 1/2, balanced 1/2, F1 a = 2/3, b = 0
    assert r["in_domain"]["micro_f1"] == pytest.approx(0.5)
    assert r["in_domain"]["macro_f1"] == pytest.approx(1 / 3)
    assert r["gap"] == pytest.approx({"balanced_accuracy": 0.0, "macro_f1": 1 / 3 - 3 / 7, "micro_f1": -0.25})
    # per class on the held-out rows: a: 3 right of 4 predicted, all 3 found -> P 3/4, R 1, F1 6/7;
    # b: never predicted -> P 0 (zero_division), R 0, F1 0, support 1
    assert r["per_class"] == {
        "a": {"precision": pytest.approx(0.75), "recall": 1.0, "f1": pytest.approx(6 / 7), "support": 3},
        "b": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    }


def test_held_out_per_class_lists_the_groups_classes_and_those_predicted_there():
    # held-out h holds only "a" (2 rows); the probe predicts "c" for one of them (x = 19)
    y = np.array(["a", "b", "c", "a", "b", "c", "a", "a"])
    groups = np.array(["t"] * 6 + ["h"] * 2)
    X = np.array([0.0, 10.0, 20.0, 0.0, 10.0, 20.0, 1.0, 19.0])[:, None]
    plan = _plan(groups, "holdout", "h")
    folds, *_ = plan.split(np.arange(8))
    probe = ThresholdProbe()
    result = run_probes(X, y, ["a", "b", "c"], [probe], folds)
    doc = plan.report(X, y, groups, folds, ["a", "b", "c"], [probe], result.per_fold)
    pc = doc["held_out"]["h"]["probes"]["threshold"]["per_class"]
    # a: 1 predicted, right; 2 true -> P 1, R 1/2, F1 2/3. c: predicted once, absent -> P 0, support 0.
    # b: neither in h nor predicted there -> not listed.
    assert pc == {
        "a": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
        "c": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }


def test_class_absent_from_training_is_reported_and_counted_as_errors():
    # groups a, b hold classes x, y; group c also holds 3 rows of class z, which no other group has.
    y = np.array(["x", "y"] * 6 + ["x", "y", "z", "z", "z"])
    groups = np.array(["a"] * 6 + ["b"] * 6 + ["c"] * 5)
    X = np.array([{"x": 0.0, "y": 10.0, "z": 20.0}[v] for v in y])[:, None]
    plan = _plan(groups)
    folds, *_ = plan.split(np.arange(len(y)))
    probe = KNNProbe(1)
    classes = ["x", "y", "z"]
    result = run_probes(X, y, classes, [probe], folds)
    doc = plan.report(X, y, groups, folds, classes, [probe], result.per_fold)
    c = doc["held_out"]["c"]
    assert c["classes_absent_from_training"] == {"z": 3} and c["n_absent_from_training"] == 3
    assert c["class_counts"] == {"x": 1, "y": 1, "z": 3}
    # 1-NN gets x and y right and cannot predict z: accuracy 2/5, the z rows stay in as errors
    assert c["probes"]["knn_k1"]["out_of_domain"]["accuracy"] == pytest.approx(2 / 5)
    assert doc["held_out"]["a"]["classes_absent_from_training"] == {}


def test_shared_classes_map_to_the_precision_every_group_has():
    tree = Hierarchy.from_json(WBC)
    pbc = ["neutrophil_band", "neutrophil_segmented", "neutrophil", "eosinophil_typical", "lymphocyte_typical",
           "monocyte", "basophil", "erythroblast", "platelet", "granulocytic_immature", "myelocyte"]
    bccd = ["neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil"]
    mapping = shared_class_map(pbc + bccd, ["pbc"] * len(pbc) + ["bccd"] * len(bccd), tree)
    assert mapping == {
        "basophil": "basophil", "eosinophil": "eosinophil", "eosinophil_typical": "eosinophil",
        "erythroblast": None, "granulocytic_immature": None, "lymphocyte": "lymphocyte",
        "lymphocyte_typical": "lymphocyte", "monocyte": "monocyte", "myelocyte": None,
        "neutrophil": "neutrophil", "neutrophil_band": "neutrophil", "neutrophil_segmented": "neutrophil",
        "platelet": None,
    }
    flat = shared_class_map(["a", "b", "a", "c"], ["g", "g", "h", "h"])
    assert flat == {"a": "a", "b": None, "c": None}


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """66 synthetic images (6 per class), rows cycling over groups g0, g1, g2; a ``site``
    column with one value."""
    root = tmp_path_factory.mktemp("domains")
    src = write_synthetic_dataset(root / "cells", 66, Hierarchy.from_json(SYNTHETIC), image_size=32, seed=1)
    rows = list(csv.DictReader(open(src, newline="")))
    path = root / "groups.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "dataset", "site"])
        for i, r in enumerate(rows):
            writer.writerow([str(root / "cells" / r["path"]), r["label"], f"g{i % 3}", "one"])
    return path


def _run(manifest, out, *extra, report=False):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = run_main(["--ckpt", "baseline:colour", "--crop-size", "32", "--data", str(manifest), "--output-dir",
                       str(out), "--num-workers", "0", "--no-progress", "--no-cache", "--folds", "2",
                       "--hierarchy", SYNTHETIC, "--k", "1", *extra, *([] if report else ["--no-report"])])
    return rc, err.getvalue()


def _rows(directory):
    with open(directory / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cli_leave_one_group_out_and_compare(manifest, tmp_path):
    rc, _ = _run(manifest, tmp_path / "logo", "--split", "leave-one-group-out", report=True)
    assert rc == 0
    html = (tmp_path / "logo" / "report.html").read_text()
    assert "Held-out domains" in html and "held-out groups g0, g1, g2" in html
    m = json.loads((tmp_path / "logo" / "metrics.json").read_text())
    assert m["split"]["kind"] == "leave_one_group_out" and m["split"]["groups"] == ["g0", "g1", "g2"]
    rows = _rows(tmp_path / "logo")
    assert sorted(int(r["sample"]) for r in rows) == list(range(66))  # one row per image, each tested once
    assert all(int(r["fold"]) == int(r["sample"]) % 3 for r in rows)  # row i is in group g(i % 3)
    held = m["domains"]["held_out"]
    assert list(held) == ["g0", "g1", "g2"]
    for i, (name, entry) in enumerate(held.items()):
        assert entry["n_test"] == 22 and entry["n_train"] == 44 and name not in entry["train_groups"]
        for probe in ("knn_k1", "logreg"):
            r = entry["probes"][probe]
            assert r["out_of_domain"]["macro_f1"] == pytest.approx(m["probes"][probe]["macro_f1"]["folds"][i])
            assert r["out_of_domain"]["micro_f1"] == r["out_of_domain"]["accuracy"]
            for h in ("balanced_accuracy", "macro_f1", "micro_f1"):
                assert r["gap"][h] == pytest.approx(r["in_domain"][h] - r["out_of_domain"][h])
    # eval.compare pairs the same samples: leave-one-group-out against plain k-fold
    rc, _ = _run(manifest, tmp_path / "kfold")
    assert rc == 0
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert compare_main([str(tmp_path / "kfold"), str(tmp_path / "logo"), "--n-resamples", "50",
                             "--output-dir", str(tmp_path / "cmp")]) == 0
    assert "knn_k1" in out.getvalue()
    with open(tmp_path / "cmp" / "comparison.csv", newline="") as f:
        assert {r["classifier"] for r in csv.DictReader(f)} == {"knn_k1", "logreg"}


def test_group_kfold_keeps_every_group_on_one_side_of_each_fold():
    """12 groups of 5 rows, two classes, 3 folds: each row tested once, each group's rows in one
    test fold and in the training rows of the other two folds only."""
    groups = np.repeat([f"p{i}" for i in range(12)], 5)
    labels = np.array(["x", "y", "x", "y", "x"] * 12)
    folds = group_kfold(labels, groups, 3, seed=0)
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(60))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(labels[test]) == {"x", "y"}
    assert group_kfold(labels, groups, 3, seed=0)[0][1].tolist() == folds[0][1].tolist()  # seeded


def test_cli_group_kfold(manifest, tmp_path):
    rc, _ = _run(manifest, tmp_path / "gk", "--split", "group-kfold")
    assert rc == 0
    rows = _rows(tmp_path / "gk")
    assert sorted(int(r["sample"]) for r in rows) == list(range(66))
    fold_of_group = {}
    for r in rows:  # row i is in group g(i % 3): a group's rows share their test fold
        assert fold_of_group.setdefault(int(r["sample"]) % 3, r["fold"]) == r["fold"]
    m = json.loads((tmp_path / "gk" / "metrics.json").read_text())
    assert m["split"]["kind"] == "group_kfold" and m["split"]["groups"] == ["g0", "g1", "g2"]
    assert sorted(g for fold in m["domains"]["test_groups"] for g in fold) == ["g0", "g1", "g2"]
    rc, err = _run(manifest, tmp_path / "gk5", "--split", "group-kfold", "--folds", "5")
    assert rc == 2 and "3 groups cannot fill 5 folds" in err


def test_cli_kfold_flags_change_nothing(manifest, tmp_path):
    assert _run(manifest, tmp_path / "plain")[0] == 0
    assert _run(manifest, tmp_path / "explicit", "--split", "kfold", "--group-column", "site")[0] == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "explicit"))
    assert a["probes"] == b["probes"] and a["split"] == b["split"] and "domains" not in b
    assert (tmp_path / "plain" / "predictions.csv").read_bytes() == (tmp_path / "explicit" / "predictions.csv").read_bytes()


def test_cli_holdout_tests_only_that_group(manifest, tmp_path):
    rc, _ = _run(manifest, tmp_path / "h", "--split", "holdout=g1")
    assert rc == 0
    rows = _rows(tmp_path / "h")
    assert sorted(int(r["sample"]) for r in rows) == list(range(1, 66, 3))
    m = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert list(m["domains"]["held_out"]) == ["g1"] and m["n_samples"] == 22


@pytest.mark.parametrize("extra, needle", [
    (("--split", "holdout=nope"), "holdout=nope"),
    (("--split", "sideways"), "sideways"),
    (("--split", "leave-one-group-out", "--group-column", "hospital"), "hospital"),
    (("--split", "leave-one-group-out", "--group-column", "site"), "single group 'one'"),
])
def test_cli_bad_domain_flags_exit_2_with_one_line(manifest, tmp_path, extra, needle):
    rc, err = _run(manifest, tmp_path / "bad", *extra)
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]


@pytest.mark.slow
def test_real_pbc_and_bccd_leave_one_domain_out(tmp_path):
    root = real_data_dir()
    if root is None:
        pytest.skip("set DINOV2_HIER_TEST_DATA to a folder with bccd/ and pbc_dev/")
    path = tmp_path / "combined.csv"
    per_code: dict[str, int] = {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "dataset"])
        for r in csv.DictReader(open(root / "pbc_dev" / "labels.csv", newline="")):
            per_code[r["code"]] = per_code.get(r["code"], 0) + 1
            if per_code[r["code"]] <= 6:  # a few per code keeps the test fast
                writer.writerow([str(root / "pbc_dev" / r["path"]), r["code"], "pbc"])
        for i, r in enumerate(csv.DictReader(open(root / "bccd" / "labels.csv", newline=""))):
            if r["label"] == "basophil" or i % 6 == 0:
                writer.writerow([str(root / "bccd" / r["path"]), r["label"], "bccd"])
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = run_main(["--ckpt", "baseline:colour", "--data", str(path), "--hierarchy", WBC, "--split",
                       "leave-one-group-out", "--classes", "shared", "--output-dir", str(tmp_path / "out"),
                       "--num-workers", "0", "--no-progress", "--no-cache", "--no-report", "--folds", "2"])
    assert rc == 0, err.getvalue()[-2000:]
    d = json.loads((tmp_path / "out" / "metrics.json").read_text())["domains"]
    assert set(d["held_out"]) == {"bccd", "pbc"}
    assert sorted(d["class_filter"]["classes"]) == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert {"erythroblast", "platelet", "granulocytic_immature"} <= set(d["class_filter"]["dropped_by_class"])
    assert d["class_filter"]["dropped_by_group"] == {"pbc": d["class_filter"]["n_dropped"]}
    for entry in d["held_out"].values():
        r = entry["probes"]["logreg"]
        assert 0.0 <= r["out_of_domain"]["macro_f1"] <= 1.0 and 0.0 <= r["out_of_domain"]["micro_f1"] <= 1.0


def test_combine_manifests_writes_a_dataset_column(tmp_path):
    from eval.combine_manifests import main as combine_main

    (tmp_path / "a.csv").write_text("path,code\nx.png,BNE\ny.png,EO\n")
    (tmp_path / "b.csv").write_text("path,label\nz.png,neutrophil\n")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = combine_main(["--input", f"pbc={tmp_path / 'a.csv'}:code", "--input", f"bccd={tmp_path / 'b.csv'}",
                           "--output", str(tmp_path / "all.csv")])
    assert rc == 0 and "2 pbc, 1 bccd" in out.getvalue()
    rows = list(csv.DictReader(open(tmp_path / "all.csv", newline="")))
    assert [(r["label"], r["dataset"]) for r in rows] == [("BNE", "pbc"), ("EO", "pbc"), ("neutrophil", "bccd")]
    assert rows[0]["path"] == str(tmp_path / "x.png")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert combine_main(["--input", "pbc", "--output", str(tmp_path / "o.csv")]) == 2
    assert "--input 'pbc'" in err.getvalue()
