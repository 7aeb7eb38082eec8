"""The domain-generalisation probe (eval.probes.dg.DGProbe, issue 21)."""
from __future__ import annotations

import numpy as np
import pytest

from eval.probes.dg import DG_METHODS, DGProbe
from eval.probes.base import balanced_accuracy


def _three_domains(seed: int, n: int = 200, cast: float = 1.5):
    """Three classes, 8 features: 4 class-dependent (class means 2.5 * e_y, noise 1) and 4
    "colour" features that carry the domain's cast only (cast 0, 0.75, -0.75 per feature,
    noise 1). The two source domains lean to opposite classes (priors 0.7/0.2/0.1 and
    0.1/0.2/0.7), so in training the cast predicts the class: a shortcut that ERM takes
    and that fails on the balanced held-out domain, whose cast lies beyond domain 0's."""
    rng = np.random.default_rng(seed)
    means = np.eye(3, 4) * 2.5
    casts = (0.0, cast / 2, -cast / 2)
    priors = ((0.7, 0.2, 0.1), (0.1, 0.2, 0.7), (1 / 3, 1 / 3, 1 / 3))
    X, y, d = [], [], []
    for dom in range(3):
        labels = rng.choice(3, size=n, p=priors[dom])
        X.append(np.hstack([means[labels] + rng.normal(size=(n, 4)), casts[dom] + rng.normal(size=(n, 4))]))
        y.append(labels)
        d.append(np.full(n, dom))
    return np.vstack(X), np.concatenate(y), np.concatenate(d)


def _held_out_score(method: str, seed: int, **kwargs) -> float:
    X, y, d = _three_domains(seed)
    train, test = d < 2, d == 2
    probe = DGProbe(method, hidden=32, epochs=15, seed=seed, **kwargs).fit(X[train], y[train], d[train])
    return balanced_accuracy(y[test].astype(str), probe.predict(X[test]))


@pytest.mark.parametrize("seed", [0, 1])
def test_boda_and_coral_beat_erm_on_the_held_out_domain(seed):
    # Held-out balanced accuracy (chance 0.333), measured with these settings, seeds 0-4:
    #   ERM                      0.536 0.762 0.610 0.499 0.537
    #   CORAL                    0.640 0.834 0.695 0.544 0.692   gain >= 0.045
    #   BoDA (released form)     0.800 0.840 0.823 0.583 0.748   gain >= 0.078
    #   BoDA, no macro term      0.765 0.849 0.800 0.570 0.728   gain >= 0.071
    #   (BoDA+ 0.812 0.813 0.897 0.776 0.678; DANN 0.423 0.737 0.651 0.379 0.472: no gain,
    #   as in the paper's Table 2, so not asserted.)
    # Asserted margins, about half the smallest gain seen: 0.02 for CORAL, 0.035 for BoDA.
    erm = _held_out_score("erm", seed)
    assert _held_out_score("coral", seed) > erm + 0.02
    assert _held_out_score("boda", seed) > erm + 0.035
    assert _held_out_score("boda", seed, macro=0.0) > erm + 0.035


def test_every_method_is_deterministic_and_predicts_known_classes():
    X, y, d = _three_domains(5, n=60)
    names = np.array(["neutrophil", "eosinophil", "lymphocyte"])[y]
    for method in DG_METHODS:
        a = DGProbe(method, hidden=16, epochs=2, seed=3).fit(X, names, d)
        b = DGProbe(method, hidden=16, epochs=2, seed=3).fit(X, names, d)
        pa = a.predict_proba(X)
        assert np.array_equal(pa, b.predict_proba(X)), method
        assert pa.shape == (len(X), 3) and np.allclose(pa.sum(1), 1.0)
        assert set(a.predict(X)) <= set(names) and list(a.classes_) == sorted(set(names))


def test_boda_plus_retrains_only_the_classifier():
    X, y, d = _three_domains(6, n=60)
    boda = DGProbe("boda", hidden=16, epochs=3, seed=2).fit(X, y, d)
    plus = DGProbe("boda+", hidden=16, epochs=3, seed=2).fit(X, y, d)
    for p, q in zip(boda.encoder_.parameters(), plus.encoder_.parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy())
    assert not np.array_equal(boda.classifier_.weight.detach().numpy(), plus.classifier_.weight.detach().numpy())


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        DGProbe("irm")


def test_dg_probes_run_from_the_command_line_on_held_out_domains(tmp_path, capsys):
    """--extra-probes dg_* with --split leave-one-group-out: every image tested once, each DG
    probe in metrics.json and predictions.csv with its settings; with kfold: exit 2, one line."""
    import csv
    import json

    from dinov2_hier.data import write_synthetic_dataset
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.paths import PROJECT_ROOT
    from eval.run import main

    tree = Hierarchy.from_json(str(PROJECT_ROOT / "hierarchies" / "synthetic.json"))
    rows = []
    for group, seed in (("a", 1), ("b", 2)):
        manifest = write_synthetic_dataset(tmp_path / group, 3 * tree.num_leaves, tree, image_size=32, seed=seed)
        with open(manifest) as f:
            for row in csv.DictReader(f):
                rows.append({"path": str((manifest.parent / row["path"]).resolve()), "label": row["label"],
                             "dataset": group})
    pooled = tmp_path / "pooled.csv"
    with open(pooled, "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "dataset"])
        writer.writeheader()
        writer.writerows(rows)
    common = ["--ckpt", "baseline:colour", "--data", str(pooled), "--hierarchy",
              str(PROJECT_ROOT / "hierarchies" / "synthetic.json"), "--num-workers", "0", "--no-progress",
              "--no-cache", "--no-report", "--folds", "2", "--k", "1", "--extra-probes", "dg_erm", "dg_boda+"]
    assert main(common + ["--split", "leave-one-group-out", "--output-dir", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"dg_erm", "dg_boda_plus"} <= set(metrics["probes"])
    assert metrics["settings"]["dg_boda_plus"]["method"] == "boda+"
    with open(tmp_path / "out" / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and all(r["dg_erm"] and r["dg_boda_plus"] for r in table)
    assert main(common + ["--output-dir", str(tmp_path / "kfold")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--extra-probes dg_erm trains on domains" in err[-1]
