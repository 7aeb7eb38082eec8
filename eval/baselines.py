"""Non-learned feature extractors: the floor a pretrained backbone must clear.

``--ckpt baseline:colour`` evaluates :class:`ColourBaseline` with the same images, folds,
probes and metrics as a checkpoint, so a report shows at once whether pretraining beat a
colour histogram (docs/evaluation.md). A baseline is an ``nn.Module`` with the backbone's
interface (a normalised ``[n, 3, S, S]`` batch in, ``{"x_norm_clstoken": [n, D]}`` out),
so extraction, caching and probing treat it like any backbone.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFIX = "baseline:"


class ColourBaseline(nn.Module):
    """HSV colour histogram + downsampled grey pixels, ``[n, 3, S, S] -> [n, 384]``.

    * 128 dims: joint histogram of hue (8 bins), saturation (4) and value (4) over all
      pixels, as square roots of the bin frequencies (the Hellinger embedding, under which
      the cosine of two histograms is their Bhattacharyya coefficient);
    * 256 dims: the grey image (ITU-R 601 luma) averaged down to 16 x 16, standardised per
      image (zero mean, unit variance), so it carries shape and texture, not brightness.

    Each block is scaled to unit L2 norm, so the two weigh the same under the kNN's
    cosine similarity; logistic regression standardises every feature on the training
    folds anyway. Inputs are normalised with ``mean``/``std`` (the extraction's
    normalisation), which is undone first.
    """

    HUE_BINS, SAT_BINS, VAL_BINS = 8, 4, 4
    GRID = 16
    # What extraction reads of a backbone: any crop size fits (one pixel per "patch").
    patch_size = 1
    num_register_tokens = 0

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.embed_dim = self.HUE_BINS * self.SAT_BINS * self.VAL_BINS + self.GRID * self.GRID

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        rgb = (x.float() * self.std + self.mean).clamp(0.0, 1.0)  # [n, 3, S, S] in [0, 1]
        return {"x_norm_clstoken": torch.cat([self.histogram(rgb), self.grey_pixels(rgb)], dim=1)}

    def histogram(self, rgb: Tensor) -> Tensor:
        """``[n, 3, S, S]`` RGB in [0, 1] -> ``[n, 128]`` unit-norm sqrt bin frequencies."""
        h, s, v = rgb_to_hsv(rgb).unbind(1)  # each [n, S, S] in [0, 1]
        hb = (h * self.HUE_BINS).long().clamp_(0, self.HUE_BINS - 1)
        sb = (s * self.SAT_BINS).long().clamp_(0, self.SAT_BINS - 1)
        vb = (v * self.VAL_BINS).long().clamp_(0, self.VAL_BINS - 1)
        index = ((hb * self.SAT_BINS + sb) * self.VAL_BINS + vb).flatten(1)  # [n, S*S]
        n_bins = self.HUE_BINS * self.SAT_BINS * self.VAL_BINS
        counts = torch.zeros(index.shape[0], n_bins, device=rgb.device).scatter_add_(
            1, index, torch.ones_like(index, dtype=torch.float32)
        )
        return F.normalize((counts / index.shape[1]).sqrt(), dim=1)

    def grey_pixels(self, rgb: Tensor) -> Tensor:
        """``[n, 3, S, S]`` -> ``[n, 256]``: 16 x 16 area-averaged luma, standardised per
        image, unit norm (a flat image gives zeros)."""
        weights = torch.tensor([0.299, 0.587, 0.114], device=rgb.device).view(1, 3, 1, 1)
        grey = F.adaptive_avg_pool2d((rgb * weights).sum(1, keepdim=True), self.GRID).flatten(1)
        grey = grey - grey.mean(dim=1, keepdim=True)
        norm = grey.norm(dim=1, keepdim=True)
        # Below 1e-4 (luma in [0, 1] over 256 cells) the image is flat: rounding noise, not shape.
        return torch.where(norm > 1e-4, grey / norm.clamp_min(1e-4), torch.zeros_like(grey))


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """``[n, 3, ...]`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn; grey
    pixels get hue 0 and saturation 0)."""
    r, g, b = rgb.unbind(1)
    value, argmax = rgb.max(dim=1)
    chroma = value - rgb.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    return torch.stack([hue, saturation, value], dim=1)


#: Baselines by name, each built from the extraction's normalisation.
BASELINES = {"colour": ColourBaseline}


def is_baseline(ckpt: object) -> bool:
    return str(ckpt).strip().lower().startswith(PREFIX)


def baseline_name(ckpt: object) -> str:
    """``"baseline:colour"`` -> ``"colour"``; an unknown name raises ValueError naming it."""
    name = str(ckpt).strip().lower()[len(PREFIX):]
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r} in --ckpt {ckpt}; known: {', '.join(PREFIX + b for b in BASELINES)}")
    return name
