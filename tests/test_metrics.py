"""dinov2_hier.metrics against hand-computed values on small hand-built trees."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.metrics import (
    SCALAR_METRICS,
    MetricInputError,
    accuracy,
    all_metrics,
    classification_report,
    hierarchical_prf,
    lineage_accuracy,
    mistake_severity,
)

# An unbalanced tree (depths in brackets):
#
#   root
#   |-- M [1]                       myeloid lineage
#   |   |-- G [2]
#   |   |   |-- N [3]
#   |   |   |   |-- band [4]
#   |   |   |   `-- seg [4]
#   |   |   `-- eos [3]
#   |   `-- mono [2]
#   |-- L [1]                       lymphoid lineage
#   |   `-- lymph [2]
#   `-- blast [1]                   a leaf directly under the root
#
# Ancestor sets (the node itself up to, excluding, the root):
#   A(band) = {band, N, G, M}   A(seg) = {seg, N, G, M}   A(N) = {N, G, M}
#   A(eos)  = {eos, G, M}       A(G)   = {G, M}           A(mono) = {mono, M}   A(M) = {M}
#   A(lymph) = {lymph, L}       A(L)   = {L}              A(blast) = {blast}
TREE = {
    "name": "unbalanced",
    "root": {"id": "root", "children": [
        {"id": "M", "children": [
            {"id": "G", "children": [
                {"id": "N", "children": [{"id": "band"}, {"id": "seg"}]},
                {"id": "eos"},
            ]},
            {"id": "mono"},
        ]},
        {"id": "L", "children": [{"id": "lymph"}]},
        {"id": "blast"},
    ]},
}


@pytest.fixture(scope="module")
def tree() -> Hierarchy:
    return Hierarchy.from_dict(TREE)


def test_tree_is_as_drawn(tree: Hierarchy) -> None:
    assert set(tree.ancestors("band")) == {"band", "N", "G", "M"}
    assert set(tree.ancestors("eos")) == {"eos", "G", "M"}
    assert tree.ancestors("blast") == ["blast"]
    assert [tree.depth(n) for n in ("M", "G", "N", "band", "eos", "mono", "lymph", "blast")] == [1, 2, 3, 4, 3, 2, 2, 1]


# --------------------------------------------------------------------------- hierarchical P/R/F1

# sample  true   pred    A(true)             A(pred)             |A_t & A_p|  |A_p|  |A_t|
#   1     band   seg     {band,N,G,M}        {seg,N,G,M}              3          4      4
#   2     eos    N       {eos,G,M}           {N,G,M}   (internal)     2          3      3
#   3     blast  lymph   {blast}             {lymph,L}                0          2      1
#   4     G      G       {G,M} (internal)    {G,M}                    2          2      2
#                                                              sums:  7         11     10
# hP = 7/11, hR = 7/10, hF1 = 2 (7/11)(7/10) / (7/11 + 7/10) = 2*7 / (11 + 10) = 2/3
HPRF_TRUE = ["band", "eos", "blast", "G"]
HPRF_PRED = ["seg", "N", "lymph", "G"]


def test_hierarchical_prf_by_hand(tree: Hierarchy) -> None:
    h_p, h_r, h_f = hierarchical_prf(HPRF_TRUE, HPRF_PRED, tree)
    assert h_p == pytest.approx(7 / 11)
    assert h_r == pytest.approx(7 / 10)
    assert h_f == pytest.approx(2 / 3)
    assert h_f == pytest.approx(2 * h_p * h_r / (h_p + h_r))


def test_hierarchical_prf_swapping_roles_swaps_precision_and_recall(tree: Hierarchy) -> None:
    h_p, h_r, h_f = hierarchical_prf(HPRF_PRED, HPRF_TRUE, tree)
    assert (h_p, h_r) == (pytest.approx(7 / 10), pytest.approx(7 / 11))
    assert h_f == pytest.approx(2 / 3)


def test_hierarchical_prf_perfect_and_disjoint(tree: Hierarchy) -> None:
    assert hierarchical_prf(["band", "L", "blast"], ["band", "L", "blast"], tree) == (1.0, 1.0, 1.0)
    # Different lineages share nothing: hP = hR = hF1 = 0.
    assert hierarchical_prf(["band", "blast"], ["lymph", "mono"], tree) == (0.0, 0.0, 0.0)


def test_hierarchical_prf_internal_prediction_above_truth(tree: Hierarchy) -> None:
    # true band {band,N,G,M} (4), pred G {G,M} (2): shared 2 -> hP = 2/2 = 1, hR = 2/4.
    h_p, h_r, h_f = hierarchical_prf(["band"], ["G"], tree)
    assert (h_p, h_r) == (1.0, 0.5)
    assert h_f == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- lineage accuracy


def test_lineage_accuracy_by_hand(tree: Hierarchy) -> None:
    # lineages (depth-1 ancestors): band->M seg->M | eos->M N->M | blast->blast lymph->L | G->M G->M
    assert lineage_accuracy(HPRF_TRUE, HPRF_PRED, tree) == pytest.approx(3 / 4)
    # An internal node at depth 1 is its own lineage; a leaf under the root is its own lineage.
    assert lineage_accuracy(["M", "L", "blast", "lymph"], ["mono", "lymph", "blast", "L"], tree) == 1.0
    assert lineage_accuracy(["blast", "eos"], ["mono", "lymph"], tree) == 0.0


# --------------------------------------------------------------------------- mistake severity


def test_mistake_severity_by_hand(tree: Hierarchy) -> None:
    # sample  true   pred    depth(true)  lca           depth(lca)  severity
    #   1     band   seg        4         N                3           1
    #   2     seg    mono       4         M                1           3
    #   3     blast  lymph      1         root             0           1
    #   4     eos    eos        -         (correct, not counted)
    #   5     lymph  lymph      -         (correct, not counted)
    # mean over the 3 mistakes: (1 + 3 + 1) / 3 = 5/3
    y_true = ["band", "seg", "blast", "eos", "lymph"]
    y_pred = ["seg", "mono", "lymph", "eos", "lymph"]
    assert mistake_severity(y_true, y_pred, tree) == pytest.approx(5 / 3)


def test_mistake_severity_with_internal_node_predictions(tree: Hierarchy) -> None:
    # true band, pred G (an ancestor, internal): lca G (depth 2) -> 4 - 2 = 2
    # true N (internal), pred band (a descendant): lca N (depth 3) -> 3 - 3 = 0, still a mistake
    # true eos, pred N (internal cousin): lca G (depth 2) -> 3 - 2 = 1
    # true lymph, pred M (internal, other lineage): lca root -> 2 - 0 = 2
    # mean (2 + 0 + 1 + 2) / 4 = 5/4
    y_true = ["band", "N", "eos", "lymph"]
    y_pred = ["G", "band", "N", "M"]
    assert mistake_severity(y_true, y_pred, tree) == pytest.approx(5 / 4)
    assert mistake_severity(["N"], ["band"], tree) == 0.0


def test_mistake_severity_is_nan_without_mistakes(tree: Hierarchy) -> None:
    assert math.isnan(mistake_severity(["band", "G", "blast"], ["band", "G", "blast"], tree))


# --------------------------------------------------------------------------- flat metrics

# labels a, b, c, d; class c is never predicted, class d is in neither y_true nor y_pred.
FLAT_TRUE = ["a", "a", "a", "b", "b", "c"]
FLAT_PRED = ["a", "a", "b", "b", "b", "a"]
# Confusion matrix (rows true, columns predicted, order a b c d):
#   a: [2, 1, 0, 0]    b: [0, 2, 0, 0]    c: [1, 0, 0, 0]    d: [0, 0, 0, 0]
# recall    a 2/3, b 2/2, c 0/1           -> balanced accuracy (2/3 + 1 + 0) / 3 = 5/9
# precision a 2/3, b 2/3, c 0 (never predicted, zero_division=0), d 0
# F1        a 2*2/(3+3) = 2/3, b 2*2/(2+3) = 4/5, c 0, d 0
# weighted F1 = (3 * 2/3 + 2 * 4/5 + 1 * 0) / 6 = 3.6 / 6 = 0.6
# macro F1 over the classes present in y_true or y_pred (a, b, c) = (2/3 + 4/5 + 0) / 3 = 22/45
# accuracy = 4/6


def test_classification_report_by_hand() -> None:
    report = classification_report(FLAT_TRUE, FLAT_PRED, ["a", "b", "c", "d"])
    assert report["labels"] == ["a", "b", "c", "d"]
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["balanced_accuracy"] == pytest.approx(5 / 9)
    assert report["weighted_f1"] == pytest.approx(0.6)
    assert report["macro_f1"] == pytest.approx(22 / 45)
    # macro precision over a, b, c: (2/3 + 2/3 + 0) / 3 = 4/9
    assert report["macro_precision"] == pytest.approx(4 / 9)
    assert report["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    pc = report["per_class"]
    assert pc["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert pc["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 4 / 5, "support": 2})
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert accuracy(FLAT_TRUE, FLAT_PRED) == pytest.approx(2 / 3)


def test_absent_classes_change_nothing_and_never_shift_the_matrix() -> None:
    with_d = classification_report(FLAT_TRUE, FLAT_PRED, ["a", "b", "c", "d"])
    without_d = classification_report(FLAT_TRUE, FLAT_PRED, ["a", "b", "c"])
    for key in ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "macro_precision"):
        assert with_d[key] == pytest.approx(without_d[key]), key
    assert without_d["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    # The absent class first: every row and column keeps its label.
    shifted = classification_report(FLAT_TRUE, FLAT_PRED, ["d", "c", "b", "a"])
    assert shifted["confusion_matrix"] == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 2, 0], [0, 0, 1, 2]]
    assert shifted["per_class"] == with_d["per_class"]
    assert shifted["balanced_accuracy"] == pytest.approx(5 / 9)


def test_flat_metrics_agree_with_sklearn_on_random_labels() -> None:
    rng = np.random.default_rng(3)
    labels = [f"class_{i}" for i in range(6)]
    y_true = list(rng.choice(labels[:5], size=300))  # class_5 never true...
    y_pred = list(rng.choice(labels, size=300))  # ...but sometimes predicted
    report = classification_report(y_true, y_pred, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert report["weighted_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    )
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert report["macro_precision"] == pytest.approx(
        precision_score(y_true, y_pred, average="macro", zero_division=0)
    )
    # balanced accuracy is the macro recall (over the classes present in y_true)
    assert report["balanced_accuracy"] == pytest.approx(
        recall_score(y_true, y_pred, labels=labels[:5], average="macro", zero_division=0)
    )


def test_predicted_class_absent_from_truth_counts_as_a_miss_without_warning() -> None:
    # recall a 1/2, b 1/1; c (predicted once, never true) has no recall -> (1/2 + 1) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report(["a", "a", "b"], ["a", "c", "b"], ["a", "b", "c"])
    assert report["balanced_accuracy"] == pytest.approx(0.75)
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # macro F1 over a, b, c (c is predicted): a 2*1/(2+1) = 2/3, b 1, c 0 -> 5/9
    assert report["macro_f1"] == pytest.approx(5 / 9)


def test_macro_precision_by_hand() -> None:
    # issue 22: precision a 1/1, b 1/2 -> macro precision 0.75
    report = classification_report(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])
    assert report["macro_precision"] == pytest.approx(0.75)
    assert report["per_class"]["a"]["precision"] == 1.0 and report["per_class"]["b"]["precision"] == 0.5
    assert all_metrics(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])["macro_precision"] == pytest.approx(0.75)


def test_numpy_string_arrays_are_accepted() -> None:
    report = classification_report(np.array(FLAT_TRUE), np.array(FLAT_PRED, dtype=object), np.array(["a", "b", "c"]))
    assert report["balanced_accuracy"] == pytest.approx(5 / 9)
    assert all(type(k) is str for k in report["per_class"])


# --------------------------------------------------------------------------- all_metrics


def test_all_metrics_with_internal_node_classes(tree: Hierarchy) -> None:
    labels = ["band", "seg", "eos", "mono", "lymph", "blast", "N", "G", "M", "L"]
    result = all_metrics(HPRF_TRUE, HPRF_PRED, labels, tree)
    assert set(SCALAR_METRICS) <= set(result)
    assert result["hierarchical_precision"] == pytest.approx(7 / 11)
    assert result["hierarchical_recall"] == pytest.approx(7 / 10)
    assert result["hierarchical_f1"] == pytest.approx(2 / 3)
    assert result["lineage_accuracy"] == pytest.approx(3 / 4)
    # mistakes: band->seg 4-3 = 1, eos->N 3-2 = 1, blast->lymph 1-0 = 1
    assert result["mistake_severity"] == pytest.approx(1.0)
    assert result["accuracy"] == pytest.approx(1 / 4)
    # recall: band 0, eos 0, blast 0, G 1 -> 1/4
    assert result["balanced_accuracy"] == pytest.approx(1 / 4)
    flat = all_metrics(HPRF_TRUE, HPRF_PRED, labels)
    assert not set(flat) & {"hierarchical_f1", "lineage_accuracy", "mistake_severity"}
    assert list(SCALAR_METRICS[:4]) == ["accuracy", "balanced_accuracy", "weighted_f1", "macro_f1"]


# --------------------------------------------------------------------------- bad input


def test_length_mismatch() -> None:
    with pytest.raises(MetricInputError, match="different lengths"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(MetricInputError, match="different lengths"):
        classification_report(["a", "b"], ["a"], ["a", "b"])


def test_empty_and_non_string_input(tree: Hierarchy) -> None:
    with pytest.raises(MetricInputError, match="empty"):
        accuracy([], [])
    with pytest.raises(MetricInputError, match=r"y_pred\[1\] is 3 \(int\)"):
        accuracy(["a", "b"], ["a", 3])
    with pytest.raises(MetricInputError, match="single string"):
        accuracy("ab", "ab")
    assert isinstance(MetricInputError("x"), ValueError)


def test_label_not_in_hierarchy_is_named(tree: Hierarchy) -> None:
    for fn in (hierarchical_prf, lineage_accuracy, mistake_severity):
        with pytest.raises(MetricInputError, match=r"y_pred\[1\] = 'bnad' is not a node.*did you mean 'band'") as info:
            fn(["band", "seg"], ["band", "bnad"], tree)
        assert info.value.label == "bnad"
        with pytest.raises(MetricInputError, match=r"y_true\[0\] = 'neutro'"):
            fn(["neutro"], ["band"], tree)
    with pytest.raises(MetricInputError, match="'root' is the root"):
        hierarchical_prf(["band"], ["root"], tree)
    with pytest.raises(MetricInputError, match=r"labels\[1\] = 'zzz'"):
        all_metrics(["band"], ["band"], ["band", "zzz"], tree)


def test_label_outside_the_class_list_is_named() -> None:
    with pytest.raises(MetricInputError, match=r"y_pred\[2\] = 'e' is not one of the 3 labels") as info:
        classification_report(["a", "b", "c"], ["a", "b", "e"], ["a", "b", "c"])
    assert info.value.label == "e"
    with pytest.raises(MetricInputError, match=r"y_true\[0\] = 'x'"):
        classification_report(["x"], ["a"], ["a", "b"])
    with pytest.raises(MetricInputError, match="appears twice"):
        classification_report(["a"], ["a"], ["a", "a"])
    with pytest.raises(MetricInputError, match="labels is empty"):
        classification_report(["a"], ["a"], [])
