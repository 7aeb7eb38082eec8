"""``python -m eval.multilabel`` end to end on a tiny checkpoint and synthetic multi-label cells,
plus its data loading, folds, metrics and pooled features."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch

from dinov2_hier.config import load_config
from dinov2_hier.constraints import ConstraintMatrix, load_constraints
from dinov2_hier.data import write_synthetic_dataset
from dinov2_hier.heads.constrained import impossible_mask, load_head, predict
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.loop import Trainer
from eval.multilabel import (
    MultiLabelDataError,
    extract_pooled_features,
    load_multilabel_data,
    main,
    multilabel_folds,
    multilabel_metrics,
)
from tests.conftest import TINY_OVERRIDES

CLASSES = ["blast", "granulocytic", "lymphoid", "mono"]
#: synthetic leaf -> multi-label set (eosinophil and erythroblast: no class positive)
LEAF_LABELS = {
    "myeloblast": "blast", "lymphoblast": "blast|lymphoid", "promyelocyte": "granulocytic", "myelocyte": "granulocytic",
    "band_neutrophil": "granulocytic", "segmented_neutrophil": "granulocytic", "small_lymphocyte": "lymphoid",
    "large_lymphocyte": "lymphoid", "monocyte": "mono", "eosinophil": "", "erythroblast": "",
}
EXCLUSIVE = [("granulocytic", "lymphoid"), ("granulocytic", "mono"), ("lymphoid", "mono")]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    overrides = TINY_OVERRIDES + ["train.iterations=2", "train.checkpoint_every=2", "data.synthetic.num_images=32"]
    Trainer(load_config(None, overrides), root / "train").run()
    tree = Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "synthetic.json")
    manifest = write_synthetic_dataset(root / "cells", 44, tree, image_size=40, seed=1)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    data = root / "cells" / "multilabel.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for r in rows:
            w.writerow([r["path"], LEAF_LABELS[r["true_label"]]])
    constraints = ConstraintMatrix.from_rules("toy", CLASSES, exclusive=EXCLUSIVE, cooccur={("blast", "lymphoid"): 0.5},
                                              display_names=["Blast", "Granulocytic", "Lymphoid", "Mono"])
    cfile = constraints.save(root / "toy.json")
    labels = [LEAF_LABELS[r["true_label"]] for r in rows]
    return {"root": root, "ckpt": root / "train" / "teacher_backbone.pt", "data": data, "constraints": cfile,
            "labels": labels, "cache": root / "cache"}


def _run(setup, out, *extra):
    argv = ["--ckpt", str(setup["ckpt"]), "--data", str(setup["data"]), "--constraints", str(setup["constraints"]),
            "--output-dir", str(out), "--num-workers", "0", "--no-progress", "--cache-dir", str(setup["cache"]), *extra]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    return rc, stdout.getvalue(), stderr.getvalue()


def test_cli_end_to_end(setup):
    out = setup["root"] / "out"
    rc, printed, err = _run(setup, out, "--folds", "3", "--variants", "soft_uncertainty", "off_static",
                            "--epochs", "4", "--mc-samples", "10", "--lr-classifier", "1e-2", "--lr-constraint", "1e-2",
                            "--lr-uncertainty", "1e-2", "--save-model")
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    n = 44
    assert m["classes"] == CLASSES and m["n_samples"] == n and m["n_unreadable"] == 0
    truth = np.array([[c in lab.split("|") for c in CLASSES] for lab in setup["labels"]])
    assert m["class_counts"] == {c: int(k) for c, k in zip(CLASSES, truth.sum(0))} == {
        "blast": 8, "granulocytic": 16, "lymphoid": 12, "mono": 4}
    assert m["split"]["kind"] == "cross_validation" and m["split"]["folds"] == 3
    assert m["checkpoint"]["arch"] == "vit_tiny" and m["settings"]["feature"] == "x_norm_patchtokens mean"
    assert m["settings"]["head"]["lambda_con"] == 0.1 and m["settings"]["head"]["epochs"] == 4
    assert list(m["probes"]) == ["soft_uncertainty", "off_static"]
    for v in m["probes"]:
        for key in ("weighted_f1", "balanced_accuracy", "auc_roc", "sensitivity", "specificity",
                    "impossible_rate_before", "impossible_rate"):
            assert len(m["probes"][v][key]["folds"]) == 3, (v, key)
        assert set(m["per_class"][v]) == set(CLASSES)
        assert {c: m["per_class"][v][c]["support"] for c in CLASSES} == m["class_counts"]
    assert m["constraints"]["exclusive_pairs"] == [list(p) for p in EXCLUSIVE] and m["constraints"]["asymmetries"] == []
    assert m["constraints"]["labels_with_exclusive_pair"] == 0

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["sample"]) for r in rows] == list(range(n)) and {r["fold"] for r in rows} == {"0", "1", "2"}
    assert [r["y_true"] for r in rows] == setup["labels"]
    ex = load_constraints(setup["constraints"]).exclusive_mask()

    def onehot(col):
        return np.array([[c in r[col].split("|") for c in CLASSES] for r in rows])

    for v in ("soft_uncertainty", "off_static"):
        raw, final = onehot(f"{v}_raw"), onehot(v)
        imp = m["impossible"][v]
        assert imp["n"] == n and imp["n_before_decoding"] == int(impossible_mask(raw, ex).sum())
        assert imp["n_after_decoding"] == int(impossible_mask(final, ex).sum())
        # per-fold weighted F1 recomputed independently from predictions.csv
        from sklearn.metrics import f1_score

        for fold in range(3):
            sel = np.array([r["fold"] == str(fold) for r in rows])
            want = f1_score(truth[sel], final[sel], average="weighted", zero_division=0)
            assert m["probes"][v]["weighted_f1"]["folds"][fold] == pytest.approx(want)
    assert m["impossible"]["soft_uncertainty"]["n_after_decoding"] == 0
    assert m["impossible"]["off_static"]["n_after_decoding"] == m["impossible"]["off_static"]["n_before_decoding"]
    assert m["probes"]["soft_uncertainty"]["impossible_rate"]["mean"] == 0.0

    th = m["thresholds"]
    assert th["off_static"]["per_class"]["mono"] == {"mean": 0.5, "std": 0.0}
    assert th["soft_uncertainty"]["mode"] == "uncertainty" and len(th["soft_uncertainty"]["alpha"]["blast"]) == 3
    assert th["soft_uncertainty"]["class_frequency"]["granulocytic"][0] == pytest.approx(16 / 44, abs=0.05)
    rel = m["relation_matrix"]
    assert list(rel) == ["soft_uncertainty"] and np.array(rel["soft_uncertainty"]["mean_R"]).shape == (4, 4)
    gram = np.array(rel["soft_uncertainty"]["mean_RRt"])
    assert np.allclose(gram, gram.T) and (np.diag(gram) >= 0).all()
    unc = m["uncertainty"]["soft_uncertainty"]
    assert unc["correct"]["n"] + unc["incorrect"]["n"] == n * 4
    assert [f["n_test"] for f in m["fit_info"]["soft_uncertainty"]] == [15, 15, 14]

    html = (out / "report.html").read_text()
    for text in ("prior C", "soft_uncertainty: mean R", "MC-dropout variance vs confidence", "Decision thresholds",
                 "Impossible combinations"):
        assert text in html
    assert "<script" not in html and "http" not in html.replace("http://www.w3.org", "")
    assert "weighted_f1" in printed and "soft_uncertainty" in printed

    head, payload = load_head(out / "head.pt")
    assert payload["classes"] == CLASSES and payload["extra"]["variant"] == "soft_uncertainty"
    assert payload["extra"]["n_train"] == n and payload["config"]["epochs"] == 4
    pr = predict(head, torch.randn(5, 192))
    assert pr.probabilities.shape == (5, 4) and not impossible_mask(pr.decoded, ex).any()

    # a second run reads the cached features and, with the same seed, gives the same numbers
    rc, _, err = _run(setup, setup["root"] / "out2", "--folds", "3", "--variants", "off_static", "--epochs", "4",
                      "--mc-samples", "10", "--lr-classifier", "1e-2", "--lr-constraint", "1e-2", "--no-report")
    assert rc == 0, err
    m2 = json.loads((setup["root"] / "out2" / "metrics.json").read_text())
    assert m2["settings"]["features_from_cache"] is True and not (setup["root"] / "out2" / "report.html").exists()
    assert m2["probes"]["off_static"]["weighted_f1"] == m["probes"]["off_static"]["weighted_f1"]


def test_cli_user_errors_exit_2(setup, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimages/000000.png,blast|lymphoyd\n")
    rc, _, err = _run(setup, tmp_path / "o1", "--data", str(bad))
    assert rc == 2 and "label 'lymphoyd'" in err and "did you mean 'lymphoid'" in err
    rc, _, err = _run(setup, tmp_path / "o2", "--variants", "soft_adaptive")
    assert rc == 2 and "variant 'soft_adaptive'" in err
    cfile = tmp_path / "c.json"
    cfile.write_text(json.dumps({"name": "x", "classes": ["a", "b"], "matrix": [[0, 2], [0, 0]]}))
    rc, _, err = _run(setup, tmp_path / "o3", "--constraints", str(cfile))
    assert rc == 2 and "column 1 (class 'b'): 2 is not a number in [-1, 1]" in err
    rc, _, err = _run(setup, tmp_path / "o4", "--folds", "50")
    assert rc == 2 and "cannot be split into 50" in err
    rc, _, err = _run(setup, tmp_path / "o5", "--dropout", "1.5")
    assert rc == 2 and "dropout must be in [0, 1)" in err


def test_load_multilabel_data(tmp_path):
    c = ConstraintMatrix.from_rules("t", ["normal", "x", "y"], exclusive=[("normal", "x")], display_names=["Normal", "X", "Y"])
    path = tmp_path / "m.csv"
    path.write_text("path,label\na.png,x|Y\nb.png,\nc.png, Normal | normal \n")
    data = load_multilabel_data(path, c)
    assert data.targets.tolist() == [[False, True, True], [False, False, False], [True, False, False]]
    assert data.label_strings() == ["x|y", "", "normal"]
    assert load_multilabel_data(path, c, empty_label="Normal").targets[1].tolist() == [True, False, False]
    with pytest.raises(MultiLabelDataError, match="no column 'code'"):
        load_multilabel_data(path, c, label_column="code")
    with pytest.raises(MultiLabelDataError, match="--empty-label 'nrmal'.*did you mean 'normal'"):
        load_multilabel_data(path, c, empty_label="nrmal")
    with pytest.raises(MultiLabelDataError, match="must be a manifest CSV"):
        load_multilabel_data(tmp_path, c)


def test_multilabel_folds_stratify_label_sets():
    rng = np.random.default_rng(0)
    targets = np.zeros((66, 3), dtype=bool)
    targets[:30, 0] = True          # set {0}: 30 rows
    targets[30:51, [1, 2]] = True   # set {1, 2}: 21 rows
    targets[51:53, 2] = True        # set {2}: 2 rows, rare
    targets[53:55, 1] = True        # set {1}: 2 rows, rare -> pooled with {2} into a group of 4
    # rows 55..65: the empty set (11 rows)
    shuffled = targets[rng.permutation(66)]
    folds = multilabel_folds(shuffled, 3, seed=4)
    tested = np.sort(np.concatenate([te for _, te in folds]))
    assert tested.tolist() == list(range(66))
    for label_set, total in (((0,), 30), ((1, 2), 21)):
        rows = np.flatnonzero((shuffled[:, list(label_set)].all(1)) & (shuffled.sum(1) == len(label_set)))
        assert len(rows) == total
        per_fold = [np.isin(te, rows).sum() for _, te in folds]
        assert per_fold == [total // 3] * 3
    again = multilabel_folds(shuffled, 3, seed=4)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    # a lone rare set smaller than the folds joins the most frequent set
    tiny = np.zeros((7, 2), dtype=bool)
    tiny[:6, 0] = True
    assert len(multilabel_folds(tiny, 3)) == 3


def test_multilabel_metrics_by_hand():
    classes = ["a", "b", "c"]
    t = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    p = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    raw = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    s = np.array([[0.9, 0.2, 0.1], [0.8, 0.4, 0.2], [0.6, 0.7, 0.3], [0.1, 0.3, 0.6]])
    ex = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    m = multilabel_metrics(t, p, s, classes, ex, y_raw=raw)
    a, b, c = m["per_class"]["a"], m["per_class"]["b"], m["per_class"]["c"]
    # a: tp 2, fp 1, fn 0, tn 1; b: tp 1, fp 0, fn 1, tn 2; c: no positives, one false positive
    assert a["f1"] == pytest.approx(4 / 5) and a["sensitivity"] == 1.0 and a["specificity"] == 0.5
    assert a["balanced_accuracy"] == 0.75 and a["auc_roc"] == 1.0 and a["support"] == 2
    assert b["f1"] == pytest.approx(2 / 3) and b["sensitivity"] == 0.5 and b["specificity"] == 1.0
    assert b["auc_roc"] == 1.0 and b["precision"] == 1.0
    assert c["f1"] is None and c["sensitivity"] is None and c["specificity"] == 0.75 and c["auc_roc"] is None
    assert m["weighted_f1"] == pytest.approx((2 * 0.8 + 2 * 2 / 3) / 4)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.75) / 2)
    assert m["sensitivity"] == 0.75 and m["specificity"] == pytest.approx((0.5 + 1.0 + 0.75) / 3)
    assert m["subset_accuracy"] == 0.25 and m["hamming_accuracy"] == pytest.approx(9 / 12)
    assert m["impossible_rate_before"] == 0.5 and m["impossible_rate"] == 0.25
    from sklearn.metrics import f1_score

    assert m["weighted_f1"] == pytest.approx(f1_score(t, p, average="weighted", zero_division=0))


def test_pooled_features_are_the_patch_token_mean(setup):
    from eval.features import load_eval_backbone
    from dinov2_hier.data import EvalTransform, load_image

    backbone = load_eval_backbone(setup["ckpt"])
    paths = [str(setup["data"].parent / "images" / f"{i:06d}.png") for i in range(2)]
    fs = extract_pooled_features(backbone, paths, "mean_patch", num_workers=0, progress=False,
                                 cache_dir=setup["root"] / "cache_pool")
    cls = extract_pooled_features(backbone, paths, "cls", num_workers=0, progress=False,
                                  cache_dir=setup["root"] / "cache_pool")
    meta = backbone.meta
    transform = EvalTransform(meta["img_size"], "pad", meta["mean"], meta["std"])
    x = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        out = backbone.model(x)
    assert np.allclose(fs.features, out["x_norm_patchtokens"].mean(1).numpy(), atol=1e-5)
    assert np.allclose(cls.features, out["x_norm_clstoken"].numpy(), atol=1e-5)
    assert fs.cache_path != cls.cache_path and fs.features.shape == (2, 192)
