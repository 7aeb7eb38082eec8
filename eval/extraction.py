"""The one feature-extraction loop of evaluation and of ``python -m eval.extract``.

* :func:`iter_feature_blocks` runs a frozen backbone over images in order (a DataLoader
  resizing in its workers, :class:`EvalTransform` normalising on the device, batched, bf16
  autocast on CUDA only, ``torch.inference_mode``) and yields :class:`FeatureBlock` s of
  consecutive rows: any of the CLS token (``x_norm_clstoken``), the mean of the patch tokens
  (``x_norm_patchtokens`` averaged over the ``N`` patches; CLS and registers excluded) and
  the patch tokens themselves, float32, copied to the host every :data:`HOST_COPY_EVERY`
  batches.
* :func:`extract_features` is the evaluation's use of it: the ``[n, D]`` CLS features,
  cached as ``.npz`` keyed by checkpoint, files and preprocessing
  (:func:`feature_cache_key`), so a second probe run does not re-extract.
  ``eval.extract`` writes the same blocks to a file in resumable chunks.

Unreadable images are never fatal: the row is marked ``ok=False`` with zero features and
logged once (missing or unreadable); the caller counts and excludes such rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinov2_hier.cpu import loader_workers, thread_plan
from dinov2_hier.io import atomic_savez
from dinov2_hier.data import EvalTransform, UnreadableImageError, is_missing_image_message, load_image

from .crossval import EvalDataError

if TYPE_CHECKING:
    from .features import EvalBackbone

__all__ = [
    "HOST_COPY_EVERY",
    "OUTPUTS",
    "Progress",
    "FeatureBlock",
    "FeatureSet",
    "eval_image_loader",
    "extract_features",
    "extraction_crop",
    "feature_cache_key",
    "iter_feature_blocks",
    "precision_tag",
]

logger = logging.getLogger("dinov2_hier.eval")

#: Batches of features kept on the device before one copy to the host: a copy to the host
#: waits for the GPU, and one per batch would leave it idle while the next batch is sent.
HOST_COPY_EVERY = 16
#: Bumped when the cached array layout or the feature definition changes.
_CACHE_FORMAT = "dinov2_hier.eval.features/1"
#: What :func:`iter_feature_blocks` can give: CLS token, mean-pooled patch tokens, patch tokens.
OUTPUTS = ("cls", "pooled", "patch_tokens")


@dataclass
class FeatureSet:
    """CLS features ``[n, D]`` float32 of ``paths`` in order; ``ok[i]`` False marks an
    unreadable image (zero features, to be excluded); ``cache_path`` the ``.npz`` used."""

    features: np.ndarray
    ok: np.ndarray
    n_unreadable: int
    from_cache: bool
    cache_path: Path | None = None


@dataclass
class FeatureBlock:
    """Rows ``start .. start + len(ok) - 1`` of the paths given to :func:`iter_feature_blocks`:
    ``ok`` bool ``[b]`` (False: unreadable, zero features), and float32 ``cls`` ``[b, D]``,
    ``pooled`` ``[b, D]``, ``patch_tokens`` ``[b, N, D]`` for the outputs asked for (else None)."""

    start: int
    ok: np.ndarray
    cls: np.ndarray | None = None
    pooled: np.ndarray | None = None
    patch_tokens: np.ndarray | None = None

    @property
    def stop(self) -> int:
        return self.start + len(self.ok)


class _EvalImages(Dataset):
    """``(index, image uint8 [3,S,S], box [4], ok, error)`` (:meth:`EvalTransform.resize`);
    an unreadable file gives zeros, an empty box and ok False."""

    def __init__(self, paths: Sequence[str], transform: EvalTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor, bool, str]:
        try:
            image = load_image(self.paths[index])
        except UnreadableImageError as err:
            s = self.transform.crop_size
            return index, torch.zeros((3, s, s), dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), False, str(err)
        return index, *self.transform.resize(image), True, ""


def eval_image_loader(paths: Sequence[str], transform: EvalTransform, *, batch_size: int = 64,
                      num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The images of ``paths`` in order, in batches of ``(index [B] int64, images [B, 3, S, S]
    uint8, boxes [B, 4], ok [B] bool, errors: B strings)``, resized by ``transform`` in the
    workers (``transform.normalize(images, boxes)`` gives the float input, on any device);
    an unreadable file gives a zero image, ``ok`` False and its message (never an
    exception). Used by :func:`iter_feature_blocks` and, without a model, by ``bench.probe``
    to time the loader. ``num_workers`` is capped at the CPU cores less one
    (:func:`dinov2_hier.cpu.loader_workers`)."""
    return DataLoader(
        _EvalImages(paths, transform),
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        num_workers=loader_workers(num_workers, "feature extraction"),
        pin_memory=pin_memory,
    )


def precision_tag(device: torch.device) -> str:
    """``"bf16"`` on CUDA (autocast), else ``"fp32"``."""
    return "bf16" if device.type == "cuda" else "fp32"


def extraction_crop(backbone: EvalBackbone, crop_size: int | None, resize_mode: str) -> int:
    """The input size in px (default: the checkpoint's ``meta["img_size"]``), checked: a
    positive multiple of the patch size, and ``resize_mode`` ``"pad"`` or ``"center_crop"``
    (else :class:`EvalDataError`)."""
    if resize_mode not in ("pad", "center_crop"):
        raise EvalDataError(f"resize_mode must be 'pad' or 'center_crop', got {resize_mode!r}")
    crop = int(crop_size if crop_size is not None else backbone.meta["img_size"])
    patch = int(backbone.meta["patch_size"])
    if crop < patch or crop % patch:
        raise EvalDataError(f"crop size {crop} px is not a positive multiple of the patch size {patch} px")
    return crop


def feature_cache_key(fingerprint: str, paths: Sequence[str], crop_size: int, resize_mode: str,
                      mean: Sequence[float], std: Sequence[float], precision: str = "fp32") -> str:
    """16 hex digits: sha256 over the weights fingerprint, the sorted paths with their file
    sizes and modification times (missing files count as size -1), crop size, resize mode,
    normalisation and the compute precision (bf16 features differ from fp32 ones)."""
    files = []
    for p in sorted(paths):
        try:
            st = os.stat(p)
            files.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([p, -1, -1])
    payload = {
        "format": _CACHE_FORMAT,
        "feature": "x_norm_clstoken",
        "fingerprint": fingerprint,
        "files": files,
        "crop_size": int(crop_size),
        "resize_mode": resize_mode,
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "precision": precision,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _load_cache(path: Path, paths: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (features, ok) in the order of ``paths``, or None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            feats, ok, cached_paths = data["features"], data["ok"], data["paths"]
        row = {str(p): i for i, p in enumerate(cached_paths.tolist())}
        index = np.array([row[p] for p in paths], dtype=np.int64)
        if feats.ndim != 2 or feats.shape[1] != dim or feats.dtype != np.float32 or ok.shape != (feats.shape[0],):
            raise ValueError(f"unexpected arrays {feats.shape} {feats.dtype} / {ok.shape}")
    # Corrupt, foreign or truncated (a kill or a full disk while copying it in): a truncated
    # .npz is a broken zip (BadZipFile) or ends inside an array (EOFError).
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        logger.warning("ignoring unusable feature cache %s (%s); extracting again", path, err)
        return None
    return np.ascontiguousarray(feats[index]), ok[index].astype(bool)


def _save_cache(path: Path, features: np.ndarray, ok: np.ndarray, paths: Sequence[str], meta: dict) -> None:
    atomic_savez(path, features=features, ok=ok, paths=np.array(list(paths), dtype=str),
                 meta=np.array(json.dumps(meta, sort_keys=True)))


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Progress:
    """A tqdm bar when stderr is a terminal and tqdm is installed (and progress is wanted),
    else an INFO line about every 10% with images/s: redrawn into a file or a pipe (a SLURM
    log, ``2> log``), a bar leaves one line per refresh. ``initial`` images count as done
    already (a resumed job) and are left out of the rate."""

    def __init__(self, total: int, enabled: bool, stream: Any = None, initial: int = 0) -> None:
        self.total, self.done, self.bar, self.enabled = total, initial, None, enabled
        self.initial = initial
        self.next_log, self.start = initial + max(1, total // 10), time.perf_counter()
        stream = sys.stderr if stream is None else stream
        if enabled and _is_terminal(stream):
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="img", desc="features", dynamic_ncols=True,
                                file=stream)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.done >= self.next_log or self.done == self.total):
            rate = (self.done - self.initial) / max(time.perf_counter() - self.start, 1e-9)
            logger.info("features: %d/%d images (%.1f img/s)", self.done, self.total, rate)
            self.next_log = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _forward(model: torch.nn.Module, batch: torch.Tensor, outputs: Sequence[str], source: str
             ) -> dict[str, torch.Tensor]:
    """The asked-for outputs of one batch, float32 on the device."""
    if batch.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
    else:
        out = model(batch)
    found: dict[str, torch.Tensor] = {}
    if "cls" in outputs:
        found["cls"] = out["x_norm_clstoken"].float()
    if "pooled" in outputs or "patch_tokens" in outputs:
        patches = out.get("x_norm_patchtokens")
        if patches is None:
            raise EvalDataError(f"{source} gives no patch tokens (x_norm_patchtokens): only its CLS "
                                "features can be extracted")
        if "pooled" in outputs:
            found["pooled"] = patches.float().mean(1)
        if "patch_tokens" in outputs:
            found["patch_tokens"] = patches.float()
    return found


def iter_feature_blocks(
    backbone: EvalBackbone,
    paths: Sequence[str],
    *,
    outputs: Sequence[str] = ("cls",),
    crop_size: int | None = None,
    resize_mode: str = "pad",
    batch_size: int = 64,
    num_workers: int = 0,
    device: Any = None,
    progress: bool | Progress = True,
    threads: int | None = None,
) -> Iterator[FeatureBlock]:
    """:class:`FeatureBlock` s covering ``paths`` in order (every row, unreadable ones with
    ``ok`` False and zeros), each up to :data:`HOST_COPY_EVERY` batches of ``batch_size``
    images; batch ``j`` holds rows ``j * batch_size ...``, so extracting a slice that starts
    at a multiple of ``batch_size`` computes its rows in the same batches as the whole.

    ``outputs``: any of :data:`OUTPUTS`. Images are resized without distortion to
    ``crop_size`` (default: the checkpoint's training crop size) by padding or
    centre-cropping in the loader's workers, normalised with the checkpoint's mean/std on
    ``device`` (default: where the model is; the model moves there) and run in eval mode
    under ``torch.inference_mode``, with bf16 autocast on CUDA only. ``num_workers`` loader
    processes and the main process's torch threads (``threads``, default
    :func:`dinov2_hier.cpu.thread_plan`'s choice; restored afterwards) share the CPU.
    ``progress``: a bar (True), none (False), or a ``Progress`` to advance.
    """
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}, got {tuple(outputs)}")
    crop = extraction_crop(backbone, crop_size, resize_mode)
    meta = backbone.meta
    model = backbone.model
    dev = torch.device(device) if device is not None else backbone.device
    model.to(dev).eval()
    paths = [str(p) for p in paths]
    transform = EvalTransform(crop, resize_mode, list(meta["mean"]), list(meta["std"]))
    workers = loader_workers(num_workers, "feature extraction")
    plan = thread_plan(workers, threads=threads)
    logger.info("feature extraction: %d loader worker(s), torch threads %s", workers, plan.why)
    loader = eval_image_loader(paths, transform, batch_size=batch_size, num_workers=workers,
                               pin_memory=dev.type == "cuda")
    on_device = transform.to(dev)
    logged: set[str] = set()
    bar = progress if isinstance(progress, Progress) else Progress(len(paths), bool(progress))
    pending: list[tuple[np.ndarray, dict[str, torch.Tensor]]] = []
    rows: list[np.ndarray] = []  # every row of the pending batches, readable or not

    def block() -> FeatureBlock:
        start, stop = int(rows[0][0]), int(rows[-1][-1]) + 1
        ok = np.zeros(stop - start, dtype=bool)
        found = FeatureBlock(start, ok)
        if pending:
            good = np.concatenate([r for r, _ in pending]) - start
            ok[good] = True
            with torch.inference_mode():
                for name in pending[0][1]:
                    values = torch.cat([t[name] for _, t in pending]).cpu().numpy()
                    array = np.zeros((stop - start, *values.shape[1:]), dtype=np.float32)
                    array[good] = values
                    setattr(found, name, array)
        for name in outputs:  # a block of unreadable images only: zeros of the right width
            if getattr(found, name) is None:
                setattr(found, name, _zeros(stop - start, name, backbone, crop))
        pending.clear()
        rows.clear()
        return found

    try:
        with plan.applied():
            for index, images, boxes, good, errors in loader:
                index, good = index.numpy(), good.numpy().astype(bool)
                for i, msg in zip(index[~good], (e for e, g in zip(errors, good) if not g)):
                    if paths[i] not in logged:
                        logged.add(paths[i])
                        kind = "missing" if is_missing_image_message(msg) else "unreadable"
                        logger.warning("skipping %s image: %s", kind, msg)
                if good.any():
                    if not good.all():
                        keep = torch.from_numpy(good)
                        images, boxes = images[keep], boxes[keep]
                    with torch.inference_mode():
                        batch = on_device.normalize(images.to(dev, non_blocking=True),
                                                    boxes.to(dev, non_blocking=True))
                        pending.append((index[good], _forward(model, batch, outputs, backbone.source)))
                rows.append(index)
                if len(rows) >= HOST_COPY_EVERY:
                    yield block()
                bar.update(len(index))
            if rows:
                yield block()
    finally:
        if bar is not progress:
            bar.close()


def _zeros(n: int, name: str, backbone: EvalBackbone, crop: int) -> np.ndarray:
    dim = backbone.embed_dim
    if name == "patch_tokens":
        return np.zeros((n, (crop // int(backbone.meta["patch_size"])) ** 2, dim), dtype=np.float32)
    return np.zeros((n, dim), dtype=np.float32)


def extract_features(
    backbone: EvalBackbone,
    paths: Sequence[str],
    *,
    crop_size: int | None = None,
    resize_mode: str = "pad",
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: Any = None,
    progress: bool = True,
    threads: int | None = None,
) -> FeatureSet:
    """CLS features (``x_norm_clstoken``) of ``paths``, in order, as ``[n, D]`` float32:
    :func:`iter_feature_blocks` with ``outputs=("cls",)`` (its arguments, same meaning).

    With ``cache_dir`` the result is stored as ``<cache_dir>/<feature_cache_key>.npz`` and a
    later call with the same weights, files (paths, sizes, mtimes), crop size, resize mode
    and normalisation loads it (``from_cache=True``); None disables caching.
    """
    crop = extraction_crop(backbone, crop_size, resize_mode)
    meta = backbone.meta
    dev = torch.device(device) if device is not None else backbone.device
    mean, std = list(meta["mean"]), list(meta["std"])
    paths = [str(p) for p in paths]
    dim = backbone.embed_dim

    cache_path = None
    if cache_dir is not None:
        key = feature_cache_key(backbone.fingerprint, paths, crop, resize_mode, mean, std, precision_tag(dev))
        cache_path = Path(cache_dir) / f"{key}.npz"
        cached = _load_cache(cache_path, paths, dim)
        if cached is not None:
            feats, ok = cached
            n_bad = int((~ok).sum())
            logger.info("features of %d images loaded from %s%s", len(paths), cache_path,
                        f" ({n_bad} missing or unreadable, skipped)" if n_bad else "")
            return FeatureSet(feats, ok, n_bad, True, cache_path)

    features = np.zeros((len(paths), dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    start = time.perf_counter()
    blocks = iter_feature_blocks(backbone, paths, outputs=("cls",), crop_size=crop, resize_mode=resize_mode,
                                 batch_size=batch_size, num_workers=num_workers, device=dev, progress=progress,
                                 threads=threads)
    with closing(blocks):
        for found in blocks:
            features[found.start:found.stop] = found.cls
            ok[found.start:found.stop] = found.ok
    n_bad = int((~ok).sum())
    elapsed = time.perf_counter() - start
    logger.info("extracted features of %d images in %.1f s (%.1f img/s, %s on %s)%s", len(paths), elapsed,
                len(paths) / max(elapsed, 1e-9), precision_tag(dev), dev,
                f"; {n_bad} missing or unreadable, skipped" if n_bad else "")
    if cache_path is not None:
        _save_cache(cache_path, features, ok, paths, {
            "fingerprint": backbone.fingerprint, "source": backbone.source, "crop_size": crop,
            "resize_mode": resize_mode, "mean": mean, "std": std, "precision": precision_tag(dev),
        })
    return FeatureSet(features, ok, n_bad, False, cache_path)
