"""Map-style datasets producing augmented items, and the skip bookkeeping for bad files.

An item is a dict (see docs/architecture.md)::

    {"global_crops": [Tensor[3,S,S], Tensor[3,S,S]], "label": str|None,
     "dataset": str|None, "path": str, "draw_id": int}

(with ``crops.photometric=device``: uint8 crops and a ``"photometric"`` entry holding
their augmentation parameters, see :class:`~dinov2_hier.data.augment.GlobalCropsAugmentation`;
with ``crops.local_crops_number`` > 0 also ``"local_crops"`` and, in device mode,
``"local_photometric"``) or, for a file that cannot be decoded, ``{"error": str, "path": str, "draw_id": int}``.
Returning error items instead of raising keeps a single corrupt file from killing a
long run; the collator drops them and the training loop feeds their paths to a
:class:`SkipCounter`, which aborts the run if too large a fraction is unreadable.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
from PIL import Image

from ..errors import RunAborted
from .records import Record

logger = logging.getLogger("dinov2_hier.data")

#: ``transform(image, draw_id) -> {"global_crops": [...]}``
Transform = Callable[[Image.Image, int], dict]

#: Largest image decoded, in pixels (width x height): 8192 x 8192 = 67,108,864, about 200 MB
#: as RGB per loader worker. A larger JPEG is decoded at the smallest of 1/2, 1/4 or 1/8
#: scale that fits (``PIL.Image.draft``; the crops keep referring to the full size); any
#: other larger image is refused as unreadable (skipped and counted in training, excluded
#: in evaluation). Both are logged once per file and process, naming the file and size.
#: PIL's own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 MP) is refused
#: before any decode whatever the format.
MAX_IMAGE_PIXELS = 8192 * 8192

#: PIL modes of grey images with more than 8 bits per pixel; see :func:`to_8bit_grey`.
HIGH_DEPTH_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

# Files whose size (or PIL's decompression-bomb warning) was logged by this process.
_reported: set[str] = set()
# Other warnings raised while opening, re-issued once per text like Python's default filter.
_warning_registry: dict = {}


class UnreadableImageError(ValueError):
    """An image file is missing, empty, truncated or not an image."""


class MissingImageError(UnreadableImageError):
    """An image file does not exist (skipped and counted like an unreadable one, but logged
    as missing)."""


#: How a missing file's error message starts; the message travels as text out of loader
#: workers, so this prefix (:func:`is_missing_image_message`) is what tells the two apart.
MISSING_IMAGE_PREFIX = "missing image file"


def is_missing_image_message(message: str | None) -> bool:
    """Whether ``message`` (an error item's text) is that of a :class:`MissingImageError`."""
    return str(message or "").startswith(MISSING_IMAGE_PREFIX)


class TooManyUnreadableImages(RunAborted, RuntimeError):
    """The fraction of unreadable images drawn so far exceeds the configured limit."""


def load_image(path: str) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB ``PIL.Image``.

    ``Image.open`` is lazy: it reads only the header, so a truncated file would fail
    later in an augmentation. ``img.load()`` forces the full decode here, where the
    failure can be turned into a skip. ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off:
    a half-grey image is silently wrong data.

    Raises:
        UnreadableImageError: missing (:class:`MissingImageError`), zero-byte, truncated or
            non-image file.
    """
    return load_image_reduced(path, None)[0]


def to_8bit_grey(image: Image.Image) -> Image.Image:
    """A grey image of more than 8 bits per pixel (:data:`HIGH_DEPTH_GREY_MODES`: 16-bit
    PNG/TIFF open as ``I;16``, 32-bit integer as ``I``, float TIFF as ``F``) as 8-bit ``L``.

    PIL's own conversion clips such values at 255 (a 16-bit image becomes almost all white).
    Here the values are scaled by the bit depth the brightest pixel needs,
    ``b = max(8, bit length of the maximum)``: ``v * 255 / (2**b - 1)``, rounded. A
    full-range 16-bit image is so divided by 257; 12-bit camera data stored in 16 bits
    (maximum <= 4095) by 4095/255 rather than coming out nearly black. Float images with
    all values in [0, 1] are multiplied by 255; other float images follow the integer rule
    on their maximum. Negative values and NaN become 0. Other modes are returned as they are.
    """
    if image.mode not in HIGH_DEPTH_GREY_MODES:
        return image
    values = np.asarray(image, dtype=np.float32)  # exact for 16-bit values
    values = np.where(np.isfinite(values), values, np.float32(0.0))
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F" and top <= 1.0:
        scale = 255.0
    else:
        bits = max(8, int(math.ceil(max(top, 0.0))).bit_length())
        scale = 255.0 / (2**bits - 1)
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as a new RGB image; grey of more than 8 bits scaled by :func:`to_8bit_grey`."""
    return to_8bit_grey(image).convert("RGB")


def _report_once(path: str, message: str) -> None:
    if path not in _reported:
        _reported.add(path)
        logger.warning("%s", message)


def _open(path: str) -> Image.Image:
    """``Image.open`` with PIL's ``DecompressionBombWarning`` turned into a log line naming
    the file (other warnings pass on unchanged)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = Image.open(path)
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            _report_once(path, f"image '{path}': PIL DecompressionBombWarning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_warning_registry,
                                   source=w.source)
    return img


def _limited_request(path: str, img: Image.Image, requested: tuple[int, int] | None) -> tuple[int, int] | None:
    """The draft size that brings a JPEG over :data:`MAX_IMAGE_PIXELS` within it (the
    smallest reduction of 1/2, 1/4, 1/8 that fits), combined with ``requested``; images
    within the limit keep ``requested``. :class:`UnreadableImageError` (logged) for a larger
    image of another format, or a JPEG that is too large even at 1/8."""
    width, height = img.size
    if width * height <= MAX_IMAGE_PIXELS:
        return requested
    if img.format not in ("JPEG", "MPO"):
        _refuse_large(path, img, f"only a JPEG is decoded reduced, this is {img.format or 'of unknown format'}")
    scale = next((s for s in (2, 4, 8) if math.ceil(width / s) * math.ceil(height / s) <= MAX_IMAGE_PIXELS), None)
    if scale is None:
        _refuse_large(path, img, "even at 1/8 scale")
    # draft picks the largest scale s with width // s >= the request: ask for width // scale.
    limit = (max(1, width // scale), max(1, height // scale))
    return limit if requested is None else (min(limit[0], requested[0]), min(limit[1], requested[1]))


def _size_text(width: int, height: int) -> str:
    return f"{width} x {height} = {width * height:,} pixels"


def _refuse_large(path: str, img: Image.Image, why: str) -> None:
    message = (f"image '{path}' is {_size_text(*img.size)}, more than MAX_IMAGE_PIXELS {MAX_IMAGE_PIXELS:,} "
               f"({why}): not decoded")
    _report_once(path, message)
    raise UnreadableImageError(message)


def load_image_reduced(
    path: str, decode_size: Callable[[int, int], tuple[int, int] | None] | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Like :func:`load_image`, but let ``decode_size(width, height)`` (the header's full
    size) ask for a smaller decode: a JPEG is then decoded at the smallest of 1/2, 1/4 or
    1/8 scale that is still at least the requested size (``PIL.Image.draft``); other
    formats decode at full size. Returns the RGB image and the full size.

    The one decoder of training and evaluation: grey images of more than 8 bits are scaled
    to 8 bits (:func:`to_8bit_grey`); an image over :data:`MAX_IMAGE_PIXELS` is decoded
    reduced when it is a JPEG and refused (:class:`UnreadableImageError`) otherwise, with
    a log line naming the file and size.
    """
    try:
        with _open(path) as img:
            full_size = img.size
            requested = decode_size(*full_size) if decode_size is not None else None
            requested = _limited_request(path, img, requested)
            if requested is not None:
                img.draft("RGB", requested)
            if full_size[0] * full_size[1] > MAX_IMAGE_PIXELS:
                if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:  # e.g. a JPEG of several tiles
                    _refuse_large(path, img, "the decoder did not reduce it")
                _report_once(path, f"image '{path}' is {_size_text(*full_size)}, more than MAX_IMAGE_PIXELS "
                                   f"{MAX_IMAGE_PIXELS:,}: decoded reduced to {img.size[0]} x {img.size[1]}")
            img.load()
            return to_rgb(img), full_size
    except UnreadableImageError:
        raise
    except FileNotFoundError as e:
        raise MissingImageError(f"{MISSING_IMAGE_PREFIX} '{path}' (no such file)") from e
    except Image.DecompressionBombError as e:
        _report_once(path, f"image '{path}': {e}: not decoded")
        raise UnreadableImageError(f"cannot read image '{path}': {type(e).__name__}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        # OSError covers missing files, UnidentifiedImageError and truncation;
        # some decoders raise SyntaxError or ValueError on corrupt headers.
        raise UnreadableImageError(f"cannot read image '{path}': {type(e).__name__}: {e}") from e


def _split_key(key: Any) -> tuple[int, int]:
    """``(index, draw_id)`` from a sampler key, or ``(i, i)`` from a plain int."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"dataset key must be an int or (index, draw_id), got {key!r}")
        return int(key[0]), int(key[1])
    return int(key), int(key)


class ImageRecordDataset:
    """Images named by :class:`~dinov2_hier.data.records.Record` s, augmented by ``transform``.

    ``dataset[(index, draw_id)]`` loads record ``index`` and augments it with the
    randomness of ``draw_id`` (the global position in the sampler's stream);
    ``dataset[i]`` uses ``draw_id = i``.
    """

    def __init__(self, records: Sequence[Record], transform: Transform) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Any) -> dict:
        index, draw_id = _split_key(key)
        record = self.records[index]
        # A transform that can use a smaller decode says how small (GlobalCropsAugmentation).
        decode_size = getattr(self.transform, "decode_size", None)
        try:
            image, full_size = load_image_reduced(
                record.path, None if decode_size is None else lambda w, h: decode_size(w, h, draw_id)
            )
        except UnreadableImageError as e:
            return {"error": str(e), "path": record.path, "draw_id": draw_id}
        if image.size != full_size:
            item = dict(self.transform(image, draw_id, source_size=full_size))
        else:
            item = dict(self.transform(image, draw_id))
        item.update(label=record.label, dataset=record.dataset, path=record.path, draw_id=draw_id)
        return item


class _SyntheticSource(Protocol):
    seed: int

    def generate(self, index: int) -> tuple[Image.Image, str]: ...

    def label(self, index: int, label_fraction: float, coarse_fraction: float) -> str | None: ...

    @property
    def dataset_name(self) -> str: ...


class SyntheticCellDataset:
    """``num_images`` synthetic cells rendered on the fly (no files), augmented by ``transform``.

    Args:
        generator: a :class:`~dinov2_hier.data.synthetic.SyntheticCellGenerator`.
        num_images: dataset length; image ``i`` is ``generator.generate(i)``.
        transform: ``transform(image, draw_id)``.
        label_fraction, coarse_fraction: which items carry a label and which of
            those only their parent node's label; a pure function of
            ``(generator.seed, index)`` (see ``SyntheticCellGenerator.label``).
    """

    def __init__(
        self,
        generator: _SyntheticSource,
        num_images: int,
        transform: Transform,
        label_fraction: float = 1.0,
        coarse_fraction: float = 0.0,
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        for name, value in (("label_fraction", label_fraction), ("coarse_fraction", coarse_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.generator = generator
        self.num_images = int(num_images)
        self.transform = transform
        self.label_fraction = float(label_fraction)
        self.coarse_fraction = float(coarse_fraction)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, key: Any) -> dict:
        index, draw_id = _split_key(key)
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        image, _leaf = self.generator.generate(index)
        item = dict(self.transform(image, draw_id))
        item.update(
            label=self.generator.label(index, self.label_fraction, self.coarse_fraction),
            dataset=self.generator.dataset_name,
            path=f"synthetic:{self.generator.seed}:{index}",
            draw_id=draw_id,
        )
        return item


class SubsetDataset:
    """The items ``indices`` of ``base``, renumbered ``0 .. len(indices) - 1``:
    ``subset[(i, draw_id)]`` is ``base[(indices[i], draw_id)]`` (a held-out validation
    split of a dataset that has no records to split, e.g. :class:`SyntheticCellDataset`)."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Any) -> dict:
        index, draw_id = _split_key(key)
        return self.base[(self.indices[index], draw_id)]


class SkipCounter:
    """Counts unreadable (and missing) images drawn by the training loop (main process only).

    Attributes:
        n_skipped: error items seen (a bad file drawn twice counts twice).
        n_drawn: items drawn (good and bad).
        bad_paths: distinct unreadable paths, in first-seen order.
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.n_skipped = 0
        self.n_drawn = 0
        self.bad_paths: list[str] = []
        self._bad_set: set[str] = set()

    @property
    def n_unique_bad(self) -> int:
        return len(self.bad_paths)

    @property
    def fraction(self) -> float:
        """Skipped / drawn (0 before anything was drawn)."""
        return self.n_skipped / self.n_drawn if self.n_drawn else 0.0

    def update(
        self, skipped_paths: Iterable[str], n_drawn: int, reasons: Iterable[str] | None = None
    ) -> None:
        """Add one batch: ``n_drawn`` items drawn, of which ``skipped_paths`` were unreadable.

        Each distinct path is logged once (warning on logger ``dinov2_hier.data``),
        with its reason when ``reasons`` (parallel to ``skipped_paths``) is given; a
        missing file's reason (:class:`MissingImageError`) logs it as missing.
        """
        skipped = list(skipped_paths)
        why = list(reasons) if reasons is not None else [None] * len(skipped)
        if len(why) != len(skipped):
            raise ValueError(f"got {len(why)} reasons for {len(skipped)} skipped paths")
        if n_drawn < len(skipped):
            raise ValueError(f"n_drawn={n_drawn} is smaller than the {len(skipped)} skipped items")
        self.n_drawn += int(n_drawn)
        self.n_skipped += len(skipped)
        for path, reason in zip(skipped, why):
            if path in self._bad_set:
                continue
            self._bad_set.add(path)
            self.bad_paths.append(path)
            if is_missing_image_message(reason):
                logger.warning("skipping missing image %s (no such file)", path)
            elif reason:
                logger.warning("skipping unreadable image %s (%s)", path, reason)
            else:
                logger.warning("skipping unreadable image %s", path)

    def check(self, max_fraction: float, min_draws: int = 0) -> None:
        """Raise :class:`TooManyUnreadableImages` if skipped/drawn > ``max_fraction``.

        Checked only once at least ``min_draws`` items were drawn, so that one bad
        file among the first few draws does not abort a run.
        """
        if self.n_drawn == 0 or self.n_drawn < min_draws:
            return
        if self.fraction > max_fraction:
            examples = ", ".join(self.bad_paths[: self.max_examples])
            raise TooManyUnreadableImages(
                f"{self.n_skipped} of {self.n_drawn} drawn images were missing or unreadable "
                f"({100 * self.fraction:.2f}%, limit {100 * max_fraction:.2f}%); "
                f"{self.n_unique_bad} distinct files, e.g. {examples}. "
                "Fix or remove them from the manifest, or raise the limit."
            )

    def state_dict(self) -> dict:
        return {"n_skipped": self.n_skipped, "n_drawn": self.n_drawn, "bad_paths": list(self.bad_paths)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"n_skipped", "n_drawn", "bad_paths"} - set(state)
        if missing:
            raise ValueError(f"SkipCounter state is missing keys {sorted(missing)}")
        self.n_skipped = int(state["n_skipped"])
        self.n_drawn = int(state["n_drawn"])
        self.bad_paths = [str(p) for p in state["bad_paths"]]
        self._bad_set = set(self.bad_paths)
