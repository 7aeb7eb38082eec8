"""BoDA as a pretraining supervised term (losses/boda_term.py, issue 21 item 3b): hand cases,
the domain vocabulary, a two-source tiny CPU run with a resume, and config errors (exit 2)."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from omegaconf import OmegaConf

from dinov2_hier.config import ConfigError, load_config
from dinov2_hier.data import write_synthetic_dataset
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses import build_supervised_terms
from dinov2_hier.losses.domain import boda_loss
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.__main__ import main as train_main
from dinov2_hier.train.checkpoint import list_checkpoints, load_checkpoint
from dinov2_hier.train.loop import Trainer
from dinov2_hier.train.supervision import Supervision, resolve_domains

SYNTHETIC = PROJECT_ROOT / "hierarchies" / "synthetic.json"
KEYS = ("supervised.boda.centroids.centroids", "supervised.boda.centroids.counts", "supervised.boda.centroids.step")


def _hierarchy():
    return Hierarchy.from_json(SYNTHETIC)


def _issue_term(**options):
    """The issue's 1-D case: leaves 0 (c0) and 1 (c1), domains d0, d1; centroids (d0,c0)=0
    (its value is never read: the own pair leaves the denominator), (d1,c0)=1, (d0,c1)=4,
    (d1,c1)=5; counts N(d0,c0)=4, N(d1,c0)=1, N(d0,c1)=2, N(d1,c1)=8 (mean 3.75)."""
    terms, _ = build_supervised_terms([{"name": "boda", **options}], _hierarchy(), 1, domains=["d0", "d1"])
    term = terms["boda"]
    term.centroids.centroids[:, :2, 0] = torch.tensor([[0.0, 4.0], [1.0, 5.0]])
    term.centroids.counts[:, :2] = torch.tensor([[4.0, 2.0], [1.0, 8.0]])
    return term


def test_term_on_the_issue_case_equals_boda_loss_and_the_hand_numbers():
    cls = torch.zeros(2, 1)  # one image, z = 0 in both crops, from (d0, c0)
    targets, domains = torch.tensor([0]), torch.tensor([0])
    paper = _issue_term(form="paper", nu=0).eval()
    # paper form with nu = 0 (the issue's equal-counts case: every calibration weight 1): per
    # sample 1 + log(e^-1 + e^-4 + e^-5) = 0.065884 (the issue's number), summed over the 2 crop rows
    assert paper(cls, targets, domains=domains).item() == pytest.approx(2 * 0.065884, abs=2e-6)
    released = _issue_term().eval()
    # released form on counts / 3.75: the issue's logits -0.125, -0.7071, -1.7678 times 3.75
    l1, l2, l3 = -0.5 * 1 / (4 / 3.75), -math.sqrt(2 / 4) * 4 / (4 / 3.75), -math.sqrt(8 / 4) * 5 / (4 / 3.75)
    assert l1 == pytest.approx(-0.46875) and l2 == pytest.approx(-2.651650) and l3 == pytest.approx(-6.629126)
    # e^l: 0.625784, 0.070535, 0.001321; -log p = 0.46875 + log(0.697640) = 0.108698
    hand = -(l1 - math.log(math.exp(l1) + math.exp(l2) + math.exp(l3)))
    assert hand == pytest.approx(0.108698, abs=1e-6)
    value = released(cls, targets, domains=domains)
    assert value.item() == pytest.approx(hand, abs=1e-6)  # a mean over rows: the same for 1 or 2 rows
    direct = boda_loss(cls, torch.tensor([0, 0]), torch.tensor([0, 0]), released.centroids.centroids,
                       released.centroids.counts / 3.75)
    assert value.item() == pytest.approx(direct.item(), abs=1e-7)


def test_coarse_and_unlabelled_rows_are_left_out_and_training_updates_after_the_loss():
    term = _issue_term(macro=0.0)  # training mode
    coarse = _hierarchy().num_leaves  # the first internal node
    cls = torch.tensor([[0.0], [7.0], [-3.0], [0.0], [7.0], [-3.0]])  # crop-major, B = 3
    value = term(cls, torch.tensor([0, coarse, -1]), domains=torch.tensor([0, 1, 1]))
    assert value.item() == pytest.approx(0.108698, abs=1e-6)  # only the leaf rows (z = 0, (d0, c0))
    # then the update: the two leaf rows joined (d0, c0) (momentum 0.9 on its old value 0)
    assert term.centroids.counts[:, :2].tolist() == [[6.0, 2.0], [1.0, 8.0]]
    assert term.centroids.counts.sum().item() == 17.0 and int(term.centroids.step) == 1


def test_level_makes_the_tree_cut_at_that_depth_the_classes():
    terms, _ = build_supervised_terms([{"name": "boda", "level": 2}], _hierarchy(), 3, domains=["a", "b"])
    term = terms["boda"]
    # synthetic.json at depth 2: immature_granulocyte (0), mature_granulocyte (1), immature_lymphoid (2),
    # mature_lymphoid (3), and the depth-2 leaves monocyte (4), erythroblast (5); depth-1 nodes: none
    assert term.num_classes == 6 and tuple(term.centroids.counts.shape) == (2, 6)
    assert term.class_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 5, -1, 0, 1, -1, 2, 3, -1, -1, -1]
    # band_neutrophil (leaf) in a, mature_granulocyte (its depth-2 parent) in b, myeloid (depth 1:
    # left out), unlabelled, monocyte in b
    targets, domains = torch.tensor([3, 13, 11, -1, 9]), torch.tensor([0, 1, 0, 1, 1])
    term(torch.randn(10, 3), targets, domains=domains)
    counts = term.centroids.counts
    assert counts[0, 1] == 2 and counts[1, 1] == 2 and counts[1, 4] == 2 and counts.sum() == 6


def test_a_single_domain_gives_exactly_zero_with_the_graph_connected():
    terms, _ = build_supervised_terms([{"name": "boda", "projection_dim": 4, "head": "linear"}], _hierarchy(), 6,
                                      domains=["a", "b"])
    term = terms["boda"]
    torch.manual_seed(0)
    for _ in range(3):  # three steps of domain "a" only: no centroid of another domain exists
        cls = torch.randn(8, 6, requires_grad=True)
        value = term(cls, torch.tensor([0, 1, 2, 0]), domains=torch.zeros(4, dtype=torch.long))
        assert value.item() == 0.0
        value.backward()
        assert cls.grad is not None and torch.equal(cls.grad, torch.zeros_like(cls))
    assert term.centroids.counts[0, :3].tolist() == [12.0, 6.0, 6.0] and term.centroids.counts[1].sum() == 0


def test_domain_vocabulary_sorted_explicit_and_unknown_names():
    cfg = load_config(None, ["supervision.hierarchy=hierarchies/synthetic.json", "supervision.losses=[{name: boda}]"])
    assert resolve_domains(cfg, [("x", "siteB"), ("y", "siteA"), ("x", "siteB")]) == ["siteA", "siteB"]
    assert list(cfg.supervision.domains) == ["siteA", "siteB"]
    cfg.supervision.domains = ["siteB", "siteA", "spare"]  # explicit order is kept
    assert resolve_domains(cfg, [("x", "siteA")]) == ["siteB", "siteA", "spare"]
    with pytest.raises(ConfigError, match="'siteC'"):
        resolve_domains(cfg, [("x", "siteC")])
    sup = Supervision(_hierarchy(), [], {}, domains=["siteA", "siteB"])
    assert sup.batch_domains(["siteB", "siteA", "siteB"]).tolist() == [1, 0, 1]
    with pytest.raises(ConfigError, match="'elsewhere'"):
        sup.batch_domains(["siteA", "elsewhere"])
    plain = load_config(None, ["supervision.hierarchy=hierarchies/synthetic.json", "supervision.losses=[{name: ce}]"])
    assert resolve_domains(plain, [("x", "siteA")]) is None and plain.supervision.domains is None


@pytest.mark.parametrize("entry, needle", [
    ("{name: boda, nu: -1}", "nu"),
    ("{name: boda, momentum: 1.5}", "momentum"),
    ("{name: boda, form: eq3}", "form"),
    ("{name: boda, every: 0}", "every"),
    ("{name: boda, temperature: 0}", "temperature"),
    ("{name: boda, domains: [a]}", "'domains'"),
    ("{name: boda, level: 0}", "level"),
])
def test_bad_boda_values_exit_2_naming_the_key(tmp_path, capsys, tiny_overrides, entry, needle):
    args = ["--output-dir", str(tmp_path / "run"), *tiny_overrides,
            "supervision.hierarchy=hierarchies/synthetic.json", f"supervision.losses=[{entry}]"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "boda" in err and needle in err


def _two_sources(tmp_path):
    manifests = []
    for name, seed in (("siteA", 1), ("siteB", 2)):
        manifest = write_synthetic_dataset(tmp_path / name, 16, _hierarchy(), image_size=40, seed=seed)
        with open(manifest, newline="") as f:
            rows = list(csv.reader(f))
        for row in rows[1:]:
            row[2] = name  # the dataset column
        with open(manifest, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        manifests.append(str(manifest))
    return manifests


def test_two_source_run_feeds_domains_to_the_term_and_resumes_its_centroids(tmp_path, tiny_overrides, monkeypatch):
    a, b = _two_sources(tmp_path)
    overrides = tiny_overrides + [
        f"data.train=[{a},{b}]", "supervision.hierarchy=hierarchies/synthetic.json",
        "supervision.losses=[{name: hierce, head: linear}, {name: boda, weight: 0.1}]",
        "train.iterations=4", "train.checkpoint_every=2",
        "data.val_fraction=0.25", "train.val_every=2",  # 11 of the 32 held out (per label), validated at 2 and 4
    ]
    from dinov2_hier.losses.boda_term import BodaTerm

    seen: list[list[int]] = []  # the training steps' domains
    validated: list[list[int]] = []  # the validation passes' (under no_grad)
    forward = BodaTerm.forward

    def recording(self, cls_tokens, targets, domains=None):
        (seen if torch.is_grad_enabled() else validated).append(domains.tolist())
        return forward(self, cls_tokens, targets, domains=domains)

    monkeypatch.setattr(BodaTerm, "forward", recording)
    run = tmp_path / "run"
    first = Trainer(load_config(None, overrides), run)
    first.run(stop_at=2)
    assert OmegaConf.load(run / "config.yaml").supervision.domains == ["siteA", "siteB"]
    assert len(seen) == 2 and all(len(d) == 8 and set(d) <= {0, 1} for d in seen)
    ckpt2 = load_checkpoint(list_checkpoints(run)[-1][1])["model"]
    assert int(ckpt2[KEYS[2]]) == 2
    # every labelled synthetic image is at a leaf: 2 crop rows per image go into its domain's counts
    counts = ckpt2[KEYS[1]]
    assert counts.sum(1).tolist() == [2.0 * sum(d.count(0) for d in seen), 2.0 * sum(d.count(1) for d in seen)]
    assert counts[0].sum() > 0 and counts[1].sum() > 0
    cent = ckpt2[KEYS[0]]
    assert (cent[counts > 0].norm(dim=1) > 0).all() and torch.equal(cent[counts == 0], torch.zeros_like(cent[counts == 0]))

    second = Trainer(load_config(None, overrides), run)  # resumes from iteration 2
    state = second.model.state_dict()
    for key in KEYS:
        assert torch.equal(state[key], ckpt2[key]), key
    second.run()
    end = load_checkpoint(list_checkpoints(run)[-1][1])["model"]
    assert int(end[KEYS[2]]) == 4 and len(seen) == 4
    # the validation passes saw domains too, and left no trace in the centroids (restored buffers)
    assert sum(len(d) for d in validated) == 2 * 11 and set(sum(validated, [])) <= {0, 1}
    assert end[KEYS[1]].sum().item() == 4 * 8 * 2
