"""Frozen-feature probes (eval.probes) and cross-validation (eval.crossval)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from eval.crossval import FIXED_SPLIT, NOT_TESTED, EvalDataError, run_probes, stratified_folds
from eval.probes import DEFAULT_C_GRID, KNNProbe, LogRegProbe, balanced_accuracy


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The probes' tensors are tiny: one thread avoids OpenMP spin-waiting on busy CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blobs(n_per_class: int, n_classes: int, dim: int = 16, spread: float = 1.0, seed: int = 0):
    """Gaussian blobs with unit covariance, centres ``spread * 3`` apart on random axes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres *= 3.0 * spread / np.linalg.norm(centres, axis=1, keepdims=True)
    X = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat([f"class_{i}" for i in range(n_classes)], n_per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


# -- logistic regression: torch matches scikit-learn -----------------------------------------
@pytest.mark.parametrize("n_classes", [3, 2])
def test_torch_logreg_matches_sklearn_fixed_C(n_classes):
    X, y = _blobs(100, n_classes, spread=0.8)
    train, test = np.arange(200), np.arange(200, len(y))
    if n_classes == 2:
        train, test = np.arange(140), np.arange(140, 200)
    models = {}
    for backend in ("sklearn", "torch"):
        probe = LogRegProbe(C=0.5, backend=backend, device="cpu").fit(X[train], y[train])
        assert probe.backend_ == backend and probe.chosen_C_ == 0.5 and probe.converged_
        models[backend] = probe
    sk, th = models["sklearn"], models["torch"]
    # Same objective -> same minimiser: compare the fitted weights directly.
    coef_sk = sk._model.model.coef_  # [K, D] (binary: [1, D])
    coef_th = th._model.coef
    assert coef_th.shape == coef_sk.shape
    np.testing.assert_allclose(coef_th, coef_sk, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(th._model.intercept, sk._model.model.intercept_, atol=2e-3)
    pred_sk, pred_th = sk.predict(X[test]), th.predict(X[test])
    assert np.mean(pred_sk == pred_th) >= 0.98
    acc_sk, acc_th = np.mean(pred_sk == y[test]), np.mean(pred_th == y[test])
    assert abs(acc_sk - acc_th) <= 0.005


def _tight_sklearn(X, y, C):
    """scikit-learn's float64 minimiser to ~1e-10 (its default tol=1e-4 stops earlier)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(X, y)


@pytest.mark.parametrize("n_classes", [4, 3, 2])
def test_torch_logreg_probabilities_match_sklearn_minimiser(n_classes):
    """300 x 20 planted blobs, C=0.5. The torch fit stops when every gradient entry of the
    objective / (C n) is below 1e-5 (float32); at this C that leaves the weights ~1e-4 from
    the float64 minimiser (measured), so 1e-3 on probabilities and weights is a 10x margin.
    Two classes: scikit-learn's binomial model, one weight vector ``coef_ [1, D]``."""
    X, y = _blobs(300 // n_classes, n_classes, dim=20, spread=0.8)
    probe = LogRegProbe(C=0.5, backend="torch", device="cpu").fit(X, y)
    assert probe.converged_
    Xs = probe._scaler.transform(X)
    ref = _tight_sklearn(Xs, y, 0.5)
    proba = torch.softmax(probe._model.decision(Xs), dim=1).numpy()
    np.testing.assert_allclose(proba, ref.predict_proba(Xs), atol=1e-3)
    assert probe._model.coef.shape == ref.coef_.shape == ((1, 20) if n_classes == 2 else (n_classes, 20))
    np.testing.assert_allclose(probe._model.coef, ref.coef_, atol=1e-3)
    np.testing.assert_allclose(probe._model.intercept, ref.intercept_, atol=1e-3)


def test_batched_problems_equal_separate_fits():
    """One batch of three problems on the same rows: all rows (3 classes), rows without
    class 2 (a binomial problem) and rows without class 1 at another C. Each equals its own
    scikit-learn fit on its rows; an absent class gets probability 0."""
    from eval.probes.lbfgs import _BatchedLBFGS, _Problems

    X, y = _blobs(40, 3, dim=8, spread=0.8, seed=2)
    classes, codes = np.unique(y, return_inverse=True)
    rows = [np.arange(len(y)), np.flatnonzero(codes != 2), np.flatnonzero(codes != 1)]
    Cs = [0.3, 2.0, 1.0]
    problems = _Problems.build(codes, 3, rows, Cs, torch.device("cpu"))
    solver = _BatchedLBFGS(torch.as_tensor(X), torch.as_tensor(codes), problems)
    while len(solver.ids) and solver.n_iter < 1000:
        solver.run(10)
        solver.retire_converged()
    assert solver.converged.all()
    logits = torch.einsum("nd,pkd->npk", torch.as_tensor(X), solver.solution[..., :-1])
    proba = torch.softmax(logits + solver.solution[..., -1] + problems.offset, dim=2).numpy()
    for p, (idx, C) in enumerate(zip(rows, Cs)):
        ref = _tight_sklearn(X[idx], y[idx], C)
        present = np.searchsorted(classes, ref.classes_)
        np.testing.assert_allclose(proba[:, p, present], ref.predict_proba(X), atol=1e-3)
        absent = np.setdiff1d(np.arange(3), present)
        assert np.all(proba[:, p, absent] == 0)


@pytest.mark.parametrize("singleton", [False, True])
def test_torch_cv_scores_match_sklearn_backend(singleton):
    """4 planted classes, 300 x 20, default C grid: the same chosen C and inner-CV scores
    within 0.01 (a flipped validation prediction moves a score by ~0.003: both backends stop
    at a gradient tolerance, scikit-learn's 1e-4 in float64, torch's 1e-5 in float32).
    With a one-sample class, one inner fold trains without it (its logit is masked)."""
    X, y = _blobs(75, 4, dim=20, spread=0.6)
    if singleton:
        y = y.copy()
        y[0] = "single"
    fitted = {b: LogRegProbe(backend=b, device="cpu").fit(X, y) for b in ("sklearn", "torch")}
    sk, th = fitted["sklearn"], fitted["torch"]
    assert th.backend_ == "torch" and th.converged_
    assert list(th.cv_scores_) == list(sk.cv_scores_) == list(DEFAULT_C_GRID)
    assert th.chosen_C_ == sk.chosen_C_
    assert max(abs(th.cv_scores_[C] - sk.cv_scores_[C]) for C in DEFAULT_C_GRID) <= 0.01
    assert np.mean(th.predict(X) == sk.predict(X)) >= 0.98


def test_torch_logreg_reports_unconverged_fits(caplog):
    X, y = _blobs(100, 3, dim=20, spread=0.8)
    with caplog.at_level("WARNING", logger="dinov2_hier.eval"):
        probe = LogRegProbe(backend="torch", device="cpu", max_iter=3).fit(X, y)
    assert not probe.converged_ and "max_iter=3" in caplog.text
    assert probe.chosen_C_ in DEFAULT_C_GRID and set(probe.cv_scores_) == set(DEFAULT_C_GRID)
    # The warning says which fits stopped short: inner CV fits by C, and the final fit.
    message = re.search(r"logreg \(torch\): L-BFGS reached max_iter=3 before converging: (.*)", caplog.text).group(1)
    match = re.fullmatch(r"(?:inner CV fits at C=([^;]+); )?the final fit at the chosen C=(\S+) (converged|did not)",
                         message.strip())
    assert match and float(match.group(2)) == probe.chosen_C_
    assert match.group(1) is not None or match.group(3) == "did not"  # something did not converge
    assert {float(C) for C in (match.group(1) or "").split(", ") if C} <= set(DEFAULT_C_GRID)
    assert LogRegProbe(backend="torch", device="cpu").fit(X, y).converged_
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinov2_hier.eval"):
        sk = LogRegProbe(backend="sklearn", C=1.0, max_iter=1).fit(X, y)
    assert not sk.converged_
    assert "logreg (sklearn): L-BFGS reached max_iter=1 before converging: the final fit (C=1)" in caplog.text


def test_torch_logreg_matches_sklearn_with_C_sweep():
    """3 near-separable blobs in 16-D, n=300: the chosen C, the accuracy (within 0.5 points)
    and >= 98% of the predictions agree between the backends."""
    X, y = _blobs(100, 3, spread=0.8)
    folds = stratified_folds(y, 3, seed=1)
    agree, accs = [], {"sklearn": [], "torch": []}
    for train, test in folds:
        preds = {}
        for backend in ("sklearn", "torch"):
            probe = LogRegProbe(backend=backend, device="cpu", seed=0).fit(X[train], y[train])
            assert probe.chosen_C_ in DEFAULT_C_GRID
            assert set(probe.cv_scores_) == set(DEFAULT_C_GRID)
            preds[backend] = probe.predict(X[test])
            accs[backend].append(np.mean(preds[backend] == y[test]))
        agree.append(np.mean(preds["sklearn"] == preds["torch"]))
    assert np.mean(agree) >= 0.98
    assert abs(np.mean(accs["sklearn"]) - np.mean(accs["torch"])) <= 0.005
    assert np.mean(accs["sklearn"]) > 0.8  # learnable but not trivial


def test_logreg_C_selection_is_seeded_and_prefers_smaller_C_on_ties():
    X, y = _blobs(30, 3, spread=3.0)  # fully separable: many C reach balanced accuracy 1
    a = LogRegProbe(backend="sklearn", seed=3).fit(X, y)
    b = LogRegProbe(backend="sklearn", seed=3).fit(X, y)
    assert a.cv_scores_ == b.cv_scores_ and a.chosen_C_ == b.chosen_C_
    best = max(a.cv_scores_.values())
    assert a.chosen_C_ == min(c for c, s in a.cv_scores_.items() if s == best)


def test_logreg_single_class_and_tiny_classes():
    X, y = _blobs(10, 3)
    probe = LogRegProbe(backend="torch", device="cpu").fit(X[:5], np.array(["only"] * 5))
    assert list(probe.predict(X[5:8])) == ["only"] * 3
    # Classes with fewer members than inner folds still fit (inner CV warns internally).
    y_small = y.copy()
    y_small[:2] = "rare"
    for backend in ("sklearn", "torch"):
        pred = LogRegProbe(backend=backend, device="cpu").fit(X, y_small).predict(X)
        assert pred.dtype.kind == "U" and set(pred) <= set(y_small)


def test_logreg_rejects_bad_arguments():
    with pytest.raises(ValueError):
        LogRegProbe(C=0)
    with pytest.raises(ValueError):
        LogRegProbe(backend="gpu")
    with pytest.raises(EvalDataError):
        LogRegProbe(backend="sklearn").fit(np.full((6, 2), np.nan), ["a", "b"] * 3)


# -- kNN ------------------------------------------------------------------------------------
def test_knn_cosine_and_euclidean_differ():
    X = np.array([[10.0, 0.0], [1.0, 1.0]])
    y = np.array(["far_same_direction", "near_other_direction"])
    queries = np.array([[1.0, 0.1], [0.0, 5.0]])
    cosine = KNNProbe(1).fit(X, y).predict(queries)
    euclid = KNNProbe(1, metric="euclidean").fit(X, y).predict(queries)
    # query 0 points along x (cosine -> the [10, 0] sample) but lies next to [1, 1].
    assert list(cosine) == ["far_same_direction", "near_other_direction"]
    assert list(euclid) == ["near_other_direction", "near_other_direction"]
    assert KNNProbe(1).name == "knn_k1" and KNNProbe(20).name == "knn_k20"


def _unit(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, dtype=float))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_knn_vote_tie_broken_by_summed_similarity():
    # k=4 around a query at angle 0: 'a' has the nearest neighbour (sim 0.99) and one far
    # (0.5); 'b' two fairly near (0.9, 0.8). Votes 2:2 -> summed 1.49 < 1.7 -> 'b'.
    X = _unit(np.degrees(np.arccos([0.99, 0.5, 0.9, 0.8, -1.0])))
    y = np.array(["a", "a", "b", "b", "c"])
    assert list(KNNProbe(4).fit(X, y).predict(_unit([0]))) == ["b"]
    # Majority beats similarity: k=3 -> a (0.99), b (0.9), b (0.8) -> 'b'; k=1 -> 'a'.
    assert list(KNNProbe(1).fit(X, y).predict(_unit([0]))) == ["a"]
    assert list(KNNProbe(3).fit(X, y).predict(_unit([0]))) == ["b"]


def test_knn_exact_tie_goes_to_class_of_nearest_neighbour():
    # Euclidean in 1-D, query at 0, k=4. 'near' at 1 and 3, 'other' at 2 and -2: votes 2:2,
    # summed distances 4 == 4 exactly -> the class whose best neighbour ranks first.
    q = np.zeros((1, 1))
    X = np.array([[1.0], [3.0], [2.0], [-2.0]])
    for first, second in (("a", "b"), ("b", "a")):
        y = np.array([first, first, second, second])
        assert list(KNNProbe(4, metric="euclidean").fit(X, y).predict(q)) == [first]


def test_knn_equal_similarity_neighbours_ranked_by_training_row():
    X = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1: same direction
    q = np.array([[1.0, 0.0]])
    assert list(KNNProbe(1).fit(X, np.array(["x", "y", "z"])).predict(q)) == ["x"]
    assert list(KNNProbe(1).fit(X, np.array(["y", "x", "z"])).predict(q)) == ["y"]
    # k=2 picks both tied rows (one vote each, equal sums) -> the lower row's class.
    assert list(KNNProbe(2).fit(X, np.array(["y", "x", "z"])).predict(q)) == ["y"]


def test_knn_k_larger_than_training_set_and_blocking(monkeypatch):
    X, y = _blobs(20, 3, spread=2.0)
    full = KNNProbe(200).fit(X[:30], y[:30]).predict(X[30:])
    counts = {c: int(np.sum(y[:30] == c)) for c in np.unique(y[:30])}
    assert len(set(full)) == 1 and counts[full[0]] == max(counts.values())  # every sample votes
    expected = KNNProbe(5).fit(X[:40], y[:40]).predict(X[40:])
    monkeypatch.setattr("eval.probes.knn._KNN_BLOCK_ELEMENTS", 50)  # one query row per block
    assert list(KNNProbe(5).fit(X[:40], y[:40]).predict(X[40:])) == list(expected)
    assert balanced_accuracy(y[40:], expected) > 0.8


# -- folds ----------------------------------------------------------------------------------
def test_stratified_folds_cover_every_sample_once_and_are_seeded():
    y = np.array(["a"] * 23 + ["b"] * 11 + ["c"] * 6)
    folds = stratified_folds(y, 5, seed=7)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(len(y)))
    for train, test in folds:
        assert np.intersect1d(train, test).size == 0 and train.size + test.size == len(y)
        for c in "abc":  # stratified: per-class counts differ by at most one between folds
            assert abs(np.sum(y[test] == c) - np.sum(y == c) / 5) < 1
    again = stratified_folds(y, 5, seed=7)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = stratified_folds(y, 5, seed=8)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_stratified_folds_rejects_class_smaller_than_folds():
    y = ["common"] * 20 + ["rare"] * 3
    with pytest.raises(EvalDataError, match=r"class 'rare' has 3 samples.*5 cross-validation folds"):
        stratified_folds(y, 5, seed=0)
    with pytest.raises(EvalDataError):
        stratified_folds(y, 1, seed=0)
    assert len(stratified_folds(y, 3, seed=0)) == 3


# -- run_probes -----------------------------------------------------------------------------
def _three_clusters():
    """Three well separated classes; 'b' sits between 'a' and 'c'."""
    X = np.array([[0.0, 1.0]] * 4 + [[1.0, 1.0]] * 4 + [[2.0, 1.0]] * 4) + np.linspace(0, 0.01, 12)[:, None]
    y = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 4)
    return X.astype(np.float32), y


@pytest.mark.parametrize("probe", [
    KNNProbe(1, metric="euclidean"),
    LogRegProbe(C=10.0, backend="sklearn"),
    LogRegProbe(C=10.0, backend="torch", device="cpu"),
], ids=["knn", "logreg_sklearn", "logreg_torch"])
def test_class_absent_from_training_does_not_shift_labels(probe):
    X, y = _three_clusters()
    classes = ["a", "b", "c"]
    train = np.array([0, 1, 2, 8, 9, 10])  # no 'b' in training
    test = np.array([3, 11, 4])
    result = run_probes(X, y, classes, [probe], folds=(train, test))
    pred = result.predictions[probe.name]
    assert list(pred[test]) == ["a", "c", pred[4]] and pred[4] in ("a", "c")
    assert list(pred[train]) == [""] * len(train)
    assert result.fold[test].tolist() == [FIXED_SPLIT] * 3
    assert result.fold[train].tolist() == [NOT_TESTED] * len(train)
    assert result.tested.sum() == 3
    (metrics,) = result.per_fold[probe.name]
    assert metrics["labels"] == classes
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (3, 3) and cm[0, 0] == 1 and cm[2, 2] == 1 and cm[1, 1] == 0


def test_run_probes_cross_validation_with_hierarchy():
    hierarchy = Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "synthetic.json")
    leaves = ["myeloblast", "eosinophil", "monocyte"]
    X, y_idx = _blobs(10, 3, spread=2.0, seed=4)
    y = np.array([leaves[int(s.split("_")[1])] for s in y_idx])
    classes = sorted(set(y), key=hierarchy.index)
    ok = np.ones(len(y), dtype=bool)
    ok[5] = False  # an unreadable image: in no training or test set
    folds = stratified_folds(y, 3, seed=0)
    probes = [KNNProbe(1), KNNProbe(20), LogRegProbe(backend="sklearn")]
    result = run_probes(X, y, classes, probes, folds, hierarchy=hierarchy, ok=ok)
    assert set(result.predictions) == {"knn_k1", "knn_k20", "logreg"}
    assert result.fold[5] == NOT_TESTED and result.predictions["knn_k1"][5] == ""
    assert np.all(result.fold[ok] >= 0) and sorted(set(result.fold[ok].tolist())) == [0, 1, 2]
    for name in result.predictions:
        assert len(result.per_fold[name]) == 3
        assert "hierarchical_f1" in result.per_fold[name][0]
        assert sum(info["n_test"] for info in result.fit_info[name]) == len(y) - 1
    assert all("chosen_C" in info for info in result.fit_info["logreg"])
    # A list of two folds is two folds, not a fixed split.
    two = run_probes(X, y, classes, [KNNProbe(1)], [(folds[0][0], folds[0][1]), (folds[0][1], folds[0][0])])
    assert set(two.fold.tolist()) == {0, 1}


def test_run_probes_rejects_inconsistent_input():
    X, y = _three_clusters()
    with pytest.raises(EvalDataError, match="not in the class list"):
        run_probes(X, y, ["a", "b"], [KNNProbe(1)], (np.arange(6), np.arange(6, 12)))
    with pytest.raises(EvalDataError, match="unique"):
        run_probes(X, y, ["a", "b", "c"], [KNNProbe(1), KNNProbe(1)], (np.arange(6), np.arange(6, 12)))
    with pytest.raises(EvalDataError, match="overlap"):
        run_probes(X, y, ["a", "b", "c"], [KNNProbe(1)], (np.arange(7), np.arange(6, 12)))


def test_auto_backend_keeps_sklearn_for_small_sets_on_any_device():
    from eval import probes

    assert probes.AUTO_TORCH_MIN_SAMPLES == 1000
    for device in ("cuda", "cpu"):
        probe = probes.LogRegProbe(backend="auto", device=device)
        assert probe._resolve_backend(999) == ("sklearn", None)
        assert probe._resolve_backend(1000) == ("torch", torch.device(device))
    # On the CPU, 1,000 rows of two well-separated blobs: the batched solver fits them.
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 500)
    X = rng.normal(size=(1000, 4)) + np.where(y == "a", -3.0, 3.0)[:, None]
    probe = probes.LogRegProbe(backend="auto", device="cpu", C=1.0).fit(X, y)
    assert probe.backend_ == "torch" and probe.converged_
    assert balanced_accuracy(y, probe.predict(X)) == 1.0


# -- issue 22: linear SVM and distance-weighted kNN ------------------------------------------
def test_svm_separable_accuracy_one_and_deterministic_C():
    from eval.probes import DEFAULT_SVM_C_GRID, LinearSVMProbe

    X, y = _blobs(20, 3, spread=3.0, seed=1)  # well separated: every C separates
    X_test, y_test = _blobs(10, 3, spread=3.0, seed=1)
    a = LinearSVMProbe(seed=2).fit(X, y)
    b = LinearSVMProbe(seed=2).fit(X, y)
    assert np.mean(a.predict(X) == y) == 1.0
    assert a.chosen_C_ in DEFAULT_SVM_C_GRID and a.chosen_C_ == b.chosen_C_ and a.cv_scores_ == b.cv_scores_
    assert list(a.cv_scores_) == sorted(DEFAULT_SVM_C_GRID)
    best = max(a.cv_scores_.values())
    assert a.chosen_C_ == min(c for c, s in a.cv_scores_.items() if s == best)  # ties -> smaller C
    assert a.converged_ and a.predict(X_test).dtype.kind == "U"
    # A grid where only a large C can separate picks that C; a fixed C skips the search.
    fixed = LinearSVMProbe(C=0.5).fit(X, y)
    assert fixed.chosen_C_ == 0.5 and fixed.cv_scores_ == {}
    assert np.mean(LinearSVMProbe(C=0.5).fit(X, y).predict(X) == y) == 1.0
    with pytest.raises(ValueError):
        LinearSVMProbe(C=0)
    with pytest.raises(ValueError):
        LinearSVMProbe(C_grid=[-1.0])


def test_svm_C_search_equals_a_hand_written_inner_cv():
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from eval.probes import LinearSVMProbe
    from eval.probes.base import inner_splits

    X, y = _blobs(15, 3, spread=0.6, seed=7)  # overlapping: the scores differ between C
    grid = [1e-4, 1e-2, 1.0]
    probe = LinearSVMProbe(C_grid=grid, seed=4).fit(X, y)
    Xs = StandardScaler().fit(X).transform(X)
    expected = {}
    for C in grid:
        scores = [balanced_accuracy(y[va], LinearSVC(C=C, max_iter=5000, random_state=4).fit(Xs[tr], y[tr])
                                    .predict(Xs[va])) for tr, va in inner_splits(y, 4, "t")]
        expected[C] = float(np.mean(scores))
    assert probe.cv_scores_ == pytest.approx(expected, abs=1e-12)
    assert probe.chosen_C_ == grid[int(np.argmax([expected[C] for C in grid]))]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_weighted_knn_matches_sklearn_distance_weights(metric, k):
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(k)
    X = rng.normal(size=(80, 6))
    y = rng.choice(["a", "b", "c", "d"], size=80)
    Q = rng.normal(size=(50, 6))
    ours = KNNProbe(k, metric=metric, weights="distance").fit(X, y).predict(Q)
    ref = KNeighborsClassifier(n_neighbors=k, weights="distance", metric=metric, algorithm="brute").fit(X, y)
    np.testing.assert_array_equal(ours, ref.predict(Q))
    assert KNNProbe(k, weights="distance").name == f"wknn_k{k}"


def test_weighted_knn_exact_match_votes_alone():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [1.1, 0.0], [0.9, 0.0]])
    y = np.array(["exact", "near", "near", "near"])
    probe = KNNProbe(4, metric="euclidean", weights="distance").fit(X, y)
    assert list(probe.predict(np.array([[0.0, 0.0], [0.8, 0.0]]))) == ["exact", "near"]


def test_weighted_knn_probe_chooses_k_on_training_rows():
    from eval.probes import DEFAULT_K_GRID, WeightedKNNProbe

    X, y = _blobs(15, 3, spread=1.0, seed=5)
    a = WeightedKNNProbe(seed=1, metric="euclidean").fit(X, y)
    b = WeightedKNNProbe(seed=1, metric="euclidean").fit(X, y)
    assert a.chosen_k_ == b.chosen_k_ and a.cv_scores_ == b.cv_scores_
    assert list(a.cv_scores_) == list(DEFAULT_K_GRID) and a.chosen_k_ in DEFAULT_K_GRID
    best = max(a.cv_scores_.values())
    assert a.chosen_k_ == min(k for k, s in a.cv_scores_.items() if s == best)
    # The inner-CV scores equal refitting KNNProbe(k, weights="distance") on each inner fold.
    from eval.probes.base import inner_splits

    for k in DEFAULT_K_GRID:
        scores = [balanced_accuracy(y[va], KNNProbe(k, metric="euclidean", weights="distance")
                                    .fit(X[tr], y[tr]).predict(X[va])) for tr, va in inner_splits(y, 1, "t")]
        assert a.cv_scores_[k] == pytest.approx(np.mean(scores), abs=1e-12), k
    np.testing.assert_array_equal(
        a.predict(X), KNNProbe(a.chosen_k_, metric="euclidean", weights="distance").fit(X, y).predict(X))
    with pytest.raises(ValueError):
        WeightedKNNProbe(k_grid=[0, 3])


def test_run_probes_records_chosen_C_and_k():
    from eval.probes import LinearSVMProbe, WeightedKNNProbe

    X, y = _blobs(12, 3, spread=2.0, seed=6)
    classes = sorted(set(y))
    result = run_probes(X, y, classes, [LinearSVMProbe(), WeightedKNNProbe()], stratified_folds(y, 2, seed=0))
    assert set(result.predictions) == {"svm", "wknn"}
    assert all("chosen_C" in info and "converged" in info for info in result.fit_info["svm"])
    assert all("chosen_k" in info and "chosen_C" not in info for info in result.fit_info["wknn"])
