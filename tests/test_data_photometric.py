"""Batched photometric augmentations: torchvision equivalence, hand-computed values, and the
``crops.photometric=device`` path (items, collation, batch on the device) against the loader path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dinov2_hier.config import ConfigError, load_config
from dinov2_hier.data import (
    AugmentationConfigError,
    CollateError,
    GlobalCropsAugmentation,
    GlobalCropsCollator,
    apply_photometric,
    photometric_params,
)
from dinov2_hier.train.batch import batch_to_device
from dinov2_hier.train.data import build_augmentation

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def random_params(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random per-crop parameters in the augmentation's ranges, each op on about half the crops."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    return {
        "jitter": torch.rand(n, generator=g) < 0.7,
        "order": torch.stack([torch.randperm(4, generator=g) for _ in range(n)]),
        "factors": torch.stack([u(0.6, 1.4), u(0.6, 1.4), u(0.8, 1.2), u(-0.1, 0.1)], dim=1),
        "grayscale": torch.rand(n, generator=g) < 0.3,
        "blur_sigma": torch.where(torch.rand(n, generator=g) < 0.5, u(0.1, 2.0), torch.zeros(n)),
        "solarize": torch.rand(n, generator=g) < 0.4,
    }


def torchvision_reference(crop: torch.Tensor, p: dict, i: int, kernel: int) -> torch.Tensor:
    """Crop ``i`` augmented image by image with torchvision's float ops."""
    x = crop.to(torch.float32) / 255
    if p["jitter"][i]:
        factors = p["factors"][i].tolist()
        for op in p["order"][i].tolist():
            x = TV_JITTER[op](x, factors[op])
    if p["grayscale"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    sigma = float(p["blur_sigma"][i])
    if sigma > 0:
        x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    if p["solarize"][i]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, list(MEAN), list(STD))


def test_batched_ops_equal_torchvision_per_image():
    n, size, kernel = 40, 14, 9
    crops = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    crops[0] = 120  # a grey crop: hue and saturation of grey pixels (the HSV special case)
    crops[1, :, :4] = 255  # saturated pixels: brightness and contrast clamp at 1
    params = random_params(n)
    params["jitter"][:2] = True
    for flag in ("jitter", "grayscale", "solarize"):  # every op both on and off somewhere
        assert 0 < int(params[flag].sum()) < n
    assert 0 < int((params["blur_sigma"] > 0).sum()) < n
    out = apply_photometric(crops, params, MEAN, STD, kernel)
    expected = torch.stack([torchvision_reference(crops[i], params, i, kernel) for i in range(n)])
    assert out.shape == (n, 3, size, size) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_an_ambient_bf16_autocast_changes_nothing():
    """Validation once augmented its batch inside the step's bf16 autocast: the blur of part
    of the batch came out bf16 and writing it into the float32 rows failed (index_copy_).
    The ops now run in float32 whatever the caller's autocast, with the same values."""
    crops = torch.randint(0, 256, (8, 3, 14, 14), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    params = random_params(8, seed=3)
    assert 0 < int((params["blur_sigma"] > 0).sum()) < 8  # a partly blurred batch
    expected = apply_photometric(crops, params, MEAN, STD, 9)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = apply_photometric(crops, params, MEAN, STD, 9)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_every_jitter_order_equals_torchvision():
    # All 24 orders on the same crop with strong factors: applying op k at position pos to the
    # crops that chose it must compose in each crop's own order.
    from itertools import permutations

    orders = torch.tensor(list(permutations(range(4))))
    n = len(orders)
    crops = torch.randint(0, 256, (1, 3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    params = {
        "jitter": torch.ones(n, dtype=torch.bool), "order": orders,
        "factors": torch.tensor([[1.3, 0.7, 1.2, 0.08]]).repeat(n, 1),
        "grayscale": torch.zeros(n, dtype=torch.bool), "blur_sigma": torch.zeros(n), "solarize": torch.zeros(n, dtype=torch.bool),
    }
    out = apply_photometric(crops.expand(n, -1, -1, -1), params, MEAN, STD, 9)
    expected = torch.stack([torchvision_reference(crops[0], params, i, 9) for i in range(n)])
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert (out - out[:1]).abs().amax() > 0.01  # the order matters, so this checks something


def none_params(n: int) -> dict[str, torch.Tensor]:
    return {
        "jitter": torch.zeros(n, dtype=torch.bool), "order": torch.tensor([[0, 1, 2, 3]]).repeat(n, 1),
        "factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1), "grayscale": torch.zeros(n, dtype=torch.bool),
        "blur_sigma": torch.zeros(n), "solarize": torch.zeros(n, dtype=torch.bool),
    }


def test_hand_computed_values():
    # Four 2 x 2 crops of the colour (200, 100, 50) / (100, 60, 200); identity normalisation.
    crops = torch.tensor([[200, 100, 50], [200, 100, 50], [100, 60, 200], [200, 100, 50]], dtype=torch.uint8)
    crops = crops.view(4, 3, 1, 1).expand(4, 3, 2, 2).contiguous()
    p = none_params(4)
    p["jitter"][0], p["factors"][0, 0] = True, 0.5  # brightness 0.5
    p["solarize"][1] = True  # 200 >= 128 -> 255 - 200
    p["jitter"][2], p["factors"][2, 0], p["solarize"][2] = True, 1.5, True  # 150, 90, 300 -> 255; then solarize
    p["grayscale"][3] = True  # 0.2989 * 200 + 0.587 * 100 + 0.114 * 50 = 124.18
    out = apply_photometric(crops, p, (0, 0, 0), (1, 1, 1), 3) * 255
    expected = [[100.0, 50.0, 25.0], [55.0, 100.0, 50.0], [105.0, 90.0, 0.0], [124.18, 124.18, 124.18]]
    for i, rgb in enumerate(expected):
        assert torch.allclose(out[i], torch.tensor(rgb).view(3, 1, 1).expand(3, 2, 2), atol=1e-4), i
    # Contrast 0.5 on a grey ramp blends with its mean luma 0.9999 * 0.3 (the weights sum to 0.9999).
    ramp = torch.tensor([0, 51, 102, 153], dtype=torch.uint8).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    p = none_params(1)
    p["jitter"][0], p["order"][0], p["factors"][0, 1] = True, torch.tensor([1, 0, 2, 3]), 0.5
    out = apply_photometric(ramp, p, (0, 0, 0), (1, 1, 1), 3)
    values = 0.5 * torch.tensor([0.0, 0.2, 0.4, 0.6]) + 0.5 * 0.9999 * 0.3
    assert torch.allclose(out[0, 0].flatten(), values, atol=1e-6)
    # Normalisation: (x - mean) / std per channel.
    out = apply_photometric(crops[:1], none_params(1), MEAN, STD, 3)
    assert torch.allclose(out[0, :, 0, 0], (torch.tensor([200, 100, 50]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_blur_keeps_a_constant_image_and_smooths_an_edge():
    crops = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    crops[0] = 77
    crops[1, :, :, 4:] = 255
    p = none_params(2)
    p["blur_sigma"][:] = torch.tensor([1.5, 1.0])
    out = apply_photometric(crops, p, (0, 0, 0), (1, 1, 1), 9) * 255
    assert torch.allclose(out[0], torch.full_like(out[0], 77.0), atol=1e-4)
    row = out[1, 0, 0]
    assert row[0] < 1 and row[7] > 254 and 0 < row[3] < 127.5 < row[4] < 255
    assert abs(float(row[3] + row[4]) - 255) < 1e-3  # symmetric about the edge


def test_params_from_crop_params_rows_and_identity():
    aug = GlobalCropsAugmentation(crop_size=8, color_jitter_p=0.5, grayscale_p=0.5, blur_p=(1.0, 0.0),
                                  solarize_p=(0.0, 1.0))
    seen_jitter = set()
    for draw_id in range(10):
        crops = aug.sample_params(20, 16, draw_id)
        p = photometric_params(crops)
        assert p["blur_sigma"][1] == 0 and p["blur_sigma"][0] == pytest.approx(crops[0].blur_sigma)
        assert p["solarize"].tolist() == [False, True]
        for i, c in enumerate(crops):
            assert bool(p["grayscale"][i]) == c.grayscale
            seen_jitter.add(c.jitter is not None)
            if c.jitter is None:
                assert not p["jitter"][i] and p["order"][i].tolist() == [0, 1, 2, 3]
                assert p["factors"][i].tolist() == [1.0, 1.0, 1.0, 0.0]
            else:
                assert p["order"][i].tolist() == list(c.jitter.order)
                expected = [c.jitter.brightness, c.jitter.contrast, c.jitter.saturation, c.jitter.hue]
                assert p["factors"][i].tolist() == pytest.approx(expected)
    assert seen_jitter == {True, False}


def test_bad_inputs_are_refused():
    crops = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        apply_photometric(crops.float(), none_params(2), MEAN, STD, 3)
    with pytest.raises(ValueError, match="'order'"):
        apply_photometric(crops, {**none_params(2), "order": torch.zeros(2, 3, dtype=torch.long)}, MEAN, STD, 3)
    with pytest.raises(ValueError, match="lack 'solarize'"):
        apply_photometric(crops, {k: v for k, v in none_params(2).items() if k != "solarize"}, MEAN, STD, 3)
    with pytest.raises(AugmentationConfigError, match="loader, device"):
        GlobalCropsAugmentation(photometric="gpu")
    with pytest.raises(ConfigError, match="crops.photometric must be one of loader, device"):
        build_augmentation(load_config(None, ["crops.photometric=gpu"]))
    assert build_augmentation(load_config(None, ["crops.photometric=device"])).photometric == "device"
    with pytest.raises(ConfigError, match="crops.reduced_decode must be true or false, got 'sometimes'"):
        build_augmentation(load_config(None, ["crops.reduced_decode=sometimes"]))
    assert build_augmentation(load_config(None, ["crops.reduced_decode=true"])).reduced_decode is True


def image(seed: int, width: int = 30, height: int = 26) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def collated(mode: str, draw_ids: list[int], errors: tuple[int, ...] = ()) -> dict:
    aug = GlobalCropsAugmentation(crop_size=16, seed=3, color_jitter_p=0.8, grayscale_p=0.4, photometric=mode)
    items = []
    for draw_id in draw_ids:
        if draw_id in errors:
            items.append({"error": "unreadable", "path": f"bad{draw_id}", "draw_id": draw_id})
        else:
            items.append({**aug(image(draw_id), draw_id), "label": None, "dataset": None, "path": f"{draw_id}",
                          "draw_id": draw_id})
    return GlobalCropsCollator((4, 4), seed=1, crop_size=16)(items), aug


def test_device_mode_gives_the_loader_crops():
    draw_ids = list(range(100, 112))
    loader, _ = collated("loader", draw_ids)
    device, aug = collated("device", draw_ids)
    b = len(draw_ids)
    assert loader["global_crops"].dtype == torch.float32 and "photometric" not in loader
    assert device["global_crops"].dtype == torch.uint8 and device["global_crops"].shape == (2 * b, 3, 16, 16)
    # Parameters are stacked crop-major like the crops: row i < B is crop 0 of image i.
    for i, draw_id in enumerate(draw_ids[:3]):
        for c, crop_params in enumerate(aug.sample_params(30, 26, draw_id)):
            row = {k: v[c * b + i] for k, v in device["photometric"].items()}
            assert bool(row["grayscale"]) == crop_params.grayscale and bool(row["solarize"]) == crop_params.solarize
    finished = batch_to_device(device, torch.device("cpu"), aug)
    assert "photometric" not in finished and finished["global_crops"].dtype == torch.float32
    assert torch.allclose(finished["global_crops"], loader["global_crops"], atol=1e-5, rtol=0)
    assert torch.equal(finished["masks"], loader["masks"])


def test_device_mode_unreadable_and_mixed_batches():
    empty, aug = collated("device", [5, 6], errors=(5, 6))
    assert empty["global_crops"].shape == (0, 3, 16, 16) and "photometric" not in empty
    assert batch_to_device(empty, torch.device("cpu"), aug)["global_crops"].dtype == torch.float32
    partly, _ = collated("device", [5, 6, 7], errors=(6,))
    assert partly["global_crops"].shape[0] == 4 and partly["photometric"]["order"].shape == (4, 4)
    loader_item = {**GlobalCropsAugmentation(crop_size=16)(image(0), 0), "path": "a", "draw_id": 0}
    device_item = {**aug(image(1), 1), "path": "b", "draw_id": 1}
    with pytest.raises(CollateError, match="1 of 2 items carry photometric"):
        GlobalCropsCollator((4, 4), crop_size=16)([loader_item, device_item])
