"""Embedding guides and the guided terms of Gräbel et al. (issue 22), the triplet baseline.

Expected values are computed by hand in the comments; the embeddings are fed straight in
(``projection_dim=0``: the term's embedding is the CLS token itself).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from dinov2_hier.errors import UserError
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses import (
    SUPERVISED_TERMS,
    GuideError,
    SupervisedConfigError,
    build_supervised_terms,
    generate_guide,
    growing_dims,
    load_guide,
    set_supervised_epoch,
)
from dinov2_hier.losses.guide import angular_sectors
from dinov2_hier.losses.guided import GuideDistanceTerm, Guide2DTerm, TripletTerm
from dinov2_hier.paths import PROJECT_ROOT

# root -> p -> {p1, p2}, q -> {q1, q2}
TREE = {
    "name": "pq",
    "root": {
        "id": "root",
        "children": [
            {"id": "p", "children": [{"id": "p1"}, {"id": "p2"}]},
            {"id": "q", "children": [{"id": "q1"}, {"id": "q2"}]},
        ],
    },
}
# The guide for p1, p2, q1; q2 is never a target here.
GUIDE = {"p1": [0.0, 0.0], "p2": [2.0, 0.0], "q1": [0.0, 1.0], "q2": [5.0, 5.0]}


@pytest.fixture(scope="module")
def tree() -> Hierarchy:
    return Hierarchy.from_dict(TREE)


@pytest.fixture(scope="module")
def wbc() -> Hierarchy:
    return Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "wbc.json")


def idx(h: Hierarchy, *names: str | None) -> torch.Tensor:
    return torch.tensor([-1 if n is None else h.index(n) for n in names])


def moved(guide: dict, angle_deg: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> dict:
    """The guide rotated by ``angle_deg`` about the origin, then translated by ``shift``."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return {k: [c * x - s * y + shift[0], s * x + c * y + shift[1]] for k, (x, y) in guide.items()}


def rotate_rows(p: torch.Tensor, angle_deg: float, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Rotate (then shift) the first two columns of ``p``."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    out = p.clone()
    out[:, 0] = c * p[:, 0] - s * p[:, 1] + shift[0]
    out[:, 1] = s * p[:, 0] + c * p[:, 1] + shift[1]
    return out


# --------------------------------------------------------------------------- guide_distance (eq. 2)

# Three labelled rows and a fourth, unlabelled one far away (it must not count).
P3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [7.0, -9.0]])


def test_guide_distance_matches_equation_2(tree: Hierarchy) -> None:
    term = GuideDistanceTerm(tree, 2, guide=GUIDE, projection_dim=0, norm_weight=0.0)
    loss = term(P3, idx(tree, "p1", "p2", "q1", None))
    # Prediction L1 distances: d01 = 1, d02 = 2, d12 = 1 + 2 = 3.
    # Guide L1 distances:      g01 = 2, g02 = 1, g12 = 2 + 1 = 3.
    # |d - g| = 1, 1, 0. Eq. 2 multiplies the sum over the b (b - 1) / 2 = 3 pairs i < j by
    # 2 / (b (b - 1)) = 2 / 6 with b = 3 labelled rows: the mean over the pairs.
    assert loss.item() == pytest.approx(2 / 6 * (1 + 1 + 0), abs=1e-6)
    assert loss.item() == pytest.approx(0.666667, abs=1e-6)


def test_guide_distance_adds_the_norm_term(tree: Hierarchy) -> None:
    term = GuideDistanceTerm(tree, 2, guide=GUIDE, projection_dim=0)  # norm_weight 0.001
    loss = term(P3, idx(tree, "p1", "p2", "q1", None))
    # + 0.001 x mean L2 norm of the labelled rows: (0 + 1 + 2) / 3 = 1.
    assert loss.item() == pytest.approx(2 / 3 + 0.001 * 1.0, abs=1e-6)


def test_guide_distance_invariances(tree: Hierarchy) -> None:
    targets = idx(tree, "p1", "p2", "q1", None)

    def value(guide: dict, p: torch.Tensor = P3) -> float:
        return GuideDistanceTerm(tree, 2, guide=guide, projection_dim=0, norm_weight=0.0)(p, targets).item()

    base = value(GUIDE)
    # Only differences of guide points enter: any translation of the guide is invisible.
    assert value(moved(GUIDE, shift=(3.0, -1.5))) == pytest.approx(base, abs=1e-6)
    # L1 distances are kept by rotations by multiples of 90 degrees (they permute and
    # negate coordinates), so those rotations (+ translation) of the guide change nothing.
    assert value(moved(GUIDE, 90.0, (3.0, -1.5))) == pytest.approx(base, abs=1e-6)
    assert value(moved(GUIDE, 180.0)) == pytest.approx(base, abs=1e-6)
    # Rotations of the embedding by 90 degrees / translations of it: also invisible.
    assert value(GUIDE, rotate_rows(P3, 90.0, (4.0, 4.0))) == pytest.approx(base, abs=1e-6)
    # NOT invariant: a general rotation (L1 is not rotation invariant). At 45 degrees
    # g12 = |(0,1) - (2,0)| rotated = sqrt(2) * 2 = 2.828427 instead of 3, etc.
    assert abs(value(moved(GUIDE, 45.0)) - base) > 0.05


def test_guide_distance_ignores_unlabelled_rows_and_empty_batches(tree: Hierarchy) -> None:
    term = GuideDistanceTerm(tree, 2, guide=GUIDE, projection_dim=0, norm_weight=0.0)
    far = P3.clone()
    far[3] = torch.tensor([1e4, -1e4])
    assert term(far, idx(tree, "p1", "p2", "q1", None)).item() == pytest.approx(2 / 3, abs=1e-6)
    # One labelled row: no pair, loss exactly 0.
    assert term(P3, idx(tree, "p1", None, None, None)).item() == 0.0
    assert term(P3, idx(tree, None, None, None, None)).item() == 0.0


# --------------------------------------------------------------------------- guide2d


def test_guide2d_matches_hand_value(tree: Hierarchy) -> None:
    term = Guide2DTerm(tree, 3, guide=GUIDE, projection_dim=0)
    rows = torch.tensor([[1.0, 2.0, 3.0], [50.0, 50.0, 50.0]])
    loss = term(rows, idx(tree, "p1", None))  # row 1 unlabelled: ignored
    # L1 of (1, 2) to (0, 0) = 3, + 0.001 x ||(1, 2, 3)||_2 = 0.001 x sqrt(14).
    assert loss.item() == pytest.approx(3 + 0.001 * math.sqrt(14), abs=1e-6)
    assert loss.item() == pytest.approx(3.003742, abs=1e-6)


def test_guide2d_coarse_label_uses_its_own_point(tree: Hierarchy) -> None:
    term = Guide2DTerm(tree, 3, guide=GUIDE, projection_dim=0, norm_weight=0.0)
    rows = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    # p is not in GUIDE: the mean of its children p1 (0, 0) and p2 (2, 0) = (1, 0).
    # Row 0: |1 - 1| + |2 - 0| = 2; row 1 (label p1 at (0, 0)): 0. Mean 1.
    assert term(rows, idx(tree, "p", "p1")).item() == pytest.approx(1.0, abs=1e-6)


def test_guide2d_invariances(tree: Hierarchy) -> None:
    rows = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    targets = idx(tree, "p2", "q1")

    def value(guide: dict, p: torch.Tensor) -> float:
        return Guide2DTerm(tree, 3, guide=guide, projection_dim=0, norm_weight=0.0)(p, targets).item()

    base = value(GUIDE, rows)
    # (1,2) vs p2 (2,0): 1 + 2 = 3; (-1, 0.5) vs q1 (0, 1): 1 + 0.5 = 1.5; mean 2.25.
    assert base == pytest.approx(2.25, abs=1e-6)
    # guide2d fixes absolute positions: moving the guide alone changes the loss ...
    assert abs(value(moved(GUIDE, shift=(1.0, 1.0)), rows) - base) > 0.1
    # ... moving guide and embedding together does not (translation; 90-degree rotations,
    # which keep L1 distances) ...
    assert value(moved(GUIDE, shift=(1.0, -2.0)), rotate_rows(rows, 0.0, (1.0, -2.0))) == pytest.approx(base, abs=1e-6)
    assert value(moved(GUIDE, 90.0, (1.0, -2.0)), rotate_rows(rows, 90.0, (1.0, -2.0))) == pytest.approx(base, abs=1e-6)
    # ... but a general joint rotation does (L1 is not rotation invariant).
    assert abs(value(moved(GUIDE, 45.0), rotate_rows(rows, 45.0)) - base) > 0.05
    # The norm term is not part of any invariance: it pulls the embedding to the origin.


# --------------------------------------------------------------------------- growing embedding


def test_growing_schedule() -> None:
    assert [growing_dims(epoch, 64) for epoch in range(6)] == [2, 2, 2, 3, 4, 5]
    assert [growing_dims(epoch, 64) for epoch in (63, 64, 65, 1000)] == [63, 64, 64, 64]
    # The paper's 1024-dim runs grow by 4 per epoch.
    assert [growing_dims(epoch, 1024, growth=4) for epoch in range(5)] == [2, 4, 8, 12, 16]
    assert growing_dims(0, 64, growth=0) == 64  # schedule off
    with pytest.raises(ValueError):
        growing_dims(-1, 64)


def test_growing_term_uses_first_n_dims(tree: Hierarchy) -> None:
    term = GuideDistanceTerm(tree, 3, guide=GUIDE, projection_dim=0, norm_weight=0.0, growth=1)
    rows = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    targets = idx(tree, "p1", "p2", "q1", None)
    # Epochs 0-2: two dims, the third column is masked: the 2-D value 2/3.
    assert term(rows, targets).item() == pytest.approx(2 / 3, abs=1e-6)
    term.set_epoch(2)
    assert term(rows, targets).item() == pytest.approx(2 / 3, abs=1e-6)
    set_supervised_epoch({"g": term}, 3)
    assert int(term.dims) == 3
    # Three dims: d01 = 1 + 5 = 6 (g 2), d02 = 2 + 5 = 7 (g 1), d12 = 3 (g 3): (4 + 6 + 0) / 3.
    assert term(rows, targets).item() == pytest.approx(10 / 3, abs=1e-5)


# --------------------------------------------------------------------------- triplet

X4 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])


def test_triplet_batch_hard_matches_hand_value(tree: Hierarchy) -> None:
    term = TripletTerm(tree, 2, margin=1.5, projection_dim=0, norm_weight=0.0)
    # Euclidean: d01 = 1, d02 = 2, d03 = 3, d12 = sqrt 5, d13 = 2, d23 = sqrt 13.
    # Anchor 0 (class p1): hardest positive 1, hardest negative min(2, 3) = 2 -> 1 - 2 + 1.5 = 0.5
    # Anchor 1: 1, min(sqrt 5, 2) = 2 -> 0.5
    # Anchor 2 (q1): sqrt 13, min(2, sqrt 5) = 2 -> sqrt 13 - 0.5; anchor 3: sqrt 13, min(3, 2) = 2 -> same.
    # Mean: (0.5 + 0.5 + 2 sqrt 13 - 1) / 4 = sqrt 13 / 2.
    loss = term(X4, idx(tree, "p1", "p1", "q1", "q1"))
    assert loss.item() == pytest.approx(math.sqrt(13) / 2, abs=1e-6)


def test_triplet_ignores_unlabelled_and_coarse_rows(tree: Hierarchy) -> None:
    term = TripletTerm(tree, 2, margin=1.5, projection_dim=0, norm_weight=0.0)
    # Row 3 out: anchors 0 and 1 (row 2 has no positive left).
    # Anchor 0: 1 - min(2) + 1.5 = 0.5; anchor 1: 1 - sqrt 5 + 1.5. Mean (3 - sqrt 5) / 2.
    expected = (3 - math.sqrt(5)) / 2
    assert term(X4, idx(tree, "p1", "p1", "q1", None)).item() == pytest.approx(expected, abs=1e-6)
    # An internal-node label (q) is dropped like -1 (as in supcon).
    assert term(X4, idx(tree, "p1", "p1", "q1", "q")).item() == pytest.approx(expected, abs=1e-6)
    # No negative in the batch: exactly 0.
    assert term(X4, idx(tree, "p1", "p1", None, None)).item() == 0.0


def test_triplet_norm_term_and_margin(tree: Hierarchy) -> None:
    term = TripletTerm(tree, 2, margin=0.0, projection_dim=0)  # norm_weight 0.001
    # Margin 0: anchors 0 and 1 give relu(1 - 2) = 0; anchors 2, 3 give sqrt 13 - 2.
    # Norm term: 0.001 x mean(0, 1, 2, 3) = 0.0015.
    expected = 2 * (math.sqrt(13) - 2) / 4 + 0.0015
    assert term(X4, idx(tree, "p1", "p1", "q1", "q1")).item() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- gradients, registry


@pytest.mark.parametrize("name", ["guide2d", "guide_distance", "triplet"])
def test_gradients_are_finite_with_equal_and_zero_rows(tree: Hierarchy, name: str) -> None:
    torch.manual_seed(0)
    extra = {"growth": 1} if name == "guide_distance" else {}
    term = SUPERVISED_TERMS[name](tree, 8, projection_dim=4, head="mlp", hidden_dim=16, **extra)
    tokens = torch.randn(6, 8)
    tokens[1] = tokens[0]  # equal rows: distance 0
    tokens = tokens.requires_grad_(True)
    loss = term(tokens, idx(tree, "p1", "p1", "q1", "p", "q2", None))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(tokens.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in term.parameters() if p.grad is not None)
    # A zero embedding (norm 0) with projection 0: still finite.
    plain = SUPERVISED_TERMS[name](tree, 2, projection_dim=0)
    zeros = torch.zeros(4, 2, requires_grad=True)
    plain(zeros, idx(tree, "p1", "p1", "q1", "q1")).backward()
    assert torch.isfinite(zeros.grad).all()


def test_registry_builds_the_guided_terms(wbc: Hierarchy) -> None:
    entries = [
        {"name": "guide2d", "weight": 1.0},
        {"name": "guide_distance", "weight": 0.5, "growth": 1, "projection_dim": 16},
        {"name": "triplet", "margin": 0.3, "head": "mlp", "hidden_dim": 32},
    ]
    terms, weights = build_supervised_terms(entries, wbc, embed_dim=24)
    assert list(terms) == ["guide2d", "guide_distance", "triplet"]
    assert weights == {"guide2d": 1.0, "guide_distance": 0.5, "triplet": 1.0}
    assert terms["guide2d"].n_max == 64 and int(terms["guide2d"].dims) == 64
    assert int(terms["guide_distance"].dims) == 2
    set_supervised_epoch(terms, 5)
    assert int(terms["guide_distance"].dims) == 5 and int(terms["guide2d"].dims) == 64
    assert terms["guide2d"].guide.shape == (wbc.num_nodes, 2)
    # Buffers are non-persistent: checkpoints keep the keys of the heads only.
    assert not any(k.endswith((".dims", ".guide", ".is_leaf")) for k in terms.state_dict())
    with pytest.raises(ValueError, match=r"targets must be indices in \[0, 50\)"):
        terms["triplet"](torch.zeros(2, 24), torch.tensor([50]))
    with pytest.raises(SupervisedConfigError, match="margin must be a finite number"):
        build_supervised_terms([{"name": "triplet", "margin": -1}], wbc, 24)
    with pytest.raises(SupervisedConfigError, match="at least 2 dimensions"):
        build_supervised_terms([{"name": "guide2d", "projection_dim": 1}], wbc, 24)


# --------------------------------------------------------------------------- guide files


def test_guide_file_is_read_and_internal_nodes_filled(tree: Hierarchy, tmp_path) -> None:
    path = tmp_path / "guide.json"
    path.write_text(json.dumps({**GUIDE, "q": [9, 9]}))
    guide = load_guide(path, tree)
    assert guide["p"] == (1.0, 0.0)  # mean of p1, p2
    assert guide["q"] == (9.0, 9.0)  # given
    assert guide["root"] == (5.0, 4.5)  # mean of p (1, 0) and q (9, 9)
    terms, _ = build_supervised_terms([{"name": "guide2d", "guide": str(path)}], tree, 4)
    assert terms["guide2d"].guide[tree.index("q")].tolist() == [9.0, 9.0]


@pytest.mark.parametrize(
    "document, match",
    [
        ({**GUIDE, "p3": [1, 1]}, r"guide.json:6: unknown node id 'p3'.*did you mean .*'p1'"),
        ({**GUIDE, "q1": [1, "x"]}, r"guide.json:4: guide point of node 'q1' must be \[x, y\]"),
        ({**GUIDE, "q1": [1, 2, 3]}, r"guide point of node 'q1'"),
        ({k: v for k, v in GUIDE.items() if k != "p2"}, r"guide.json: the embedding guide has no point for leaf 'p2'"),
        ([[0, 0]], r"must be a JSON object"),
    ],
)
def test_bad_guide_files_name_file_line_and_node(tree: Hierarchy, tmp_path, document, match: str) -> None:
    path = tmp_path / "guide.json"
    # One key per line: line 1 is "{", the first node line 2.
    text = json.dumps(document) if not isinstance(document, dict) else (
        "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in document.items()) + "\n}\n"
    )
    path.write_text(text)
    with pytest.raises(GuideError, match=match) as info:
        load_guide(path, tree)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)  # one line, exit code 2
    with pytest.raises(SupervisedConfigError, match=match.split(":", 2)[-1].strip()):
        build_supervised_terms([{"name": "guide_distance", "guide": str(path)}], tree, 4)


# --------------------------------------------------------------------------- the generated wbc guide


def _angle(point: tuple[float, float]) -> float:
    return math.atan2(point[1], point[0]) % (2 * math.pi)


def _gap(a: float, b: float) -> float:
    d = abs(a - b) % (2 * math.pi)
    return min(d, 2 * math.pi - d)


def test_generated_wbc_guide(wbc: Hierarchy) -> None:
    guide = generate_guide(wbc)
    assert generate_guide(wbc) == guide  # deterministic
    assert list(guide) == wbc.nodes
    # Every node gets its own point; radius = depth.
    points = [tuple(round(v, 9) for v in guide[n]) for n in wbc.nodes]
    assert len(set(points)) == wbc.num_nodes
    for node in wbc.nodes:
        assert math.hypot(*guide[node]) == pytest.approx(wbc.depth(node), abs=1e-9)
    # Angles: 28 leaves, each leaf's sector is 360/28 = 12.857 degrees wide, leaves in file order.
    step = 2 * math.pi / wbc.num_leaves
    for i, leaf in enumerate(wbc.leaves):
        assert _angle(guide[leaf]) == pytest.approx((i + 0.5) * step, abs=1e-9)
    # Every node's angle lies in its parent's sector.
    sectors = angular_sectors(wbc)
    for node in wbc.nodes:
        parent = wbc.parent(node)
        if parent is not None and wbc.depth(node) > 0:
            start, end = sectors[parent]
            assert start <= 0.5 * sum(sectors[node]) <= end


def test_generated_wbc_guide_keeps_siblings_together(wbc: Hierarchy) -> None:
    guide = generate_guide(wbc)
    angle = {n: _angle(guide[n]) for n in wbc.nodes if n != wbc.root}
    deg = math.degrees
    # Band and segmented neutrophils: neighbours (one leaf step, 12.857 deg); to the typical
    # eosinophil (same maturity node, other cell type) 2 steps; to a typical lymphocyte
    # (other lineage) 6 steps = 77.14 deg.
    assert deg(_gap(angle["neutrophil_band"], angle["neutrophil_segmented"])) == pytest.approx(360 / 28, abs=1e-9)
    assert deg(_gap(angle["neutrophil_band"], angle["eosinophil_typical"])) == pytest.approx(2 * 360 / 28, abs=1e-9)
    assert deg(_gap(angle["neutrophil_band"], angle["lymphocyte_typical"])) == pytest.approx(6 * 360 / 28, abs=1e-9)
    # The six lineages sit at 19.29, 109.29, 186.43, 231.43, 282.86, 302.14 and the
    # unclassified branch at 334.29 degrees.
    lineages = [round(deg(angle[n]), 2) for n in wbc.nodes_at_depth(1)]
    assert lineages == [19.29, 109.29, 186.43, 231.43, 282.86, 302.14, 334.29]
    # On average over every group of >= 2 siblings below a lineage, siblings are closer in
    # angle than a sibling and a node outside the parent's subtree (the lineages themselves
    # are spread over the circle on purpose).
    sibling, other = [], []
    for parent in wbc.internal_nodes:
        kids = wbc.children(parent)
        if len(kids) < 2 or parent == wbc.root:
            continue
        inside = {parent, *kids}
        stack = list(kids)
        while stack:
            node = stack.pop()
            inside.add(node)
            stack.extend(wbc.children(node))
        outside = [n for n in angle if n not in inside and not (set(wbc.ancestors(parent)) & {n})]
        sibling += [_gap(angle[a], angle[b]) for i, a in enumerate(kids) for b in kids[i + 1:]]
        other += [_gap(angle[a], angle[n]) for a in kids for n in outside]
    mean_sibling, mean_other = deg(sum(sibling) / len(sibling)), deg(sum(other) / len(other))
    # 30 sibling pairs at 24.0 degrees on average; 1456 (sibling, outsider) pairs at 102.58.
    assert (len(sibling), len(other)) == (30, 1456)
    assert mean_sibling == pytest.approx(24.0, abs=1e-6)
    assert mean_other == pytest.approx(102.583, abs=1e-3)
    assert mean_sibling < 0.5 * mean_other


def test_the_trainer_tells_the_growing_terms_the_epoch(tmp_path) -> None:
    """A tiny run with epochs of one iteration: after iterations 0..4 the growing term uses
    growing_dims(4, 8, growth=1) = 4 dimensions (2 until the trainer tells it the epoch)."""
    from dinov2_hier.config import load_config
    from dinov2_hier.data import write_synthetic_dataset
    from dinov2_hier.train.loop import Trainer
    from tests.conftest import TINY_OVERRIDES

    synthetic = str(PROJECT_ROOT / "hierarchies" / "synthetic.json")
    tree = Hierarchy.from_json(synthetic)
    manifest = write_synthetic_dataset(tmp_path / "cells", 16, tree, image_size=40, seed=3)
    trainer = Trainer(load_config(None, TINY_OVERRIDES + [
        "train.iterations=5", "train.epoch_length=1", "train.checkpoint_every=5", f"data.train=[{manifest}]",
        f"supervision.hierarchy={synthetic}",
        "supervision.losses=[{name: guide_distance, weight: 0.5, growth: 1, projection_dim: 8}]",
    ]), tmp_path / "run")
    trainer.run()
    term = trainer.model.supervised["guide_distance"]
    assert term.epoch == 4 and int(term.dims) == growing_dims(4, 8, growth=1) == 4
