"""Publish a trained teacher backbone: ``model.safetensors`` + ``config.json`` + ``README.md``.

```
python -m dinov2_hier.export --ckpt CKPT --output-dir DIR [--format timm|ours|pth]
                             [--dtype fp32|bf16|fp16] [--eval EVAL_DIR ...] [--select val_loss]
                             [--license ID] [--datasets ID ...] [--base-model ORG/NAME]
```

``CKPT`` is a training output directory (its newest ``checkpoints/ckpt_*.pt``, else its
``teacher_backbone.pt``; with ``--select val_loss`` its checkpoint with the lowest
validation loss), a full training checkpoint file, or a ``teacher_backbone.pt``.

Layouts (``--format``; default: timm when timm has a DINOv2 family for the backbone,
else ours with a warning):

- ``timm``: a folder ``timm.create_model("local-dir:DIR", pretrained=True)`` loads with no
  project code (uploaded, ``hf-hub:ORG/NAME``): ``config.json`` in timm's schema
  (:func:`~dinov2_hier.models.timm_compat.timm_hub_config`) with this project's document
  under ``"dinov2_hier"``, timm's tensor names. Refused (exit 2) for backbones timm has no
  family for (``vit_tiny``, patch 8, ...).
- ``ours`` (alias ``safetensors``) / ``pth``: the layout of format version 1 (every export
  before timm's): the document is ``config.json``, DINOv2 tensor names; readable by older
  versions of this project.

Both load with :func:`dinov2_hier.hub.load_backbone`, ``eval.run --ckpt DIR`` and
``student.pretrained_weights``. Tensors are contiguous, fp32 unless ``--dtype``. The model
card (:mod:`dinov2_hier.model_card`) carries the Hub's YAML front matter. Every file is
written atomically; the export is loaded back and compared with the teacher before the
command reports success. See docs/export.md.

Length (~550 lines): the one path from a trained teacher to a verified folder, whose steps
share :class:`TrainedTeacher` and the chosen layout: reading the teacher (run directory,
checkpoint, teacher file, ``--select``, never a checkpoint that is not good), the config document, the evaluations it cites
(checked against the weights), writing either layout and reading it back, and the command
line. The model card's text is :mod:`dinov2_hier.model_card`'s.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from dinov2_hier import __version__
from dinov2_hier.cli import prepare_output_dir, run_cli, setup_logging
from dinov2_hier.errors import UserError
from dinov2_hier.eval_results import (
    CHECKPOINT_KEY,
    DATA_KEY,
    N_SAMPLES_KEY,
    PROBES_KEY,
    SPLIT_KEY,
    EvalResultsError,
    read_metrics,
    section,
)
from dinov2_hier.hub import FORMAT_VERSION, OURS_FORMAT_VERSION, check_state_dict, load_backbone
from dinov2_hier.io import atomic_write_file, atomic_torch_save, atomic_write_text, file_sha256
from dinov2_hier.models import BackboneSpec, WeightsError, read_artifact
from dinov2_hier.model_card import (
    CARD_FILE,
    CARD_METRICS,
    DEFAULT_LICENSE,
    EvalSummary,
    display_path,
    render_model_card,
    summarize_sources,
)
from dinov2_hier.models.artifacts import (
    CHECKPOINT,
    CONFIG_FILE,
    DINOV2_LAYOUT,
    EXPORT_BLOCK_KEY,
    PTH_FILE,
    RUN_CONFIG_FILE,
    SAFETENSORS_CONFIG_KEY,
    SAFETENSORS_FILE,
    TEACHER,
    TEACHER_FILE,
    TIMM_LAYOUT,
    BackboneArtifact,
    list_checkpoints,
    parse_run_config,
    spec_of_config,
)
from dinov2_hier.models.vision_transformer import Mlp

__all__ = ["CARD_METRICS", "ExportError", "ExportResult", "export_backbone", "load_trained_teacher", "main",
           "read_eval_summary", "summarize_sources"]

logger = logging.getLogger("dinov2_hier.export")

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})
_DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType({torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"})
#: Metrics of the model card's evaluation table: metrics.json key -> column title.
class ExportError(UserError, ValueError):
    """The checkpoint, output directory or an evaluation directory cannot be exported."""


# --------------------------------------------------------------------------- the source


@dataclass
class TrainedTeacher:
    """A teacher backbone and what is known about its training.

    ``state``: backbone state dict (DINOv2 names); ``spec``: its architecture and input
    normalisation; ``cfg``: the run's resolved configuration when available;
    ``hierarchy_fingerprint``: recorded by a full checkpoint ("" for unsupervised runs,
    None when unknown); ``source``: file name shown in the card; ``path``: the file read.
    """

    state: dict[str, Tensor]
    spec: BackboneSpec
    cfg: DictConfig | None
    iteration: int | None
    hierarchy_fingerprint: str | None
    source: str
    path: Path | None = None


def _read_run_config(path: Path) -> DictConfig | None:
    if not path.is_file():
        return None
    return parse_run_config(path.read_text(encoding="utf-8"), str(path))


def load_trained_teacher(ckpt: str | Path, select: str | None = None) -> TrainedTeacher:
    """Read the teacher backbone of a training run without unpickling code.

    ``ckpt``: a training output directory (newest ``checkpoints/ckpt_*.pt``, else
    ``teacher_backbone.pt``; ``config.yaml`` from the directory), a full checkpoint
    (``{"model": {"teacher.backbone.<name>": ...}, "config": yaml, "iteration", ...}``)
    or a ``teacher_backbone.pt`` (``{"model": state_dict, "meta": {...}}``; the run's
    ``config.yaml`` is taken from its folder when present). ``select="val_loss"``: of a
    training output directory the checkpoint with the lowest validation loss
    (:func:`dinov2_hier.train.validation.best_checkpoint`). Files are read by
    :func:`~dinov2_hier.models.read_artifact`.
    Raises :class:`ExportError` / :class:`~dinov2_hier.models.WeightsError` naming the file.
    """
    path = Path(ckpt)
    if not path.exists():
        raise ExportError(f"checkpoint not found: {path}")
    if select is not None:
        from dinov2_hier.train.validation import select_checkpoint

        path = select_checkpoint(path, select).path  # RUN/checkpoints/ckpt_*.pt
    teacher = _read_teacher(path)
    logger.info("exporting the teacher backbone of %s (iteration %s)", teacher.path, teacher.iteration)
    return teacher


def _good_artifact(path: Path) -> BackboneArtifact:
    """The artifact ``path`` names, never a checkpoint that is not good (written during a
    non-finite streak or with non-finite weights): a run directory falls back to its newest
    good checkpoint, else its ``teacher_backbone.pt`` (written at good checkpoints only), with
    a warning; a named checkpoint file that is not good raises :class:`ExportError`."""
    from dinov2_hier.train.checkpoint import why_not_good

    artifact = read_artifact(path, accept=(CHECKPOINT, TEACHER))
    flaw = why_not_good(artifact.raw) if artifact.kind == CHECKPOINT else None
    if flaw is None:
        return artifact
    if not path.is_dir():
        raise ExportError(f"{artifact.path}: not a good checkpoint ({flaw}); export an earlier checkpoint or the "
                          "run directory (its newest good one)")
    for _, candidate in reversed(list_checkpoints(path)):
        other = read_artifact(candidate, accept=(CHECKPOINT,))
        if why_not_good(other.raw) is None:
            logger.warning("%s is not a good checkpoint (%s): exporting %s, the newest good one", artifact.path,
                           flaw, candidate.name)
            return other
    teacher = path / TEACHER_FILE
    if not teacher.is_file():
        raise ExportError(f"{path}: no good checkpoint and no {TEACHER_FILE} (the newest, {artifact.path.name}: {flaw})")
    logger.warning("%s is not a good checkpoint (%s) and no other is: exporting %s", artifact.path, flaw, TEACHER_FILE)
    return read_artifact(teacher, accept=(TEACHER,))


def _read_teacher(path: Path) -> TrainedTeacher:
    artifact = _good_artifact(path)
    run_cfg = _read_run_config(artifact.run_dir / RUN_CONFIG_FILE) if artifact.run_dir is not None else None
    spec = artifact.spec
    if artifact.kind == CHECKPOINT:
        cfg = artifact.train_config if artifact.train_config is not None else run_cfg
        if cfg is None:
            raise ExportError(f"{artifact.path}: the checkpoint holds no 'config' and no {RUN_CONFIG_FILE} is "
                              "beside its run")
        spec = spec if spec is not None else spec_of_config(cfg, RUN_CONFIG_FILE)
    else:  # a teacher file: the run's config.yaml feeds the card when it describes this model
        cfg = run_cfg
        if run_cfg is not None:
            recorded = spec_of_config(run_cfg, RUN_CONFIG_FILE)
            if (recorded.arch, recorded.img_size) != (spec.arch, spec.img_size):
                logger.warning("%s beside %s describes another model; not used for the card", RUN_CONFIG_FILE,
                               artifact.path)
                cfg = None
    return TrainedTeacher(
        state=artifact.state, spec=spec, cfg=cfg, iteration=artifact.iteration,
        hierarchy_fingerprint=artifact.hierarchy_fingerprint, source=artifact.path.name, path=artifact.path,
    )


# --------------------------------------------------------------------------- config.json


def _hierarchy_info(teacher: TrainedTeacher) -> dict[str, Any] | None:
    """Name, file and fingerprint of the label tree, or None for a run without supervision."""
    cfg = teacher.cfg
    if cfg is None or not cfg.supervision.losses or cfg.supervision.hierarchy is None:
        return None
    spec = str(cfg.supervision.hierarchy)
    info: dict[str, Any] = {"name": Path(spec).stem, "file": Path(spec).name, "fingerprint": teacher.hierarchy_fingerprint}
    from dinov2_hier.hierarchy import Hierarchy, HierarchyError
    from dinov2_hier.paths import ResourceNotFoundError, resolve_resource

    try:
        tree = Hierarchy.from_json(resolve_resource(spec, "hierarchy"))
    except (HierarchyError, ResourceNotFoundError, OSError) as err:
        logger.warning("hierarchy %s not readable at export time (%s); name taken from the file name", spec, err)
        return info
    info["name"] = tree.name
    if info["fingerprint"] is None:
        info["fingerprint"] = tree.fingerprint()
    elif info["fingerprint"] != tree.fingerprint():
        logger.warning("%s changed since training: recording the checkpoint's fingerprint", spec)
    return info


def build_export_config(teacher: TrainedTeacher, model: torch.nn.Module, dtype: torch.dtype, weights_file: str,
                        layout: str = DINOV2_LAYOUT) -> dict[str, Any]:
    """The export document for ``teacher`` (``model``: its architecture, may be on meta):
    ``config.json`` itself in our layout, its ``"dinov2_hier"`` block in timm's."""
    spec = teacher.spec
    block = model.blocks[0]
    # Plain MLP: hidden width / D. SwiGLU: the factories' 4.0, which swiglu_hidden_dim maps.
    mlp_ratio = block.mlp.fc1.out_features / model.embed_dim if isinstance(block.mlp, Mlp) else 4.0
    config: dict[str, Any] = {
        "format": "dinov2_hier.backbone",
        "format_version": FORMAT_VERSION if layout == TIMM_LAYOUT else OURS_FORMAT_VERSION,
        "tensor_layout": layout,
        "architecture": spec.arch,
        "embed_dim": model.embed_dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "mlp_ratio": mlp_ratio,
        "patch_size": spec.patch_size,
        "img_size": spec.img_size,
        "in_chans": model.patch_embed.proj.in_channels,
        "num_register_tokens": spec.num_register_tokens,
        "ffn_layer": spec.ffn_layer,
        "layerscale": None if spec.layerscale is None else float(spec.layerscale),
        "qkv_bias": spec.qkv_bias,
        "interpolate_offset": model.interpolate_offset,
        "interpolate_antialias": model.interpolate_antialias,
        "num_parameters": sum(v.numel() for v in teacher.state.values()),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "hierarchy": _hierarchy_info(teacher),
        "iteration": teacher.iteration,
        "weights_file": weights_file,
        "dtype": _DTYPE_NAMES[dtype],
        "source_checkpoint": teacher.source,
        "dinov2_hier_version": __version__,
        "torch_version": torch.__version__,
    }
    from dinov2_hier.models.timm_compat import timm_family, timm_registered_name

    # timm_model: the registered timm model of exactly this shape; timm_family: the one whose
    # family it is (config.json's architecture in timm's layout), None when timm has none.
    config["timm_model"] = timm_registered_name(model, spec.arch)
    config["timm_family"] = timm_family(model, spec.arch)
    return config


# --------------------------------------------------------------------------- model card


def read_eval_summary(directory: str | Path) -> EvalSummary:
    """Read ``DIR/metrics.json`` (or, for an evaluated training directory, the metrics of the
    best checkpoint named by ``DIR/summary.json``; :func:`dinov2_hier.eval_results.read_metrics`).
    Raises :class:`ExportError` naming the file and key when it is missing or malformed."""
    directory = Path(directory)
    try:
        path, doc = read_metrics(directory)
    except EvalResultsError as err:
        raise ExportError(str(err)) from None
    data, split, checkpoint = (section(doc, key) for key in (DATA_KEY, SPLIT_KEY, CHECKPOINT_KEY))
    if split.get("kind") == "cross_validation":
        split_text = f"{split.get('folds')}-fold CV"
    elif split.get("kind") == "fixed":
        split_text = f"fixed test set ({split.get('n_test')} images)"
    else:
        split_text = "-"
    data_path = data.get("test_path") or data.get("path")
    return EvalSummary(
        name=directory.name,
        data=display_path(str(data_path)) if data_path else "-",
        split=split_text,
        iteration=checkpoint.get("iteration"),
        n_samples=doc.get(N_SAMPLES_KEY),
        probes={str(p): dict(m) for p, m in doc[PROBES_KEY].items()},
        metrics_path=path,
        fingerprint=checkpoint.get("fingerprint") if isinstance(checkpoint.get("fingerprint"), str) else None,
        evaluated=checkpoint.get("path") if isinstance(checkpoint.get("path"), str) else None,
    )


def _short(fingerprint: str) -> str:
    """The first 16 hex digits of a sha256; other fingerprints (``untrained:...``) whole."""
    return fingerprint[:16] if re.fullmatch(r"[0-9a-f]{64}", fingerprint) else fingerprint


def _holds_weights(path: Path, state: Mapping[str, Tensor]) -> bool:
    """Whether ``path`` (a checkpoint, teacher file or plain weights file) holds exactly the
    backbone tensors ``state``: another file of the same weights."""
    try:
        other = read_artifact(path).state
    except WeightsError:
        return False
    return other.keys() == state.keys() and all(torch.equal(other[k], state[k]) for k in state)


def check_eval_weights(evals: Sequence[EvalSummary], teacher: TrainedTeacher) -> None:
    """Refuse evaluation results of other weights than ``teacher``'s.

    An evaluation is of the exported weights when the fingerprint its ``metrics.json``
    records is the sha256 of the exported checkpoint file, or when the file it names still
    has that fingerprint and holds the same backbone tensors (e.g. the run's
    ``teacher_backbone.pt`` evaluated, its final ``ckpt_*.pt`` exported). Otherwise
    :class:`ExportError` naming the metrics file and both fingerprints. An evaluation that
    records no fingerprint (written by hand or by an old version) cannot be checked: it is
    marked ``verified=False`` (the card says so) with a warning.
    """
    if not evals or teacher.path is None:
        return
    exported = file_sha256(teacher.path)
    for ev in evals:
        if ev.fingerprint is None:
            ev.verified = False
            logger.warning("%s records no checkpoint fingerprint: its metrics go into the model card marked as "
                           "not verified to be of the exported weights", ev.metrics_path)
            continue
        if ev.fingerprint == exported:
            continue
        evaluated = Path(ev.evaluated).expanduser() if ev.evaluated else None
        if (evaluated is not None and evaluated.is_file() and file_sha256(evaluated) == ev.fingerprint
                and _holds_weights(evaluated, teacher.state)):
            logger.info("%s: the evaluated %s holds the exported weights", ev.metrics_path, evaluated)
            continue
        raise ExportError(
            f"{ev.metrics_path}: evaluated other weights (fingerprint {_short(ev.fingerprint)}, "
            f"{ev.evaluated or 'path not recorded'}) than those exported (fingerprint {_short(exported)}, "
            f"{teacher.path}); export the evaluated checkpoint or leave this --eval out"
        )


# --------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    weights: Path
    config: Path
    card: Path
    document: dict[str, Any]
    #: ``"timm"`` or ``"dinov2"`` (ours); ``config.json`` as written (timm's schema or ``document``).
    layout: str = DINOV2_LAYOUT
    config_json: dict[str, Any] | None = None


#: ``--format`` values: the tensor layout and weights file of each.
FORMATS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "timm": (TIMM_LAYOUT, SAFETENSORS_FILE),
    "ours": (DINOV2_LAYOUT, SAFETENSORS_FILE),
    "safetensors": (DINOV2_LAYOUT, SAFETENSORS_FILE),  # the name of "ours" before timm's layout
    "pth": (DINOV2_LAYOUT, PTH_FILE),
})


def _choose_format(fmt: str | None, family: str | None, spec: BackboneSpec) -> str:
    """``fmt``, or for None timm's layout when timm has a family for the backbone, else
    ours with a warning; ``--format timm`` without a family is refused."""
    what = f"{spec.arch} / patch {spec.patch_size} / {spec.num_register_tokens} registers"
    if family is not None:
        return fmt or "timm"
    if fmt == "timm":
        raise ExportError(f"--format timm: timm has no DINOv2 model family for {what} (timm's are vit_small, "
                          "vit_base, vit_large and vit_giant2 at patch 14); export with --format ours, which "
                          "dinov2_hier.load_backbone and dinov2_hier.hub.create_timm_model load")
    if fmt is None:
        logger.warning("timm has no DINOv2 model family for %s: writing dinov2_hier's layout (config.json "
                       "'timm_family': null), not timm's; load it with dinov2_hier.load_backbone or "
                       "dinov2_hier.hub.create_timm_model", what)
        return "ours"
    return fmt


def export_backbone(
    ckpt: str | Path,
    output_dir: str | Path,
    fmt: str | None = None,
    dtype: str = "fp32",
    eval_dirs: Sequence[str | Path] = (),
    select: str | None = None,
    license_name: str = DEFAULT_LICENSE,
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
) -> ExportResult:
    """Export the teacher backbone of ``ckpt`` into ``output_dir`` (see the module docstring).

    Args:
        ckpt: run directory, full checkpoint or ``teacher_backbone.pt``.
        output_dir: created if needed; existing export files are replaced.
        fmt: ``timm`` (timm's layout, ``model.safetensors``), ``ours`` / ``safetensors``
            (ours, ``model.safetensors``), ``pth`` (ours, ``model.pth``, a plain
            ``torch.save`` dict name -> tensor, readable with ``weights_only=True``);
            None: timm when timm has a family for the backbone, else ours (a warning).
        dtype: ``fp32`` (default), ``bf16`` or ``fp16`` for the stored tensors.
        eval_dirs: ``eval.run`` output directories for the card's evaluation table; each
            must have evaluated the exported weights (:func:`check_eval_weights`).
        select: ``"val_loss"``: export the checkpoint of the run directory ``ckpt`` with
            the lowest validation loss instead of the newest.
        license_name, datasets, base_model: the card's front matter
            (:func:`dinov2_hier.model_card.card_metadata`).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    torch_dtype = _DTYPES[dtype]
    evals = [read_eval_summary(d) for d in eval_dirs]  # fail on bad input before writing
    teacher = load_trained_teacher(ckpt, select)
    check_eval_weights(evals, teacher)  # another model's metrics never reach the card
    try:
        with torch.device("meta"):
            model = teacher.spec.build()
    except ValueError as err:
        raise ExportError(f"{teacher.source}: cannot build the recorded architecture: {err}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(shapes, teacher.state, teacher.source)
    from dinov2_hier.models.timm_compat import timm_family, timm_hub_config, to_timm_state_dict

    fmt = _choose_format(fmt, timm_family(model, teacher.spec.arch), teacher.spec)
    layout, weights_name = FORMATS[fmt]
    ours = {k: teacher.state[k].detach().to("cpu") for k in shapes}
    if layout == TIMM_LAYOUT:  # fold and rename in the teacher's dtype, then cast
        ours = to_timm_state_dict(ours)  # the stored grid: timm is built at the training img_size
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in ours.items()}

    out = prepare_output_dir(Path(output_dir))  # OutputDirError: a file in the way, not writable
    document = build_export_config(teacher, model, torch_dtype, weights_name, layout)
    timm_part = None
    if layout == TIMM_LAYOUT:
        spec = teacher.spec
        timm_part = timm_hub_config(model, spec.arch, spec.img_size, spec.mean, spec.std, spec.layerscale,
                                    license_name)
        config_json = {**timm_part, EXPORT_BLOCK_KEY: document}
    else:
        config_json = document
    weights_path = out / weights_name
    if weights_name == SAFETENSORS_FILE:
        from safetensors.torch import save_file

        metadata = {"format": "pt", SAFETENSORS_CONFIG_KEY: json.dumps(config_json)}
        atomic_write_file(weights_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        atomic_torch_save(tensors, weights_path)
    stale = out / (PTH_FILE if weights_name == SAFETENSORS_FILE else SAFETENSORS_FILE)
    if stale.is_file():
        stale.unlink()
        logger.info("removed %s of an earlier export", stale)
    config_path = out / CONFIG_FILE
    atomic_write_text(config_path, json.dumps(config_json, indent=2) + "\n")
    card_path = out / CARD_FILE
    atomic_write_text(card_path, render_model_card(
        document, teacher.cfg, evals, timm_config=timm_part, model_name=out.resolve().name,
        license_name=license_name, datasets=datasets, base_model=base_model))

    # Read the export back the way users will and compare with the teacher, bit for bit
    # (timm's layout: converted back to ours and again to timm's, which is exact).
    loaded = load_backbone(out, dtype=torch_dtype).state_dict()
    if layout == TIMM_LAYOUT:
        loaded = to_timm_state_dict(loaded)
    for key, value in tensors.items():
        if not torch.equal(loaded[key], value):
            raise RuntimeError(f"export verification failed: '{key}' differs after reloading {weights_path}")
    size = weights_path.stat().st_size
    logger.info("wrote %s (%.1f MiB, %s layout), %s, %s", weights_path, size / 2**20, layout, config_path.name,
                card_path.name)
    return ExportResult(weights_path, config_path, card_path, document, layout, config_json)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2_hier.export",
        description="Export the teacher backbone of a training run as model.safetensors + config.json + "
                    "README.md (model card), by default in timm's layout (timm.create_model('local-dir:DIR')).",
    )
    parser.add_argument("--ckpt", required=True,
                        help="training output directory (newest checkpoint), checkpoints/ckpt_*.pt or teacher_backbone.pt")
    parser.add_argument("--output-dir", required=True, help="folder to write model.safetensors, config.json, README.md")
    parser.add_argument("--format", default=None, choices=tuple(FORMATS),
                        help="timm: timm's config.json and tensor names (default when timm has a DINOv2 family for "
                             "the backbone; else the default is ours, with a warning); ours (alias safetensors): "
                             "dinov2_hier's layout of format version 1; pth: ours as model.pth")
    parser.add_argument("--dtype", default="fp32", choices=tuple(_DTYPES), help="stored tensor dtype (default fp32)")
    parser.add_argument("--select", choices=("val_loss",), default=None,
                        help="with a training output directory: export its checkpoint with the lowest validation "
                             "loss (val_total in metrics.jsonl) instead of the newest")
    parser.add_argument("--eval", nargs="+", default=[], metavar="DIR",
                        help="output directories of python -m eval.run, tabulated in the model card; each must "
                             "have evaluated the exported weights (checked by their recorded fingerprint)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, dest="license_name",
                        help=f"the card's license (Hub licence id; default {DEFAULT_LICENSE})")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="ID",
                        help="the card's datasets (Hub dataset ids; default: the dataset names of the training data)")
    parser.add_argument("--base-model", default=None, metavar="ORG/NAME",
                        help="the card's base_model (default: the timm id of DINOv2 release weights named by "
                             "student.pretrained_weights; none for other initial weights)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def job() -> None:
        result = export_backbone(args.ckpt, args.output_dir, fmt=args.format, dtype=args.dtype, eval_dirs=args.eval,
                                 select=args.select, license_name=args.license_name, datasets=args.datasets,
                                 base_model=args.base_model)
        print(f"exported {result.weights}")

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
