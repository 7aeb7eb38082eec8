"""Deterministic synthetic blood-cell images whose look is driven by a hierarchy's leaf ``meta``.

Every visual attribute of a class (cell size, nucleus shape/size/colour, chromatin
texture, cytoplasm colour, granules) is read from the leaf's ``meta`` in the hierarchy
JSON (see ``hierarchies/synthetic.json``); nothing per class is hard-coded here, so the
tree and the pictures cannot drift apart. Image ``index`` is a pure function of
``(seed, index)``: its class is ``leaves[index % n_leaves]`` (exactly balanced) and all
nuisance variation (position, rotation, radius, stain, red cells, noise) comes from
``numpy.random.default_rng([seed, index])``.

Drawing uses signed distance fields in pixel units evaluated on the whole pixel grid
(no per-pixel Python loops), with a half-pixel soft edge for antialiasing.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError
from ..io import atomic_write_text

NUCLEUS_SHAPES = ("round", "oval", "kidney", "band", "lobed")

#: Scene constants (not class attributes): stained-slide background and red cells.
_BACKGROUND_RGB = np.array([232, 214, 222], dtype=np.float32) / 255.0
_RED_CELL_RGB = np.array([214, 150, 162], dtype=np.float32) / 255.0
_RED_CELL_RADIUS = 0.17  # fraction of the image side


class SyntheticSpecError(UserError, ValueError):
    """A leaf's ``meta`` lacks a visual attribute or holds an invalid one (message names node and key)."""


def _get(meta: Mapping[str, Any], key: str, node: str, where: str) -> Any:
    if not isinstance(meta, Mapping) or key not in meta:
        raise SyntheticSpecError(f"node '{node}': meta{where} is missing key '{key}'")
    return meta[key]


def _number(meta: Mapping[str, Any], key: str, node: str, where: str, lo: float, hi: float) -> float:
    value = _get(meta, key, node, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise SyntheticSpecError(f"node '{node}': meta{where}.{key} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _color(meta: Mapping[str, Any], node: str, where: str) -> np.ndarray:
    value = _get(meta, "color", node, where)
    if (
        not isinstance(value, (list, tuple)) or len(value) != 3
        or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        raise SyntheticSpecError(f"node '{node}': meta{where}.color must be [r, g, b] in 0..255, got {value!r}")
    return np.asarray(value, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class CellAttributes:
    """Visual attributes of one cell type, parsed from a leaf's ``meta``.

    Lengths are relative: ``cell_radius`` to the image side, nucleus ``size``/``offset`` to
    the cell radius, ``thickness`` and chromatin ``scale`` to the nucleus radius, granule
    ``size`` to the cell radius. Colours are RGB in [0, 1].
    """

    cell_radius: float
    nucleus_shape: str
    nucleus_size: float
    nucleus_aspect: float
    nucleus_lobes: int
    nucleus_thickness: float
    nucleus_offset: float
    nucleus_color: np.ndarray
    chromatin_scale: float
    chromatin_contrast: float
    cytoplasm_color: np.ndarray
    granule_color: np.ndarray
    granule_density: float
    granule_size: float

    @classmethod
    def from_meta(cls, node: str, meta: Mapping[str, Any]) -> "CellAttributes":
        nucleus = _get(meta, "nucleus", node, "")
        shape = _get(nucleus, "shape", node, ".nucleus")
        if shape not in NUCLEUS_SHAPES:
            raise SyntheticSpecError(f"node '{node}': meta.nucleus.shape must be one of {NUCLEUS_SHAPES}, got {shape!r}")
        lobes = 1
        if shape == "lobed":
            lobes = int(_number(nucleus, "lobes", node, ".nucleus", 2, 6))
        chromatin = _get(meta, "chromatin", node, "")
        cytoplasm = _get(meta, "cytoplasm", node, "")
        granules = _get(meta, "granules", node, "")
        return cls(
            cell_radius=_number(meta, "cell_radius", node, "", 0.05, 0.5),
            nucleus_shape=shape,
            nucleus_size=_number(nucleus, "size", node, ".nucleus", 0.1, 1.0),
            nucleus_aspect=(_number(nucleus, "aspect", node, ".nucleus", 0.3, 1.0)
                            if shape in ("oval", "kidney") else 1.0),
            nucleus_lobes=lobes,
            nucleus_thickness=(_number(nucleus, "thickness", node, ".nucleus", 0.1, 0.9)
                               if shape == "band" else 0.0),
            nucleus_offset=_number(nucleus, "offset", node, ".nucleus", 0.0, 0.5),
            nucleus_color=_color(nucleus, node, ".nucleus"),
            chromatin_scale=_number(chromatin, "scale", node, ".chromatin", 0.01, 2.0),
            chromatin_contrast=_number(chromatin, "contrast", node, ".chromatin", 0.0, 1.0),
            cytoplasm_color=_color(cytoplasm, node, ".cytoplasm"),
            granule_color=_color(granules, node, ".granules"),
            granule_density=_number(granules, "density", node, ".granules", 0.0, 1.0),
            granule_size=_number(granules, "size", node, ".granules", 0.005, 0.5),
        )


# -- drawing primitives (all arrays [S, S], pixel units) -------------------------------------


def _value_noise(rng: np.random.Generator, size: int, feature_px: float) -> np.ndarray:
    """Smooth random field in [-1, 1] with blobs about ``feature_px`` pixels wide, ``[size, size]``.

    Random values on a lattice of spacing ``feature_px`` (randomly shifted), interpolated
    bilinearly with a smoothstep so the field has no visible grid creases.
    """
    feature_px = max(float(feature_px), 0.5)
    n = int(math.ceil(size / feature_px)) + 2
    lattice = rng.uniform(-1.0, 1.0, size=(n, n)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) / feature_px + rng.uniform(0.0, 1.0, size=2).astype(np.float32)[:, None]
    i = np.floor(t).astype(np.int64)
    f = t - i
    f = f * f * (3.0 - 2.0 * f)
    iy, ix, fy, fx = i[0][:, None], i[1][None, :], f[0][:, None], f[1][None, :]
    top = lattice[iy, ix] * (1 - fx) + lattice[iy, ix + 1] * fx
    bottom = lattice[iy + 1, ix] * (1 - fx) + lattice[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _alpha(sdf: np.ndarray) -> np.ndarray:
    """Coverage from a signed distance in pixels (negative inside): 1 inside, 0 outside, a 1-pixel ramp."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _ellipse_sdf(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an ellipse with semi-axes a (along u), b (along v)."""
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points (px, py) [S,S] to segments a->b given as [k, 2] arrays; result [k, S, S]."""
    ax, ay = a[:, 0, None, None], a[:, 1, None, None]
    dx, dy = (b[:, 0] - a[:, 0])[:, None, None], (b[:, 1] - a[:, 1])[:, None, None]
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return np.hypot(px - ax - t * dx, py - ay - t * dy)


def _nucleus_sdf(attrs: CellAttributes, u: np.ndarray, v: np.ndarray, radius: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Signed distance (pixels) to the nucleus in its local frame (u, v), nucleus radius ``radius``."""
    shape = attrs.nucleus_shape
    if shape == "round":
        return np.hypot(u, v) - radius
    if shape == "oval":
        return _ellipse_sdf(u, v, radius, radius * attrs.nucleus_aspect)
    if shape == "kidney":
        # An oval with a disc bitten out of one long side (the hof).
        body = _ellipse_sdf(u, v, radius, radius * attrs.nucleus_aspect)
        notch_v = radius * attrs.nucleus_aspect + 0.25 * radius
        notch = np.hypot(u, v - notch_v) - 0.55 * radius
        return np.maximum(body, -notch)
    if shape == "band":
        # A thick ring with a gap facing +v: a C / horseshoe.
        half_width = 0.5 * attrs.nucleus_thickness * radius
        ring_radius = radius - half_width
        r = np.hypot(u, v)
        ring = np.abs(r - ring_radius) - half_width
        gap_half_angle = 0.9 + rng.uniform(-0.2, 0.2)  # radians
        angle_from_gap = np.abs(np.arctan2(u, v))
        gap = (gap_half_angle - angle_from_gap) * r
        return np.maximum(ring, gap)
    # lobed: lobes on an arc, joined by thin chromatin strands.
    n = attrs.nucleus_lobes
    arc_radius = 0.6 * radius
    step = min(2.0, 4.5 / n)  # radians between neighbouring lobes
    angles = math.pi / 2 + (np.arange(n) - (n - 1) / 2) * step + rng.uniform(-0.15, 0.15, n)
    chord = 2 * arc_radius * math.sin(step / 2)
    lobe_radius = min(0.45 * radius, 0.42 * chord) * rng.uniform(0.9, 1.1, n)
    radial = arc_radius * rng.uniform(0.9, 1.1, n)
    centres = np.stack([radial * np.cos(angles), radial * np.sin(angles)], axis=1)
    lobes = np.hypot(u - centres[:, 0, None, None], v - centres[:, 1, None, None]) - lobe_radius[:, None, None]
    sdf = lobes.min(axis=0)
    strand_half_width = max(0.08 * radius, 0.5)
    strands = _segment_distance(u, v, centres[:-1], centres[1:]) - strand_half_width
    return np.minimum(sdf, strands.min(axis=0))


def _blend(img: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint ``color`` ([3] or [S,S,3]) over ``img`` [S,S,3] with coverage ``alpha`` [S,S]."""
    a = alpha[..., None]
    return img * (1.0 - a) + color * a


class SyntheticCellGenerator:
    """Renders cell ``index`` of a hierarchy's leaves: ``generate(index) -> (PIL RGB image, leaf_id)``.

    Args:
        hierarchy: a ``Hierarchy``; every leaf's ``meta`` must hold the attributes of
            :class:`CellAttributes` (validated here, errors name the leaf and key).
        image_size: side ``S`` of the square images, pixels.
        seed: base seed; image ``index`` uses ``numpy.random.default_rng([seed, index])``.
        red_cells: (min, max) number of red-cell discs drawn behind the white cell.
        dataset_name: value of the ``dataset`` field of items (default: the hierarchy's name).
    """

    def __init__(
        self,
        hierarchy: Any,
        image_size: int = 64,
        seed: int = 0,
        red_cells: Sequence[int] = (0, 3),
        dataset_name: str | None = None,
    ) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if len(red_cells) != 2 or not 0 <= red_cells[0] <= red_cells[1]:
            raise ValueError(f"red_cells must be (min, max) with 0 <= min <= max, got {red_cells}")
        self.hierarchy = hierarchy
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.red_cells = (int(red_cells[0]), int(red_cells[1]))
        self.leaves: list[str] = list(hierarchy.leaves)
        if not self.leaves:
            raise SyntheticSpecError("hierarchy has no leaves")
        self.attributes = {leaf: CellAttributes.from_meta(leaf, hierarchy.meta(leaf)) for leaf in self.leaves}
        self._dataset_name = dataset_name
        centres = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._yy, self._xx = np.meshgrid(centres, centres, indexing="ij")
        # Weyl-sequence offset for labelling decisions: a stream independent of the images'.
        self._label_offset = float(np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1,))).random())

    @property
    def dataset_name(self) -> str:
        return self._dataset_name or getattr(self.hierarchy, "name", None) or "synthetic"

    def leaf_of(self, index: int) -> str:
        """Class of image ``index``: leaves cycle, so any ``n_leaves`` consecutive images hold each once."""
        return self.leaves[int(index) % len(self.leaves)]

    def generate_array(self, index: int) -> tuple[np.ndarray, str]:
        """``(uint8 ndarray [S, S, 3], leaf_id)`` for image ``index``."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        leaf = self.leaf_of(index)
        attrs = self.attributes[leaf]
        rng = np.random.default_rng([self.seed, int(index)])
        s = self.image_size
        yy, xx = self._yy, self._xx

        # Slide background: uneven stain plus a per-image tint.
        tint = 1.0 + rng.normal(0.0, 0.02, 3).astype(np.float32)
        img = _BACKGROUND_RGB * tint * (1.0 + 0.03 * _value_noise(rng, s, s / 4))[..., None]

        # Red cells: pale discs with a lighter centre (central pallor).
        for _ in range(int(rng.integers(self.red_cells[0], self.red_cells[1] + 1))):
            cx, cy = rng.uniform(0, s, 2)
            r = _RED_CELL_RADIUS * s * rng.uniform(0.85, 1.15)
            d = np.hypot(xx - cx, yy - cy)
            pallor = np.exp(-((d / (0.55 * r)) ** 2))[..., None]
            color = _RED_CELL_RGB * tint * (1 - 0.5 * pallor) + _BACKGROUND_RGB * 0.5 * pallor
            img = _blend(img, color, _alpha(d - r))

        # The white cell: a slightly elliptic disc, randomly placed and rotated.
        stain = 1.0 + rng.normal(0.0, 0.03, 3).astype(np.float32)
        radius = attrs.cell_radius * s * math.exp(rng.normal(0.0, 0.06))
        cx, cy = s / 2 + rng.uniform(-0.08, 0.08, 2) * s
        theta = rng.uniform(0.0, 2 * math.pi)
        cos_t, sin_t = math.cos(theta), math.sin(theta)
        u = cos_t * (xx - cx) + sin_t * (yy - cy)
        v = -sin_t * (xx - cx) + cos_t * (yy - cy)
        elong = 1.0 + rng.uniform(-0.08, 0.08)
        cell_sdf = _ellipse_sdf(u, v, radius * elong, radius / elong)
        cell = _alpha(cell_sdf)
        cytoplasm = attrs.cytoplasm_color * stain * (1.0 + 0.05 * _value_noise(rng, s, 0.3 * radius))[..., None]
        img = _blend(img, cytoplasm, cell)

        # Granules: a random fraction `density` of small square cells of the cytoplasm.
        if attrs.granule_density > 0:
            g = max(1.0, attrs.granule_size * radius)
            n = int(math.ceil(s / g)) + 1
            present = rng.random((n, n)) < attrs.granule_density
            shift = rng.uniform(0.0, g, 2)
            gy = ((yy + shift[0]) / g).astype(np.int64)
            gx = ((xx + shift[1]) / g).astype(np.int64)
            inside = _alpha(cell_sdf + 1.0)  # keep granules off the membrane
            img = _blend(img, attrs.granule_color * stain, 0.85 * present[gy, gx] * inside)

        # Nucleus: eccentric, in its own rotated frame, textured by chromatin noise.
        n_radius = attrs.nucleus_size * radius
        phi = rng.uniform(0.0, 2 * math.pi)
        ncx = cx + attrs.nucleus_offset * radius * math.cos(phi)
        ncy = cy + attrs.nucleus_offset * radius * math.sin(phi)
        psi = theta + rng.uniform(-0.5, 0.5)
        cos_p, sin_p = math.cos(psi), math.sin(psi)
        nu = cos_p * (xx - ncx) + sin_p * (yy - ncy)
        nv = -sin_p * (xx - ncx) + cos_p * (yy - ncy)
        nucleus = _alpha(_nucleus_sdf(attrs, nu, nv, n_radius, rng)) * cell
        chromatin = 1.0 + attrs.chromatin_contrast * _value_noise(rng, s, attrs.chromatin_scale * n_radius)
        img = _blend(img, attrs.nucleus_color * stain * chromatin[..., None], nucleus)

        img = img + rng.normal(0.0, 0.015, img.shape).astype(np.float32)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), leaf

    def generate(self, index: int) -> tuple[Image.Image, str]:
        """``(PIL RGB image S x S, leaf_id)`` for image ``index``; identical bytes for identical (seed, index)."""
        array, leaf = self.generate_array(index)
        return Image.fromarray(array), leaf

    def coarse_label(self, leaf: str) -> str:
        """The parent of ``leaf``; the leaf itself when its parent is the root (no coarser useful label)."""
        if self.hierarchy.depth(leaf) <= 1:
            return leaf
        return self.hierarchy.parent(leaf)

    def label(self, index: int, label_fraction: float = 1.0, coarse_fraction: float = 0.0) -> str | None:
        """Training label of image ``index``: the leaf, its parent (coarse), or None (unlabelled).

        A pure function of ``(seed, index)``: with ``u = frac(offset(seed) + index * phi)``
        (``phi`` the golden-ratio conjugate, a low-discrepancy Weyl sequence), the image is
        labelled iff ``u < label_fraction`` and coarse iff ``u < label_fraction * coarse_fraction``.
        Over any ``n`` consecutive indices the counts are within a few units of
        ``n * label_fraction`` and ``n * label_fraction * coarse_fraction`` (no binomial noise).
        """
        for name, value in (("label_fraction", label_fraction), ("coarse_fraction", coarse_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        golden = (math.sqrt(5.0) - 1.0) / 2.0
        # Reduce the product modulo 1 in two steps to keep precision for large indices.
        u = (self._label_offset + (int(index) * golden) % 1.0) % 1.0
        if u >= label_fraction:
            return None
        leaf = self.leaf_of(index)
        return self.coarse_label(leaf) if u < label_fraction * coarse_fraction else leaf


def write_synthetic_dataset(
    out_dir: str | Path,
    num_images: int,
    hierarchy: Any,
    image_size: int = 64,
    seed: int = 0,
    label_fraction: float = 1.0,
    coarse_fraction: float = 0.0,
    image_format: str = "png",
) -> Path:
    """Write ``num_images`` synthetic images and a manifest; return the manifest path.

    Layout: ``out_dir/images/<index:06d>.<ext>`` (flat, so folder names reveal no labels) and
    ``out_dir/manifest.csv`` with columns ``path,label,dataset,true_label``: ``label`` follows
    :meth:`SyntheticCellGenerator.label` (empty = unlabelled, or the parent node for coarse
    labels); ``true_label`` is always the leaf, for evaluation. ``image_format``: png
    (lossless, byte-exact) or jpg.
    """
    fmt = image_format.lower()
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be png or jpg, got '{image_format}'")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    ext = "png" if fmt == "png" else "jpg"
    generator = SyntheticCellGenerator(hierarchy, image_size=image_size, seed=seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "dataset", "true_label"])
    for index in range(num_images):
        image, leaf = generator.generate(index)
        rel = f"images/{index:06d}.{ext}"
        if ext == "png":
            image.save(out_dir / rel, format="PNG")
        else:
            image.save(out_dir / rel, format="JPEG", quality=95)
        label = generator.label(index, label_fraction, coarse_fraction)
        writer.writerow([rel, label or "", generator.dataset_name, leaf])
    manifest = out_dir / "manifest.csv"
    atomic_write_text(manifest, buffer.getvalue())
    return manifest
