"""Frozen backbones and labelled data for evaluation (the features: :mod:`eval.extraction`).

* :func:`load_eval_backbone` rebuilds the teacher backbone from a ``teacher_backbone.pt``,
  a full training checkpoint (``checkpoints/ckpt_*.pt``), a foreign DINOv2 / DinoBloom
  weights file (with ``arch``), or builds an untrained one (``"none"``), in eval mode.
* :func:`resolve_checkpoints` turns a ``--ckpt`` argument into the checkpoints to evaluate.
* :func:`load_eval_data` reads a manifest CSV or ImageFolder and resolves every label to a
  hierarchy node id (or keeps the raw strings without a hierarchy) with one fixed class list.
* :func:`extract_features` (defined in :mod:`eval.extraction`, re-exported here with the
  loader and the cache key) runs the backbone over images and caches the ``[n, D]`` float32
  CLS features as ``.npz`` keyed by checkpoint, files and preprocessing; it shares its
  batched loop, :func:`eval.extraction.iter_feature_blocks`, with ``python -m eval.extract``.

Reading the backbone files themselves is :func:`dinov2_hier.models.read_artifact`'s.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinov2_hier.data import IMAGENET_MEAN, IMAGENET_STD, Record, read_manifest, records_from_source
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.io import file_sha256
from dinov2_hier.labels import LabelMap, LabelMapError, LabelResolver, split_label_maps
from dinov2_hier.models import BackboneArtifact, WeightsError, build_backbone, load_backbone_weights, read_artifact
from dinov2_hier.models.artifacts import CHECKPOINT, CONFIG_FILE, EXPORT, TEACHER, locate_export
from dinov2_hier.paths import ResourceNotFoundError, resolve_resource
from dinov2_hier.train.checkpoint import TEACHER_FILE, CheckpointError, list_checkpoints, load_model_state, weights_finite

from .baselines import BASELINES, PREFIX, baseline_name, is_baseline
from .crossval import EvalDataError
# re-exported: the names of this module before eval.extraction
from .extraction import FeatureSet, eval_image_loader, extract_features, feature_cache_key

__all__ = [
    "EvalBackbone",
    "EvalData",
    "EvalDataError",
    "FeatureSet",
    "eval_image_loader",
    "extract_features",
    "feature_cache_key",
    "load_eval_backbone",
    "load_eval_data",
    "resolve_checkpoints",
]

logger = logging.getLogger("dinov2_hier.eval")


# -- backbones ------------------------------------------------------------------------------
@dataclass
class EvalBackbone:
    """A frozen backbone ready for feature extraction.

    ``meta`` holds ``arch, patch_size, img_size, mean, std, num_register_tokens, iteration``
    (None when unknown) and the remaining build options; ``fingerprint`` identifies the
    weights (sha256 of the file's bytes, or ``untrained:<arch>:<seed>``).
    """

    model: nn.Module
    meta: dict
    source: str
    fingerprint: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.model.parameters(), self.model.buffers())).device


def _finish(model: nn.Module, meta: dict, source: str, fingerprint: str, device: Any) -> EvalBackbone:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return EvalBackbone(model.to(device), meta, source, fingerprint)


def _meta(model: nn.Module, arch: str, img_size: int, mean: Sequence[float], std: Sequence[float],
          iteration: int | None, **extra: Any) -> dict:
    return {
        "arch": arch,
        "patch_size": int(model.patch_size),
        "img_size": int(img_size),
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "num_register_tokens": int(model.num_register_tokens),
        "embed_dim": int(model.embed_dim),
        "iteration": None if iteration is None else int(iteration),
        **extra,
    }


def _strict_load(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, recorded_arch: str,
                 arch: str) -> None:
    """Strict load; on mismatch one CheckpointError naming file, architectures and first key."""
    try:
        load_model_state(model, dict(state), path)
    except CheckpointError as err:
        if arch != recorded_arch:
            detail = str(err).removeprefix(f"{path}: ")
            raise CheckpointError(
                f"{path} holds a {recorded_arch} backbone, not the requested arch {arch}: {detail}"
            ) from None
        raise


def _build(arch: str, path: Path, **kwargs: Any) -> nn.Module:
    try:
        return build_backbone(arch, **kwargs)
    except ValueError as err:  # unknown arch, img_size not a multiple of the patch size, ...
        raise CheckpointError(f"{path}: cannot build backbone {arch!r}: {err}") from None


def _check_recorded_geometry(state: Mapping[str, Any], path: Path, img_size: int, patch_size: int,
                             num_register_tokens: int) -> None:
    """Compare the token shapes of ``state`` with the recorded image geometry *before* the
    model is built: a recorded ``img_size`` of a million pixels (or a million register
    tokens) would otherwise allocate tens of GB before the strict load found the mismatch.
    Messages name the key as the strict load does. Geometry the build itself refuses (a
    size that is not a multiple of the patch) is left to it."""
    if patch_size < 1 or img_size < patch_size or img_size % patch_size or num_register_tokens < 0:
        return
    config = "checkpoint does not match its recorded config"
    pos = state.get("pos_embed")
    tokens = 1 + (img_size // patch_size) ** 2
    if isinstance(pos, torch.Tensor) and pos.ndim == 3 and pos.shape[1] != tokens:
        raise CheckpointError(
            f"{path}: shape mismatch at 'pos_embed': checkpoint {tuple(pos.shape)} holds {pos.shape[1]} positions, "
            f"the recorded img_size {img_size} and patch_size {patch_size} need 1 + ({img_size}/{patch_size})^2 = "
            f"{tokens} ({config}; the model was not built)"
        )
    proj = state.get("patch_embed.proj.weight")
    if isinstance(proj, torch.Tensor) and proj.ndim == 4 and tuple(proj.shape[2:]) != (patch_size, patch_size):
        raise CheckpointError(
            f"{path}: shape mismatch at 'patch_embed.proj.weight': checkpoint {tuple(proj.shape)} vs the recorded "
            f"patch_size {patch_size} ({config}; the model was not built)"
        )
    registers = state.get("register_tokens")
    if registers is None and num_register_tokens > 0:
        raise CheckpointError(
            f"{path}: {config} (missing key 'register_tokens': {num_register_tokens} recorded, none in the "
            "weights; the model was not built)"
        )
    if isinstance(registers, torch.Tensor) and registers.ndim == 3 and registers.shape[1] != num_register_tokens:
        raise CheckpointError(
            f"{path}: shape mismatch at 'register_tokens': checkpoint {tuple(registers.shape)} vs "
            f"{num_register_tokens} recorded register tokens ({config}; the model was not built)"
        )


def _from_recorded(artifact: BackboneArtifact, arch: str | None) -> tuple[nn.Module, dict]:
    """A teacher file, an export or our training checkpoint: the recorded architecture (``arch``
    overrides its name), geometry checked against the weights before building, strict load."""
    path = artifact.path
    try:
        recorded_spec, state = artifact.spec, artifact.state
    except WeightsError as err:
        raise CheckpointError(str(err)) from None
    spec = recorded_spec.with_arch(arch)
    _check_recorded_geometry(state, path, spec.img_size, spec.patch_size, spec.num_register_tokens)
    try:
        model = spec.build()
    except ValueError as err:  # unknown arch, img_size not a multiple of the patch size, ...
        raise CheckpointError(f"{path}: cannot build backbone {spec.arch!r}: {err}") from None
    _strict_load(model, state, path, str(recorded_spec.arch), str(spec.arch))
    return model, _meta(model, spec.arch, spec.img_size, spec.mean, spec.std, artifact.iteration,
                        ffn_layer=spec.ffn_layer, layerscale=spec.layerscale, qkv_bias=spec.qkv_bias)


def _from_foreign_weights(artifact: BackboneArtifact, arch: str | None) -> tuple[nn.Module, dict]:
    """A DINOv2 / DinoBloom style file without recorded architecture: ``arch`` decides;
    patch size, registers, FFN, LayerScale and qkv bias are read off the tensors; the model
    is built at 224 px (position embeddings interpolated)."""
    path = artifact.path
    if arch is None:
        raise CheckpointError(
            f"{path}: not a dinov2_hier checkpoint (no 'meta' or 'config' recording the architecture); "
            "name the architecture (--arch vit_small|vit_base|vit_large|vit_giant2) to load it as "
            "DINOv2/DinoBloom weights"
        )
    state = artifact.state  # WeightsError naming the file
    proj = state.get("patch_embed.proj.weight")
    patch = int(proj.shape[-1]) if proj is not None and proj.ndim == 4 else 14
    registers = state.get("register_tokens")
    img_size = 224 - 224 % patch
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": patch,
        "num_register_tokens": int(registers.shape[1]) if registers is not None and registers.ndim == 3 else 0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "layerscale_init": 1e-5 if "blocks.0.ls1.gamma" in state else None,
    }
    if any(k.startswith("blocks.0.mlp.w12") for k in state):
        kwargs["ffn_layer"] = "swiglu"
    model = _build(arch, path, **kwargs)
    try:
        report = load_backbone_weights(model, state)
    except WeightsError as err:
        raise WeightsError(f"{path}: weights do not match {arch}: {str(err).removeprefix('state dict: ')}") from None
    if report.missing:
        raise WeightsError(
            f"{path}: weights do not match {arch} (missing key {report.missing[0]!r}; "
            f"{len(report.missing)} missing, {len(report.unexpected)} unexpected)"
        )
    if report.unexpected:
        logger.warning("%s: ignored %d unexpected keys (first %r)", path, len(report.unexpected), report.unexpected[0])
    extra = {"qkv_bias": kwargs["qkv_bias"], "layerscale": kwargs["layerscale_init"],
             "ffn_layer": kwargs.get("ffn_layer", "default")}
    return model, _meta(model, arch, img_size, IMAGENET_MEAN, IMAGENET_STD, None, **extra)


def load_eval_backbone(ckpt: str | os.PathLike, arch: str | None = None, device: Any = "cpu", *,
                       seed: int = 0) -> EvalBackbone:
    """The frozen teacher backbone of ``ckpt`` in eval mode on ``device``.

    ``ckpt``: a ``teacher_backbone.pt`` (``{"model", "meta"}``), a training checkpoint
    (teacher weights ``teacher.backbone.*`` of ``"model"``, architecture and normalisation
    from its ``"config"``), an export of ``python -m dinov2_hier.export`` (its weights file or
    ``config.json``: architecture, image size and normalisation from its config), a
    DINOv2/DinoBloom weights file (needs ``arch``), ``"none"``:
    an untrained ``arch`` backbone at 224 px with ImageNet normalisation, initialised under
    ``torch.manual_seed(seed)`` without touching the global RNG, or ``"baseline:NAME"``: a
    non-learned extractor of :mod:`eval.baselines` (``baseline:colour``).

    ``arch`` given for a dinov2_hier checkpoint overrides the recorded one; a checkpoint
    whose weights do not fit raises :class:`CheckpointError` naming the file, both
    architectures and the first mismatching key (never a partial load).
    """
    if is_baseline(ckpt):
        return _baseline(ckpt, device)
    if str(ckpt).strip().lower() == "none":
        if not arch:
            raise CheckpointError("an untrained baseline (--ckpt none) needs an architecture (--arch vit_small, ...)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = build_backbone(arch)
            except ValueError as err:
                raise CheckpointError(f"cannot build backbone {arch!r}: {err}") from None
        meta = _meta(model, arch, model.grid_size[0] * model.patch_size, IMAGENET_MEAN, IMAGENET_STD, None)
        return _finish(model, meta, "none", f"untrained:{arch}:{seed}", device)

    path = Path(ckpt).expanduser()
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass a checkpoint file, or resolve the directory's checkpoints "
            "with resolve_checkpoints()"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        artifact = read_artifact(path)
    except WeightsError as err:  # as always: a torch file is a checkpoint, a safetensors file weights
        raise (WeightsError if path.suffix == ".safetensors" else CheckpointError)(str(err)) from None
    if artifact.kind == CHECKPOINT and not weights_finite(artifact.raw.get("model", {})):
        raise CheckpointError(f"{path}: its weights are not finite (saved after non-finite training steps); "
                              "evaluate an earlier checkpoint")
    if artifact.kind in (TEACHER, EXPORT) or artifact.stores_config:
        model, meta = _from_recorded(artifact, arch)
    else:  # foreign weights, a checkpoint that records no configuration
        model, meta = _from_foreign_weights(artifact, arch)
    # An export named by its config.json: the weights file read identifies it (and keys the cache).
    return _finish(model, meta, str(artifact.path), file_sha256(artifact.path), device)


def _baseline_name(ckpt: object) -> str:
    try:
        return baseline_name(ckpt)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _baseline(ckpt: object, device: Any) -> EvalBackbone:
    """A non-learned extractor (:mod:`eval.baselines`) with ImageNet normalisation at
    224 px (``--crop-size`` changes it); patch size 1, so any crop size fits."""
    name = _baseline_name(ckpt)
    model = BASELINES[name](IMAGENET_MEAN, IMAGENET_STD)
    meta = _meta(model, f"{PREFIX}{name}", 224, IMAGENET_MEAN, IMAGENET_STD, None)
    return _finish(model, meta, f"{PREFIX}{name}", f"{PREFIX}{name}:v1", device)


def resolve_checkpoints(path: str | os.PathLike, select: str | None = None) -> list[tuple[str, str]]:
    """``(name, ckpt)`` pairs to evaluate for a ``--ckpt`` argument.

    ``"none"`` -> ``[("untrained", "none")]``; ``"baseline:colour"`` ->
    ``[("baseline_colour", "baseline:colour")]``; a file -> ``[(stem, path)]``; an export folder
    (``python -m dinov2_hier.export``; holds ``config.json``) -> ``[(folder name, weights file)]``; a training
    output directory -> every ``checkpoints/ckpt_*.pt`` in iteration order, named
    ``iter_00001000``; a directory without full checkpoints but with a
    ``teacher_backbone.pt`` -> that file. ``select="val_loss"`` (``--select``): of a
    training output directory only the checkpoint with the lowest validation loss
    (:func:`dinov2_hier.train.validation.best_checkpoint`).
    """
    if select is not None:
        from dinov2_hier.train.validation import select_checkpoint

        chosen = select_checkpoint(path, select)
        return [(f"iter_{chosen.iteration:08d}", str(chosen.path))]
    if str(path).strip().lower() == "none":
        return [("untrained", "none")]
    if is_baseline(path):
        return [(f"baseline_{_baseline_name(path)}", str(path).strip().lower())]
    p = Path(path).expanduser()
    if p.is_file():
        return [(p.stem, str(p))]
    if p.is_dir() and (p / CONFIG_FILE).is_file():  # an export folder: its weights file
        try:
            weights = locate_export(p)[0]
        except WeightsError as err:
            raise CheckpointError(str(err)) from None
        return [(p.name, str(weights))]
    if p.is_dir():
        found = [(f"iter_{it:08d}", str(ckpt)) for it, ckpt in list_checkpoints(p)]
        if found:
            return found
        if (p / TEACHER_FILE).is_file():
            return [(Path(TEACHER_FILE).stem, str(p / TEACHER_FILE))]
        raise CheckpointError(f"{p}: no checkpoints/ckpt_*.pt and no {TEACHER_FILE} in this directory")
    raise CheckpointError(f"checkpoint not found: {p}")


# -- labelled data --------------------------------------------------------------------------
@dataclass
class EvalData:
    """Images to evaluate and their labels.

    ``labels[i]`` is the hierarchy node id of ``paths[i]`` (or the raw label without a
    hierarchy); ``classes`` is the class list fixed once from the whole dataset, in
    ``hierarchy.index`` order (else sorted); ``records`` are the records as read.
    """

    paths: list[str]
    labels: list[str]
    classes: list[str]
    records: list[Record] = field(repr=False)


def _as_hierarchy(hierarchy: Hierarchy | str | os.PathLike | None) -> Hierarchy | None:
    if hierarchy is None or isinstance(hierarchy, Hierarchy):
        return hierarchy
    return Hierarchy.from_json(resolve_resource(hierarchy, "hierarchy"))


def _read_label_map(label_map: str, label_maps_dir: str | os.PathLike, hierarchy: Hierarchy | None) -> LabelMap:
    """A label map given as a JSON file or as a dataset name in ``label_maps_dir``."""
    candidate = Path(label_map).expanduser()
    if candidate.suffix.lower() == ".json" or candidate.is_file():
        try:
            file = resolve_resource(candidate, "label map")
        except ResourceNotFoundError as err:
            raise LabelMapError(str(err)) from None
        return LabelMap.from_json(file, hierarchy)
    try:
        file = resolve_resource(Path(label_maps_dir) / f"{label_map}.json", "label map")
    except ResourceNotFoundError:
        raise LabelMapError(
            f"label map {label_map!r} is neither a JSON file nor a dataset with a map in {label_maps_dir}"
        ) from None
    return LabelMap.from_json(file, hierarchy)


def load_eval_data(
    source: str | os.PathLike,
    hierarchy: Hierarchy | str | os.PathLike | None = None,
    label_map: str | None = None,
    label_maps_dir: str | os.PathLike = "hierarchies/label_maps",
    label_column: str = "label",
) -> EvalData:
    """Read a manifest CSV or an ImageFolder and resolve every label.

    With ``hierarchy`` (a :class:`Hierarchy` or a JSON path) labels become node ids: an
    explicit ``label_map`` (a JSON file, or a dataset name in ``label_maps_dir``) maps every
    row; otherwise each row's ``dataset`` column picks a map from ``label_maps_dir`` (maps for
    other trees are ignored), and a row without one must name a node. Without a hierarchy
    the labels are the raw strings, passed through ``label_map`` when one is given.

    Raises:
        LabelMapError: a label no map or node knows; the message names the label, its dataset,
            the data source and the first image carrying it.
        EvalDataError: an unlabelled row (named by its image path) or no images at all.
        DataSourceError / ManifestError: the source itself is missing or malformed.
    """
    hierarchy = _as_hierarchy(hierarchy)
    src = Path(source).expanduser()
    if src.suffix.lower() == ".csv":
        records = read_manifest(src, label_column=label_column)
    else:
        records = records_from_source(src)
    if not records:
        raise EvalDataError(f"{src}: no images listed")
    unlabelled = [r for r in records if r.label is None]
    if unlabelled:
        raise EvalDataError(
            f"{src}: {len(unlabelled)} of {len(records)} images have no label (column '{label_column}') "
            f"(first: {unlabelled[0].path}); evaluation needs a label for every image"
        )

    explicit = _read_label_map(label_map, label_maps_dir, hierarchy) if label_map else None
    if hierarchy is not None:
        maps: dict[str, LabelMap] = {}
        others: dict[str, LabelMap] = {}
        try:
            folder = resolve_resource(label_maps_dir, "label map directory")
        except ResourceNotFoundError:
            folder = None
        if folder is not None and folder.is_dir():
            maps, others = split_label_maps(folder, hierarchy)
        if explicit is not None:
            maps[explicit.dataset] = explicit
        resolver = LabelResolver(hierarchy, maps, unmapped="error", other_maps=others,
                                 hierarchy_option="--hierarchy ")

        def resolve(label: str, dataset: str | None) -> str:
            node = resolver.resolve(label, dataset)
            assert node is not None  # labels are non-blank here
            return node
    else:
        def resolve(label: str, dataset: str | None) -> str:
            return explicit.map(label) if explicit is not None else label

    resolved: dict[tuple[str, str | None], str] = {}
    labels: list[str] = []
    for record in records:
        dataset = explicit.dataset if explicit is not None else record.dataset
        key = (record.label, dataset)
        if key not in resolved:
            try:
                resolved[key] = resolve(record.label, dataset)
            except LabelMapError as err:
                hint = "; name the dataset's label map with label_map (--label-map)" if dataset is None else ""
                raise LabelMapError(
                    f"{err} [dataset {dataset!r}, image {record.path}]{hint}", source=str(src)
                ) from None
        labels.append(resolved[key])
    unique = set(labels)
    classes = sorted(unique, key=hierarchy.index) if hierarchy is not None else sorted(unique)
    return EvalData(paths=[r.path for r in records], labels=labels, classes=classes, records=records)
