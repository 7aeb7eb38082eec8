"""Crop augmentations of the DINOv2 recipe (two global crops, optional local crops) and an eval transform.

Randomness is a pure function of ``(seed, draw_id)``: every random parameter is drawn
from a private ``torch.Generator`` and the ops are applied through torchvision's
functional API (geometry) and :mod:`.photometric` with those parameters. torchvision's
transform *classes* draw from the global torch RNG, whose state differs between loader
workers and after a resume, so they are not used. The global RNG is never touched.

Pipeline per global crop (crop ``i`` of 2; per-crop probabilities are pairs):

1. random resized crop of ``scale`` x image area with aspect ratio in ``ratio``,
   resized to ``crop_size`` (PIL, ``interpolation``, antialiased);
2. horizontal flip (p=``hflip_p``), vertical flip (``vflip_p``), rotation by
   k*90 degrees counter-clockwise with k uniform in {1,2,3} (``rot90_p``): cells
   have no canonical orientation;
3. colour jitter (``color_jitter_p``; brightness/contrast/saturation/hue factors and
   their order random), grayscale (``grayscale_p``);
4. Gaussian blur (``blur_p[i]``, sigma uniform in ``blur_sigma`` pixels);
5. solarize at 128 (``solarize_p[i]``);
6. to float in [0, 1], normalise with ``mean``/``std``.

Local crops (``local_crops_number`` > 0, DINOv2's multi-crop; none by default): each is a
random resized crop of ``local_crops_scale`` x image area resized to ``local_crops_size``,
with the global crops' flips, quarter turns, colour jitter and grey, Gaussian blur with
probability :data:`LOCAL_BLUR_P` and no solarize. Their parameters come from a generator
of their own, seeded with ``(seed, draw_id,`` :data:`LOCAL_CROPS_STREAM` ``)``: the global
crops of a draw are the same with or without local crops.

Steps 1-2 (geometry) always run in the loader worker, on PIL images and uint8 tensors.
Steps 3-6 (photometric) run batched in float32 through
:func:`~dinov2_hier.data.photometric.apply_photometric`, either in the worker on the
image's crops (``photometric="loader"``) or later on the training device on the whole
batch (``photometric="device"``: the item carries uint8 crops and the parameters; the
local crops, of another size, as a tensor and parameter rows of their own).

Length (~510 lines): the global crops, the local crops and the eval transform share the
seeded parameter draws and the geometry helpers.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..models.spec import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported: the default normalisation)
from .photometric import ColorJitterParams, CropParams, apply_photometric, photometric_params
from .seeding import torch_generator

#: Where the photometric ops run: in the loader worker, or on the training device.
PHOTOMETRIC_MODES = ("loader", "device")

#: Gaussian blur probability of a local crop (DINOv2's ``GaussianBlur(p=0.5)``).
LOCAL_BLUR_P = 0.5
#: Third seed component of the local crops' generator, ``(seed, draw_id, LOCAL_CROPS_STREAM)``
#: ("local" in ASCII): a stream apart from the global crops' ``(seed, draw_id)``.
LOCAL_CROPS_STREAM = int.from_bytes(b"local", "big")


_PIL_RESAMPLE = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
}


class AugmentationConfigError(ValueError):
    """An augmentation parameter is out of range."""


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """A per-crop probability: one value for both crops, or one per crop."""
    if isinstance(value, (int, float)):
        pair = (float(value), float(value))
    else:
        pair = tuple(float(v) for v in value)
        if len(pair) != 2:
            raise AugmentationConfigError(f"{name} must be a number or a pair (crop 0, crop 1), got {value}")
    for p in pair:
        if not 0.0 <= p <= 1.0:
            raise AugmentationConfigError(f"{name} probabilities must lie in [0, 1], got {value}")
    return pair  # type: ignore[return-value]


def _check_probability(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise AugmentationConfigError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _check_range(value: Sequence[float], name: str, low: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low <= lo <= hi:
        raise AugmentationConfigError(f"{name} must be (lo, hi) with {low} <= lo <= hi, got {value}")
    return lo, hi


def _check_area_scale(value: Sequence[float], name: str) -> tuple[float, float]:
    """A RandomResizedCrop area range: ``(lo, hi)`` with ``0 < lo <= hi <= 1``."""
    lo, hi = _check_range(value, name, 0.0)
    if hi > 1.0 or lo <= 0.0:
        raise AugmentationConfigError(f"{name} must lie in (0, 1], got {value}")
    return lo, hi


def _interpolation(name: str) -> InterpolationMode:
    try:
        mode = InterpolationMode(name.lower())
    except ValueError:
        mode = None
    if mode not in _PIL_RESAMPLE:
        raise AugmentationConfigError(f"unknown interpolation '{name}'; use one of nearest, bilinear, bicubic")
    return mode


class _Draw:
    """Scalar draws from a private generator."""

    def __init__(self, generator: torch.Generator) -> None:
        self.g = generator

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.g))

    def bernoulli(self, p: float) -> bool:
        # Draw even when p is 0 or 1 so that later draws do not shift when p changes.
        return float(torch.rand((), generator=self.g)) < p

    def integer(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi)."""
        return int(torch.randint(lo, hi, (), generator=self.g))


class GlobalCropsAugmentation:
    """Two augmented global crops (and ``local_crops_number`` local crops) of a PIL image,
    a pure function of ``(seed, draw_id)``.

    With ``photometric="loader"`` (default):
    ``__call__(image, draw_id) -> {"global_crops": [Tensor[3,S,S], Tensor[3,S,S]]}``,
    float32, normalised with ``mean``/``std`` (so each channel c lies in
    ``[(0 - mean[c]) / std[c], (1 - mean[c]) / std[c]]``), ``S = crop_size``.

    With ``photometric="device"``: ``{"global_crops": [uint8 [3,S,S] x 2], "photometric":
    params}``, the crops after geometry only and their photometric parameters (rows
    ``[2, ...]``, see :mod:`.photometric`); :meth:`photometric_batch` finishes a collated
    batch of them on the training device, with the same result as the loader path.

    With ``local_crops_number = n > 0`` the dict also holds ``"local_crops"``: ``n``
    crops ``[3, s, s]`` (``s = local_crops_size``), float32 normalised, or uint8 with their
    parameter rows ``[n, ...]`` as ``"local_photometric"`` in device mode. With ``n = 0``
    neither key is there and nothing about the global crops changes.

    The photometric ops used to run on uint8 tensors (rounding to integers after every
    op); since both modes share the float32 implementation, loader-mode crops differ
    slightly from those of earlier versions (before normalisation, on pbc_dev crops: a
    mean of about 1 and at most about 5 of 255 grey levels).
    """

    n_crops = 2

    def __init__(
        self,
        crop_size: int = 224,
        scale: Sequence[float] = (0.32, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        vflip_p: float = 0.5,
        rot90_p: float = 0.5,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float | Sequence[float] = (1.0, 0.1),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_kernel_size: int = 9,
        solarize_p: float | Sequence[float] = (0.0, 0.2),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        seed: int = 0,
        photometric: str = "loader",
        reduced_decode: bool = False,
        local_crops_number: int = 0,
        local_crops_size: int = 98,
        local_crops_scale: Sequence[float] = (0.05, 0.32),
    ) -> None:
        if crop_size < 1:
            raise AugmentationConfigError(f"crop_size must be >= 1, got {crop_size}")
        self.crop_size = int(crop_size)
        self.scale = _check_area_scale(scale, "scale")
        if isinstance(local_crops_number, bool) or not isinstance(local_crops_number, int) or local_crops_number < 0:
            raise AugmentationConfigError(f"local_crops_number must be an integer >= 0, got {local_crops_number!r}")
        self.local_crops_number = int(local_crops_number)
        if local_crops_size < 1:
            raise AugmentationConfigError(f"local_crops_size must be >= 1, got {local_crops_size}")
        self.local_crops_size = int(local_crops_size)
        # Not related to ``scale``: DINOv2 lets the two ranges overlap or leave a gap.
        self.local_crops_scale = _check_area_scale(local_crops_scale, "local_crops_scale")
        self.ratio = _check_range(ratio, "ratio", 1e-6)
        self.hflip_p = _check_probability(hflip_p, "hflip_p")
        self.vflip_p = _check_probability(vflip_p, "vflip_p")
        self.rot90_p = _check_probability(rot90_p, "rot90_p")
        self.color_jitter_p = _check_probability(color_jitter_p, "color_jitter_p")
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= value <= 1.0:
                raise AugmentationConfigError(f"{name} must lie in [0, 1], got {value}")
        if not 0.0 <= hue <= 0.5:
            raise AugmentationConfigError(f"hue must lie in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.grayscale_p = _check_probability(grayscale_p, "grayscale_p")
        self.blur_p = _pair(blur_p, "blur_p")
        self.blur_sigma = _check_range(blur_sigma, "blur_sigma", 1e-6)
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise AugmentationConfigError(f"blur_kernel_size must be odd and positive, got {blur_kernel_size}")
        self.blur_kernel_size = int(blur_kernel_size)
        self.solarize_p = _pair(solarize_p, "solarize_p")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise AugmentationConfigError(f"mean and std need 3 entries, std > 0; got {mean}, {std}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.interpolation = _interpolation(interpolation)
        self.seed = int(seed)
        if photometric not in PHOTOMETRIC_MODES:
            raise AugmentationConfigError(
                f"photometric must be one of {', '.join(PHOTOMETRIC_MODES)}, got '{photometric}'"
            )
        self.photometric = photometric
        if not isinstance(reduced_decode, bool):
            raise AugmentationConfigError(f"reduced_decode must be true or false, got {reduced_decode!r}")
        self.reduced_decode = reduced_decode
        # (width, height, draw_id) -> parameters (global, local) of the last image: decode_size
        # and __call__ of one item need the same draws (a pure function, memoised once).
        self._last_params: tuple[tuple[int, int, int], tuple[list[CropParams], list[CropParams]]] | None = None

    # -- parameters ---------------------------------------------------------------------

    def _crop_box(
        self, draw: _Draw, width: int, height: int, scale: tuple[float, float]
    ) -> tuple[int, int, int, int]:
        """Random box (top, left, h, w) covering a ``scale`` fraction of the area with an
        aspect ratio (w/h) in ``ratio``; falls back to the largest centred box whose ratio
        is clamped into ``ratio`` when 10 tries do not fit (thin images, scale near 1)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * draw.uniform(*scale)
            aspect = math.exp(draw.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = draw.integer(0, height - h + 1)
                left = draw.integer(0, width - w + 1)
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return (height - h) // 2, (width - w) // 2, h, w

    def _sample_crop(
        self, draw: _Draw, width: int, height: int, scale: tuple[float, float], blur_p: float, solarize_p: float
    ) -> CropParams:
        """One crop's parameters, drawn in a fixed order (box, flips, turn, jitter, grey, blur, solarize)."""
        top, left, h, w = self._crop_box(draw, width, height, scale)
        hflip = draw.bernoulli(self.hflip_p)
        vflip = draw.bernoulli(self.vflip_p)
        rot90_k = draw.integer(1, 4) if draw.bernoulli(self.rot90_p) else 0
        jitter = None
        if draw.bernoulli(self.color_jitter_p):
            order = tuple(int(j) for j in torch.randperm(4, generator=draw.g))
            jitter = ColorJitterParams(
                order=order,
                brightness=draw.uniform(1 - self.brightness, 1 + self.brightness),
                contrast=draw.uniform(1 - self.contrast, 1 + self.contrast),
                saturation=draw.uniform(1 - self.saturation, 1 + self.saturation),
                hue=draw.uniform(-self.hue, self.hue),
            )
        grayscale = draw.bernoulli(self.grayscale_p)
        blur_sigma = draw.uniform(*self.blur_sigma) if draw.bernoulli(blur_p) else None
        solarize = draw.bernoulli(solarize_p)
        return CropParams(top, left, h, w, hflip, vflip, rot90_k, jitter, grayscale, blur_sigma, solarize)

    def sample_params(self, width: int, height: int, draw_id: int) -> list[CropParams]:
        """The random parameters of both global crops of a ``width`` x ``height`` image at ``draw_id``."""
        draw = _Draw(torch_generator(self.seed, int(draw_id)))
        return [
            self._sample_crop(draw, width, height, self.scale, self.blur_p[i], self.solarize_p[i])
            for i in range(self.n_crops)
        ]

    def sample_local_params(self, width: int, height: int, draw_id: int) -> list[CropParams]:
        """The random parameters of the ``local_crops_number`` local crops (box in
        ``local_crops_scale``, blur with :data:`LOCAL_BLUR_P`, no solarize), from their own
        generator: :meth:`sample_params` of the same draw is unaffected."""
        draw = _Draw(torch_generator(self.seed, int(draw_id), LOCAL_CROPS_STREAM))
        return [
            self._sample_crop(draw, width, height, self.local_crops_scale, LOCAL_BLUR_P, 0.0)
            for _ in range(self.local_crops_number)
        ]

    def _params(self, width: int, height: int, draw_id: int) -> tuple[list[CropParams], list[CropParams]]:
        """(:meth:`sample_params`, :meth:`sample_local_params`), computed once per image when
        :meth:`decode_size` asked first; no local draws without local crops."""
        key = (int(width), int(height), int(draw_id))
        if self._last_params is None or self._last_params[0] != key:
            local = self.sample_local_params(*key) if self.local_crops_number else []
            self._last_params = (key, (self.sample_params(*key), local))
        return self._last_params[1]

    # -- application --------------------------------------------------------------------

    def decode_size(self, width: int, height: int, draw_id: int) -> tuple[int, int] | None:
        """The smallest decoded size of a ``width`` x ``height`` image that still gives every
        crop of ``draw_id`` at least its output size (``crop_size``, ``local_crops_size``) in
        source pixels on each side, when that is at most half the full size; None otherwise
        or when ``reduced_decode`` is off.

        A JPEG decoder can scale by 1/2, 1/4 or 1/8 while decoding (``PIL.Image.draft``),
        which is several times cheaper than decoding at full size and downscaling after.
        The crop parameters stay those of the full-size image.
        """
        if not self.reduced_decode:
            return None
        global_params, local_params = self._params(width, height, draw_id)
        factor = min(min(p.height, p.width) for p in global_params) / self.crop_size
        if local_params:
            factor = min(factor, min(min(p.height, p.width) for p in local_params) / self.local_crops_size)
        if factor < 2.0:
            return None
        return math.ceil(width / factor), math.ceil(height / factor)

    def geometry(
        self, image: Image.Image, p: CropParams, source_size: tuple[int, int] | None = None, size: int | None = None
    ) -> torch.Tensor:
        """Resized crop, flips and quarter turns of one crop: uint8 ``[3, S, S]``,
        ``S = size`` (default ``crop_size``; ``local_crops_size`` for a local crop).

        ``source_size``: the full size the crop box ``p`` refers to, when ``image`` was
        decoded at a reduced size (:meth:`decode_size`); the box is then scaled to it.
        """
        side = self.crop_size if size is None else int(size)
        if source_size is None or tuple(source_size) == image.size:
            # Crop and resize in PIL (fast, antialiased), then work on uint8 tensors.
            cropped = TF.resized_crop(
                image, p.top, p.left, p.height, p.width, [side, side], interpolation=self.interpolation, antialias=True
            )
        else:
            sx, sy = image.width / source_size[0], image.height / source_size[1]
            box = (p.left * sx, p.top * sy, (p.left + p.width) * sx, (p.top + p.height) * sy)
            # PIL resamples a sub-pixel box directly (antialiased like the path above).
            cropped = image.resize((side, side), _PIL_RESAMPLE[self.interpolation], box=box)
        x = TF.pil_to_tensor(cropped)  # uint8 [3, S, S]
        if p.hflip:
            x = x.flip(-1)
        if p.vflip:
            x = x.flip(-2)
        if p.rot90_k:
            x = torch.rot90(x, p.rot90_k, dims=(-2, -1))
        return x

    def photometric_batch(self, crops: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Photometric ops and normalisation of uint8 ``[N, 3, S, S]`` crops (any device)
        with their parameter rows: float32 ``[N, 3, S, S]``."""
        return apply_photometric(crops, params, self.mean, self.std, self.blur_kernel_size)

    def apply(self, image: Image.Image, p: CropParams) -> torch.Tensor:
        """One crop with fixed parameters: ``Tensor[3, S, S]`` float32, normalised."""
        return self.photometric_batch(self.geometry(image, p).unsqueeze(0), photometric_params([p]))[0]

    def __call__(self, image: Image.Image, draw_id: int, source_size: tuple[int, int] | None = None) -> dict:
        """``source_size``: the image's full size when it was decoded smaller (:meth:`decode_size`)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"GlobalCropsAugmentation expects a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = source_size if source_size is not None else image.size
        global_params, local_params = self._params(width, height, draw_id)
        crops = torch.stack([self.geometry(image, p, source_size) for p in global_params])
        item = self._finish(crops, global_params, "global_crops", "photometric")
        if local_params:
            local = torch.stack([self.geometry(image, p, source_size, self.local_crops_size) for p in local_params])
            item.update(self._finish(local, local_params, "local_crops", "local_photometric"))
        return item

    def _finish(self, crops: torch.Tensor, params: list[CropParams], key: str, params_key: str) -> dict:
        """``{key: crops}`` normalised (loader mode), or uint8 with ``{params_key: rows}`` (device mode)."""
        photometric = photometric_params(params)
        if self.photometric == "device":
            return {key: list(crops.unbind(0)), params_key: photometric}
        return {key: list(self.photometric_batch(crops, photometric).unbind(0))}


class EvalTransform:
    """Deterministic transform for feature extraction: ``PIL -> Tensor[3, S, S]`` float32.

    ``resize_mode="pad"``: resize so the long side is ``crop_size`` (aspect kept), then pad
    the short side symmetrically (extra pixel bottom/right) with the normalisation mean,
    i.e. with 0 after normalisation, so the whole cell stays visible.
    ``resize_mode="center_crop"``: resize so the short side is ``crop_size``, then take
    the centred ``crop_size`` square.

    It runs in two halves so that loader workers can send uint8 images (a quarter of the
    bytes) and the normalisation can run on the device for a whole batch:
    :meth:`resize` (``PIL -> uint8 [3, S, S]`` and the image's box on it) and
    :meth:`normalize` (a batch of those -> float32). The normalisation is a lookup of
    each uint8 value in a table computed once with the ops of the float path (divide by
    255, subtract the mean, divide by the std), so its result is the same to the bit on
    any device. Calling the transform runs both.
    """

    def __init__(
        self,
        crop_size: int = 224,
        resize_mode: str = "pad",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> None:
        if resize_mode not in ("pad", "center_crop"):
            raise AugmentationConfigError(f"resize_mode must be 'pad' or 'center_crop', got '{resize_mode}'")
        if crop_size < 1:
            raise AugmentationConfigError(f"crop_size must be >= 1, got {crop_size}")
        self.crop_size = int(crop_size)
        self.resize_mode = resize_mode
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.interpolation = _interpolation(interpolation)
        # [3, 256]: the normalised value of every uint8 level in every channel.
        levels = torch.arange(256, dtype=torch.float32).div_(255.0).repeat(3, 1).unsqueeze(-1)
        self.table = TF.normalize(levels, self.mean, self.std).squeeze(-1)

    def resize(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 [3, S, S], box int64 [4])``: the resized (and for ``center_crop``
        cropped) image on an ``S x S`` canvas, and ``(top, left, height, width)`` of the
        image's pixels on it; :meth:`normalize` sets the rest to 0."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        s = self.crop_size
        w, h = image.size
        grow = max if self.resize_mode == "pad" else min
        factor = s / grow(w, h)
        new_w = min(s, max(1, round(w * factor))) if self.resize_mode == "pad" else max(s, round(w * factor))
        new_h = min(s, max(1, round(h * factor))) if self.resize_mode == "pad" else max(s, round(h * factor))
        resized = TF.pil_to_tensor(TF.resize(image, [new_h, new_w], interpolation=self.interpolation, antialias=True))
        if self.resize_mode == "center_crop":
            return TF.center_crop(resized, [s, s]), torch.tensor([0, 0, s, s])
        left, top = (s - new_w) // 2, (s - new_h) // 2
        canvas = torch.zeros((3, s, s), dtype=torch.uint8)
        canvas[:, top:top + new_h, left:left + new_w] = resized
        return canvas, torch.tensor([top, left, new_h, new_w])

    def to(self, device: torch.device | str) -> EvalTransform:
        """A copy whose lookup table lives on ``device``, so that :meth:`normalize` of
        batches there copies nothing from the host (a blocking copy would wait for the GPU)."""
        moved = copy.copy(self)
        moved.table = self.table.to(device)
        return moved

    def normalize(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` and ``boxes`` ``[B, 4]`` from :meth:`resize` -> float32
        ``[B, 3, S, S]`` on ``images``' device: normalised inside each box, 0 outside."""
        device = images.device
        channels = torch.arange(3, device=device).view(1, 3, 1, 1)
        x = self.table.to(device)[channels, images.long()]
        top, left, height, width = boxes.to(device).unbind(1)
        pos = torch.arange(images.shape[-1], device=device)
        rows = (pos >= top[:, None]) & (pos < (top + height)[:, None])
        cols = (pos >= left[:, None]) & (pos < (left + width)[:, None])
        return x.masked_fill(~(rows[:, None, :, None] & cols[:, None, None, :]), 0.0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image_u8, box = self.resize(image)
        return self.normalize(image_u8[None], box[None])[0]
