"""eval.bootstrap: paired stratified bootstrap, prediction-table comparison, predictions.csv."""
from __future__ import annotations

import csv
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.metrics import (
    FLAT_SCALAR_METRICS,
    SCALAR_METRICS,
    MetricInputError,
    accuracy,
    all_metrics,
)
from eval.bootstrap import (
    PredictionTableError,
    bootstrap_metric,
    compare_prediction_tables,
    paired_bootstrap,
    read_predictions_csv,
    stratified_resample_indices,
)

# Unbalanced tree: root -> M(G(N(band, seg), eos), mono), L(lymph), blast (a leaf at depth 1).
TREE = {
    "name": "unbalanced",
    "root": {"id": "root", "children": [
        {"id": "M", "children": [
            {"id": "G", "children": [{"id": "N", "children": [{"id": "band"}, {"id": "seg"}]}, {"id": "eos"}]},
            {"id": "mono"},
        ]},
        {"id": "L", "children": [{"id": "lymph"}]},
        {"id": "blast"},
    ]},
}
CLASSES = ["band", "seg", "lymph", "blast"]


@pytest.fixture(scope="module")
def tree() -> Hierarchy:
    return Hierarchy.from_dict(TREE)


def large_difference() -> tuple[list[str], list[str], list[str]]:
    """n = 200, 50 per class; A is perfect, B predicts the next class for every other sample."""
    y_true = [c for c in CLASSES for _ in range(50)]
    pred_a = list(y_true)
    pred_b = [CLASSES[(CLASSES.index(t) + 1) % 4] if i % 2 else t for i, t in enumerate(y_true)]
    return y_true, pred_a, pred_b


def random_predictions(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Labels with unequal class sizes; predictions include internal nodes and classes never true."""
    rng = np.random.default_rng(seed)
    true_pool = ["band", "seg", "eos", "lymph", "blast", "G"]
    pred_pool = true_pool + ["N", "mono", "M"]
    y_true = list(rng.choice(true_pool, size=n, p=[0.3, 0.25, 0.15, 0.15, 0.1, 0.05]))
    def noisy(flip: float) -> list[str]:
        flips = rng.random(n) < flip
        return [str(rng.choice(pred_pool)) if f else t for t, f in zip(y_true, flips)]
    return y_true, noisy(0.3), noisy(0.5)


# --------------------------------------------------------------------------- paired_bootstrap


def test_large_difference_excludes_zero() -> None:
    y_true, pred_a, pred_b = large_difference()
    # B: every class keeps 25 of its 50 samples -> accuracy = balanced accuracy = 1/2; each class is
    # predicted 50 times (25 own + 25 from its neighbour) -> precision = recall = F1 = 1/2 everywhere.
    for name in FLAT_SCALAR_METRICS:
        result = paired_bootstrap(y_true, pred_a, pred_b, bootstrap_metric(name, CLASSES), n_resamples=1000, seed=0)
        assert result["a"] == 1.0 and result["b"] == pytest.approx(0.5), name
        assert result["observed"] == pytest.approx(0.5), name
        assert result["excludes_zero"] is True, name
        assert 0.3 < result["ci_low"] < 0.5 < result["ci_high"] < 0.7, (name, result)
        assert result["n_resamples"] == result["n_valid"] == 1000
    # The other way round the difference is negative and still significant.
    reverse = paired_bootstrap(y_true, pred_b, pred_a, bootstrap_metric("accuracy", CLASSES))
    assert reverse["observed"] == pytest.approx(-0.5) and reverse["ci_high"] < 0 and reverse["excludes_zero"]


def test_large_difference_with_a_plain_callable() -> None:
    y_true, pred_a, pred_b = large_difference()
    result = paired_bootstrap(y_true, pred_a, pred_b, accuracy, n_resamples=300, seed=1)
    assert result["observed"] == pytest.approx(0.5)
    assert result["excludes_zero"] and 0.3 < result["ci_low"] < 0.5 < result["ci_high"] < 0.7


def test_identical_predictions_give_zero(tree: Hierarchy) -> None:
    y_true, pred, _ = random_predictions(300, seed=4)
    labels = sorted(set(y_true) | set(pred), key=tree.index)
    for name in SCALAR_METRICS:
        result = paired_bootstrap(y_true, pred, list(pred), bootstrap_metric(name, labels, tree), n_resamples=200)
        assert result["observed"] == 0.0, name
        assert result["ci_low"] == 0.0 and result["ci_high"] == 0.0, name
        assert result["ci_low"] <= 0.0 <= result["ci_high"]
        assert result["excludes_zero"] is False, name
    plain = paired_bootstrap(y_true, pred, pred, accuracy, n_resamples=50)
    assert (plain["observed"], plain["ci_low"], plain["ci_high"], plain["excludes_zero"]) == (0.0, 0.0, 0.0, False)


def test_same_seed_same_output_other_seed_other_output() -> None:
    y_true, pred_a, pred_b = random_predictions(400, seed=5)
    labels = sorted(set(y_true) | set(pred_a) | set(pred_b))
    metric = bootstrap_metric("balanced_accuracy", labels)
    first = paired_bootstrap(y_true, pred_a, pred_b, metric, n_resamples=300, seed=7)
    assert paired_bootstrap(y_true, pred_a, pred_b, metric, n_resamples=300, seed=7) == first
    other = paired_bootstrap(y_true, pred_a, pred_b, metric, n_resamples=300, seed=8)
    assert other["observed"] == first["observed"]
    assert (other["ci_low"], other["ci_high"]) != (first["ci_low"], first["ci_high"])
    np.testing.assert_array_equal(
        stratified_resample_indices(y_true, 50, seed=3), stratified_resample_indices(y_true, 50, seed=3)
    )


def test_resamples_keep_every_class_size() -> None:
    y_true = ["a"] * 7 + ["b"] * 3 + ["c"] * 1 + ["a"] * 2 + ["d"] * 5  # interleaved, unequal sizes
    sizes = Counter(y_true)
    seen: list[Counter] = []

    def class_sizes(yt, yp) -> float:  # a metric that records the class sizes it is given
        seen.append(Counter(yt))
        return float(len(yt))

    result = paired_bootstrap(y_true, y_true, y_true, class_sizes, n_resamples=100, seed=2)
    assert len(seen) == 2 + 2 * 100  # observed a and b, then a and b per resample
    assert all(counts == sizes for counts in seen)
    assert result["observed"] == 0.0
    rows = stratified_resample_indices(y_true, 100, seed=2)
    assert rows.shape == (100, len(y_true))
    labels = np.array(y_true)
    for row in rows:
        assert Counter(labels[row]) == sizes
    # Resampling is with replacement: some row repeats a sample.
    assert any(len(set(row)) < len(row) for row in rows)


@pytest.mark.slow
def test_vectorised_path_matches_the_loop_over_the_metric_functions(tree: Hierarchy) -> None:
    y_true, pred_a, pred_b = random_predictions(150, seed=6)
    labels = sorted(set(y_true) | set(pred_a) | set(pred_b), key=tree.index)
    for name in SCALAR_METRICS:
        metric = bootstrap_metric(name, labels, tree)
        fast = paired_bootstrap(y_true, pred_a, pred_b, metric, n_resamples=60, seed=11)
        slow = paired_bootstrap(y_true, pred_a, pred_b, lambda t, p, m=metric: m(t, p), n_resamples=60, seed=11)
        assert fast["n_valid"] == slow["n_valid"], name
        for key in ("observed", "ci_low", "ci_high", "a", "b"):
            assert fast[key] == pytest.approx(slow[key], abs=1e-12), (name, key)
        assert fast["excludes_zero"] == slow["excludes_zero"]


def test_mistake_severity_undefined_without_mistakes(tree: Hierarchy) -> None:
    y_true, pred_a, pred_b = large_difference()
    result = paired_bootstrap(y_true, pred_a, pred_b, bootstrap_metric("mistake_severity", CLASSES, tree))
    assert math.isnan(result["a"]) and math.isnan(result["observed"])
    assert result["n_valid"] == 0 and math.isnan(result["ci_low"]) and result["excludes_zero"] is False
    # B's mistakes: band->seg 4-3 = 1, seg->lymph 4-0 = 4, lymph->blast 2-0 = 2, blast->band 1-0 = 1
    assert result["b"] == pytest.approx((1 + 4 + 2 + 1) / 4)


def test_bad_input() -> None:
    with pytest.raises(MetricInputError, match="different lengths"):
        paired_bootstrap(["a", "b"], ["a", "b"], ["a"], accuracy)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(["a"], ["a"], ["a"], accuracy, n_resamples=0)
    with pytest.raises(ValueError, match="needs a hierarchy"):
        bootstrap_metric("hierarchical_f1", ["a"])
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_metric("f2", ["a"])


# --------------------------------------------------------------------------- prediction tables


def table(y_true: list[str], **columns: list[str]) -> dict[str, list[str]]:
    n = len(y_true)
    out = {"sample": [str(i) for i in range(n)], "path": [f"img_{i}.png" for i in range(n)],
           "fold": [str(i % 5) for i in range(n)], "y_true": list(y_true)}
    out.update({k: list(v) for k, v in columns.items()})
    return out


def test_compare_prediction_tables(tree: Hierarchy) -> None:
    y_true, good, bad = large_difference()
    table_a = table(y_true, knn_k1=good, logreg=bad, only_in_a=good)
    table_b = table(y_true, logreg=good, knn_k1=bad, knn_k20=good)
    result = compare_prediction_tables(table_a, table_b, hierarchy=tree, n_resamples=200, seed=0)
    assert list(result) == ["knn_k1", "logreg"]  # common classifiers, in A's order
    assert list(result["knn_k1"]) == list(SCALAR_METRICS)
    assert result["knn_k1"]["accuracy"]["observed"] == pytest.approx(0.5)
    assert result["logreg"]["accuracy"]["observed"] == pytest.approx(-0.5)
    assert result["knn_k1"]["accuracy"]["excludes_zero"] and result["logreg"]["accuracy"]["excludes_zero"]
    # Observed values are those of all_metrics on each table.
    metrics_good = all_metrics(y_true, good, CLASSES, tree)
    metrics_bad = all_metrics(y_true, bad, CLASSES, tree)
    for name in ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "hierarchical_precision",
                 "hierarchical_recall", "hierarchical_f1", "lineage_accuracy"):
        entry = result["knn_k1"][name]
        assert entry["a"] == pytest.approx(metrics_good[name]) and entry["b"] == pytest.approx(metrics_bad[name])
        assert entry["observed"] == pytest.approx(metrics_good[name] - metrics_bad[name])
    # Lineage of B: its 100 correct samples, plus the 25 mistakes band->seg (both M); the 75
    # mistakes seg->lymph, lymph->blast, blast->band change lineage: 125 / 200.
    assert result["knn_k1"]["lineage_accuracy"]["b"] == pytest.approx(125 / 200)
    assert result["knn_k1"]["lineage_accuracy"]["observed"] == pytest.approx(75 / 200)
    # Same result as paired_bootstrap with the same seed, metric by metric.
    single = paired_bootstrap(y_true, good, bad, bootstrap_metric("hierarchical_f1", CLASSES, tree), 200, seed=0)
    assert single == result["knn_k1"]["hierarchical_f1"]
    flat_only = compare_prediction_tables(table_a, table_b, n_resamples=50)
    assert list(flat_only["knn_k1"]) == list(FLAT_SCALAR_METRICS)


def test_compare_prediction_tables_rejects_unpaired_tables(tree: Hierarchy) -> None:
    y_true, good, bad = large_difference()
    base = table(y_true, logreg=good)
    changed = table(y_true, logreg=bad)
    changed["y_true"][17] = "lymph"
    with pytest.raises(PredictionTableError, match=r"row 18 \(sample '17'\).*y_true is 'band' in A but 'lymph' in B"):
        compare_prediction_tables(base, changed, n_resamples=10)
    reordered = table(y_true, logreg=bad)
    reordered["sample"][3], reordered["sample"][4] = reordered["sample"][4], reordered["sample"][3]
    with pytest.raises(PredictionTableError, match=r"row 4 .*sample is '3' in A but '4' in B"):
        compare_prediction_tables(base, reordered, n_resamples=10)
    shorter = {k: v[:-1] for k, v in table(y_true, logreg=bad).items()}
    with pytest.raises(PredictionTableError, match=r"different numbers of rows \(200 in A, 199 in B\)"):
        compare_prediction_tables(base, shorter, n_resamples=10)
    with pytest.raises(PredictionTableError, match="no classifier column in common"):
        compare_prediction_tables(base, table(y_true, knn_k1=good), n_resamples=10)
    ragged = table(y_true, logreg=good[:-1])
    with pytest.raises(PredictionTableError, match="column 'logreg' has 199 rows"):
        compare_prediction_tables(base, ragged, n_resamples=10)
    unknown = table(y_true, logreg=["neutrophil"] + bad[1:])
    with pytest.raises(MetricInputError, match="'neutrophil' is not a node"):
        compare_prediction_tables(base, unknown, hierarchy=tree, n_resamples=10)
    assert issubclass(PredictionTableError, ValueError)


def test_read_predictions_csv(tmp_path: Path) -> None:
    y_true, good, bad = large_difference()
    rows = table(y_true, knn_k1=good, logreg=bad)
    path = tmp_path / "predictions.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(rows))
        writer.writerows(zip(*rows.values()))
    assert read_predictions_csv(path) == rows
    bad_row = tmp_path / "bad.csv"
    bad_row.write_text("sample,y_true,logreg\n0,band,band\n1,seg\n", encoding="utf-8")
    with pytest.raises(PredictionTableError, match=r"bad.csv:3: expected 3 fields, got 2"):
        read_predictions_csv(bad_row)
    no_truth = tmp_path / "no_truth.csv"
    no_truth.write_text("sample,logreg\n0,band\n", encoding="utf-8")
    with pytest.raises(PredictionTableError, match="no 'y_true' column"):
        read_predictions_csv(no_truth)
    with pytest.raises(PredictionTableError, match="cannot read"):
        read_predictions_csv(tmp_path / "missing.csv")


def test_speed_n2000_all_metrics(tree: Hierarchy) -> None:
    y_true, pred_a, pred_b = random_predictions(2000, seed=9)
    table_a = table(y_true, knn_k1=pred_a, knn_k20=pred_b, logreg=pred_a)
    table_b = table(y_true, knn_k1=pred_b, knn_k20=pred_a, logreg=pred_b)
    start = time.perf_counter()
    result = compare_prediction_tables(table_a, table_b, hierarchy=tree, n_resamples=1000, seed=0)
    elapsed = time.perf_counter() - start
    assert len(result) == 3 and all(len(v) == len(SCALAR_METRICS) for v in result.values())
    # 3 classifiers x 9 metrics x 1000 resamples of 2000 samples: well under a second here.
    assert elapsed < 5.0, elapsed


def test_macro_precision_vectorised_matches_the_loop() -> None:
    # issue 22: macro precision in the bootstrap; the count-table path equals the metric function.
    y_true, pred_a, pred_b = random_predictions(120, seed=9)
    labels = sorted(set(y_true) | set(pred_a) | set(pred_b))
    metric = bootstrap_metric("macro_precision", labels)
    fast = paired_bootstrap(y_true, pred_a, pred_b, metric, n_resamples=80, seed=3)
    slow = paired_bootstrap(y_true, pred_a, pred_b, lambda t, p: metric(t, p), n_resamples=80, seed=3)
    for key in ("observed", "ci_low", "ci_high", "a", "b"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-12), key
    hand = bootstrap_metric("macro_precision", ["a", "b"])
    assert hand(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(0.75)
    counts = np.array([[1.0, 1.0, 1.0]])  # pairs (a, a), (a, b), (b, b) once each
    assert hand.from_pair_counts(["a", "a", "b"], ["a", "b", "b"], counts)[0] == pytest.approx(0.75)
