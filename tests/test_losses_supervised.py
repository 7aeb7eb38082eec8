"""Numerical tests of the supervised losses, their heads and the registry.

Expected values are written out by hand (explicit probabilities and ``math.log``) on
tiny trees, or come from slow double-loop references written here independently of
the vectorised code.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses import (
    SUPERVISED_TERMS,
    DistanceLoss,
    FlatCELoss,
    HierCELoss,
    HierSupConLoss,
    LossInputError,
    MultiLevelCELoss,
    SupConLoss,
    SupervisedConfigError,
    build_supervised_terms,
    class_at_level_table,
    level_classes,
)

# Unbalanced: subtrees of depth 1, 2 and 3 below the root, a leaf (a1) at depth 2 next to
# a subtree of depth 3, and a leaf (c) directly under the root.
#
#   root ── a ── a1
#        │    └─ a2 ── a2x
#        │          └─ a2y
#        ├─ b ── b1
#        │    └─ b2
#        └─ c
UNBALANCED = {
    "name": "unbalanced",
    "root": {
        "id": "root",
        "children": [
            {"id": "a", "children": [{"id": "a1"}, {"id": "a2", "children": [{"id": "a2x"}, {"id": "a2y"}]}]},
            {"id": "b", "children": [{"id": "b1"}, {"id": "b2"}]},
            {"id": "c"},
        ],
    },
}
# Balanced, 4 leaves: root -> {p -> {p1, p2}, q -> {q1, q2}}.
BALANCED = {
    "name": "balanced",
    "root": {
        "id": "root",
        "children": [
            {"id": "p", "children": [{"id": "p1"}, {"id": "p2"}]},
            {"id": "q", "children": [{"id": "q1"}, {"id": "q2"}]},
        ],
    },
}
# Leaf logits for the unbalanced tree, leaves in order a1, a2x, a2y, b1, b2, c.
Z = [1.0, 0.5, -0.5, 0.2, -1.0, 0.3]


@pytest.fixture(scope="module")
def tree() -> Hierarchy:
    return Hierarchy.from_dict(UNBALANCED)


@pytest.fixture(scope="module")
def balanced() -> Hierarchy:
    return Hierarchy.from_dict(BALANCED)


def idx(h: Hierarchy, *names: str) -> torch.Tensor:
    return torch.tensor([-1 if n is None else h.index(n) for n in names], dtype=torch.long)


def hand_probs(z: list[float]) -> dict[str, float]:
    """Leaf and node probabilities of the unbalanced tree from explicit exponentials."""
    e = [math.exp(v) for v in z]
    s = sum(e)
    p = dict(zip(["a1", "a2x", "a2y", "b1", "b2", "c"], [v / s for v in e]))
    p["a2"] = p["a2x"] + p["a2y"]
    p["a"] = p["a1"] + p["a2"]
    p["b"] = p["b1"] + p["b2"]
    p["root"] = 1.0
    return p


def logits(z: list[float] = Z, rows: int = 1) -> torch.Tensor:
    return torch.tensor([z] * rows, dtype=torch.float32)


def test_tree_is_as_drawn(tree: Hierarchy) -> None:
    assert tree.leaves == ["a1", "a2x", "a2y", "b1", "b2", "c"]
    assert tree.nodes[6:] == ["a", "a2", "b", "root"]
    assert tree.max_depth == 3


# --------------------------------------------------------------------------- HierCE


def test_hierce_leaf_target_by_hand(tree: Hierarchy) -> None:
    p, w = hand_probs(Z), [math.exp(-0.5 * d) for d in range(4)]
    # a2x: edges a2->a2x (child depth 3), a->a2 (2), root->a (1).
    expected = (
        -w[3] * math.log(p["a2x"] / p["a2"]) - w[2] * math.log(p["a2"] / p["a"]) - w[1] * math.log(p["a"] / 1.0)
    )
    got = HierCELoss(tree, alpha=0.5)(logits(), idx(tree, "a2x"))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.6425, abs=1e-4)  # 0.0699 + 0.2909 + 0.2816, worked on paper


def test_hierce_internal_target_uses_only_edges_above(tree: Hierarchy) -> None:
    p, w = hand_probs(Z), [math.exp(-0.5 * d) for d in range(4)]
    expected = -w[2] * math.log(p["a2"] / p["a"]) - w[1] * math.log(p["a"])
    got = HierCELoss(tree, alpha=0.5)(logits(), idx(tree, "a2"))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Coarsest label: a single edge.
    got_a = HierCELoss(tree, alpha=0.5)(logits(), idx(tree, "a"))
    assert got_a.item() == pytest.approx(-w[1] * math.log(p["a"]), rel=1e-6)


def test_hierce_unbalanced_and_leaf_under_root(tree: Hierarchy) -> None:
    p, w = hand_probs(Z), [math.exp(-0.5 * d) for d in range(4)]
    loss = HierCELoss(tree, alpha=0.5)
    # a1 is a leaf at depth 2 beside the depth-3 subtree a2: two edges, not three.
    a1 = -w[2] * math.log(p["a1"] / p["a"]) - w[1] * math.log(p["a"])
    assert loss(logits(), idx(tree, "a1")).item() == pytest.approx(a1, rel=1e-6)
    # c hangs under the root: one edge of weight exp(-alpha).
    c = -w[1] * math.log(p["c"])
    assert loss(logits(), idx(tree, "c")).item() == pytest.approx(c, rel=1e-6)
    # Batch: mean over the usable rows only (-1 and the root are unlabelled).
    targets = idx(tree, "a1", None, "c", "root")
    assert loss(logits(rows=4), targets).item() == pytest.approx((a1 + c) / 2, rel=1e-6)


def test_hierce_alpha_zero_is_minus_log_p(tree: Hierarchy) -> None:
    p = hand_probs(Z)
    loss = HierCELoss(tree, alpha=0.0)
    for node in ["a1", "a2x", "a2y", "b1", "b2", "c", "a", "a2", "b"]:
        got = loss(logits(), idx(tree, node)).item()
        assert got == pytest.approx(-math.log(p[node]), rel=1e-6), node
    # Leaves: the telescoped sum is exactly plain cross-entropy.
    z = torch.randn(7, 6)
    t = torch.tensor([0, 1, 2, 3, 4, 5, 1])
    assert torch.allclose(loss(z, t), F.cross_entropy(z, t), atol=1e-6)


def test_hierce_extreme_logits_stay_finite(tree: Hierarchy) -> None:
    z = torch.tensor([[200.0, -200.0, -200.0, -200.0, -200.0, -200.0]], requires_grad=True)
    value = HierCELoss(tree)(z, idx(tree, "a2x"))
    value.backward()
    assert torch.isfinite(value) and value.item() > 100
    assert torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------- flat CE


def test_flat_ce_drops_internal_labels(tree: Hierarchy) -> None:
    torch.manual_seed(0)
    z = torch.randn(6, 6)
    targets = idx(tree, "a1", "a2", "c", None, "b2", "root")
    kept = torch.tensor([0, 2, 4])
    expected = F.cross_entropy(z[kept], targets[kept])
    assert torch.allclose(FlatCELoss(tree)(z, targets), expected, atol=1e-6)


def test_weighted_flat_ce_by_hand() -> None:
    # issue 22: logits [2, 0] label 0 and [0, 0] label 1, class weights (0.5, 1.5):
    # (0.5 * log(1 + e^-2) + 1.5 * log 2) / (0.5 + 1.5) = 0.551592
    two = Hierarchy.from_dict({"name": "two", "root": {"id": "root", "children": [{"id": "x"}, {"id": "y"}]}})
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    targets = idx(two, "x", "y")
    weights = torch.tensor([0.5, 1.5])
    expected = (0.5 * math.log(1 + math.exp(-2)) + 1.5 * math.log(2)) / 2.0
    assert expected == pytest.approx(0.551592, abs=1e-6)
    for class_weights in ([0.5, 1.5], {"y": 1.5, "x": 0.5}):
        loss = FlatCELoss(two, class_weights=class_weights)(z, targets)
        assert float(loss) == pytest.approx(0.551592, abs=1e-6)
        assert torch.allclose(loss, F.cross_entropy(z, targets, weight=weights), atol=1e-7)
    # The registry term takes the same option and applies it to its head's logits.
    terms, _ = build_supervised_terms([{"name": "ce", "head": "linear", "class_weights": [0.5, 1.5]}], two, 4)
    assert torch.equal(terms["ce"].criterion.class_weights, weights)


def test_weighted_flat_ce_matches_torch_and_drops_internal_labels(tree: Hierarchy) -> None:
    torch.manual_seed(1)
    z = torch.randn(7, 6)
    targets = idx(tree, "a1", "a2", "c", None, "b2", "root", "a2x")
    weights = torch.tensor([0.2, 1.0, 3.0, 0.7, 1.1, 2.5])
    kept = torch.tensor([0, 2, 4, 6])
    expected = F.cross_entropy(z[kept], targets[kept], weight=weights)
    assert torch.allclose(FlatCELoss(tree, class_weights=weights.tolist())(z, targets), expected, atol=1e-6)
    # All-ones weights are the unweighted loss.
    assert torch.allclose(FlatCELoss(tree, class_weights=[1.0] * 6)(z, targets), FlatCELoss(tree)(z, targets))
    # Nothing usable: an exact 0 that still has a graph.
    z.requires_grad_(True)
    empty = FlatCELoss(tree, class_weights=weights.tolist())(z, idx(tree, *[None] * 7))
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.all(z.grad == 0)


def test_class_weight_errors_and_balanced_helper(tree: Hierarchy) -> None:
    from dinov2_hier.losses.class_weights import balanced_class_weights
    for bad, match in (([1.0] * 5, "6 leaves"), ({"a1": 1.0}, "no weight"), ({"zz": 1.0}, "not leaves"),
                       ("balanced", "balanced_class_weights"), ([0.0] * 6, "all 0"), ([1.0] * 5 + [-1.0], ">= 0")):
        with pytest.raises(ValueError, match=match):
            FlatCELoss(tree, class_weights=bad)
    with pytest.raises(SupervisedConfigError, match="class_weights"):
        build_supervised_terms([{"name": "ce", "class_weights": [1.0]}], tree, 4)
    # sklearn's compute_class_weight("balanced"): n / (n_classes * count)
    labels = ["a"] * 6 + ["b"] * 3 + ["c"]
    assert balanced_class_weights(labels, ["a", "b", "c"]) == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    from sklearn.utils.class_weight import compute_class_weight
    import numpy as np
    expected = compute_class_weight("balanced", classes=np.array(["a", "b", "c"]), y=np.array(labels))
    assert balanced_class_weights(labels, ["a", "b", "c"]) == pytest.approx(list(expected))
    with pytest.raises(ValueError, match="do not occur"):
        balanced_class_weights(labels, ["a", "b", "c", "d"])


# --------------------------------------------------------------------------- SupCon


def supcon_reference(features: torch.Tensor, labels: list[int], tau: float) -> float:
    """Khosla et al. L_out by explicit double loops in float64; labels < 0 ignored."""
    z = F.normalize(features.double(), dim=1).tolist()
    dot = lambda i, j: sum(x * y for x, y in zip(z[i], z[j]))  # noqa: E731
    n, total, anchors = len(labels), 0.0, 0
    for i in range(n):
        if labels[i] < 0:
            continue
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(dot(i, a) / tau) for a in range(n) if a != i and labels[a] >= 0)
        total += -sum(math.log(math.exp(dot(i, p) / tau) / denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors if anchors else 0.0


def test_supcon_matches_double_loop() -> None:
    torch.manual_seed(1)
    features = torch.randn(9, 5)
    labels = [0, 1, 0, 2, 1, -1, 0, 3, 1]  # label 3 has no positive: skipped as an anchor
    got = SupConLoss(temperature=0.1)(features, torch.tensor(labels))
    assert got.item() == pytest.approx(supcon_reference(features, labels, 0.1), rel=1e-5)
    got_05 = SupConLoss(temperature=0.5)(features * 3.0, torch.tensor(labels))  # scale-free: normalised inside
    assert got_05.item() == pytest.approx(supcon_reference(features, labels, 0.5), rel=1e-5)


def test_supcon_with_hierarchy_drops_internal_labels(tree: Hierarchy) -> None:
    torch.manual_seed(2)
    features = torch.randn(6, 4)
    nodes = idx(tree, "a1", "a1", "a", "b1", "b1", "a2")
    got = SupConLoss(0.2, hierarchy=tree)(features, nodes)
    as_leaves = [0, 0, -1, 3, 3, -1]
    assert got.item() == pytest.approx(supcon_reference(features, as_leaves, 0.2), rel=1e-5)


# --------------------------------------------------------------------------- HierSupCon


def test_class_at_level_table(tree: Hierarchy) -> None:
    table = class_at_level_table(tree)
    expected = {
        "a1": ["a", "a1", "a1"],  # a shallow leaf stays its own class at deeper levels
        "a2x": ["a", "a2", "a2x"],
        "a2": ["a", "a2", None],  # an internal label drops out below its depth
        "a": ["a", None, None],
        "c": ["c", "c", "c"],
        "root": [None, None, None],
    }
    for node, classes in expected.items():
        assert table[tree.index(node)].tolist() == [-1 if c is None else tree.index(c) for c in classes], node


def hier_supcon_reference(h: Hierarchy, features: torch.Tensor, labels: list[str | None], tau: float) -> list[float]:
    """Per-depth SupCon with classes from the Hierarchy API (not the table), by loops."""
    out = []
    for depth in range(1, h.max_depth + 1):
        level = []
        for node in labels:
            if node is None or node == h.root:
                level.append(-1)
            elif h.depth(node) >= depth:
                level.append(h.index(h.ancestor_at_depth(node, depth)))
            elif h.is_leaf(node):
                level.append(h.index(node))
            else:
                level.append(-1)
        out.append(supcon_reference(features, level, tau))
    return out


def test_hier_supcon_matches_slow_reference(tree: Hierarchy) -> None:
    torch.manual_seed(3)
    features = torch.randn(12, 6)
    names = ["a2x", "a2y", "a2x", "a1", "a", "a2", "b1", "b2", "b1", "c", "c", None]
    loss = HierSupConLoss(tree, temperature=0.2)
    got, info = loss(features, idx(tree, *names), return_levels=True)
    raw = hier_supcon_reference(tree, features, names, 0.2)
    assert info["raw"].tolist() == pytest.approx(raw, rel=1e-5)
    # Constraint, fine to coarse (depth 3 is the finest), then penalties 1/k, k from the leaves.
    constrained = [max(raw[d:]) for d in range(3)]
    assert info["constrained"].tolist() == pytest.approx(constrained, rel=1e-5)
    weights = [1 / 3, 1 / 2, 1.0]
    assert info["weights"].tolist() == pytest.approx(weights)
    expected = sum(w * c for w, c in zip(weights, constrained)) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hier_supcon_constraint_orders_levels(tree: Hierarchy) -> None:
    # Two a2x views far apart, an a2y close to the first: the leaf level is hard,
    # the coarser levels easy, so the constraint lifts them to the leaf level's loss.
    features = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [1.0, 0.1], [0.0, 1.0]])
    _, info = HierSupConLoss(tree, temperature=0.1)(features, idx(tree, "a2x", "a2x", "a2y", "b1"), return_levels=True)
    raw, constrained = info["raw"], info["constrained"]
    assert raw[0] < raw[2]  # without the constraint the coarse level would be easier
    assert constrained[0] >= constrained[1] >= constrained[2]
    assert constrained[0].item() == pytest.approx(raw[2].item())


def test_hier_supcon_contrasts_the_leaf_level(tree: Hierarchy) -> None:
    torch.manual_seed(4)
    features = torch.randn(6, 5)
    loss = HierSupConLoss(tree)
    one, info_one = loss(features, idx(tree, "a2x", "a2x", "a2y", "a2y", "b1", "b1"), return_levels=True)
    # Only sample 2 changes, to its sibling leaf: same ancestors at depths 1 and 2.
    two, info_two = loss(features, idx(tree, "a2x", "a2x", "a2x", "a2y", "b1", "b1"), return_levels=True)
    assert abs(one.item() - two.item()) > 1e-3
    assert info_one["raw"][:2].tolist() == info_two["raw"][:2].tolist()
    assert abs(info_one["raw"][2].item() - info_two["raw"][2].item()) > 1e-3
    assert info_two["active"].tolist() == [True, True, True]


def test_hier_supcon_custom_level_weights(tree: Hierarchy) -> None:
    torch.manual_seed(5)
    features = torch.randn(8, 4)
    targets = idx(tree, "a2x", "a2y", "a1", "a1", "b1", "b2", "c", "c")
    plain, info = HierSupConLoss(tree)(features, targets, return_levels=True)
    flat = HierSupConLoss(tree, level_weights=[1.0, 1.0, 1.0])(features, targets)
    assert flat.item() == pytest.approx(info["constrained"].sum().item() / 3, rel=1e-6)
    assert plain.item() < flat.item()
    with pytest.raises(LossInputError, match="level_weights"):
        HierSupConLoss(tree, level_weights=[1.0, 1.0])


# --------------------------------------------------------------------------- multilevel CE


def hand_ce(row: list[float], k: int) -> float:
    return -math.log(math.exp(row[k]) / sum(math.exp(v) for v in row))


def test_level_classes(tree: Hierarchy) -> None:
    assert level_classes(tree) == [
        ["c", "a", "b"],
        ["a1", "b1", "b2", "c", "a2"],
        ["a1", "a2x", "a2y", "b1", "b2", "c"],
    ]
    assert MultiLevelCELoss(tree).level_sizes == (3, 5, 6)


def test_multilevel_ce_by_hand(tree: Hierarchy) -> None:
    l1 = [[0.1, 0.7, -0.2], [0.4, 0.0, 0.3], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0]]
    l2 = [[0.2, 0.1, -0.3, 0.0, 0.9], [0.5, 0.5, 0.5, 0.5, 0.5], [0.3, -0.2, 0.1, 0.8, 0.0], [0.0] * 5]
    l3 = [[0.0, 1.2, -0.4, 0.1, 0.3, -0.1], [0.0] * 6, [0.5, 0.1, 0.2, -0.3, 0.0, 0.6], [0.0] * 6]
    # Targets: a2x (leaf, depth 3), a (internal, depth 1), c (leaf under root), unlabelled.
    targets = idx(tree, "a2x", "a", "c", None)
    depth1 = (hand_ce(l1[0], 1) + hand_ce(l1[1], 1) + hand_ce(l1[2], 0)) / 3  # a, a, c
    depth2 = (hand_ce(l2[0], 4) + hand_ce(l2[2], 3)) / 2  # a2, (a ignored), c
    depth3 = (hand_ce(l3[0], 1) + hand_ce(l3[2], 5)) / 2  # a2x, c
    got = MultiLevelCELoss(tree)([torch.tensor(l1), torch.tensor(l2), torch.tensor(l3)], targets)
    assert got.item() == pytest.approx((depth1 + depth2 + depth3) / 3, rel=1e-6)


def test_multilevel_ce_averages_only_active_levels(tree: Hierarchy) -> None:
    l1 = [[0.1, 0.7, -0.2], [0.4, 0.0, 0.3]]
    levels = [torch.tensor(l1), torch.zeros(2, 5), torch.zeros(2, 6)]
    got = MultiLevelCELoss(tree)(levels, idx(tree, "a", "b"))  # only depth 1 is informative
    assert got.item() == pytest.approx((hand_ce(l1[0], 1) + hand_ce(l1[1], 2)) / 2, rel=1e-6)


# --------------------------------------------------------------------------- distance


def test_distance_loss_by_hand(tree: Hierarchy) -> None:
    p = hand_probs(Z)
    leaves = ["a1", "a2x", "a2y", "b1", "b2", "c"]
    d_b1 = [4, 5, 5, 0, 2, 3]  # from leaf b1
    d_a2 = [2, 0, 0, 4, 4, 3]  # from internal a2: its own leaves cost 0
    expected_b1 = sum(p[leaf] * d for leaf, d in zip(leaves, d_b1))
    expected_a2 = sum(p[leaf] * d for leaf, d in zip(leaves, d_a2))
    loss = DistanceLoss(tree)
    assert loss.distances[tree.index("b1")].tolist() == d_b1
    assert loss.distances[tree.index("a2")].tolist() == d_a2
    got = loss(logits(rows=3), idx(tree, "b1", "a2", None))
    assert got.item() == pytest.approx((expected_b1 + expected_a2) / 2, rel=1e-6)


# --------------------------------------------------------------------------- shared behaviour


def all_losses(h: Hierarchy) -> list[tuple[str, torch.nn.Module, callable]]:
    """(name, loss, make_inputs(B, dtype) -> inputs requiring grad)."""

    def leaf(b: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.randn(b, h.num_leaves, dtype=dtype, requires_grad=True)]

    def feats(b: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.randn(b, 8, dtype=dtype, requires_grad=True)]

    multilevel = MultiLevelCELoss(h)

    def levels(b: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [[torch.randn(b, s, dtype=dtype, requires_grad=True) for s in multilevel.level_sizes]]

    return [
        ("hierce", HierCELoss(h), leaf),
        ("ce", FlatCELoss(h), leaf),
        ("distance", DistanceLoss(h), leaf),
        ("multilevel", multilevel, levels),
        ("supcon", SupConLoss(hierarchy=h), feats),
        ("hiersupcon", HierSupConLoss(h), feats),
    ]


def _leaves_of(inputs: list) -> list[torch.Tensor]:
    return [t for x in inputs for t in (x if isinstance(x, list) else [x])]


@pytest.mark.parametrize("batch", [0, 4])
def test_no_usable_label_gives_exact_zero_and_backward_works(tree: Hierarchy, batch: int) -> None:
    torch.manual_seed(6)
    for name, loss, make in all_losses(tree):
        inputs = make(batch, torch.float32)
        value = loss(*inputs, torch.full((batch,), -1, dtype=torch.long))
        assert value.item() == 0.0 and value.dtype == torch.float32, name
        assert value.requires_grad, name
        value.backward()
        for tensor in _leaves_of(inputs):
            assert tensor.grad is not None and torch.all(tensor.grad == 0), name


def test_single_labelled_sample_contrastive_is_zero_without_nan(tree: Hierarchy) -> None:
    features = torch.randn(3, 4, requires_grad=True)
    for loss in (SupConLoss(hierarchy=tree), HierSupConLoss(tree)):
        value = loss(features, idx(tree, "a1", None, None))
        value.backward()
        assert value.item() == 0.0 and torch.isfinite(features.grad).all()


def test_bf16_inputs_give_float32(tree: Hierarchy) -> None:
    torch.manual_seed(7)
    targets = idx(tree, "a2x", "a", "c", "b2", "a2x", "b1")
    for name, loss, make in all_losses(tree):
        inputs = make(6, torch.bfloat16)
        value = loss(*inputs, targets)
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        value.backward()
        as_fp32 = [[t.detach().float() for t in x] if isinstance(x, list) else x.detach().float() for x in inputs]
        assert value.item() == pytest.approx(loss(*as_fp32, targets).item(), rel=1e-5), name
    # Under autocast too (the heads run in bf16, the loss does not).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.nn.Linear(4, tree.num_leaves)(torch.randn(6, 4))
        assert z.dtype == torch.bfloat16
        assert HierCELoss(tree)(z, targets).dtype == torch.float32


def test_buffers_are_registered(tree: Hierarchy) -> None:
    assert {"membership", "parent_index", "path_weights"} <= dict(HierCELoss(tree).named_buffers()).keys()
    assert "level_table" in dict(HierSupConLoss(tree).named_buffers())
    assert "distances" in dict(DistanceLoss(tree).named_buffers())
    # Derived from the tree: not saved in checkpoints.
    assert HierCELoss(tree).state_dict() == {}


def test_bad_inputs_raise(tree: Hierarchy) -> None:
    with pytest.raises(LossInputError, match="columns"):
        HierCELoss(tree)(torch.randn(2, 5), idx(tree, "a1", "c"))
    with pytest.raises(LossInputError, match=r"indices in \[0, 10\)"):
        HierCELoss(tree)(torch.randn(2, 6), torch.tensor([0, 10]))
    with pytest.raises(LossInputError, match="integer"):
        FlatCELoss(tree)(torch.randn(2, 6), torch.tensor([0.0, 1.0]))
    with pytest.raises(LossInputError, match="list of 3"):
        MultiLevelCELoss(tree)([torch.randn(2, 3)], idx(tree, "a1", "c"))
    with pytest.raises(LossInputError, match="temperature"):
        SupConLoss(temperature=0.0)


# --------------------------------------------------------------------------- terms and registry


def all_entries() -> list[dict]:
    return [
        {"name": "hierce", "weight": 1.0, "alpha": 0.5, "head": "linear"},
        {"name": "ce", "head": "mlp", "hidden_dim": 16},
        {"name": "supcon", "weight": 0.5, "temperature": 0.2, "projection_dim": 8, "head": "linear"},
        {"name": "hiersupcon", "projection_dim": 8, "head": "mlp", "hidden_dim": 16},
        {"name": "multilevel_ce", "head": "linear"},
        {"name": "distance", "weight": 2.0, "head": "mlp", "hidden_dim": 16},
        {"name": "hierce", "key": "hierce_alpha0", "alpha": 0.0, "head": "linear"},
    ]


def test_pairwise_terms_are_those_that_compare_samples() -> None:
    """These terms see the CLS tokens of every rank under supervision.contrast_across_ranks."""
    assert {name for name, cls in SUPERVISED_TERMS.items() if cls.pairwise} == {
        "supcon", "hiersupcon", "guide_distance", "triplet"}


def test_registry_builds_all_six(tree: Hierarchy) -> None:
    terms, weights = build_supervised_terms(all_entries(), tree, embed_dim=12)
    assert set(SUPERVISED_TERMS) == {
        "hierce", "ce", "supcon", "hiersupcon", "multilevel_ce", "distance",
        "guide2d", "guide_distance", "triplet",  # issue 22: tests/test_losses_guide.py
        "boda",  # issue 21: tests/test_boda_term.py
    }  # fmt: skip
    assert list(terms) == ["hierce", "ce", "supcon", "hiersupcon", "multilevel_ce", "distance", "hierce_alpha0"]
    assert weights == {
        "hierce": 1.0, "ce": 1.0, "supcon": 0.5, "hiersupcon": 1.0,
        "multilevel_ce": 1.0, "distance": 2.0, "hierce_alpha0": 1.0,
    }  # fmt: skip
    assert terms["hierce_alpha0"].criterion.alpha == 0.0
    assert isinstance(terms["hierce"].head, torch.nn.Linear)
    assert build_supervised_terms([], tree, 12)[0].keys() == set()


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([{"name": "hierCE"}], r"unknown supervised loss name 'hierCE'.*valid names: hierce, ce"),
        ([{"name": "hierce", "alhpa": 0.5}], r"entry #0 \('hierce'\).*'alhpa'.*valid keys: name, key, weight, alpha"),
        ([{"name": "ce", "alpha": 0.5}], r"'alpha'"),
        ([{"name": "ce"}, {"name": "ce"}], r"entry #1.*used twice"),
        ([{"name": "ce", "weight": -1}], r"'weight'"),
        ([{"name": "ce", "weight": True}], r"'weight'"),
        ([{"name": "ce", "key": "dino"}], r"reserved"),
        ([{"name": "hierce", "head": "transformer"}], r"entry #0 \('hierce'\).*head must be one of"),
        ([{"name": "supcon", "temperature": -0.1}], r"temperature"),
        ([{"name": "hiersupcon", "projection_dim": -2}], r"projection_dim"),
        (["hierce"], r"must be a mapping"),
        ({"name": "hierce"}, r"list of mappings"),
    ],
)
def test_registry_rejects_bad_entries(tree: Hierarchy, entries: object, match: str) -> None:
    with pytest.raises(SupervisedConfigError, match=match):
        build_supervised_terms(entries, tree, embed_dim=12)


def test_every_term_gives_finite_scalar_and_trains_its_head(tree: Hierarchy) -> None:
    torch.manual_seed(8)
    terms, _ = build_supervised_terms(all_entries(), tree, embed_dim=12)
    targets = idx(tree, "a2x", "a2y", "a", "c", "b1", None, "a1", "a2x")
    for key, term in terms.items():
        cls_tokens = torch.randn(16, 12, requires_grad=True)
        value = term(cls_tokens, targets)
        assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value), key
        value.backward()
        grads = [p.grad for p in term.parameters()]
        assert grads and all(g is not None for g in grads), key
        assert any(g.abs().sum() > 0 for g in grads), key
        assert cls_tokens.grad.abs().sum() > 0, key


def test_contrastive_term_without_projection_uses_cls_tokens(tree: Hierarchy) -> None:
    torch.manual_seed(9)
    terms, _ = build_supervised_terms([{"name": "supcon"}, {"name": "hiersupcon"}], tree, embed_dim=6)
    cls_tokens = torch.randn(8, 6)
    targets = idx(tree, "a2x", "a1", "b1", "a2x")
    crop_labels = targets.repeat(2)  # crop-major: image i's two views are rows i and i + B
    assert terms["supcon"](cls_tokens, targets).item() == pytest.approx(
        SupConLoss(0.1, hierarchy=tree)(cls_tokens, crop_labels).item()
    )
    # Two views of one image are positives of each other even when no other image shares the label.
    alone = idx(tree, "a1", "b1", "c", "b2")
    leaf_labels = [tree.index(n) for n in ["a1", "b1", "c", "b2"]] * 2
    expected = supcon_reference(cls_tokens, leaf_labels, 0.1)
    assert terms["supcon"](cls_tokens, alone).item() == pytest.approx(expected, rel=1e-5)
    assert sum(p.numel() for p in terms["hiersupcon"].parameters()) == 0


def test_term_rejects_mismatched_rows(tree: Hierarchy) -> None:
    term = build_supervised_terms([{"name": "hierce", "head": "linear"}], tree, embed_dim=4)[0]["hierce"]
    with pytest.raises(LossInputError, match="2B rows"):
        term(torch.randn(5, 4), idx(tree, "a1", "c"))


def test_hierce_training_reduces_loss(balanced: Hierarchy) -> None:
    torch.manual_seed(10)
    n_per_class, dim = 16, 8
    centres = torch.randn(4, dim) * 2.0
    labels = torch.arange(4).repeat_interleave(n_per_class)  # leaf indices p1, p2, q1, q2
    features = centres[labels] + torch.randn(len(labels), dim)
    # Every fourth image is labelled only at its lineage (p or q): coarse labels train too.
    targets = labels.clone()
    coarse = torch.arange(len(labels)) % 4 == 0
    lineage = torch.tensor([balanced.index("p"), balanced.index("p"), balanced.index("q"), balanced.index("q")])
    targets[coarse] = lineage[labels[coarse]]
    head = torch.nn.Linear(dim, 4)
    loss_fn = HierCELoss(balanced, alpha=0.5)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05)
    start = loss_fn(head(features), targets).item()
    for _ in range(50):
        optimiser.zero_grad()
        loss = loss_fn(head(features), targets)
        loss.backward()
        optimiser.step()
    end = loss_fn(head(features), targets).item()
    assert start > 0.4  # ~0.61 with this seed
    assert end < 0.1 * start, (start, end)  # ~0.015 with this seed


# --------------------------------------------------------------------------- issue 18: loss options


def test_hierce_normalize_divides_by_the_weight_sum_over_all_nodes(tree: Hierarchy) -> None:
    # Bertinetto et al.'s get_exponential_weighting(normalize=True), transcribed: every
    # tree position (root included, depth 0) gets exp(-alpha * depth), divided by their sum.
    depths = {"root": 0, "a": 1, "b": 1, "c": 1, "a1": 2, "a2": 2, "b1": 2, "b2": 2, "a2x": 3, "a2y": 3}
    z = sum(math.exp(-0.5 * d) for d in depths.values())
    assert HierCELoss.weight_sum(tree, 0.5) == pytest.approx(z)
    p, w = hand_probs(Z), [math.exp(-0.5 * d) / z for d in range(4)]
    expected = (
        -w[3] * math.log(p["a2x"] / p["a2"]) - w[2] * math.log(p["a2"] / p["a"]) - w[1] * math.log(p["a"] / 1.0)
    )
    for dense in (True, False):
        got = HierCELoss(tree, alpha=0.5, normalize=True, dense=dense)(logits(), idx(tree, "a2x"))
        assert got.item() == pytest.approx(expected, rel=1e-6)
        plain = HierCELoss(tree, alpha=0.5, dense=dense)(logits(), idx(tree, "a2x"))
        assert plain.item() == pytest.approx(expected * z, rel=1e-6)  # default: unnormalised
    with pytest.raises(LossInputError, match="normalize"):
        HierCELoss(tree, normalize="yes")  # type: ignore[arg-type]


def test_hierce_normalizer_of_the_wbc_tree() -> None:
    # The figure: 14.48 for hierarchies/wbc.json at alpha 0.5.
    wbc = Hierarchy.from_json("hierarchies/wbc.json")
    assert HierCELoss.weight_sum(wbc, 0.5) == pytest.approx(14.48, abs=5e-3)
    terms, _ = build_supervised_terms([{"name": "hierce", "normalize": True, "head": "linear"}], wbc, 8)
    assert terms["hierce"].criterion.weight_scale == pytest.approx(1 / 14.4778, rel=1e-4)


def hier_supcon_dedup_reference(
    h: Hierarchy, views: torch.Tensor, labels: list[str | None], tau: float
) -> tuple[list[float], float]:
    """Zhang et al.'s HMLC loop, transcribed: ``views [V, B, D]`` (V views of B images),
    finest level first; after each level keep the first image of each of its classes
    (images without a class there stay). Returns (raw per depth 1..H, loss) with the
    paper's penalties 1/k and the running max over finer levels."""
    H = h.max_depth

    def cls(node: str | None, depth: int) -> int:
        if node is None or node == h.root:
            return -1
        if h.depth(node) >= depth:
            return h.index(h.ancestor_at_depth(node, depth))
        return h.index(node) if h.is_leaf(node) else -1

    images = list(range(len(labels)))
    raw = [0.0] * H
    for depth in range(H, 0, -1):
        rows = torch.cat([views[v, images] for v in range(views.shape[0])])  # view-major, as their code
        level = [cls(labels[i], depth) for i in images] * views.shape[0]
        raw[depth - 1] = supcon_reference(rows, level, tau)
        seen: set[int] = set()
        kept = []
        for i in images:
            c = cls(labels[i], depth)
            if c < 0 or c not in seen:
                kept.append(i)
            seen.add(c)
        images = kept
    loss, running = 0.0, float("-inf")
    for k in range(1, H + 1):  # k = 1 is the finest level
        running = max(running, raw[H - k])
        loss += running / k
    return raw, loss / H


def test_hier_supcon_dedup_matches_zhang_loop(tree: Hierarchy) -> None:
    torch.manual_seed(6)
    names = ["a2x", "a2x", "a2y", "a1", "a", "a2y", "b1", "b2", "b1", "c", None, "a2x"]
    views = torch.randn(2, len(names), 5)
    targets = idx(tree, *names)
    loss = HierSupConLoss(tree, temperature=0.07, dedup=True)
    crop_major = torch.cat([views[0], views[1]])
    got, info = loss(crop_major, targets.repeat(2), return_levels=True, sample_ids=torch.arange(12).repeat(2))
    raw, expected = hier_supcon_dedup_reference(tree, views, names, 0.07)
    assert info["raw"].tolist() == pytest.approx(raw, rel=1e-5)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Which images the coarse levels see: depth 2 keeps a2x (#0), a2y (#2), a1 (#3), a (#4,
    # no depth-3 class), b1 (#6), b2 (#7), c (#9); depth 1 one per depth-2 class: a2 (#0),
    # a1 (#3), a (#4, no depth-2 class), b1 (#6), b2 (#7), c (#9).
    labels = loss.level_labels(targets)
    assert (labels[1] >= 0).nonzero().flatten().tolist() == [0, 2, 3, 6, 7, 9]  # #4 has no depth-2 class
    assert (labels[0] >= 0).nonzero().flatten().tolist() == [0, 3, 4, 6, 7, 9]
    # One view per image, as rows: the same as each row being its own sample.
    one, _ = loss(views[0], targets, return_levels=True)
    assert one.item() == pytest.approx(hier_supcon_dedup_reference(tree, views[:1], names, 0.07)[1], rel=1e-5)
    # Without dedup the finest level is the same, the coarser ones contrast the whole batch.
    _, plain = HierSupConLoss(tree, temperature=0.07)(crop_major, targets.repeat(2), return_levels=True)
    assert plain["raw"][2].item() == pytest.approx(info["raw"][2].item(), rel=1e-6)
    assert all(abs(plain["raw"][d].item() - info["raw"][d].item()) > 1e-3 for d in (0, 1))
    with pytest.raises(LossInputError, match="dedup"):
        HierSupConLoss(tree, dedup=1)  # type: ignore[arg-type]


def test_hier_supcon_term_dedups_by_image(tree: Hierarchy) -> None:
    # The registry passes dedup and temperature (the paper's 0.07); the term keeps both crops.
    torch.manual_seed(7)
    terms, _ = build_supervised_terms(
        [{"name": "hiersupcon", "temperature": 0.07, "dedup": True, "projection_dim": 0}], tree, 5
    )
    term = terms["hiersupcon"]
    assert term.criterion.temperature == 0.07 and term.criterion.dedup
    names = ["a2x", "a2x", "a2y", "b1", "b1", "c"]
    views = torch.randn(2, len(names), 5)
    got = term(torch.cat([views[0], views[1]]), idx(tree, *names))
    assert got.item() == pytest.approx(hier_supcon_dedup_reference(tree, views, names, 0.07)[1], rel=1e-5)
