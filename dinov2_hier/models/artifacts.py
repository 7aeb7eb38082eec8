"""Every file that holds a backbone, read one way: :func:`read_artifact`.

A path is one of (:attr:`BackboneArtifact.kind`):

- ``"checkpoint"``: a training checkpoint ``checkpoints/ckpt_*.pt``
  (``{"model": {"teacher.backbone.<name>": ...}, "config": yaml, "iteration", ...}``; the
  same layout without ``config``, as DINOv2 writes it, is one too);
- ``"teacher"``: a ``teacher_backbone.pt`` (``{"model": state_dict, "meta": {...}}``);
- ``"export"``: an export of ``python -m dinov2_hier.export``: its folder, its
  ``config.json``, or its weights file (``config.json`` beside it, or the config in a
  ``.safetensors`` header);
- ``"weights"``: anything else holding backbone tensors (DINOv2 / DinoBloom releases and
  training checkpoints, plain state dicts): no recorded architecture;
- a training output directory stands for its newest checkpoint, else its ``teacher_backbone.pt``.

Files are read without unpickling code (``torch.load(weights_only=True)`` or safetensors;
see :func:`~dinov2_hier.models.weights.read_state_dict`). What a file records is parsed
when asked for: :attr:`BackboneArtifact.state` (the backbone, DINOv2 names),
:attr:`~BackboneArtifact.spec` (:class:`~dinov2_hier.models.spec.BackboneSpec`, None for
foreign weights), :attr:`~BackboneArtifact.iteration`, the checkpoint's training config.
Errors are :class:`~dinov2_hier.models.WeightsError` naming the file; the loaders
(:func:`load_backbone_weights`, :func:`dinov2_hier.hub.load_backbone`,
:func:`dinov2_hier.export.load_trained_teacher`, ``eval.features.load_eval_backbone``)
decide which kinds they take and what they check.

The names of the files of a training run and of an export are defined here, the lowest
floor that reads them; the training loop and the export, which write them, import them.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Union

from torch import Tensor

from dinov2_hier.io import read_json_object
from dinov2_hier.models.spec import TEACHER_BACKBONE_PREFIX, BackboneSpec
from dinov2_hier.models.vision_transformer import VisionTransformer
from dinov2_hier.models.weights import (
    LoadReport,
    WeightsError,
    extract_backbone_state_dict,
    load_backbone_state,
    read_state_dict,
)

PathLike = Union[str, os.PathLike]

# ------------------------------------------------------------------ file names
#: A training run directory: ``checkpoints/ckpt_<iteration:08d>.pt``, ``teacher_backbone.pt``
#: (the newest good teacher) and ``config.yaml`` (the resolved configuration).
CHECKPOINT_DIR = "checkpoints"
TEACHER_FILE = "teacher_backbone.pt"
RUN_CONFIG_FILE = "config.yaml"
_CHECKPOINT_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
#: An export folder: ``config.json`` and ``model.safetensors`` (or ``model.pth``).
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PTH_FILE = "model.pth"
#: Key of the safetensors header metadata that repeats config.json, so that a
#: ``model.safetensors`` copied without its folder still describes itself.
SAFETENSORS_CONFIG_KEY = "dinov2_hier_config"
#: An export in timm's layout (``format_version`` 2, the default of the export command):
#: ``config.json`` is timm's schema (``architecture``, ``model_args``, ``pretrained_cfg``)
#: with this project's document under this top-level key, which timm ignores; the document's
#: ``tensor_layout`` is :data:`TIMM_LAYOUT` and the weights file holds timm's tensor names.
#: Older exports (``format_version`` 1, ``--format ours``) are this document itself, with
#: DINOv2 tensor names (``tensor_layout`` :data:`DINOV2_LAYOUT`, or absent).
EXPORT_BLOCK_KEY = "dinov2_hier"
TIMM_LAYOUT, DINOV2_LAYOUT = "timm", "dinov2"

# ------------------------------------------------------------------ kinds
CHECKPOINT, TEACHER, EXPORT, WEIGHTS = "checkpoint", "teacher", "export", "weights"
ALL_KINDS = (CHECKPOINT, TEACHER, EXPORT, WEIGHTS)
KIND_NAMES = {CHECKPOINT: "dinov2_hier training checkpoint", TEACHER: TEACHER_FILE,
              EXPORT: "dinov2_hier export", WEIGHTS: "backbone weights file"}
# DDP ("module.") and torch.compile ("_orig_mod.") wrappers add path components to names.
_WRAPPER_PARTS = re.compile(r"(^|\.)(?:module|_orig_mod)\.")


def list_checkpoints(output_dir: PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the full checkpoints in ``output_dir``, oldest first.
    Temporary files of an interrupted write never match the name pattern."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def run_dir_of_file(path: PathLike) -> Path:
    """The training run directory a checkpoint or teacher file sits in by the run layout
    (``RUN/checkpoints/ckpt_*.pt``, ``RUN/teacher_backbone.pt``)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent


def teacher_backbone_state(model_state: Mapping[str, Any]) -> dict[str, Any]:
    """The EMA teacher's backbone in a training model's state dict (a checkpoint's
    ``"model"``): the ``teacher.backbone.`` entries with the prefix removed, after dropping
    the ``module.`` / ``_orig_mod.`` parts that DDP and torch.compile add."""
    prefix = TEACHER_BACKBONE_PREFIX
    unwrapped = ((_WRAPPER_PARTS.sub(r"\1", k), v) for k, v in model_state.items())
    return {k[len(prefix):]: v for k, v in unwrapped if k.startswith(prefix)}


def parse_run_config(text: str, source: str) -> Any:
    """A training configuration (YAML text) as a ``DictConfig``; :class:`WeightsError`
    naming ``source`` when it is not YAML or not a mapping."""
    from omegaconf import DictConfig, OmegaConf

    try:
        cfg = OmegaConf.create(text)
    except Exception as err:  # OmegaConf raises yaml and its own error types
        raise WeightsError(f"{source}: cannot parse the run configuration: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise WeightsError(f"{source}: the run configuration is not a mapping")
    return cfg


def spec_of_config(cfg: Any, source: str) -> BackboneSpec:
    """:meth:`BackboneSpec.from_config` with a :class:`WeightsError` naming ``source``
    for a configuration that lacks a setting or holds one of the wrong type."""
    try:
        return BackboneSpec.from_config(cfg)
    except Exception as err:  # OmegaConf's missing-key errors, ValueError, TypeError
        raise WeightsError(f"{source}: the run configuration lacks an architecture setting: {err}") from None


# ------------------------------------------------------------------ exports


def read_config(path: PathLike) -> dict[str, Any]:
    """Read an export's ``config.json`` (a JSON object); :class:`WeightsError` naming the file otherwise.
    The document as stored (for a timm-layout export, timm's schema with our block inside)."""
    return read_json_object(path, WeightsError, what="config file")


def is_foreign_timm_config(config: Mapping[str, Any]) -> bool:
    """A ``config.json`` in timm's schema without our block (a timm model of another project)."""
    return "pretrained_cfg" in config and "embed_dim" not in config and not isinstance(config.get(EXPORT_BLOCK_KEY), Mapping)


def export_document(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """This project's export document of a ``config.json``: the :data:`EXPORT_BLOCK_KEY`
    block of a timm-layout export, the whole object of an older one. A timm config
    without the block (another project's timm model) raises :class:`WeightsError`."""
    block = config.get(EXPORT_BLOCK_KEY)
    if isinstance(block, Mapping):
        return dict(block)
    if is_foreign_timm_config(config):
        raise WeightsError(f"{source}: timm's config schema without a '{EXPORT_BLOCK_KEY}' block: not a dinov2_hier "
                           f"export (load it with timm.create_model(\"local-dir:...\"))")
    return dict(config)


def tensor_layout(document: Mapping[str, Any], source: str = "config") -> str:
    """``tensor_layout`` of an export document (:data:`DINOV2_LAYOUT` when absent)."""
    layout = document.get("tensor_layout", DINOV2_LAYOUT)
    if layout not in (TIMM_LAYOUT, DINOV2_LAYOUT):
        raise WeightsError(f"{source}: 'tensor_layout' must be {TIMM_LAYOUT} or {DINOV2_LAYOUT}, got {layout!r}")
    return layout


def export_tensors(raw: Mapping[str, Any], document: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """An export's tensors in DINOv2's layout: as stored, or converted from timm's
    (:func:`~dinov2_hier.models.timm_compat.from_timm_state_dict`: renames, the zero class
    position, a zero ``mask_token``); nothing else renamed or dropped, so strict checks
    still see the file's own keys."""
    if tensor_layout(document, source) == DINOV2_LAYOUT:
        return dict(raw)
    from dinov2_hier.models.timm_compat import from_timm_state_dict

    registers = document.get("num_register_tokens", 0)
    registers = registers if isinstance(registers, int) and not isinstance(registers, bool) else 0
    return from_timm_state_dict(raw, registers, str(document.get("ffn_layer", "mlp")))


def safetensors_config(path: PathLike) -> dict[str, Any] | None:
    """The export config stored in a safetensors header (:data:`SAFETENSORS_CONFIG_KEY`), if any."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors' own error types are not ValueErrors
        raise WeightsError(f"cannot read safetensors file {path}: {err}") from None
    text = metadata.get(SAFETENSORS_CONFIG_KEY)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: header metadata '{SAFETENSORS_CONFIG_KEY}' is not valid JSON: {err.msg}") from None
    return export_document(config, f"{path} (header metadata)") if isinstance(config, dict) else None


def locate_export(path: PathLike) -> tuple[Path, dict[str, Any], str]:
    """Find the weights file and config of an export.

    ``path`` is an export directory, its ``config.json``, or a weights file
    (``.safetensors`` / ``.pth`` / ``.pt``). For a directory the file named by the config's
    ``weights_file`` is used, else ``model.safetensors``, else ``model.pth``. A weights file
    uses the ``config.json`` beside it, else (safetensors only) the config in its header.
    Returns ``(weights_path, config, config_source)``.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"export not found: {path}")
    if path.is_dir() or path.name == CONFIG_FILE:
        folder = path if path.is_dir() else path.parent
        config_path = folder / CONFIG_FILE
        config = export_document(read_config(config_path), str(config_path))
        name = config.get("weights_file")
        if name is not None:
            if not isinstance(name, str) or Path(name).name != name:
                raise WeightsError(f"{config_path}: 'weights_file' must be a file name, got {name!r}")
            weights = folder / name
        else:
            weights = next((folder / n for n in (SAFETENSORS_FILE, PTH_FILE) if (folder / n).is_file()),
                           folder / SAFETENSORS_FILE)
        if not weights.is_file():
            raise WeightsError(f"{folder}: weights file {weights.name} not found")
        return weights, config, str(config_path)
    config_path = path.parent / CONFIG_FILE
    if config_path.is_file():
        return path, export_document(read_config(config_path), str(config_path)), str(config_path)
    if path.suffix == ".safetensors":
        config = safetensors_config(path)
        if config is not None:
            return path, config, f"{path} (header metadata)"
    raise WeightsError(f"{path}: no {CONFIG_FILE} beside it describing the architecture")


# ------------------------------------------------------------------ the artifact


@dataclass(frozen=True, eq=False)
class BackboneArtifact:
    """A file holding a backbone, read (see the module docstring).

    ``kind``: one of :data:`ALL_KINDS`; ``path``: the file read (an export's weights
    file); ``raw``: its top-level mapping as stored; ``run_dir``: the training run
    directory of a checkpoint or teacher file by the run layout (None for other kinds);
    ``export``: an export's ``(config, config_source)`` when already read.
    """

    kind: str
    path: Path
    raw: Mapping[str, Any]
    run_dir: Path | None = None
    export: tuple[dict[str, Any], str] | None = None

    @property
    def stores_config(self) -> bool:
        """Whether this is a checkpoint that stores its training configuration (ours do;
        DINOv2's do not)."""
        return self.kind == CHECKPOINT and isinstance(self.raw.get("config"), str)

    @cached_property
    def state(self) -> dict[str, Tensor]:
        """The backbone state dict, DINOv2 parameter names: a teacher file's ``"model"`` as
        stored, our checkpoint's teacher backbone (:func:`teacher_backbone_state`), or (exports,
        foreign weights, a checkpoint without ``config``) what
        :func:`~dinov2_hier.models.weights.extract_backbone_state_dict` finds.
        :class:`WeightsError` naming the file for a non-tensor entry or no backbone."""
        if self.kind == TEACHER:
            return _tensor_dict(self.raw["model"], f"{self.path}: 'model'")
        if self.stores_config:  # ours
            return _tensor_dict(teacher_backbone_state(self.raw["model"]), f"{self.path}: 'model'")
        try:  # DINOv2's checkpoints may name chunked blocks: the general extraction renames them
            return extract_backbone_state_dict(self.tensors if self.kind == EXPORT else self.raw)
        except WeightsError as err:
            raise WeightsError(f"{self.path}: {err}") from None

    @cached_property
    def tensors(self) -> dict[str, Any]:
        """The file's entries in DINOv2's layout, nothing dropped: an export in timm's
        layout converted (:func:`export_tensors`), any other file as stored."""
        if self.kind != EXPORT:
            return dict(self.raw)
        return export_tensors(self.raw, self.metadata, self.metadata_source)

    @cached_property
    def metadata(self) -> Any:
        """What the file records of its architecture, as stored: a teacher file's
        ``"meta"``, a checkpoint's ``"config"`` (YAML text, None when absent), an export's
        config; None for foreign weights."""
        if self.kind == TEACHER:
            return self.raw["meta"]
        if self.kind == CHECKPOINT:
            return self.raw.get("config")
        if self.kind == EXPORT:
            return self._export[0]
        return None

    @property
    def metadata_source(self) -> str:
        """How error messages name where the metadata is recorded."""
        if self.kind == EXPORT:
            return self._export[1]
        return f"{self.path}: '{'meta' if self.kind == TEACHER else 'config'}'"

    @cached_property
    def train_config(self) -> Any:
        """A checkpoint's training configuration (``DictConfig``); None for other kinds and
        for a checkpoint that stores none (a DINOv2 one)."""
        return parse_run_config(self.raw["config"], str(self.path)) if self.stores_config else None

    @cached_property
    def spec(self) -> BackboneSpec | None:
        """The recorded architecture; None when the file records none (foreign weights, a
        checkpoint without configuration). :class:`WeightsError` naming the file when the
        record is malformed."""
        if self.kind == TEACHER:
            return BackboneSpec.from_metadata(self.metadata, self.metadata_source)
        if self.kind == EXPORT:
            return BackboneSpec.from_export_config(self.metadata, self.metadata_source)
        cfg = self.train_config
        return None if cfg is None else spec_of_config(cfg, str(self.path))

    @property
    def iteration(self) -> int | None:
        """The training iteration the weights are from, when recorded."""
        if self.kind == CHECKPOINT:
            value = self.raw.get("iteration")
        elif self.kind in (TEACHER, EXPORT):
            value = self.metadata.get("iteration") if isinstance(self.metadata, Mapping) else None
        else:
            value = None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def hierarchy_fingerprint(self) -> str | None:
        """The label tree's fingerprint a checkpoint records ("" for a run without
        supervision); None when unknown."""
        value = self.raw.get("hierarchy_fingerprint") if self.kind == CHECKPOINT else None
        return value if isinstance(value, str) else None

    @cached_property
    def _export(self) -> tuple[dict[str, Any], str]:
        return self.export if self.export is not None else locate_export(self.path)[1:]


def _tensor_dict(obj: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source} is a {type(obj).__name__}, expected a dict of tensors")
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise WeightsError(f"{source}: entry '{key}' is a {type(value).__name__}, expected a tensor")
    return dict(obj)


def _classify(obj: Mapping[str, Any]) -> str:
    """Kind of a file's top-level mapping, by content (an export is known by its location)."""
    model = obj.get("model")
    if isinstance(obj.get("meta"), Mapping) and "model" in obj:
        return TEACHER
    if (isinstance(model, Mapping) and ("config" in obj or "iteration" in obj)
            and any(_WRAPPER_PARTS.sub(r"\1", str(k)).startswith(TEACHER_BACKBONE_PREFIX) for k in model)):
        return CHECKPOINT
    return WEIGHTS


def _is_export_file(path: Path) -> bool:
    """Whether a weights file describes itself as an export (config.json beside it, or the
    config in its safetensors header)."""
    config_path = path.parent / CONFIG_FILE
    if config_path.is_file():  # another project's timm config.json beside it: foreign weights
        return not is_foreign_timm_config(read_config(config_path))
    return path.suffix == ".safetensors" and safetensors_config(path) is not None


def _refuse(path: Path, kind: str, raw: Mapping[str, Any], accept: Collection[str]) -> WeightsError:
    keys = ", ".join(sorted(map(str, raw))[:8])
    return WeightsError(f"{path}: not a {' or '.join(KIND_NAMES[k] for k in accept)} (top-level keys: {keys})")


def read_artifact(path: PathLike, accept: Collection[str] = ALL_KINDS) -> BackboneArtifact:
    """Read the backbone file at ``path`` (see the module docstring); only the kinds in
    ``accept`` are taken, any other raises :class:`WeightsError` naming the file.

    A directory is an export folder when it holds ``config.json``, else a training run
    (its newest ``checkpoints/ckpt_*.pt``, else its ``teacher_backbone.pt``). A file is
    classified by its content; a file of plain tensors is an export when
    :func:`locate_export` finds its config, else foreign weights. With ``accept`` =
    ``("export",)`` the path is taken as an export (:func:`locate_export`'s errors).
    """
    path = Path(path)
    export: tuple[dict[str, Any], str] | None = None
    run_dir: Path | None = None
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and {CHECKPOINT, TEACHER} & set(accept):
        run_dir = path
        found = list_checkpoints(path)
        path = found[-1][1] if found else path / TEACHER_FILE
        if not path.is_file():
            raise WeightsError(f"{run_dir}: no {CHECKPOINT_DIR}/ckpt_*.pt and no {TEACHER_FILE}")
    if path.is_dir() or path.name == CONFIG_FILE or tuple(accept) == (EXPORT,):
        weights, config, source = locate_export(path)  # an export is known by its location
        path, export = weights, (config, source)
    raw = read_state_dict(path)  # weights_only=True / safetensors: refuses pickled code
    kind = EXPORT if export is not None else _classify(raw)
    if kind == WEIGHTS and _is_export_file(path):
        kind = EXPORT
    if kind not in accept:
        raise _refuse(path, kind, raw, accept)
    run_dir = (run_dir or run_dir_of_file(path)) if kind in (TEACHER, CHECKPOINT) else None
    return BackboneArtifact(kind, path, raw, run_dir, export)


def load_backbone_weights(model: VisionTransformer, path_or_state: PathLike | Mapping[str, Any],
                          source: str | None = None) -> LoadReport:
    """Load backbone weights into ``model`` in place (non-strict), from a file of any kind
    :func:`read_artifact` reads (its :attr:`~BackboneArtifact.state`) or an in-memory
    state dict of any layout :func:`~dinov2_hier.models.weights.extract_backbone_state_dict`
    accepts; the checks and the report are :func:`~dinov2_hier.models.weights.load_backbone_state`'s.
    ``source`` names a mapping's origin in the errors (a file already read)."""
    if isinstance(path_or_state, Mapping):
        source = source or "state dict"
        try:
            state = extract_backbone_state_dict(path_or_state)
        except WeightsError as err:
            raise WeightsError(f"{source}: {err}") from err
    else:
        source = os.fspath(path_or_state)
        if not os.path.isfile(source):  # a directory is no weights file here
            raise WeightsError(f"weights file not found: {source}")
        state = read_artifact(source).state
    return load_backbone_state(model, state, source)
