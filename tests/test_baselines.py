"""The colour baseline of eval/, against hand computations."""
from __future__ import annotations

import colorsys
import math

import pytest
import torch

from eval.baselines import ColourBaseline, baseline_name, is_baseline, rgb_to_hsv

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_rgb_to_hsv_matches_colorsys() -> None:
    torch.manual_seed(0)
    rgb = torch.rand(1, 3, 5, 7)
    rgb[0, :, 0, 0] = 0.3  # grey pixel: hue 0, saturation 0
    rgb[0, :, 0, 1] = 0.0  # black
    hsv = rgb_to_hsv(rgb.double())
    for i in range(5):
        for j in range(7):
            expected = colorsys.rgb_to_hsv(*rgb[0, :, i, j].tolist())
            assert hsv[0, :, i, j].tolist() == pytest.approx(expected, abs=1e-6), (i, j)


def test_histogram_bins_by_hand() -> None:
    """A 2 x 2 image: two pure red pixels (h 0, s 1, v 1 -> bin (0, 3, 3)), one pure blue
    (h 2/3 -> hue bin 5), one black (h 0, s 0, v 0 -> bin (0, 0, 0)); sqrt frequencies,
    unit norm: red sqrt(1/2), blue and black sqrt(1/4), normalised by sqrt(1)."""
    rgb = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])[None]
    model = ColourBaseline(MEAN, STD)
    hist = model.histogram(rgb)[0]
    bin_of = lambda h, s, v: (h * 4 + s) * 4 + v  # noqa: E731
    expected = torch.zeros(128)
    expected[bin_of(0, 3, 3)] = math.sqrt(0.5)
    expected[bin_of(5, 3, 3)] = math.sqrt(0.25)
    expected[bin_of(0, 0, 0)] = math.sqrt(0.25)
    torch.testing.assert_close(hist, expected)


def test_grey_pixels_standardised_and_forward_shape() -> None:
    model = ColourBaseline(MEAN, STD)
    # left half black, right half white: luma 0 / 1 -> +-1/16 after centring and unit norm
    rgb = torch.zeros(1, 3, 32, 32)
    rgb[..., 16:] = 1.0
    grey = model.grey_pixels(rgb)[0].view(16, 16)
    torch.testing.assert_close(grey[:, :8], torch.full((16, 8), -1 / 16))
    torch.testing.assert_close(grey[:, 8:], torch.full((16, 8), 1 / 16))
    assert model.grey_pixels(torch.full((1, 3, 32, 32), 0.7)).abs().max() == 0.0  # flat image: zeros
    # the forward undoes the normalisation: the same features as from the raw pixels
    out = model(_normalised(rgb))["x_norm_clstoken"]
    assert out.shape == (1, 384) and model.embed_dim == 384
    torch.testing.assert_close(out[0, 128:], model.grey_pixels(rgb)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :128].norm(), torch.tensor(1.0))


def test_baseline_names() -> None:
    assert is_baseline("baseline:colour") and is_baseline(" Baseline:Colour ") and not is_baseline("runs/x")
    assert baseline_name("baseline:colour") == "colour"
    with pytest.raises(ValueError, match="unknown baseline 'hog'.*baseline:colour"):
        baseline_name("baseline:hog")
