"""Scale (issue 19, item 16): the hierarchical losses' set-up is linear in the tree size (no
node x node or node x leaf table above ``DENSE_MAX_NODES``, no Python work per node pair
or per node and level), their tree path gives the dense path's numbers, and a recorded
model configuration that does not describe its weights fails before the model is built.
"""
from __future__ import annotations

import functools
import json
import math
import random

import pytest
import torch

from dinov2_hier.cli import EXIT_USER_ERROR, run_cli
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.losses import (
    DistanceLoss,
    HierCELoss,
    HierSupConLoss,
    LossInputError,
    MultiLevelCELoss,
    SupConLoss,
    class_at_level_table,
    level_classes,
)
from dinov2_hier.losses.hierarchical import DENSE_MAX_NODES
from dinov2_hier.models import WeightsError
from tests.test_losses_supervised import UNBALANCED  # leaves a1, a2x, a2y, b1, b2, c


def flat_tree(groups: int, per_group: int) -> Hierarchy:
    """root -> ``groups`` internal nodes -> ``per_group`` leaves each."""
    root = {"id": "root", "children": [
        {"id": f"g{g}", "children": [{"id": f"g{g}.{i}"} for i in range(per_group)]} for g in range(groups)
    ]}
    return Hierarchy.from_dict({"name": "flat", "root": root})


def comb(depth: int, leaves_per_level: int) -> Hierarchy:
    """A chain of ``depth - 1`` internal nodes, each with ``leaves_per_level`` leaves (max depth ``depth``)."""
    nodes = [{"id": "root", "parent": None}]
    parent = "root"
    for d in range(1, depth):
        nodes.append({"id": f"i{d}", "parent": parent})
        parent = f"i{d}"
        nodes.extend({"id": f"l{d}.{k}", "parent": parent} for k in range(leaves_per_level))
    return Hierarchy.from_dict({"name": "comb", "nodes": nodes})


def random_tree(rng: random.Random, size: int) -> Hierarchy:
    nodes = [{"id": "r", "parent": None}]
    for i in range(1, size):
        pool = nodes[-4:] if rng.random() < 0.5 else nodes  # some deep chains, some bushes
        nodes.append({"id": f"n{i}", "parent": rng.choice(pool)["id"]})
    return Hierarchy.from_dict({"name": "random", "nodes": nodes})


@pytest.fixture(scope="module")
def big_flat() -> Hierarchy:
    return flat_tree(100, 1000)  # 100,000 leaves, 100,101 nodes


def _requested_numel(args: tuple, kwargs: dict) -> int:
    size = kwargs.get("size", args[0] if args else ())
    if isinstance(size, (tuple, list, torch.Size)):
        dims = list(size)
    else:
        dims = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    return math.prod(int(d) for d in dims)


def _guard_allocations(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Make torch.zeros/ones/empty/full refuse anything larger than ``limit`` elements."""
    for name in ("zeros", "ones", "empty", "full"):
        original = getattr(torch, name)

        @functools.wraps(original)
        def guarded(*args, _original=original, _name=name, **kwargs):
            numel = _requested_numel(args, kwargs)
            if numel > limit:
                raise AssertionError(f"torch.{_name} of {numel:,} elements (limit {limit:,}): a dense tree table")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, guarded)


def test_setup_on_a_100k_leaf_tree_allocates_nothing_quadratic(big_flat, monkeypatch):
    h = big_flat
    limit = (h.max_depth + 2) * h.num_nodes  # [num_nodes, max_depth] tables are allowed
    _guard_allocations(monkeypatch, limit)
    losses = {
        "hierce": HierCELoss(h),
        "distance": DistanceLoss(h),
        "multilevel": MultiLevelCELoss(h),
        "hiersupcon": HierSupConLoss(h),
        "supcon": SupConLoss(hierarchy=h),
    }
    monkeypatch.undo()
    for name, loss in losses.items():
        for key, buffer in loss.named_buffers():
            assert buffer.numel() <= limit, (name, key, tuple(buffer.shape))
    assert not losses["hierce"].dense and not losses["distance"].dense
    # The tree path runs on it: a small batch, leaf and internal targets, finite gradients.
    torch.manual_seed(0)
    z = torch.randn(3, h.num_leaves, requires_grad=True)
    targets = torch.tensor([h.index("g7.123"), h.index("g99"), -1])
    for name in ("hierce", "distance"):
        value = losses[name](z, targets)
        value.backward()
        assert torch.isfinite(value) and value.item() > 0, name
        assert torch.isfinite(z.grad).all(), name
        z.grad = None


_COUNTED = ("index", "parent", "depth", "is_leaf", "children", "ancestors", "ancestor_at_depth", "lca",
            "distance", "leaves_under", "nodes_at_depth")
_COPIED = ("nodes", "leaves", "internal_nodes")


def _count_hierarchy_work(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls into Hierarchy, a list-returning call or property as its length."""
    work = [0]
    for name in _COUNTED:
        original = getattr(Hierarchy, name)

        def counted(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            work[0] += len(out) if isinstance(out, list) else 1
            return out

        monkeypatch.setattr(Hierarchy, name, counted)
    for name in _COPIED:
        getter = getattr(Hierarchy, name).fget

        def copied(self, _getter=getter):
            out = _getter(self)
            work[0] += len(out)
            return out

        monkeypatch.setattr(Hierarchy, name, property(copied))
    return work


@pytest.mark.parametrize("make", [
    pytest.param(lambda h: HierCELoss(h), id="hierce"),
    pytest.param(lambda h: DistanceLoss(h), id="distance"),
    pytest.param(lambda h: MultiLevelCELoss(h), id="multilevel"),
    pytest.param(lambda h: HierSupConLoss(h), id="hiersupcon"),
])
def test_setup_work_is_linear_in_the_tree_on_the_deepest_tree(monkeypatch, make):
    """100 levels (MAX_DEPTH), 397 nodes: a few Hierarchy calls per node, not one per
    (node, level) or (node, leaf) pair (a 5,000-deep chain took minutes that way)."""
    h = comb(100, 3)
    assert h.max_depth == 100 and h.num_nodes > DENSE_MAX_NODES
    work = _count_hierarchy_work(monkeypatch)
    make(h)
    assert work[0] <= 20 * h.num_nodes, f"{work[0]:,} Hierarchy calls for {h.num_nodes} nodes"


# --------------------------------------------------------------------------- same numbers


Z = [1.0, 0.5, -0.5, 0.2, -1.0, 0.3]


def test_tree_path_hierce_by_hand():
    tree = Hierarchy.from_dict(UNBALANCED)
    e = [math.exp(v) for v in Z]
    p = {k: v / sum(e) for k, v in zip(["a1", "a2x", "a2y", "b1", "b2", "c"], e)}
    p["a2"] = p["a2x"] + p["a2y"]
    p["a"] = p["a1"] + p["a2"]
    p["b"] = p["b1"] + p["b2"]
    w = [math.exp(-0.5 * d) for d in range(4)]
    expected = {
        "a2x": -w[3] * math.log(p["a2x"] / p["a2"]) - w[2] * math.log(p["a2"] / p["a"]) - w[1] * math.log(p["a"]),
        "a2": -w[2] * math.log(p["a2"] / p["a"]) - w[1] * math.log(p["a"]),
        "a1": -w[2] * math.log(p["a1"] / p["a"]) - w[1] * math.log(p["a"]),
        "b2": -w[2] * math.log(p["b2"] / p["b"]) - w[1] * math.log(p["b"]),
        "c": -w[1] * math.log(p["c"]),
    }
    loss = HierCELoss(tree, alpha=0.5, dense=False)
    assert not loss.dense and "path_weights" not in dict(loss.named_buffers())
    for node, value in expected.items():
        got = loss(torch.tensor([Z]), torch.tensor([tree.index(node)]))
        assert got.item() == pytest.approx(value, rel=1e-6), node
    assert loss(torch.tensor([Z]), torch.tensor([tree.index("a2x")])).item() == pytest.approx(0.6425, abs=1e-4)
    log_p = loss.node_log_probs(torch.tensor([Z]))[0]
    for node in ["a1", "a2", "a", "b", "c"]:
        assert log_p[tree.index(node)].item() == pytest.approx(math.log(p[node]), rel=1e-6), node
    assert log_p[tree.index("root")].item() == 0.0


def test_tree_path_distance_by_hand():
    tree = Hierarchy.from_dict(UNBALANCED)
    e = [math.exp(v) for v in Z]
    p = [v / sum(e) for v in e]
    d_b1, d_a2 = [4, 5, 5, 0, 2, 3], [2, 0, 0, 4, 4, 3]
    expected = (sum(a * b for a, b in zip(p, d_b1)) + sum(a * b for a, b in zip(p, d_a2))) / 2
    loss = DistanceLoss(tree, dense=False)
    got = loss(torch.tensor([Z] * 3), torch.tensor([tree.index("b1"), tree.index("a2"), -1]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tree_path_equals_the_dense_path_on_random_trees():
    rng = random.Random(4)
    torch.manual_seed(4)
    for _ in range(10):
        h = random_tree(rng, rng.randint(2, 70))
        z = (torch.randn(9, h.num_leaves) * 3).requires_grad_()
        targets = torch.randint(-1, h.num_nodes, (9,))
        for alpha in (0.5, 0.0, -0.3):
            dense, tree = HierCELoss(h, alpha, dense=True), HierCELoss(h, alpha, dense=False)
            (a, used_a), (b, used_b) = dense.per_sample(z, targets), tree.per_sample(z, targets)
            assert torch.equal(used_a, used_b)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tree.node_log_probs(z), dense.node_log_probs(z), rtol=1e-5, atol=1e-5)
        for cls in (HierCELoss, DistanceLoss):
            grads = []
            for dense in (True, False):
                z.grad = None
                value = cls(h, dense=dense)(z, targets)
                value.backward()
                grads.append((value.detach(), z.grad.clone()))
            torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-5)


def test_dense_is_automatic_below_the_limit_and_checked():
    small, large = flat_tree(3, 4), flat_tree(10, 30)
    assert small.num_nodes <= DENSE_MAX_NODES < large.num_nodes
    assert HierCELoss(small).dense and DistanceLoss(small).dense
    assert not HierCELoss(large).dense and not DistanceLoss(large).dense
    assert "tables=tree" in repr(HierCELoss(large))
    with pytest.raises(LossInputError, match="dense"):
        HierCELoss(small, dense="yes")


def _level_table_reference(h: Hierarchy) -> torch.Tensor:
    """class_at_level_table as defined, one Hierarchy query per (node, level)."""
    table = torch.full((h.num_nodes, h.max_depth), -1, dtype=torch.long)
    for node in h.nodes:
        for d in range(1, h.max_depth + 1):
            if h.depth(node) >= d:
                table[h.index(node), d - 1] = h.index(h.ancestor_at_depth(node, d))
            elif h.depth(node) >= 1 and h.is_leaf(node):
                table[h.index(node), d - 1] = h.index(node)
    return table


def test_level_tables_equal_their_definition():
    rng = random.Random(5)
    for h in [comb(12, 2), Hierarchy.from_dict(UNBALANCED)] + [random_tree(rng, rng.randint(2, 60)) for _ in range(20)]:
        assert torch.equal(class_at_level_table(h), _level_table_reference(h))
        expected = [[n for n in h.nodes if h.depth(n) == d or (h.is_leaf(n) and h.depth(n) < d)]
                    for d in range(1, h.max_depth + 1)]
        assert level_classes(h) == expected
        assert MultiLevelCELoss(h).level_sizes == tuple(len(level) for level in expected)


# --------------------------------------------------------------------------- shapes before building


def _tiny_export(folder, **overrides):
    from safetensors.torch import save_file

    from dinov2_hier.hub import model_kwargs
    from dinov2_hier.models.vision_transformer import VisionTransformer

    config = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 16,
              "num_register_tokens": 1, "ffn_layer": "mlp", "layerscale": 1e-5, "qkv_bias": True}
    torch.manual_seed(0)
    model = VisionTransformer(**model_kwargs(config))
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    return folder


def test_crafted_config_depth_fails_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    import dinov2_hier.hub as hub

    export = _tiny_export(tmp_path / "export", depth=5000)

    def never(*args, **kwargs):
        raise AssertionError("the model was built before its shapes were compared")

    monkeypatch.setattr(hub, "build_from_config", never)
    with pytest.raises(WeightsError, match=r"config\.json: 'depth' is 5000 but .*model\.safetensors holds 2 "
                                           r"transformer blocks"):
        hub.load_backbone(export)
    # Through the command-line error handling: one line, exit 2.
    assert run_cli(lambda: hub.load_backbone(export)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'depth' is 5000" in err


def test_crafted_config_width_fails_before_the_model_is_built(tmp_path, monkeypatch):
    import dinov2_hier.hub as hub

    export = _tiny_export(tmp_path / "export", img_size=8 * 1000)
    monkeypatch.setattr(hub, "build_from_config", lambda *a, **k: pytest.fail("model built"))
    mismatch = r"shape mismatch at 'pos_embed': file \(1, 5, 32\) vs model \(1, 1000001, 32\)"
    with pytest.raises(WeightsError, match=mismatch):
        hub.load_backbone(export)


@pytest.mark.parametrize("overrides", [
    {}, {"depth": 3, "num_register_tokens": 0}, {"ffn_layer": "swiglu", "layerscale": None, "qkv_bias": False},
])
def test_expected_shapes_are_the_built_models(overrides):
    from dinov2_hier.hub import build_from_config, expected_shapes

    config = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 16,
              "num_register_tokens": 2, "ffn_layer": "mlp", "layerscale": 1e-5, "qkv_bias": True, **overrides}
    built = build_from_config(config, device="meta").state_dict()
    assert list(expected_shapes(config).items()) == [(k, tuple(v.shape)) for k, v in built.items()]


def test_eval_teacher_file_with_crafted_geometry_fails_before_building(tmp_path, monkeypatch):
    import eval.features as features
    from dinov2_hier.models.spec import BackboneSpec
    from dinov2_hier.models.vision_transformer import build_backbone
    from dinov2_hier.train.checkpoint import CheckpointError

    model = build_backbone("vit_tiny", img_size=32, patch_size=8)
    meta = {"arch": "vit_tiny", "img_size": 8 * 100_000, "patch_size": 8, "num_register_tokens": 0}
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / "teacher_backbone.pt")
    # eval builds a recorded architecture through BackboneSpec.build (it called build_backbone before)
    monkeypatch.setattr(BackboneSpec, "build", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'pos_embed'.*need 1 \+ \(800000/8\)\^2"):
        features.load_eval_backbone(tmp_path / "teacher_backbone.pt")
    meta.update(img_size=32, num_register_tokens=1_000_000)
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / "teacher_backbone.pt")
    with pytest.raises(CheckpointError, match=r"missing key 'register_tokens'"):
        features.load_eval_backbone(tmp_path / "teacher_backbone.pt")


def test_constrained_head_with_crafted_in_dim_fails_before_building(tmp_path, monkeypatch):
    import dinov2_hier.heads.constrained as constrained

    head = constrained.ConstrainedMultiLabelHead(8, 3, constrained.ConstrainedConfig(), prior=torch.zeros(3, 3),
                                                 exclusive=torch.zeros(3, 3, dtype=torch.bool))
    path = constrained.save_head(tmp_path / "head.pt", head, ["a", "b", "c"])
    payload = torch.load(path, weights_only=True)
    payload["in_dim"] = 1_000_000
    torch.save(payload, path)
    monkeypatch.setattr(constrained, "ConstrainedMultiLabelHead", lambda *a, **k: pytest.fail("head built"))
    with pytest.raises(constrained.ConstrainedHeadError, match=r"'classifier.weight' is \(3, 8\).*need \(3, 1000000\)"):
        constrained.load_head(path)
