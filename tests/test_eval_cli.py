"""The evaluation faces end to end, in-process: eval.run / eval.linear / eval.knn / eval.compare.

A tiny ViT trained for a few iterations on synthetic cells gives the checkpoints; a synthetic
labelled dataset (hierarchies/synthetic.json) the data. With $DINOV2_HIER_TEST_DATA (bccd/
and pbc_dev/) also real images.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from dinov2_hier.config import load_config
from dinov2_hier.data import write_synthetic_dataset
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.checkpoint import TEACHER_FILE
from dinov2_hier.train.loop import Trainer
from eval.compare import main as compare_main
from eval.knn import main as knn_main
from eval.linear import main as linear_main
from eval.run import main as run_main
from tests.conftest import TINY_OVERRIDES, real_data_dir

SYNTHETIC = str(PROJECT_ROOT / "hierarchies" / "synthetic.json")
FLAT = ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "macro_precision")
HIER = ("hierarchical_precision", "hierarchical_recall", "hierarchical_f1", "lineage_accuracy", "mistake_severity")
N_PER_CLASS = 4  # 11 synthetic classes -> 44 images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A training run with checkpoints at iterations 2 and 4, a labelled set and a test set."""
    root = tmp_path_factory.mktemp("eval")
    overrides = TINY_OVERRIDES + ["train.iterations=4", "train.checkpoint_every=2", "data.synthetic.num_images=64"]
    Trainer(load_config(None, overrides), root / "train").run()
    tree = Hierarchy.from_json(SYNTHETIC)
    n = N_PER_CLASS * tree.num_leaves
    data = write_synthetic_dataset(root / "cells", n, tree, image_size=40, seed=1)
    test = write_synthetic_dataset(root / "cells_test", tree.num_leaves * 2, tree, image_size=40, seed=2)
    return {"root": root, "train": root / "train", "data": data, "test": test, "n": n, "tree": tree,
            "cache": root / "cache"}


def _common(setup, out, *extra):
    return ["--data", str(setup["data"]), "--output-dir", str(out), "--num-workers", "0", "--no-progress",
            "--cache-dir", str(setup["cache"]), *extra]


def _metrics(directory):
    return json.loads((directory / "metrics.json").read_text())


def _rows(directory):
    with open(directory / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_probe(summary, n_folds, hierarchical=True):
    names = FLAT + (HIER if hierarchical else ())
    assert list(summary) == list(names)
    for name, entry in summary.items():
        assert len(entry["folds"]) == n_folds, name
        if name == "mistake_severity":
            assert all(v is None or v >= 0 for v in entry["folds"])
            continue
        assert all(0.0 <= v <= 1.0 for v in entry["folds"]), name
        assert 0.0 <= entry["mean"] <= 1.0 and entry["std"] >= 0.0
        assert entry["mean"] == pytest.approx(sum(entry["folds"]) / n_folds)


@pytest.fixture(scope="module")
def run_dir(setup):
    """``eval.run`` over the whole training directory (both checkpoints); returns (dir, stdout)."""
    out = setup["root"] / "run_dir"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = run_main(["--ckpt", str(setup["train"]), *_common(setup, out, "--hierarchy", SYNTHETIC, "--folds", "3",
                                                              "--k", "1", "5", "--C", "1.0")])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue()


def test_run_over_a_training_directory(setup, run_dir):
    out, printed = run_dir
    summary = json.loads((out / "summary.json").read_text())
    names = [c["name"] for c in summary["checkpoints"]]
    assert names == ["iter_00000002", "iter_00000004"]  # iteration order
    assert [c["iteration"] for c in summary["checkpoints"]] == [2, 4]
    assert summary["best"] in names and summary["criterion"]["probe"] == "logreg"
    best = max(summary["checkpoints"], key=lambda c: c["score"])
    assert summary["best_score"] == best["score"]
    assert "best checkpoint by logreg balanced_accuracy" in printed

    for name in names:
        m = _metrics(out / name)
        assert m["checkpoint"]["name"] == name and m["checkpoint"]["arch"] == "vit_tiny"
        assert m["checkpoint"]["iteration"] == int(name.split("_")[1])
        assert list(m["probes"]) == ["knn_k1", "knn_k5", "logreg"]
        for probe in m["probes"].values():
            _check_probe(probe, 3)
        assert m["n_samples"] == setup["n"] and m["n_unreadable"] == 0
        assert m["classes"] == setup["tree"].leaves and set(m["class_counts"].values()) == {N_PER_CLASS}
        assert m["hierarchy"]["name"] == "synthetic"
        assert m["split"] == {"kind": "cross_validation", "folds": 3, "seed": 0}
        assert m["settings"]["crop_size"] == 32 and m["settings"]["logreg"]["C"] == 1.0
        assert [f["chosen_C"] for f in m["fit_info"]["logreg"]] == [1.0, 1.0, 1.0]
        # CPU run: the auto backend is scikit-learn; convergence is recorded per fold.
        assert {(f["backend"], type(f["converged"])) for f in m["fit_info"]["logreg"]} == {("sklearn", bool)}
        cm = m["confusion_matrix"]["logreg"]
        assert sum(map(sum, cm)) == setup["n"] and [sum(r) for r in cm] == [N_PER_CLASS] * 11
        rows = _rows(out / name)
        assert list(rows[0]) == ["sample", "path", "fold", "y_true", "knn_k1", "knn_k5", "logreg"]
        assert [int(r["sample"]) for r in rows] == list(range(setup["n"]))  # each sample exactly once
        assert {r["fold"] for r in rows} == {"0", "1", "2"}
        assert all(r["logreg"] in m["classes"] for r in rows)
        # accuracy from predictions.csv matches the fold-weighted metrics (equal-size folds here)
        correct = sum(r["logreg"] == r["y_true"] for r in rows) / len(rows)
        folds = m["probes"]["logreg"]["accuracy"]["folds"]
        sizes = [sum(r["fold"] == str(i) for r in rows) for i in range(3)]
        assert correct == pytest.approx(sum(a * s for a, s in zip(folds, sizes)) / len(rows))
        html = (out / name / "report.html").read_text()
        assert html.count('<svg class="confusion"') == 3 and "http://" not in html
        # the training run's collapse verdict, replayed up to this checkpoint
        training = m["training"]
        assert training["run_dir"] == str(setup["train"]) and training["iteration"] == m["checkpoint"]["iteration"]
        assert training["collapsed"] is False and training["detected_at_iteration"] is None
        assert f"not collapsed up to iteration {training['iteration']}" in html


def test_linear_on_teacher_file_uses_the_feature_cache(setup, capsys):
    ckpt = str(setup["train"] / TEACHER_FILE)
    out = setup["root"] / "linear"
    args = ["--ckpt", ckpt, *_common(setup, out, "--hierarchy", SYNTHETIC, "--folds", "2", "--C-grid", "0.1", "1",
                                     "--no-report")]
    assert linear_main(args) == 0, capsys.readouterr().err
    first = _metrics(out)
    assert list(first["probes"]) == ["logreg"] and not (out / "report.html").exists()
    assert first["settings"]["logreg"]["C_grid"] == [0.1, 1.0]
    assert all(f["chosen_C"] in (0.1, 1.0) for f in first["fit_info"]["logreg"])
    _check_probe(first["probes"]["logreg"], 2)
    assert first["settings"]["features_from_cache"] is False
    assert linear_main(args) == 0
    second = _metrics(out)
    assert second["settings"]["features_from_cache"] is True
    assert second["probes"] == first["probes"]  # same features, folds and seed -> same numbers


def test_knn_fixed_split_without_hierarchy(setup, capsys):
    out = setup["root"] / "knn_fixed"
    rc = knn_main(["--ckpt", str(setup["train"] / TEACHER_FILE), *_common(setup, out, "--test-data",
                                                                          str(setup["test"]), "--k", "3",
                                                                          "--metric", "euclidean")])
    assert rc == 0, capsys.readouterr().err
    m = _metrics(out)
    assert list(m["probes"]) == ["knn_k3"] and m["hierarchy"] is None
    _check_probe(m["probes"]["knn_k3"], 1, hierarchical=False)
    assert m["probes"]["knn_k3"]["accuracy"]["std"] == 0.0
    assert m["split"] == {"kind": "fixed", "n_train": setup["n"], "n_test": 22}
    assert m["settings"]["knn"] == {"k": [3], "metric": "euclidean"}
    rows = _rows(out)
    assert len(rows) == 22 and {r["fold"] for r in rows} == {"-1"}
    assert all("cells_test" in r["path"] for r in rows)


def test_untrained_baseline_and_unreadable_images(setup, tmp_path, capsys):
    folder = setup["data"].parent
    (folder / "broken.png").write_bytes(b"not a png")
    manifest = folder / "with_broken.csv"
    manifest.write_text(setup["data"].read_text() + "broken.png,myeloblast,synthetic,myeloblast\n")
    out = tmp_path / "out"
    rc = run_main(["--ckpt", "none", "--arch", "vit_tiny", "--crop-size", "28", "--data", str(manifest),
                   "--hierarchy", SYNTHETIC, "--folds", "2", "--k", "1", "--C", "0.5", "--output-dir", str(out),
                   "--num-workers", "0", "--no-progress", "--no-cache"])
    assert rc == 0, capsys.readouterr().err
    m = _metrics(out)
    assert m["n_unreadable"] == 1 and m["unreadable"] == [str(folder / "broken.png")]
    assert m["n_samples"] == setup["n"] and m["n_images"] == setup["n"] + 1
    assert m["checkpoint"]["fingerprint"] == "untrained:vit_tiny:0" and m["settings"]["crop_size"] == 28
    assert len(_rows(out)) == setup["n"]  # the unreadable image is skipped, not predicted


def test_colour_baseline_evaluates_like_a_checkpoint(setup, tmp_path, capsys):
    """``--ckpt baseline:colour``: the same folds, probes and files as a checkpoint, a fixed
    fingerprint, no training run; an unknown baseline is a one-line error (exit 2)."""
    out = tmp_path / "colour"
    rc = run_main(["--ckpt", "baseline:colour", "--crop-size", "40", *_common(setup, out, "--hierarchy", SYNTHETIC,
                   "--folds", "2", "--k", "1", "--C", "1.0")])
    assert rc == 0, capsys.readouterr().err
    m = _metrics(out)
    assert m["checkpoint"]["arch"] == "baseline:colour" and m["checkpoint"]["fingerprint"] == "baseline:colour:v1"
    assert m["settings"]["crop_size"] == 40 and m["training"] is None and m["n_samples"] == setup["n"]
    # the synthetic classes differ in granule colour and nucleus shape: far above chance (1/11)
    assert m["probes"]["knn_k1"]["balanced_accuracy"]["mean"] > 0.3
    assert len(_rows(out)) == setup["n"]
    rc = run_main(["--ckpt", "baseline:texture", *_common(setup, tmp_path / "bad")])
    assert rc == 2 and "unknown baseline 'texture'" in _error(capsys)


def test_extra_probes_svm_and_weighted_knn(setup, tmp_path, capsys):
    """``--extra-probes svm wknn`` adds both probes on the same folds, with their settings and
    the chosen C / k in fit_info; without the flag neither appears (issue 22)."""
    out = tmp_path / "extra"
    rc = run_main(["--ckpt", "baseline:colour", "--crop-size", "40", *_common(
        setup, out, "--hierarchy", SYNTHETIC, "--folds", "2", "--k", "1", "--C", "1.0", "--no-report",
        "--extra-probes", "svm", "wknn", "--svm-C-grid", "0.1", "1", "--wknn-k-grid", "1", "3")])
    assert rc == 0, capsys.readouterr().err
    m = _metrics(out)
    assert list(m["probes"]) == ["knn_k1", "logreg", "svm", "wknn"]
    _check_probe(m["probes"]["svm"], 2)
    _check_probe(m["probes"]["wknn"], 2)
    assert m["settings"]["svm"] == {"C_grid": [0.1, 1.0]}
    assert m["settings"]["wknn"] == {"k_grid": [1, 3], "metric": "cosine", "weights": "distance"}
    # 2 samples per class in a training fold: too few for the inner 3-fold CV -> the fallbacks
    assert all(f["chosen_C"] == 1.0 for f in m["fit_info"]["svm"])
    assert all(f["chosen_k"] == 1 for f in m["fit_info"]["wknn"])
    rows = _rows(out)
    assert {"svm", "wknn"} <= set(rows[0])
    plain = tmp_path / "plain"
    assert run_main(["--ckpt", "baseline:colour", "--crop-size", "40", *_common(
        setup, plain, "--folds", "2", "--k", "1", "--C", "1.0", "--no-report")]) == 0
    assert not {"svm", "wknn"} & set(_metrics(plain)["settings"]) and list(_metrics(plain)["probes"]) == [
        "knn_k1", "logreg"]
    capsys.readouterr()
    rc = run_main(["--ckpt", "baseline:colour", *_common(setup, tmp_path / "bad", "--extra-probes", "svm",
                                                          "--svm-C-grid", "0")])
    assert rc == 2 and "--svm-C-grid" in _error(capsys)


def test_compare_against_itself_and_another_model(setup, run_dir, tmp_path, capsys):
    a = setup["root"] / "cmp_a"
    b = setup["root"] / "cmp_b"
    base = ["--hierarchy", SYNTHETIC, "--folds", "2", "--k", "1", "--C", "1.0", "--no-report"]
    assert run_main(["--ckpt", str(setup["train"] / TEACHER_FILE), *_common(setup, a, *base)]) == 0
    assert run_main(["--ckpt", "none", "--arch", "vit_tiny", "--crop-size", "28", *_common(setup, b, *base)]) == 0
    capsys.readouterr()

    out = tmp_path / "cmp"
    assert compare_main([str(a), str(a), "--n-resamples", "200", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "excludes 0" in printed and "B - A" in printed
    doc = json.loads((out / "comparison.json").read_text())
    rows = doc["rows"]
    assert {r["classifier"] for r in rows} == {"knn_k1", "logreg"}
    assert {r["metric"] for r in rows} == set(FLAT + HIER)  # hierarchy taken from metrics.json
    for r in rows:
        if r["metric"] == "mistake_severity" and r["difference"] is None:
            continue
        assert r["difference"] == 0.0 and r["ci_low"] <= 0.0 <= r["ci_high"] and not r["excludes_zero"]
    with open(out / "comparison.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)

    # each directory against the first; the run directory (summary.json) resolves to its best checkpoint
    best = json.loads((run_dir[0] / "summary.json").read_text())["best"]
    assert compare_main([str(a), str(b), str(run_dir[0]), "--n-resamples", "100", "--seed", "3",
                         "--output-dir", str(out)]) == 0, capsys.readouterr().err
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert {r["reference"] for r in rows} == {str(a)}
    assert {r["model"] for r in rows} == {str(b), str(run_dir[0] / best)}
    # classifiers present in both: knn_k1 and logreg (the run directory also has knn_k5)
    assert {r["classifier"] for r in rows} == {"knn_k1", "logreg"}
    for r in rows:
        assert r["difference"] is None or r["difference"] == pytest.approx(r["model_value"] - r["reference_value"])
        if r["ci_low"] is not None:
            assert r["ci_low"] <= r["ci_high"] and r["excludes_zero"] == (r["ci_low"] > 0 or r["ci_high"] < 0)


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_label_exits_2(setup, tmp_path, capsys):
    manifest = tmp_path / "alien.csv"
    rows = setup["data"].read_text().splitlines()
    folder = setup["data"].parent
    body = [f"{folder / r.split(',')[0]},{r.split(',')[1]}" for r in rows[1:]]
    body[3] = body[3].split(",")[0] + ",alien_cell"
    manifest.write_text("path,label\n" + "\n".join(body) + "\n")
    rc = run_main(["--ckpt", "none", "--arch", "vit_tiny", "--data", str(manifest), "--hierarchy", SYNTHETIC,
                   "--output-dir", str(tmp_path / "o"), "--no-progress", "--no-cache"])
    assert rc == 2 and "alien_cell" in _error(capsys)


def test_mismatched_arch_exits_2(setup, tmp_path, capsys):
    rc = linear_main(["--ckpt", str(setup["train"] / TEACHER_FILE), "--arch", "vit_small",
                      *_common(setup, tmp_path / "o", "--folds", "2")])
    line = _error(capsys)
    assert rc == 2 and "vit_small" in line and "vit_tiny" in line


def test_class_smaller_than_folds_exits_2(setup, tmp_path, capsys):
    rc = knn_main(["--ckpt", "none", "--arch", "vit_tiny", *_common(setup, tmp_path / "o", "--folds", "5")])
    line = _error(capsys)
    assert rc == 2 and "fewer than the 5" in line and f"has {N_PER_CLASS} samples" in line


def test_missing_paths_exit_2(setup, tmp_path, capsys):
    rc = run_main(["--ckpt", "none", "--arch", "vit_tiny", "--data", str(tmp_path / "no" / "such.csv"),
                   "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "no/such.csv" in _error(capsys)
    rc = run_main(["--ckpt", str(tmp_path / "missing.pt"), *_common(setup, tmp_path / "o")])
    assert rc == 2 and "missing.pt" in _error(capsys)
    rc = run_main(["--ckpt", "none", *_common(setup, tmp_path / "o")])  # no --arch
    assert rc == 2 and "--arch" in _error(capsys)
    assert compare_main([str(tmp_path / "nowhere"), str(tmp_path)]) == 2
    assert "nowhere" in _error(capsys)


# --------------------------------------------------------------------------- real images (optional)

REAL = real_data_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="DINOV2_HIER_TEST_DATA with bccd/ and pbc_dev/ not set")


@needs_real
def test_real_pbc_dev_with_the_trained_checkpoint(setup, tmp_path, capsys):
    out = tmp_path / "pbc"
    rc = run_main(["--ckpt", str(setup["train"] / TEACHER_FILE), "--data", str(REAL / "pbc_dev" / "labels.csv"),
                   "--label-column", "code", "--label-map", str(PROJECT_ROOT / "hierarchies/label_maps/pbc.json"),
                   "--hierarchy", str(PROJECT_ROOT / "hierarchies/wbc.json"), "--C", "0.01", "--num-workers", "2",
                   "--no-progress", "--no-cache", "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = _metrics(out)
    assert m["n_samples"] + m["n_unreadable"] == 1610
    # coarse PBC codes map to internal nodes of the WBC tree
    assert "granulocytic_immature" in m["classes"] and "neutrophil" in m["classes"] and len(m["classes"]) == 13
    for probe in ("knn_k1", "knn_k20", "logreg"):
        _check_probe(m["probes"][probe], 5)
    assert len(_rows(out)) == m["n_samples"]


@needs_real
def test_real_bccd_untrained_backbone(tmp_path, capsys):
    out = tmp_path / "bccd"
    rc = run_main(["--ckpt", "none", "--arch", "vit_tiny", "--crop-size", "56", "--data",
                   str(REAL / "bccd" / "labels.csv"), "--label-map", "bccd",
                   "--hierarchy", "hierarchies/wbc.json", "--folds", "3", "--C", "1.0", "--num-workers", "2",
                   "--no-progress", "--no-cache", "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = _metrics(out)
    assert m["n_samples"] + m["n_unreadable"] == 351
    assert set(m["classes"]) == {"neutrophil", "eosinophil", "basophil", "monocyte", "lymphocyte"}
    for probe in ("knn_k1", "knn_k20", "logreg"):
        _check_probe(m["probes"][probe], 3)
    assert sum(m["class_counts"].values()) == m["n_samples"]
