"""Publish a trained teacher backbone: ``model.safetensors`` + ``config.json`` + ``README.md``.

```
python -m dinov2_hier.export --ckpt CKPT --output-dir DIR [--format safetensors|pth]
                             [--dtype fp32|bf16|fp16] [--eval EVAL_DIR ...] [--select val_loss]
```

``CKPT`` is a training output directory (its newest ``checkpoints/ckpt_*.pt``, else its
``teacher_backbone.pt``; with ``--select val_loss`` its checkpoint with the lowest
validation loss), a full training checkpoint file, or a ``teacher_backbone.pt``.
The EMA teacher's backbone is written with DINOv2 parameter names as contiguous tensors
(fp32 unless ``--dtype``), with ``config.json`` (architecture, normalisation, hierarchy,
provenance; read by :func:`dinov2_hier.hub.load_backbone`) and a model card summarising
the training data, supervision and, with ``--eval``, the probe results of
``python -m eval.run`` output directories. Every file is written atomically; the export is
loaded back and compared with the teacher before the command reports success.
See docs/export.md.

Length (~690 lines): one command's whole job, from the checkpoint to the verified export;
about half is the model card (Markdown rendering of the run's data, supervision and
evaluations), which is the part to split off if this module grows.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
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
from dinov2_hier.hub import FORMAT_VERSION, check_state_dict, load_backbone
from dinov2_hier.io import atomic_write_file, atomic_torch_save, atomic_write_text, file_sha256
from dinov2_hier.models import BackboneSpec, WeightsError, read_artifact
from dinov2_hier.models.artifacts import (
    CHECKPOINT,
    CONFIG_FILE,
    PTH_FILE,
    RUN_CONFIG_FILE,
    SAFETENSORS_CONFIG_KEY,
    SAFETENSORS_FILE,
    TEACHER,
    parse_run_config,
    spec_of_config,
)
from dinov2_hier.models.vision_transformer import Mlp

logger = logging.getLogger("dinov2_hier.export")

CARD_FILE = "README.md"
_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})
_DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType({torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"})
#: Metrics of the model card's evaluation table: metrics.json key -> column title.
CARD_METRICS: Mapping[str, str] = MappingProxyType({
    "balanced_accuracy": "balanced accuracy",
    "weighted_f1": "weighted F1",
    "hierarchical_f1": "hF1",
    "lineage_accuracy": "lineage accuracy",
})


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


def _read_teacher(path: Path) -> TrainedTeacher:
    artifact = read_artifact(path, accept=(CHECKPOINT, TEACHER))
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


def build_export_config(teacher: TrainedTeacher, model: torch.nn.Module, dtype: torch.dtype, weights_file: str) -> dict[str, Any]:
    """The ``config.json`` document for ``teacher`` (``model``: its architecture, may be on meta)."""
    spec = teacher.spec
    block = model.blocks[0]
    # Plain MLP: hidden width / D. SwiGLU: the factories' 4.0, which swiglu_hidden_dim maps.
    mlp_ratio = block.mlp.fc1.out_features / model.embed_dim if isinstance(block.mlp, Mlp) else 4.0
    config: dict[str, Any] = {
        "format": "dinov2_hier.backbone",
        "format_version": FORMAT_VERSION,
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
    from dinov2_hier.models.timm_compat import timm_registered_name

    # Only a timm model of exactly this shape is named; any other backbone still loads into
    # timm's VisionTransformer through create_timm_model (the card says so).
    config["timm_model"] = timm_registered_name(model, spec.arch)
    return config


# --------------------------------------------------------------------------- model card


def _display_path(spec: str) -> str:
    """The last two components of a path: enough to recognise it, no machine layout."""
    parts = Path(spec).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else spec


def summarize_sources(cfg: DictConfig) -> list[dict[str, Any]]:
    """One entry per ``data.train`` source: ``source``, ``kind`` and, when the manifest or
    folder is readable now, ``images``, ``labelled`` and ``datasets`` (name -> images)."""
    from dinov2_hier.data.records import DataSourceError, records_from_source
    from dinov2_hier.paths import ResourceNotFoundError, resolve_resource

    entries = []
    for source in list(cfg.data.train):
        source = str(source)
        if source == "synthetic":
            entries.append(_synthetic_source(cfg))
            continue
        kind = "manifest" if source.lower().endswith(".csv") else "image folder"
        entry: dict[str, Any] = {"source": _display_path(source), "kind": kind, "images": None,
                                 "labelled": None, "datasets": {}}
        try:
            records = records_from_source(resolve_resource(source, "training source"))
        except (DataSourceError, ResourceNotFoundError, OSError) as err:
            logger.warning("training source %s not readable at export time: %s", source, err)
        else:
            entry["images"] = len(records)
            entry["labelled"] = sum(r.label is not None for r in records)
            entry["datasets"] = dict(sorted(Counter(r.dataset or "-" for r in records).items()))
        entries.append(entry)
    return entries


def _synthetic_source(cfg: DictConfig) -> dict[str, Any]:
    """The synthetic generator's images; the labelled count is exact (labels are a pure
    function of seed and index), or None when the generator's tree is not readable."""
    from dinov2_hier.data import SyntheticCellGenerator
    from dinov2_hier.hierarchy import Hierarchy, HierarchyError
    from dinov2_hier.paths import ResourceNotFoundError, resolve_resource

    syn = cfg.data.synthetic
    n = int(syn.num_images)
    entry: dict[str, Any] = {"source": "synthetic", "kind": f"synthetic cells ({syn.image_size} px, generator)",
                             "images": n, "labelled": None, "datasets": {"synthetic": n}}
    try:
        tree = Hierarchy.from_json(resolve_resource(syn.hierarchy, "synthetic hierarchy"))
    except (HierarchyError, ResourceNotFoundError, OSError) as err:
        logger.warning("synthetic hierarchy not readable at export time: %s", err)
        return entry
    generator = SyntheticCellGenerator(tree, image_size=int(syn.image_size), seed=int(cfg.seed))
    fraction, coarse = float(syn.label_fraction), float(syn.coarse_fraction)
    entry["labelled"] = sum(generator.label(i, fraction, coarse) is not None for i in range(n))
    return entry


@dataclass
class EvalSummary:
    """Probe results of one ``eval.run`` output directory, for the card.

    ``fingerprint`` / ``evaluated``: ``checkpoint.fingerprint`` (sha256 of the evaluated
    weights file) and ``checkpoint.path`` as ``metrics.json`` records them (None when it
    does not); ``verified``: False when the weights could not be checked against the
    exported ones (see :func:`check_eval_weights`); the card then says so.
    """

    name: str
    data: str
    split: str
    iteration: int | None
    n_samples: int | None
    probes: dict[str, dict[str, Any]]
    metrics_path: Path | None = None
    fingerprint: str | None = None
    evaluated: str | None = None
    verified: bool = True


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
        data=_display_path(str(data_path)) if data_path else "-",
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


def format_mean_std(entry: Any, digits: int = 3) -> str:
    """``"0.812 ± 0.013"`` from ``{"mean": ..., "std": ...}``; ``"-"`` when absent or null."""
    if not isinstance(entry, Mapping):
        return "-"
    mean, std = entry.get("mean"), entry.get("std")
    if not isinstance(mean, (int, float)) or isinstance(mean, bool) or not math.isfinite(mean):
        return "-"
    if not isinstance(std, (int, float)) or isinstance(std, bool) or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines.extend("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)
    return lines


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def render_model_card(config: Mapping[str, Any], cfg: DictConfig | None, evals: Sequence[EvalSummary] = ()) -> str:
    """The model card (Markdown with a Hugging Face style front matter)."""
    arch = config["architecture"]
    name = f"{arch} / patch {config['patch_size']}"
    lines = [
        "---",
        "library_name: dinov2_hier",
        "pipeline_tag: image-feature-extraction",
        "tags: [vision-transformer, dinov2, self-supervised, hematology, blood-cell-morphology]",
        "---",
        "",
        f"# {name}: dinov2_hier teacher backbone",
        "",
        f"The EMA teacher backbone of a `dinov2_hier` pretraining run (DINOv2 recipe with two global crops"
        f"{' and hierarchical supervision' if config.get('hierarchy') else ''}), exported at iteration "
        f"{config.get('iteration')} from `{config.get('source_checkpoint')}`: {config['depth']} blocks, width "
        f"{config['embed_dim']}, {config['num_heads']} heads, {config['num_register_tokens']} register tokens, "
        f"{_fmt_params(int(config['num_parameters']))} parameters ({config['dtype']}).",
        "",
        "## Files",
        "",
        *_table(["file", "content"], [
            [f"`{config['weights_file']}`", "backbone weights, DINOv2 parameter names"],
            [f"`{CONFIG_FILE}`", "architecture, input normalisation, hierarchy, provenance"],
            [f"`{CARD_FILE}`", "this card"],
        ]),
        "",
        "## Usage",
        "",
        "```python",
        "import dinov2_hier",
        "model = dinov2_hier.load_backbone(\"PATH/TO/THIS/FOLDER\")  # eval mode, strict load",
        "features = model(images)[\"x_norm_clstoken\"]  # images [n, 3, H, W] -> [n, "
        f"{config['embed_dim']}]",
        "```",
        "",
        f"Inputs: RGB scaled to [0, 1], normalised with mean {config['mean']} and std {config['std']}; "
        f"height and width multiples of {config['patch_size']} px (trained at {config['img_size']} px; other "
        "sizes interpolate the position embeddings).",
        "",
    ]
    size, patch = int(config["img_size"]), int(config["patch_size"])
    if size % patch == 0:
        if config.get("timm_model"):
            what = f"timm's `{config['timm_model']}` (the registered model of this shape)"
        else:
            what = (f"timm's `VisionTransformer` built with this model's shapes ({arch}, patch {patch}, "
                    f"{config['num_register_tokens']} register tokens; timm registers no DINOv2 model of this shape)")
        lines += [
            f"timm: {what}, strict load; `forward_features(x)[:, 0]` equals `x_norm_clstoken` for "
            f"inputs of the `img_size` it is built for (here {size} px, the training crop size):",
            "",
            "```python",
            "from dinov2_hier.hub import create_timm_model",
            f"model = create_timm_model(\"PATH/TO/THIS/FOLDER\", img_size={size})",
            "```",
            "",
        ]
    lines += [
        f"As initialisation of a new run: `python -m dinov2_hier.train ... "
        f"student.arch={arch} student.patch_size={config['patch_size']} "
        f"student.pretrained_weights=PATH/TO/THIS/FOLDER/{config['weights_file']}`.",
        "",
        "## Architecture",
        "",
        *_table(["setting", "value"], [[k, config[k] if isinstance(config[k], str) else json.dumps(config[k])] for k in (
            "architecture", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size",
            "num_register_tokens", "ffn_layer", "layerscale", "qkv_bias", "interpolate_offset",
        )]),
        "",
    ]
    lines += _training_sections(config, cfg)
    if evals:
        lines += _evaluation_section(config, evals)
    hierarchy = config.get("hierarchy")
    lines += [
        "## Provenance",
        "",
        f"- exported from `{config.get('source_checkpoint')}`, iteration {config.get('iteration')}",
        f"- dinov2_hier {config['dinov2_hier_version']}, torch {config['torch_version']}",
    ]
    if hierarchy:
        lines.append(f"- hierarchy `{hierarchy.get('name')}` ({hierarchy.get('file')}), "
                     f"fingerprint `{hierarchy.get('fingerprint')}`")
    return "\n".join(lines) + "\n"


def _training_sections(config: Mapping[str, Any], cfg: DictConfig | None) -> list[str]:
    if cfg is None:
        return ["## Training", "", "The run's configuration was not available at export time.", ""]
    lines = ["## Training data", ""]
    rows = []
    for s in summarize_sources(cfg):
        datasets = ", ".join(f"{k}: {v}" for k, v in s["datasets"].items()) or None
        rows.append([f"`{s['source']}`", s["kind"], s["images"] if s["images"] is not None else "not readable at export",
                     s["labelled"], datasets])
    lines += _table(["source", "kind", "images", "labelled", "datasets"], rows)
    lines += ["", "## Supervision", ""]
    lines += [
        f"- self-supervised: DINO (weight {cfg.dino.loss_weight}), iBOT (weight {cfg.ibot.loss_weight}), "
        f"KoLeo (weight {cfg.dino.koleo_loss_weight}); centering {cfg.dino.centering}",
    ]
    terms = OmegaConf.to_container(cfg.supervision.losses, resolve=True) or []
    if terms:
        hierarchy = config.get("hierarchy") or {}
        lines.append(f"- supervised terms on the student CLS token, labels resolved onto the hierarchy "
                     f"`{hierarchy.get('name')}` (fingerprint `{str(hierarchy.get('fingerprint'))[:16]}`):")
        lines.append("")
        term_rows = []
        for term in terms:
            term = dict(term)
            name, weight = term.pop("name", "?"), term.pop("weight", 1.0)
            term_rows.append([name, weight, ", ".join(f"{k}={v}" for k, v in term.items()) or None])
        lines += _table(["term", "weight", "settings"], term_rows)
        share = cfg.supervision.labelled_fraction
        lines += ["", f"- labelled share per batch: {'as drawn' if share is None else share}; "
                      f"balance: {cfg.supervision.balance}"]
    else:
        lines.append("- no supervised terms (self-supervised only)")
    trained = config.get("iteration")
    lines += [
        "",
        "## Training",
        "",
        *_table(["setting", "value"], [
            ["iterations (trained / planned)", f"{trained} / {cfg.train.iterations}"],
            ["batch size per GPU (images, 2 global crops each)", cfg.train.batch_size_per_gpu],
            ["global crop size (px)", cfg.crops.global_crops_size],
            ["base learning rate", cfg.optim.base_lr],
            ["precision", f"{cfg.compute.device}, {cfg.compute.dtype}"],
            ["seed", cfg.seed],
        ]),
        "",
    ]
    return lines


def _evaluation_section(config: Mapping[str, Any], evals: Sequence[EvalSummary]) -> list[str]:
    lines = [
        "## Evaluation",
        "",
        "Frozen CLS features (`x_norm_clstoken`) probed by `python -m eval.run` (kNN and logistic regression); "
        "mean ± standard deviation over the folds; higher is better for every metric shown.",
        "",
    ]
    rows = []
    for ev in evals:
        for probe, metrics in ev.probes.items():
            rows.append([ev.data, ev.split, probe, *(format_mean_std(metrics.get(k)) for k in CARD_METRICS)])
    lines += _table(["data", "split", "probe", *CARD_METRICS.values()], rows)
    other = sorted({ev.iteration for ev in evals if ev.iteration is not None and ev.iteration != config.get("iteration")})
    if other:
        lines += ["", f"Note: evaluated at iteration(s) {', '.join(map(str, other))}; "
                      f"the exported weights are from iteration {config.get('iteration')}."]
    unverified = [ev.name for ev in evals if not ev.verified]
    if unverified:
        lines += ["", f"Note: the weights evaluated in {', '.join(f'`{n}`' for n in unverified)} are not verified "
                      "to be the exported ones (no checkpoint fingerprint recorded in metrics.json)."]
    return lines + [""]


# --------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    weights: Path
    config: Path
    card: Path
    document: dict[str, Any]


def export_backbone(
    ckpt: str | Path,
    output_dir: str | Path,
    fmt: str = "safetensors",
    dtype: str = "fp32",
    eval_dirs: Sequence[str | Path] = (),
    select: str | None = None,
) -> ExportResult:
    """Export the teacher backbone of ``ckpt`` into ``output_dir`` (see the module docstring).

    Args:
        ckpt: run directory, full checkpoint or ``teacher_backbone.pt``.
        output_dir: created if needed; existing export files are replaced.
        fmt: ``safetensors`` (``model.safetensors``) or ``pth`` (``model.pth``, a plain
            ``torch.save`` dict name -> tensor, readable with ``weights_only=True``).
        dtype: ``fp32`` (default), ``bf16`` or ``fp16`` for the stored tensors.
        eval_dirs: ``eval.run`` output directories for the card's evaluation table; each
            must have evaluated the exported weights (:func:`check_eval_weights`).
        select: ``"val_loss"``: export the checkpoint of the run directory ``ckpt`` with
            the lowest validation loss instead of the newest.
    """
    if fmt not in ("safetensors", "pth"):
        raise ExportError(f"--format must be safetensors or pth, got '{fmt}'")
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
    tensors = {k: teacher.state[k].detach().to("cpu", torch_dtype).contiguous() for k in shapes}

    out = prepare_output_dir(Path(output_dir))  # OutputDirError: a file in the way, not writable
    weights_name = SAFETENSORS_FILE if fmt == "safetensors" else PTH_FILE
    document = build_export_config(teacher, model, torch_dtype, weights_name)
    weights_path = out / weights_name
    if fmt == "safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", SAFETENSORS_CONFIG_KEY: json.dumps(document)}
        atomic_write_file(weights_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        atomic_torch_save(tensors, weights_path)
    stale = out / (PTH_FILE if fmt == "safetensors" else SAFETENSORS_FILE)
    if stale.is_file():
        stale.unlink()
        logger.info("removed %s of an earlier export", stale)
    config_path = out / CONFIG_FILE
    atomic_write_text(config_path, json.dumps(document, indent=2) + "\n")
    card_path = out / CARD_FILE
    atomic_write_text(card_path, render_model_card(document, teacher.cfg, evals))

    # Read the export back the way users will and compare with the teacher, bit for bit.
    loaded = load_backbone(out, dtype=torch_dtype).state_dict()
    for key, value in tensors.items():
        if not torch.equal(loaded[key], value):
            raise RuntimeError(f"export verification failed: '{key}' differs after reloading {weights_path}")
    size = weights_path.stat().st_size
    logger.info("wrote %s (%.1f MiB), %s, %s", weights_path, size / 2**20, config_path.name, card_path.name)
    return ExportResult(weights_path, config_path, card_path, document)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2_hier.export",
        description="Export the teacher backbone of a training run as model.safetensors + config.json + "
                    "README.md (model card).",
    )
    parser.add_argument("--ckpt", required=True,
                        help="training output directory (newest checkpoint), checkpoints/ckpt_*.pt or teacher_backbone.pt")
    parser.add_argument("--output-dir", required=True, help="folder to write model.safetensors, config.json, README.md")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "pth"),
                        help="weights file format (default safetensors)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(_DTYPES), help="stored tensor dtype (default fp32)")
    parser.add_argument("--select", choices=("val_loss",), default=None,
                        help="with a training output directory: export its checkpoint with the lowest validation "
                             "loss (val_total in metrics.jsonl) instead of the newest")
    parser.add_argument("--eval", nargs="+", default=[], metavar="DIR",
                        help="output directories of python -m eval.run, tabulated in the model card; each must "
                             "have evaluated the exported weights (checked by their recorded fingerprint)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def job() -> None:
        result = export_backbone(args.ckpt, args.output_dir, fmt=args.format, dtype=args.dtype, eval_dirs=args.eval,
                                 select=args.select)
        print(f"exported {result.weights}")

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
