"""Global-crop augmentation (shapes, ranges, determinism, exact geometry) and the eval transform."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_hier.data import AugmentationConfigError, EvalTransform, GlobalCropsAugmentation

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def noise_image(width: int = 24, height: int = 20, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def plain(**overrides) -> GlobalCropsAugmentation:
    """Every random op off, identity normalisation: output = pixels / 255."""
    kwargs = dict(
        crop_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, vflip_p=0.0, rot90_p=0.0,
        color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, mean=(0, 0, 0), std=(1, 1, 1),
    )
    kwargs.update(overrides)
    return GlobalCropsAugmentation(**kwargs)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 (exact for values k / 255)."""
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_shapes_dtype_and_value_range():
    aug = GlobalCropsAugmentation(crop_size=16, seed=3)
    image = noise_image()
    low = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
    for draw_id in range(12):
        crops = aug(image, draw_id)["global_crops"]
        assert len(crops) == 2
        for crop in crops:
            assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32
            assert bool((crop >= low - 1e-5).all()) and bool((crop <= high + 1e-5).all())


def test_deterministic_in_seed_and_draw_id_only():
    image = noise_image()
    aug = GlobalCropsAugmentation(crop_size=16, seed=5)
    torch.manual_seed(0)
    first = aug(image, 7)["global_crops"]
    torch.manual_seed(12345)
    torch.rand(100)
    state = torch.random.get_rng_state()
    again = GlobalCropsAugmentation(crop_size=16, seed=5)(image, 7)["global_crops"]
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_draw = aug(image, 8)["global_crops"]
    other_seed = GlobalCropsAugmentation(crop_size=16, seed=6)(image, 7)["global_crops"]
    assert not torch.equal(first[0], other_draw[0])
    assert not torch.equal(first[0], other_seed[0])
    assert not torch.equal(first[0], first[1])  # the two crops differ


def hand_rot90_ccw(a: np.ndarray) -> np.ndarray:
    """Counter-clockwise quarter turn of an [n, n, c] array written out index by index."""
    n = a.shape[0]
    out = np.empty_like(a)
    for i in range(n):
        for j in range(n):
            out[i, j] = a[j, n - 1 - i]
    return out


def test_flips_and_rot90_exact_on_asymmetric_image():
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    aug = plain(hflip_p=0.5, vflip_p=0.5, rot90_p=0.5)
    seen = set()
    for draw_id in range(200):
        params = aug.sample_params(8, 8, draw_id)
        crops = aug(image, draw_id)["global_crops"]
        for p, crop in zip(params, crops):
            assert (p.top, p.left, p.height, p.width) == (0, 0, 8, 8)
            expected = pixels
            if p.hflip:
                expected = expected[:, ::-1]
            if p.vflip:
                expected = expected[::-1, :]
            for _ in range(p.rot90_k):
                expected = hand_rot90_ccw(np.ascontiguousarray(expected))
            assert np.array_equal(to_uint8(crop), expected)
            seen.add((p.hflip, p.vflip, p.rot90_k))
    assert len(seen) == 16  # every flip / rotation combination was exercised


def test_crop_box_sizes():
    aug = plain(scale=(0.25, 0.25), ratio=(1.0, 1.0))
    for draw_id in range(20):
        for p in aug.sample_params(12, 8, draw_id):
            # area 0.25 * 96 = 24 -> side round(sqrt(24)) = 5
            assert (p.height, p.width) == (5, 5)
            assert 0 <= p.top <= 3 and 0 <= p.left <= 7
    # A 40 x 4 strip cannot hold a square of the full area: fallback to the centred 4 x 4.
    p = plain().sample_params(40, 4, 0)[0]
    assert (p.top, p.left, p.height, p.width) == (0, 18, 4, 4)


def test_solarize_and_grayscale_values():
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    crops = plain(solarize_p=(0.0, 1.0))(image, 0)["global_crops"]
    assert to_uint8(crops[0])[0, 0].tolist() == [200, 100, 50]
    assert to_uint8(crops[1])[0, 0].tolist() == [55, 100, 50]  # >= 128 inverted
    gray = plain(grayscale_p=1.0)(image, 0)["global_crops"][0]
    expected = 0.299 * 200 + 0.587 * 100 + 0.114 * 50  # ITU-R 601 luma = 124.2
    assert torch.allclose(gray * 255, torch.full_like(gray, expected), atol=1.0)


def test_brightness_jitter_uses_drawn_factor():
    image = Image.new("RGB", (8, 8), (100, 50, 20))
    aug = plain(color_jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    for draw_id in range(5):
        factor = aug.sample_params(8, 8, draw_id)[0].jitter.brightness
        assert 0.6 <= factor <= 1.4
        crop = aug(image, draw_id)["global_crops"][0]
        expected = torch.tensor([min(255.0, c * factor) for c in (100, 50, 20)]).view(3, 1, 1)
        assert torch.allclose(crop * 255, expected.expand(3, 8, 8), atol=1.0)


def test_normalisation_values():
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    crop = GlobalCropsAugmentation(
        crop_size=8, scale=(1, 1), ratio=(1, 1), hflip_p=0, vflip_p=0, rot90_p=0, color_jitter_p=0,
        grayscale_p=0, blur_p=0, solarize_p=0,
    )(image, 0)["global_crops"][0]
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    assert torch.allclose(crop[:, 3, 3], torch.tensor(expected), atol=1e-5)


def test_blur_only_on_chosen_crop():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, 4:] = 255  # vertical edge
    crops = plain(blur_p=(1.0, 0.0), blur_sigma=(1.0, 1.0))(Image.fromarray(pixels), 0)["global_crops"]
    assert np.array_equal(to_uint8(crops[1]), pixels)
    blurred = to_uint8(crops[0])[0, :, 0].astype(int)
    assert blurred[0] == 0 and blurred[7] == 255
    assert 0 < blurred[3] < 128 < blurred[4] < 255  # edge smoothed, symmetric about the edge
    assert abs(int(blurred[3]) + int(blurred[4]) - 255) <= 1


def test_config_errors():
    with pytest.raises(AugmentationConfigError, match="blur_p"):
        GlobalCropsAugmentation(blur_p=(1.0, 0.5, 0.2))
    with pytest.raises(AugmentationConfigError, match="interpolation"):
        GlobalCropsAugmentation(interpolation="lanczos9")
    with pytest.raises(AugmentationConfigError, match="scale"):
        GlobalCropsAugmentation(scale=(0.5, 1.5))


def test_eval_transform_pad_and_center_crop():
    # 40 wide x 20 high, left half red, right half blue.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    red = torch.tensor([(1 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (0 - MEAN[2]) / STD[2]])
    blue = torch.tensor([(0 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (1 - MEAN[2]) / STD[2]])

    padded = EvalTransform(20, "pad")(image)  # resized to 20 x 10, rows 5..14 hold the image
    assert padded.shape == (3, 20, 20) and padded.dtype == torch.float32
    assert torch.count_nonzero(padded[:, :5]) == 0 and torch.count_nonzero(padded[:, 15:]) == 0
    assert torch.allclose(padded[:, 10, 2], red, atol=1e-5)
    assert torch.allclose(padded[:, 10, 17], blue, atol=1e-5)

    cropped = EvalTransform(20, "center_crop")(image)  # resized 40 x 20 (unchanged), columns 10..29
    assert cropped.shape == (3, 20, 20)
    assert torch.allclose(cropped[:, 5, 0], red, atol=1e-5)
    assert torch.allclose(cropped[:, 5, 19], blue, atol=1e-5)
    assert torch.allclose(cropped[:, :, :10], red.view(3, 1, 1).expand(3, 20, 10), atol=1e-5)
    with pytest.raises(AugmentationConfigError, match="resize_mode"):
        EvalTransform(20, "stretch")


def _float_eval_transform(image: Image.Image, s: int, mode: str) -> torch.Tensor:
    """The float path EvalTransform had before it split into uint8 resize + normalisation."""
    import torchvision.transforms.v2.functional as F2
    from torchvision.transforms import InterpolationMode

    image = image.convert("RGB")
    w, h = image.size
    factor = s / (max if mode == "pad" else min)(w, h)
    new_w = min(s, max(1, round(w * factor))) if mode == "pad" else max(s, round(w * factor))
    new_h = min(s, max(1, round(h * factor))) if mode == "pad" else max(s, round(h * factor))
    resized = F2.resize(image, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = F2.normalize(F2.pil_to_tensor(resized).to(torch.float32).div_(255.0), MEAN, STD)
    if mode == "center_crop":
        return F2.center_crop(x, [s, s])
    left, top = (s - new_w) // 2, (s - new_h) // 2
    return F2.pad(x, [left, top, s - new_w - left, s - new_h - top], fill=0.0)


def test_eval_transform_uint8_halves_equal_the_float_path_to_the_bit():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in
              ((20, 37), (37, 20), (28, 28), (180, 300), (9, 9))]
    images.append(Image.fromarray(rng.integers(0, 256, size=(30, 17), dtype=np.uint8), mode="L"))
    for mode in ("pad", "center_crop"):
        transform = EvalTransform(28, mode, MEAN, STD)
        halves = [transform.resize(image) for image in images]
        assert all(u8.dtype == torch.uint8 and u8.shape == (3, 28, 28) for u8, _ in halves)
        batch = transform.normalize(torch.stack([u8 for u8, _ in halves]), torch.stack([box for _, box in halves]))
        for image, row, (_, box) in zip(images, batch, halves):
            reference = _float_eval_transform(image, 28, mode)
            assert torch.equal(row, reference) and torch.equal(transform(image), reference)
            if mode == "center_crop":
                assert box.tolist() == [0, 0, 28, 28]
    # 37 x 20 (w x h) padded to 28: resized to 28 x 15, rows 6..20 hold it.
    assert EvalTransform(28, "pad").resize(images[0])[1].tolist() == [6, 0, 15, 28]


def _smooth_rgb(size: int) -> Image.Image:
    """A smooth colour image (gradients and a disc): JPEG keeps it nearly intact."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    disc = ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08).astype(float)
    rgb = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.4 + 0.4 * disc], axis=-1)
    return Image.fromarray((255 * rgb).round().astype(np.uint8))


def test_reduced_decode_size_rule():
    aug = GlobalCropsAugmentation(crop_size=64, scale=(0.5, 1.0), reduced_decode=True)
    # Both crop boxes are at least sqrt(0.5 * 3/4) = 0.61 of a 1024 px side = 627 px, so
    # the factor min(box sides) / 64 is >= 9.8 and the request is the full size / factor.
    for draw_id in range(5):
        boxes = aug.sample_params(1024, 1024, draw_id)
        factor = min(min(p.height, p.width) for p in boxes) / 64
        assert aug.decode_size(1024, 1024, draw_id) == (int(np.ceil(1024 / factor)),) * 2
    # 100 px: no crop has 2 x 64 source pixels per side; and the option off never asks.
    assert aug.decode_size(100, 100, 0) is None
    assert GlobalCropsAugmentation(crop_size=64, reduced_decode=False).decode_size(1024, 1024, 0) is None
    with pytest.raises(AugmentationConfigError, match="reduced_decode"):
        GlobalCropsAugmentation(reduced_decode="yes")


def test_reduced_decode_gives_nearly_the_full_decode_crops(tmp_path):
    from dinov2_hier.data import ImageRecordDataset, Record, load_image_reduced

    jpeg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    _smooth_rgb(1024).save(jpeg, quality=95)
    _smooth_rgb(1024).save(png)
    common = dict(crop_size=64, scale=(0.5, 1.0), photometric="device")
    full = ImageRecordDataset([Record(str(jpeg), None)], GlobalCropsAugmentation(**common))
    reduced = ImageRecordDataset([Record(str(jpeg), None)], GlobalCropsAugmentation(**common, reduced_decode=True))
    request = reduced.transform.decode_size(1024, 1024, 3)
    image, size = load_image_reduced(str(jpeg), lambda w, h: request)
    assert size == (1024, 1024) and image.width <= 1024 // 8  # decoded at 1/8 scale (factor >= 9.8)
    a, b = full[(0, 3)], reduced[(0, 3)]
    for x, y in zip(a["global_crops"], b["global_crops"]):
        diff = (x.float() - y.float()).abs()
        assert diff.mean() < 1.0 and diff.max() < 16  # grey levels of 255 (measured: <= 0.33 and 9)
    assert all(torch.equal(a["photometric"][k], b["photometric"][k]) for k in a["photometric"])
    # A format without reduced decoding (PNG) is decoded at full size: identical crops.
    c = ImageRecordDataset([Record(str(png), None)], GlobalCropsAugmentation(**common, reduced_decode=True))[(0, 3)]
    d = ImageRecordDataset([Record(str(png), None)], GlobalCropsAugmentation(**common))[(0, 3)]
    assert all(torch.equal(x, y) for x, y in zip(c["global_crops"], d["global_crops"]))


def test_reduced_decode_draws_the_crop_parameters_once_per_item(tmp_path):
    from dinov2_hier.data import ImageRecordDataset, Record

    path = tmp_path / "big.jpg"
    _smooth_rgb(512).save(path, quality=95)
    aug = GlobalCropsAugmentation(crop_size=64, reduced_decode=True)
    calls = []
    original = aug.sample_params
    aug.sample_params = lambda *args: calls.append(args) or original(*args)
    dataset = ImageRecordDataset([Record(str(path), None)], aug)
    first = dataset[(0, 7)]
    assert calls == [(512, 512, 7)]  # decode_size and the crops shared one draw
    dataset[(0, 8)]
    assert calls == [(512, 512, 7), (512, 512, 8)]
    # The memo changes nothing: a fresh augmentation gives the same crops for draw 7.
    fresh = ImageRecordDataset([Record(str(path), None)], GlobalCropsAugmentation(crop_size=64, reduced_decode=True))
    assert all(torch.equal(a, b) for a, b in zip(first["global_crops"], fresh[(0, 7)]["global_crops"]))
