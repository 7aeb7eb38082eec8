"""DINOv2's local crops (``crops.local_crops_number`` > 0, off by default): the DINO loss's
local terms against a hand computation, the augmentation (global crops unchanged, both
photometric modes alike), collation order, a tiny demo-config training run, and bad values."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from PIL import Image

from dinov2_hier.config import ConfigError, load_config
from dinov2_hier.data import CollateError, GlobalCropsAugmentation, GlobalCropsCollator
from dinov2_hier.losses import DINOLoss, LossInputError
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.batch import batch_to_device
from dinov2_hier.train.data import build_augmentation, build_train_data

from .conftest import TINY_OVERRIDES, counting_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- (a) the loss ------------------------------------------------------------------------------


def hand_dino(student: torch.Tensor, teacher: torch.Tensor, local: torch.Tensor | None, temp: float) -> float:
    """DINOv2's DINO loss term by term in float64: each student global crop against the other
    teacher crop, each local crop against both teacher crops; the mean of the batch-mean
    cross-entropies over all those pairs."""
    student, local = student.detach(), None if local is None else local.detach()
    b = student.shape[0] // 2
    glob = [student[:b], student[b:]]
    targets = [teacher[:b].double(), teacher[b:].double()]
    n_local = 0 if local is None else local.shape[0] // b
    pairs = [(glob[0], targets[1]), (glob[1], targets[0])]
    pairs += [(local[j * b:(j + 1) * b], targets[c]) for j in range(n_local) for c in range(2)]
    terms = []
    for s, t in pairs:
        rows = [-(t[i] * torch.log_softmax(s[i].double() / temp, dim=-1)).sum() for i in range(b)]
        terms.append(sum(rows) / b)
    return float(sum(terms) / len(terms))


def test_dino_loss_local_terms_equal_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, k, n_local, temp = 3, 5, 2, 0.1
    loss = DINOLoss(k, student_temp=temp)
    student = torch.randn(2 * b, k, generator=g)
    teacher = torch.softmax(torch.randn(2 * b, k, generator=g), dim=-1)
    local = torch.randn(n_local * b, k, generator=g, requires_grad=True)
    value = loss(student, teacher, local)
    value.backward()
    value = value.detach()
    assert value.dtype == torch.float32 and value.shape == ()
    assert float(value) == pytest.approx(hand_dino(student, teacher, local, temp), rel=1e-6)
    # 2 + 2 nL = 6 terms: the local crops weigh 4/6 of the loss.
    assert float(value) == pytest.approx((2 * hand_dino(student, teacher, None, temp)
                                          + 4 * _local_mean(local, teacher, temp, b)) / 6, rel=1e-6)
    assert local.grad is not None and bool(local.grad.abs().sum() > 0)
    with pytest.raises(LossInputError, match="local_logits must have nL\\*B rows"):
        loss(student, teacher, local[:4])
    with pytest.raises(LossInputError, match="local_logits has 4 columns"):
        loss(student, teacher, torch.randn(b, 4))


def _local_mean(local: torch.Tensor, teacher: torch.Tensor, temp: float, b: int) -> float:
    """Mean over the (local crop, teacher crop) pairs of their batch-mean cross-entropy."""
    log_p = F.log_softmax(local.detach().double() / temp, dim=-1)
    ces = [-(teacher[c * b:(c + 1) * b].double() * log_p[j * b:(j + 1) * b]).sum(-1).mean()
           for j in range(local.shape[0] // b) for c in range(2)]
    return float(sum(ces) / len(ces))


def test_dino_loss_without_local_crops_is_exactly_the_old_value():
    g = torch.Generator().manual_seed(1)
    b, k, temp = 4, 7, 0.1
    loss = DINOLoss(k, student_temp=temp)
    student = torch.randn(2 * b, k, generator=g)
    teacher = torch.softmax(torch.randn(2 * b, k, generator=g), dim=-1)
    # The formula before local crops existed, op for op: mean over both cross pairs' rows.
    swapped = torch.cat([teacher[b:], teacher[:b]])
    old = (-(swapped * F.log_softmax(student / temp, dim=-1)).sum(dim=-1)).mean()
    assert torch.equal(loss(student, teacher), old)
    assert torch.equal(loss(student, teacher, None), old)
    assert torch.equal(loss(student, teacher, student[:0]), old)  # nL = 0 as an empty tensor
    assert float(old) == pytest.approx(hand_dino(student, teacher, None, temp), rel=1e-6)


# -- (b) the augmentation -------------------------------------------------------------------


def noise_image(width: int = 60, height: int = 50, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["loader", "device"])
def test_global_crops_are_the_same_with_and_without_local_crops(mode):
    image = noise_image()
    without = GlobalCropsAugmentation(crop_size=16, seed=3, photometric=mode)
    with_local = GlobalCropsAugmentation(crop_size=16, seed=3, photometric=mode, local_crops_number=2,
                                         local_crops_size=8)
    for draw_id in (0, 7, 123):
        a, b = without(image, draw_id), with_local(image, draw_id)
        assert all(torch.equal(x, y) for x, y in zip(a["global_crops"], b["global_crops"]))
        assert "local_crops" not in a and "local_photometric" not in a
        assert len(b["local_crops"]) == 2
        for crop in b["local_crops"]:
            assert crop.shape == (3, 8, 8) and crop.dtype == (torch.uint8 if mode == "device" else torch.float32)
        if mode == "device":
            assert all(torch.equal(a["photometric"][k], b["photometric"][k]) for k in a["photometric"])
            assert b["local_photometric"]["order"].shape == (2, 4)
        assert with_local.sample_params(60, 50, draw_id) == without.sample_params(60, 50, draw_id)


def test_local_crop_parameters():
    aug = GlobalCropsAugmentation(crop_size=16, seed=5, local_crops_number=4, local_crops_size=8,
                                  local_crops_scale=(0.05, 0.32))
    params = [p for d in range(100) for p in aug.sample_local_params(400, 400, d)]
    assert len(params) == 400
    areas = [p.height * p.width / 400**2 for p in params]
    assert 0.045 <= min(areas) and max(areas) <= 0.33  # the scale range, up to rounding the box
    assert not any(p.solarize for p in params)
    blurred = sum(p.blur_sigma is not None for p in params) / len(params)
    assert 0.42 < blurred < 0.58  # p = 0.5 (DINOv2's local crops); 400 draws: 3.2 standard errors
    assert aug.sample_local_params(400, 400, 3) == aug.sample_local_params(400, 400, 3)  # pure in (seed, draw)
    assert aug.sample_local_params(400, 400, 3) != aug.sample_local_params(400, 400, 4)
    # The local crops count for a reduced decode too: none of them may get too few source pixels.
    big = GlobalCropsAugmentation(crop_size=16, local_crops_number=2, local_crops_size=8, reduced_decode=True)
    sides = [min(p.height, p.width) / 16 for p in big.sample_params(1024, 1024, 0)]
    sides += [min(p.height, p.width) / 8 for p in big.sample_local_params(1024, 1024, 0)]
    assert big.decode_size(1024, 1024, 0) == (math.ceil(1024 / min(sides)),) * 2


def _items(mode: str, draw_ids, errors=()):
    aug = GlobalCropsAugmentation(crop_size=16, seed=2, photometric=mode, local_crops_number=3, local_crops_size=8)
    items = []
    for d in draw_ids:
        if d in errors:
            items.append({"error": "unreadable", "path": f"img{d}", "draw_id": d})
        else:
            items.append({**aug(noise_image(30, 26, seed=d), d), "path": f"img{d}", "draw_id": d})
    return items, aug


def _collator(n_local: int = 3) -> GlobalCropsCollator:
    return GlobalCropsCollator((4, 4), seed=1, crop_size=16, local_crops_number=n_local, local_crops_size=8)


def test_device_mode_gives_the_loader_local_crops():
    draw_ids = list(range(40, 46))
    loader = _collator()(_items("loader", draw_ids)[0])
    device_items, aug = _items("device", draw_ids)
    device = _collator()(device_items)
    assert device["local_crops"].dtype == torch.uint8 and device["local_photometric"]["jitter"].shape == (18,)
    finished = batch_to_device(device, torch.device("cpu"), aug)
    assert "local_photometric" not in finished and finished["local_crops"].dtype == torch.float32
    assert torch.allclose(finished["local_crops"], loader["local_crops"], atol=1e-5, rtol=0)
    assert torch.allclose(finished["global_crops"], loader["global_crops"], atol=1e-5, rtol=0)


# -- (c) collation ------------------------------------------------------------------------


def _marked_item(i: int, n_local: int) -> dict:
    """An item whose crops are constant images: global crop c = 10 i + c, local crop j = 10 i + 5 + j."""
    return {
        "global_crops": [torch.full((3, 16, 16), 10.0 * i + c) for c in range(2)],
        "local_crops": [torch.full((3, 8, 8), 10.0 * i + 5 + j) for j in range(n_local)],
        "path": f"img{i}", "draw_id": i,
    }


def test_collate_local_crops_crop_major_and_unreadable_items_dropped():
    items = [_marked_item(i, 3) for i in range(4)]
    items[2] = {"error": "unreadable", "path": "img2", "draw_id": 2}
    batch = _collator()(items)
    kept = [0, 1, 3]
    assert batch["local_crops"].shape == (3 * 3, 3, 8, 8) and batch["global_crops"].shape == (6, 3, 16, 16)
    # Row j * B + i is local crop j of readable image i.
    assert batch["local_crops"][:, 0, 0, 0].tolist() == [10.0 * i + 5 + j for j in range(3) for i in kept]
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [10.0 * i + c for c in range(2) for i in kept]
    assert batch["skipped"] == ["img2"] and batch["paths"] == ["img0", "img1", "img3"]
    # Device mode: the parameter rows are crop-major too (row j * B + i: local crop j of image i).
    device_items, aug = _items("device", [10, 11, 12], errors=(11,))
    device = _collator()(device_items)
    for i, d in enumerate([10, 12]):
        for j, p in enumerate(aug.sample_local_params(30, 26, d)):
            assert bool(device["local_photometric"]["grayscale"][j * 2 + i]) == p.grayscale
            assert float(device["local_photometric"]["blur_sigma"][j * 2 + i]) == pytest.approx(p.blur_sigma or 0.0)
    empty = _collator()([{"error": "x", "path": "a", "draw_id": 0}])
    assert empty["local_crops"].shape == (0, 3, 8, 8) and "local_photometric" not in empty


def test_collate_without_local_crops_has_no_key_and_refuses_a_mismatch():
    plain = [{k: v for k, v in _marked_item(i, 0).items() if k != "local_crops"} for i in range(2)]
    batch = GlobalCropsCollator((4, 4), crop_size=16)(plain)
    assert "local_crops" not in batch and "local_photometric" not in batch
    with pytest.raises(CollateError, match="has 2 local crops, expected 3"):
        _collator()([_marked_item(0, 3), _marked_item(1, 2)])
    with pytest.raises(CollateError, match="built for none"):
        GlobalCropsCollator((4, 4), crop_size=16)([_marked_item(0, 1)])


# -- (d) training --------------------------------------------------------------------------

DEMO_LOCAL = [
    "train.batch_size_per_gpu=8", "train.iterations=2", "train.checkpoint_every=100", "train.log_every=1",
    "data.num_workers=0", "data.synthetic.num_images=64",
    "crops.local_crops_number=2", "crops.local_crops_size=32",  # 4 x 4 patches of the demo's 8 px
]


def test_demo_config_trains_with_local_crops_and_validates(tmp_path):
    from dinov2_hier.train.loop import METRICS_FILE, Trainer

    overrides = DEMO_LOCAL + ["crops.photometric=device", "data.val_fraction=0.125", "train.val_every=2",
                              "train.val_max_batches=1"]
    trainer = Trainer(load_config(PROJECT_ROOT / "configs/demo.yaml", overrides), tmp_path / "run")
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    assert [r["iteration"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss_dino"]) and math.isfinite(r["loss_total"]) for r in steps)
    val = [r for r in records if r.get("split") == "val"]
    assert len(val) == 1 and math.isfinite(val[0]["val_dino"])


def test_compute_losses_dino_is_the_documented_average():
    from dinov2_hier.train.meta_arch import SSLMetaArch

    cfg = load_config(PROJECT_ROOT / "configs/demo.yaml", DEMO_LOCAL)
    data = build_train_data(cfg)
    batch = data.collator([data.dataset[(i, i)] for i in range(4)])
    batch = batch_to_device(batch, torch.device("cpu"), data.augmentation)
    assert batch["local_crops"].shape == (2 * 4, 3, 32, 32) and batch["global_crops"].shape == (8, 3, 64, 64)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()  # the demo has no stochastic depth: the passes are deterministic
    temp = 0.05
    with torch.no_grad():
        losses, _ = model.compute_losses(batch, temp, with_stats=False)
        targets = model.teacher_targets(batch["global_crops"], batch["mask_indices"], temp,
                                        batch["masks_weight"] > 0)
        student, head = model.student["backbone"], model.student["dino_head"]
        glob = head(student(batch["global_crops"], masks=batch["masks"])["x_norm_clstoken"])
        local = head(student(batch["local_crops"])["x_norm_clstoken"])
        without, _ = model.compute_losses({k: v for k, v in batch.items() if k != "local_crops"}, temp, False)
    expected = hand_dino(glob, targets.cls_probs, local, cfg.dino.student_temp)
    assert float(losses["dino"]) == pytest.approx(expected, rel=1e-5)
    assert float(losses["dino"]) == pytest.approx(float(model.dino_loss(glob, targets.cls_probs, local)), rel=1e-6)
    # Without the local crops: the two global cross pairs alone; the other terms are unchanged.
    assert torch.equal(without["dino"], model.dino_loss(glob, targets.cls_probs))
    for name in ("ibot", "koleo"):
        assert torch.equal(without[name], losses[name])


# -- (e) configuration ---------------------------------------------------------------------

BAD = [
    (["crops.local_crops_number=-1"], "crops.local_crops_number must be an integer >= 0, got -1"),
    (["crops.local_crops_size=0"], "crops.local_crops_size must be an integer >= 1, got 0"),
    (["crops.local_crops_scale=[0.3,0.1]"],
     "crops.local_crops_scale must be a [min, max] pair of numbers in (0, 1] with min <= max, got [0.3, 0.1]"),
    (["crops.local_crops_number=2", "crops.local_crops_size=12"],
     "crops.local_crops_size=12 is not a multiple of student.patch_size=8"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_local_crop_values_exit_2_in_one_line(tmp_path, capsys, overrides, message):
    from dinov2_hier.train.__main__ import main as train_main

    assert train_main(["--output-dir", str(tmp_path / "run"), *TINY_OVERRIDES, *overrides]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line)]
    assert "Traceback" not in err and lines == [f"error: {message}"]


def test_local_keys_are_optional_and_unrelated_to_the_global_scale():
    # The size only has to fit the patch when local crops are on; the two scale ranges may overlap.
    cfg = load_config(None, TINY_OVERRIDES + ["crops.local_crops_size=12", "crops.global_crops_scale=[0.2, 1.0]",
                                              "crops.local_crops_scale=[0.05, 0.5]"])
    assert build_augmentation(cfg).local_crops_number == 0
    cfg.crops.local_crops_number = 2
    with pytest.raises(ConfigError, match="local_crops_size=12"):
        build_augmentation(cfg)
    cfg.crops.local_crops_size = 16
    assert build_augmentation(cfg).local_crops_scale == (0.05, 0.5)
    # A config saved before the keys existed: no local crops, no local batch keys.
    old = load_config(None, TINY_OVERRIDES)
    with open_dict(old):
        for key in ("local_crops_number", "local_crops_size", "local_crops_scale"):
            del old.crops[key]
    assert "local_crops_number" not in OmegaConf.to_container(old.crops)
    data = build_train_data(old)
    assert data.augmentation.local_crops_number == 0
    assert "local_crops" not in data.collator([data.dataset[(0, 0)], data.dataset[(1, 1)]])


def test_bench_step_with_local_crops(tmp_path, capsys):
    from bench.train_step import main as bench_main
    from bench.train_step import synthetic_batch

    overrides = TINY_OVERRIDES + ["crops.photometric=device", "crops.local_crops_number=2", "crops.local_crops_size=16"]
    batch = synthetic_batch(load_config(None, overrides), torch.device("cpu"))
    assert batch["local_crops"].shape == (16, 3, 16, 16) and batch["local_photometric"]["order"].shape == (16, 4)
    out = tmp_path / "bench.json"
    assert bench_main(["--steps", "1", "--warmup", "1", "--json", str(out), *overrides]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["local_crops_number"] == 2 and result["local_crops_size"] == 16


def test_position_embeddings_interpolate_to_every_smaller_grid():
    """ViT-S/14 at 224 px (16 x 16 patches) on DINOv2's 98 px and the 70 px local crops, and
    every other smaller grid up to 40 x 40: the class token kept, the grid resampled."""
    from dinov2_hier.models.vision_transformer import interpolate_pos_embed

    for side in range(2, 41):
        pos = torch.randn(1, 1 + side * side, 4)
        for h in range(1, side + 1):
            out = interpolate_pos_embed(pos, (h, h))
            assert out.shape == (1, 1 + h * h, 4) and torch.equal(out[:, 0], pos[:, 0])


@pytest.mark.slow
def test_compiled_forward_is_one_graph_and_the_backbone_gets_one_static_graph_more():
    """compute.compile=forward: the step's forward with local crops still traces as one graph
    (dynamo's fullgraph trace, backend without code generation); compute.compile=backbone: the
    student backbone adds one graph for the local crops' shape, a static one."""
    from bench.train_step import synthetic_batch
    from dinov2_hier.train.meta_arch import SSLMetaArch

    cfg = load_config(None, TINY_OVERRIDES + ["crops.local_crops_number=2", "crops.local_crops_size=16"])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    batch = synthetic_batch(cfg, torch.device("cpu"))
    reference = float(model(batch, 0.07)[0]["dino"].detach())
    graphs = []

    torch._dynamo.reset()
    try:
        traced = torch.compile(model, backend=counting_backend(graphs), fullgraph=True)(batch, 0.07)
        assert len(graphs) == 1 and float(traced[0]["dino"].detach()) == pytest.approx(reference, rel=1e-5)
        graphs.clear()
        torch._dynamo.reset()
        model.student["backbone"].compile(backend=counting_backend(graphs))
        for _ in range(2):
            model(batch, 0.07)
        assert len(graphs) == 2  # the global crops (masked) and the local crops
        local_inputs = [t for t in graphs[1] if isinstance(t, torch.Tensor) and t.dim() == 4
                        and not isinstance(t, torch.nn.Parameter)]
        assert [tuple(t.shape) for t in local_inputs] == [(16, 3, 16, 16)]
        assert not any(isinstance(t, torch.SymInt) for t in graphs[1])  # no dynamic sizes
    finally:
        torch._dynamo.reset()
