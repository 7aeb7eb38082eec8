"""Photometric augmentations of a batch of crops with per-crop parameters, on any device.

One implementation serves both places where the ops can run (``crops.photometric``): a
loader worker applies it to the crops of one image, or the training loop applies it
to the whole collated batch on the GPU, where it costs far less than the ~75% of a
worker's CPU time these ops take (colour jitter and blur dominate).

The ops follow torchvision's float formulas (``torchvision.transforms.v2.functional``),
in float32 on values in [0, 1], in this order (as DINOv2's recipe):

1. colour jitter (crops with ``jitter``): brightness, contrast, saturation and hue, in
   the crop's own random ``order``;
2. grayscale (ITU-R 601 luma 0.2989/0.587/0.114, replicated to 3 channels);
3. Gaussian blur (crops with ``blur_sigma > 0``; torchvision's kernel, reflect padding);
4. solarize at 128/255 (``x >= t -> 1 - x``);
5. normalise with ``mean``/``std``.

Parameters of ``N`` crops are a dict of tensors (:data:`PARAM_SHAPES`):

- ``jitter`` bool ``[N]``: colour jitter on/off;
- ``order`` long ``[N, 4]``: permutation of the ops 0 brightness, 1 contrast,
  2 saturation, 3 hue (``(0, 1, 2, 3)`` when jitter is off);
- ``factors`` float32 ``[N, 4]``: brightness, contrast and saturation factors (1 =
  identity) and the hue shift in turns (0 = identity), indexed by op;
- ``grayscale`` bool ``[N]``; ``blur_sigma`` float32 ``[N]`` in pixels (0 = no blur);
  ``solarize`` bool ``[N]``.

The batch is never split by a Python loop over crops: each op runs once per jitter
position on the subset of crops that needs it (ops nobody needs are skipped, which keeps
the two-crop loader call cheap). Which crops those are is read from the parameter
tensors; keep them on the CPU when the crops are on a GPU, so that choosing the subsets
never waits for a device-to-host copy. The chosen row indices of all ops travel to the
device in one pinned, asynchronous copy, the factors and sigmas in one copy each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

#: Name -> (dtype, shape after the leading ``N``) of the parameter tensors.
PARAM_SHAPES: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "jitter": (torch.bool, ()),
    "order": (torch.long, (4,)),
    "factors": (torch.float32, (4,)),
    "grayscale": (torch.bool, ()),
    "blur_sigma": (torch.float32, ()),
    "solarize": (torch.bool, ()),
}

# ITU-R 601 luma weights as torchvision uses them.
LUMA = (0.2989, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128 / 255
IDENTITY_ORDER = (0, 1, 2, 3)
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


@dataclass(frozen=True)
class ColorJitterParams:
    """Factors as in torchvision: brightness/contrast/saturation multiply (1 = identity),
    hue shifts by a fraction of the hue circle; ``order`` is a permutation of
    (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    order: tuple[int, ...]
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class CropParams:
    """Everything random about one crop. Box in input-image pixels.

    Drawn by :mod:`dinov2_hier.data.augment`, which applies the geometry; defined here,
    below it, because :func:`photometric_params` reads the photometric fields."""

    top: int
    left: int
    height: int
    width: int
    hflip: bool
    vflip: bool
    rot90_k: int  # counter-clockwise quarter turns, 0..3
    jitter: ColorJitterParams | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def photometric_params(crops: Sequence[CropParams]) -> dict[str, torch.Tensor]:
    """The parameter dict (see the module docstring) of ``crops``, CPU tensors, one row each.

    Crops without colour jitter get the identity order and factors; no blur is sigma 0.
    """
    jitters = [c.jitter for c in crops]
    return {
        "jitter": torch.tensor([j is not None for j in jitters], dtype=torch.bool),
        "order": torch.tensor(
            [list(j.order) if j is not None else list(IDENTITY_ORDER) for j in jitters], dtype=torch.long
        ).view(len(crops), 4),
        "factors": torch.tensor(
            [[j.brightness, j.contrast, j.saturation, j.hue] if j is not None else list(IDENTITY_FACTORS)
             for j in jitters],
            dtype=torch.float32,
        ).view(len(crops), 4),
        "grayscale": torch.tensor([c.grayscale for c in crops], dtype=torch.bool),
        "blur_sigma": torch.tensor(
            [c.blur_sigma if c.blur_sigma is not None else 0.0 for c in crops], dtype=torch.float32
        ),
        "solarize": torch.tensor([c.solarize for c in crops], dtype=torch.bool),
    }


def stack_photometric(per_image: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Parameters of ``B`` images (each with rows ``[n, ...]``, one per crop: ``n = 2``
    global or ``local_crops_number`` local crops) -> rows ``[nB, ...]`` in crop-major order
    (crop 0 of every image, then crop 1, ...), like the crops."""
    return {key: torch.stack([p[key] for p in per_image], dim=1).flatten(0, 1) for key in PARAM_SHAPES}


def check_params(params: dict[str, torch.Tensor], n: int) -> None:
    """Raise ``ValueError`` unless ``params`` holds every key with the documented dtype and shape."""
    for key, (dtype, tail) in PARAM_SHAPES.items():
        if key not in params:
            raise ValueError(f"photometric params lack '{key}' (have {sorted(params)})")
        value = params[key]
        if value.dtype != dtype or tuple(value.shape) != (n, *tail):
            raise ValueError(
                f"photometric params '{key}' must be {dtype} {[n, *tail]}, got {value.dtype} {list(value.shape)}"
            )


# -- the ops, on float32 [n, 3, H, W] in [0, 1] with per-crop values [n] ---------------------


def _per_crop(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Grey level ``[n, 1, H, W]`` (operation order as torchvision's, for equal rounding)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(factor * x + (1 - factor) * other, 0, 1)``, per crop."""
    f = _per_crop(factor)
    return x.mul(f).add_(other.mul(1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul(_per_crop(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the crop's mean grey level."""
    return _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the crop's grey image."""
    return _blend(x, _luma(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's (Pillow's) RGB -> HSV; hue in turns [0, 1). Grey pixels get h = s = 0."""
    r, g, _ = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    grey = maxc == minc
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    # Denominators replaced by 1 where they would be 0 (grey pixels): no NaN.
    s = spread / torch.where(grey, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(grey, ones, spread).unsqueeze(1)).unbind(dim=1)
    max_not_r = maxc != r
    max_is_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(max_is_g & max_not_r)
    hr = bc.sub(gc).mul_(~max_not_r)
    hb = gc.add(4.0).sub_(rc).mul_(max_not_r & ~max_is_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torchvision's HSV -> RGB on ``[n, H, W]`` planes -> ``[n, 3, H, W]``."""
    h6 = h.mul(6.0)
    sector = torch.floor(h6)
    f = h6.sub_(sector)
    sector = sector.to(torch.int32).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q).
    at = [sector == k for k in range(6)]
    r = torch.where(at[0] | at[5], v, torch.where(at[1], q, torch.where(at[4], t, p)))
    g = torch.where(at[1] | at[2], v, torch.where(at[0], t, torch.where(at[3], q, p)))
    b = torch.where(at[3] | at[4], v, torch.where(at[2], t, torch.where(at[5], q, p)))
    return torch.stack((r, g, b), dim=1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (per crop) in HSV space."""
    h, s, v = _rgb_to_hsv(x)
    h = h.add_(shift.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(h, s, v)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Grey level replicated to 3 channels (a real copy: later ops write in place)."""
    return _luma(x).repeat(1, 3, 1, 1)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel per sigma: ``[n] -> [n, kernel_size]``, each sums to 1.

    Its sample points span +-(k-1)/(2 sqrt 2) and it takes softmax(-(t/sigma)^2), i.e.
    ``exp(-d^2 / (2 sigma^2))`` at pixel offsets ``d``, normalised.
    """
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax((t.unsqueeze(0) / sigma.unsqueeze(1)).pow(2).neg(), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each crop with its own sigma: reflect padding, then a separable grouped
    convolution (one group per crop channel; the 2-D kernel is the outer product)."""
    n, c, height, width = x.shape
    kernels = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # [n*c, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)  # along rows
    y = F.conv2d(y, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)  # along columns
    return y.view(n, c, height, width)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


# -- batching --------------------------------------------------------------------------------


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _blur(kernel_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda y, sigma: gaussian_blur(y, sigma, kernel_size)


def _plan(params: dict[str, torch.Tensor], blur_kernel_size: int) -> list[tuple[Callable, torch.Tensor, str | None]]:
    """The ops in order, each with the bool ``[N]`` mask of the crops it runs on and the
    parameter column it reads (a key of ``_op_values``, or None)."""
    steps: list[tuple[Callable, torch.Tensor, str | None]] = []
    for pos in range(4):  # at each jitter position, op k runs on the crops whose order[:, pos] is k
        for k, op in enumerate(JITTER_OPS):
            steps.append((op, params["jitter"] & (params["order"][:, pos] == k), f"factor{k}"))
    steps.append((grayscale, params["grayscale"], None))
    steps.append((_blur(blur_kernel_size), params["blur_sigma"] > 0, "blur_sigma"))
    steps.append((solarize, params["solarize"], None))
    return steps


def _rows_on(masks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Row indices of each bool mask, on ``device``, moved there in one copy.

    Reading the masks needs their values on the host; with CPU masks that costs no device
    synchronisation, and one (pinned, asynchronous) transfer of all indices replaces a
    pageable copy per op, which measured as most of the host time of this function.
    """
    rows = [mask.nonzero().flatten() for mask in masks]
    flat = torch.cat(rows)
    if flat.device != device:
        if device.type == "cuda" and flat.device.type == "cpu":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
    return list(flat.split([r.numel() for r in rows]))


def _op_values(params: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The per-crop values the ops read, on ``device`` (one transfer per column)."""
    factors = params["factors"].to(device, non_blocking=True)
    values = {f"factor{k}": factors[:, k] for k in range(4)}
    values["blur_sigma"] = params["blur_sigma"].to(device, non_blocking=True)
    return values


def _on_rows(x: torch.Tensor, rows: torch.Tensor, n_rows: int, op: Callable, value: torch.Tensor | None) -> torch.Tensor:
    """``x`` with ``op(x[rows], value[rows])`` written into the chosen rows (``n_rows`` of
    them, known on the host). Every row chosen: no gather/scatter copy."""
    if n_rows == 0:
        return x
    args = () if value is None else (value,)
    if n_rows == x.shape[0]:
        return op(x, *args)
    args = tuple(v.index_select(0, rows) for v in args)
    return x.index_copy_(0, rows, op(x.index_select(0, rows), *args))


def apply_photometric(
    crops: torch.Tensor,
    params: dict[str, torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    blur_kernel_size: int,
) -> torch.Tensor:
    """Photometric augmentations and normalisation of a batch of crops.

    Args:
        crops: uint8 ``[N, 3, S, S]`` (pixels 0..255), on any device.
        params: per-crop parameters (module docstring), ``N`` rows. Keep them on the CPU
            when the crops are on a GPU: choosing each op's crops reads them on the host
            (on the GPU that would synchronise once per op).
        mean, std: per-channel normalisation of values in [0, 1].
        blur_kernel_size: odd side of the Gaussian kernel, pixels.
    Returns:
        float32 ``[N, 3, S, S]`` on ``crops``' device: ``(augmented / 255 - mean) / std``.
    """
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be uint8 [N, 3, S, S], got {crops.dtype} {list(crops.shape)}")
    check_params(params, crops.shape[0])
    # float32 whatever the caller's autocast: a bf16 blur written back into the float32
    # rows of a partly blurred batch would fail (index_copy_ needs one dtype).
    with torch.autocast(device_type=crops.device.type, enabled=False):
        return _apply(crops, params, mean, std, blur_kernel_size)


def _apply(crops: torch.Tensor, params: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
           blur_kernel_size: int) -> torch.Tensor:
    x = crops.to(torch.float32).div_(255.0)
    steps = _plan(params, blur_kernel_size)
    counts = [int(mask.sum()) for _, mask, _ in steps]
    rows = _rows_on([mask for _, mask, _ in steps], x.device)
    values = _op_values(params, x.device)
    for (op, _, key), r, n_rows in zip(steps, rows, counts):
        x = _on_rows(x, r, n_rows, op, None if key is None else values[key])
    # Per-channel scalars: no host-to-device copy of a mean/std tensor.
    for c in range(3):
        x[:, c].sub_(mean[c]).div_(std[c])
    return x
