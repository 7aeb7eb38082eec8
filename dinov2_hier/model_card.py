"""The model card of an export: ``README.md`` with the Hugging Face Hub's YAML front matter.

Rendered by :func:`render_model_card` from the export document (``config.json``'s
``dinov2_hier`` block), the run's configuration and the ``eval.run`` results; split off
:mod:`dinov2_hier.export`, which reads the checkpoint and writes the files.

Front matter (parsed by the Hub; :func:`card_metadata`): ``license``, ``library_name``
(``timm`` for a timm-layout export, else ``dinov2_hier``), ``pipeline_tag``, ``tags``,
``datasets`` (``--datasets``, else the ``dataset`` names of the training manifests),
``base_model`` (``--base-model``, else the timm Hub id of DINOv2 release weights named by
``student.pretrained_weights``; other initial weights are named in the card's text only)
and, with evaluations, ``model-index`` (one result per evaluation and probe).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinov2_hier.models.artifacts import CONFIG_FILE, EXPORT_BLOCK_KEY, TIMM_LAYOUT

logger = logging.getLogger("dinov2_hier.export")

CARD_FILE = "README.md"
DEFAULT_LICENSE = "apache-2.0"  # the project's licence (LICENSE); the weights' may depend on the data
TAGS = ("image-feature-extraction", "vision-transformer", "dinov2", "self-supervised", "hematology",
        "blood-cell-morphology", "dinov2_hier")
#: Metrics of the model card's evaluation table: metrics.json key -> column title.
CARD_METRICS: Mapping[str, str] = MappingProxyType({
    "balanced_accuracy": "balanced accuracy",
    "weighted_f1": "weighted F1",
    "hierarchical_f1": "hF1",
    "lineage_accuracy": "lineage accuracy",
})
#: DINOv2's released backbone files (``student.pretrained_weights``) -> their timm Hub ids.
RELEASED_WEIGHTS: Mapping[str, str] = MappingProxyType({
    f"dinov2_vit{s}14{r}_pretrain": f"timm/vit_{name}_patch14{r}_dinov2.lvd142m"
    for s, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")) for r in ("", "_reg4")
})


def display_path(spec: str) -> str:
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
        entry: dict[str, Any] = {"source": display_path(source), "kind": kind, "images": None,
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


def base_model_of(cfg: DictConfig | None, override: str | None = None) -> tuple[str | None, str | None]:
    """``(hub_id, initial_weights)``: the Hub id for the card's ``base_model`` (``override``,
    else the timm id of a DINOv2 release file named by ``student.pretrained_weights``, else
    None) and the file name of the initial weights (None for a run trained from scratch)."""
    weights = None
    if cfg is not None and OmegaConf.select(cfg, "student.pretrained_weights", default=None):
        weights = Path(str(cfg.student.pretrained_weights)).name
    if override:
        return override, weights
    if weights is None:
        return None, None
    hub_id = RELEASED_WEIGHTS.get(Path(weights).stem)
    if hub_id is None:
        logger.warning("initialised from %s: no known Hub id, so the card has no base_model (pass --base-model "
                       "ORG/NAME)", weights)
    return hub_id, weights


def card_metadata(
    config: Mapping[str, Any],
    sources: Sequence[Mapping[str, Any]],
    evals: Sequence[EvalSummary] = (),
    *,
    model_name: str = "dinov2_hier-backbone",
    license_name: str = DEFAULT_LICENSE,
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """The card's YAML front matter as a mapping (see the module docstring)."""
    timm_layout = config.get("tensor_layout") == TIMM_LAYOUT
    meta: dict[str, Any] = {
        "license": license_name,
        "library_name": "timm" if timm_layout else "dinov2_hier",
        "pipeline_tag": "image-feature-extraction",
        "tags": (["timm"] if timm_layout else []) + list(TAGS),
    }
    if datasets is None:
        datasets = sorted({name for s in sources for name in s["datasets"] if name != "-"})
    if datasets:
        meta["datasets"] = list(datasets)
    if base_model:
        meta["base_model"] = base_model
    results = []
    for ev in evals:
        for probe, metrics in ev.probes.items():
            values = []
            for key, title in CARD_METRICS.items():
                entry = metrics.get(key)
                mean = entry.get("mean") if isinstance(entry, Mapping) else None
                if isinstance(mean, (int, float)) and not isinstance(mean, bool) and math.isfinite(mean):
                    values.append({"type": key, "name": title, "value": round(float(mean), 4)})
            if values:
                results.append({
                    "task": {"type": "image-classification", "name": f"{probe} probe on frozen CLS features"},
                    "dataset": {"type": ev.data, "name": ev.data, "split": ev.split},
                    "metrics": values,
                })
    if results:
        meta["model-index"] = [{"name": model_name, "results": results}]
    return meta


def render_model_card(
    config: Mapping[str, Any],
    cfg: DictConfig | None,
    evals: Sequence[EvalSummary] = (),
    *,
    timm_config: Mapping[str, Any] | None = None,
    model_name: str = "dinov2_hier-backbone",
    license_name: str = DEFAULT_LICENSE,
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
) -> str:
    """The model card (Markdown with the Hub's YAML front matter, :func:`card_metadata`).

    ``config``: the export document; ``timm_config``: timm's part of ``config.json`` for a
    timm-layout export (None: our layout); ``base_model``: ``--base-model``.
    """
    import yaml

    arch = config["architecture"]
    name = f"{arch} / patch {config['patch_size']}"
    sources = summarize_sources(cfg) if cfg is not None else []
    hub_id, initial = base_model_of(cfg, base_model)
    meta = card_metadata(config, sources, evals, model_name=model_name, license_name=license_name,
                         datasets=datasets, base_model=hub_id)
    timm_name = timm_config["architecture"] if timm_config else None
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"),
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
            [f"`{config['weights_file']}`",
             "backbone weights, timm's tensor names" if timm_name else "backbone weights, DINOv2 parameter names"],
            [f"`{CONFIG_FILE}`",
             f"timm's model config (`{timm_name}`, `model_args`, `pretrained_cfg`); this project's metadata "
             f"(architecture, hierarchy, provenance) under `{EXPORT_BLOCK_KEY}`" if timm_name
             else "architecture, input normalisation, hierarchy, provenance"],
            [f"`{CARD_FILE}`", "this card"],
        ]),
        "",
        "## Usage",
        "",
    ]
    size, patch = int(config["img_size"]), int(config["patch_size"])
    if timm_name:
        lines += [
            f"With timm alone (>= 1.0; `local-dir:` for this folder, `hf-hub:ORG/NAME` once uploaded): timm's "
            f"`{timm_name}` with this export's `model_args` ({size} px, {config['num_register_tokens']} register "
            "tokens), no classifier; the output is the normalised CLS token (`x_norm_clstoken`):",
            "",
            "```python",
            "import timm",
            "model = timm.create_model(\"local-dir:PATH/TO/THIS/FOLDER\", pretrained=True).eval()",
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
            f"features = model(images)  # [n, 3, {size}, {size}] -> [n, {config['embed_dim']}]",
            "```",
            "",
            "With dinov2_hier (any input size that is a multiple of the patch size):",
            "",
        ]
    elif size % patch == 0:
        lines += [
            f"timm: this export is in dinov2_hier's layout (timm has no DINOv2 model family for {arch} / "
            f"patch {patch}); `create_timm_model` builds timm's `VisionTransformer` with its shapes, strict load, "
            f"`forward_features(x)[:, 0]` equal to `x_norm_clstoken` for inputs of the `img_size` it is built for "
            f"(here {size} px, the training crop size):",
            "",
            "```python",
            "from dinov2_hier.hub import create_timm_model",
            f"model = create_timm_model(\"PATH/TO/THIS/FOLDER\", img_size={size})",
            "```",
            "",
            "With dinov2_hier:",
            "",
        ]
    lines += [
        "```python",
        "import dinov2_hier",
        "model = dinov2_hier.load_backbone(\"PATH/TO/THIS/FOLDER\")  # eval mode, strict load",
        "features = model(images)[\"x_norm_clstoken\"]  # images [n, 3, H, W] -> [n, "
        f"{config['embed_dim']}]",
        "```",
        "",
        f"Inputs: RGB scaled to [0, 1], normalised with mean {config['mean']} and std {config['std']}; "
        f"height and width multiples of {patch} px (trained at {size} px; other "
        "sizes interpolate the position embeddings).",
        "",
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
    lines += _training_sections(config, cfg, sources)
    if evals:
        lines += _evaluation_section(config, evals)
    hierarchy = config.get("hierarchy")
    lines += [
        "## Provenance",
        "",
        f"- exported from `{config.get('source_checkpoint')}`, iteration {config.get('iteration')}",
        f"- dinov2_hier {config['dinov2_hier_version']}, torch {config['torch_version']}",
    ]
    if initial:
        lines.append(f"- initialised from `{initial}`" + (f" (`{hub_id}`)" if hub_id else ""))
    if hierarchy:
        lines.append(f"- hierarchy `{hierarchy.get('name')}` ({hierarchy.get('file')}), "
                     f"fingerprint `{hierarchy.get('fingerprint')}`")
    return "\n".join(lines) + "\n"


def _held_out_note(cfg: DictConfig) -> list[str]:
    """What of the sources above was not trained on: the ``data.val_fraction`` share held out
    for validation, or the separate ``data.val`` sources."""
    fraction = float(cfg.data.get("val_fraction", 0.0) or 0.0)
    if fraction > 0:
        return ["", f"A share of {fraction:g} of these images (stratified by label, chosen by a hash of the run's "
                    f"seed and each path) was held out for validation (`data.val_fraction`) and not trained on."]
    val = cfg.data.get("val")
    if val:
        names = ", ".join(f"`{display_path(str(v))}`" for v in (val if not isinstance(val, str) else [val]))
        return ["", f"Validation images (`data.val`, not trained on): {names}."]
    return []


def _training_sections(config: Mapping[str, Any], cfg: DictConfig | None,
                       sources: Sequence[Mapping[str, Any]]) -> list[str]:
    if cfg is None:
        return ["## Training", "", "The run's configuration was not available at export time.", ""]
    lines = ["## Training data", ""]
    rows = []
    for s in sources:
        datasets = ", ".join(f"{k}: {v}" for k, v in s["datasets"].items()) or None
        rows.append([f"`{s['source']}`", s["kind"], s["images"] if s["images"] is not None else "not readable at export",
                     s["labelled"], datasets])
    lines += _table(["source", "kind", "images", "labelled", "datasets"], rows)
    lines += _held_out_note(cfg)
    lines += ["", "## Supervision", ""]
    lines += [
        f"- self-supervised: DINO (weight {cfg.dino.loss_weight}), iBOT (weight {cfg.ibot.loss_weight}), "
        f"KoLeo (weight {cfg.dino.koleo_loss_weight}); centering {cfg.dino.centering}"
        + ("; DINO targets: SwAV (the student's own Sinkhorn-Knopp codes, docs/swav.md)"
           if OmegaConf.select(cfg, "dino.targets", default="teacher") == "swav" else ""),
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

