"""``python -m eval.multilabel --ckpt CKPT --data MANIFEST --constraints FILE --output-dir DIR``

Biologically constrained multi-label classification on frozen features (Mouadden et al.):
the head of :mod:`dinov2_hier.heads.constrained` is trained on cached backbone features
under seeded k-fold cross-validation (or a fixed split with ``--test-data``) and reported
in ``metrics.json``, ``predictions.csv`` and a self-contained ``report.html``. Options:
``python -m eval.multilabel --help``; the guide is docs/multilabel.md.

* **Labels**: the manifest's label column holds several class names separated by ``|``
  (class ids or display names of the constraint file); an empty cell is "no class
  positive" unless ``--empty-label CLASS`` names the class it stands for (e.g. ``normal``).
* **Features**: the mean of the backbone's patch tokens (``x_norm_patchtokens``, registers
  excluded), as the paper pools; ``--pool cls`` uses the CLS token instead. Extraction and
  its cache are :func:`eval.features.extract_features`'s (the cache key differs per pool).
* **Folds**: label-powerset stratification: :func:`eval.crossval.stratified_folds` on the
  label *set* of each image, with label sets rarer than the number of folds pooled into one
  group (and that group into the most frequent set when it is itself too small), so every
  image is tested exactly once and frequent label combinations are spread evenly.
* **Variants**: ``--variants soft_uncertainty`` (default; ``<constraints>_<thresholds>``
  with constraints off|fixed|binary|soft and thresholds static|class|uncertainty);
  ``--ablation`` adds the paper's ablation table (off_static, soft_static,
  fixed_static, binary_static, soft_class, soft_uncertainty). All variants share the folds.

Length (~910 lines): a whole evaluation face (data, folds, variants, metrics, its own
report); the head itself is :mod:`dinov2_hier.heads.constrained`.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError
from eval.report import REPORT_CSS
from eval.report import escape_html as _esc
from eval.report import svg_legend_and_ticks

__all__ = [
    "ABLATION_VARIANTS",
    "MultiLabelData",
    "MultiLabelDataError",
    "build_parser",
    "evaluate_multilabel",
    "extract_pooled_features",
    "load_multilabel_data",
    "main",
    "multilabel_folds",
    "multilabel_metrics",
    "parse_variant",
    "render_multilabel_report",
    "svg_matrix_heatmap",
    "svg_threshold_bars",
    "svg_uncertainty_scatter",
]

log = logging.getLogger("dinov2_hier.eval.multilabel")

ABLATION_VARIANTS = ("off_static", "soft_static", "fixed_static", "binary_static", "soft_class", "soft_uncertainty")
LABEL_SEP = "|"
HEAD_FILE = "head.pt"
#: Most (image, class) points drawn in the uncertainty scatter (a seeded subsample above).
MAX_SCATTER_POINTS = 4000


class MultiLabelDataError(UserError, ValueError):
    """A multi-label manifest that cannot be used; the message names the file, the image
    and the label."""


# --------------------------------------------------------------------------- data


@dataclass
class MultiLabelData:
    """``paths[i]`` with targets ``targets[i]`` (bool ``[n, K]`` in ``classes`` order)."""

    paths: list[str]
    targets: np.ndarray
    classes: list[str]

    def label_strings(self, rows: np.ndarray | None = None) -> list[str]:
        return label_strings(self.targets if rows is None else self.targets[rows], self.classes)


def label_strings(targets: np.ndarray, classes: Sequence[str], sep: str = LABEL_SEP) -> list[str]:
    """``"a|c"`` per row of a bool ``[n, K]`` matrix (classes in matrix order; ``""`` for none)."""
    return [sep.join(c for c, on in zip(classes, row) if on) for row in np.asarray(targets, dtype=bool)]


def load_multilabel_data(source: str | Path, constraints: Any, *, label_column: str = "label",
                         sep: str = LABEL_SEP, empty_label: str | None = None) -> MultiLabelData:
    """Read a manifest CSV (``path,<label_column>[,...]``) whose labels are ``sep``-separated
    class names of ``constraints`` (a :class:`~dinov2_hier.constraints.ConstraintMatrix`).

    Raises:
        MultiLabelDataError: not a CSV, no label column, no rows, an unknown label (named
            with its image and the closest class names).
    """
    from dinov2_hier.data import read_manifest
    from dinov2_hier.errors import suggest

    src = Path(source).expanduser()
    if src.suffix.lower() != ".csv":
        raise MultiLabelDataError(f"{src}: multi-label data must be a manifest CSV (path,{label_column}), "
                                  "an ImageFolder cannot hold several labels per image")
    records = read_manifest(src, label_column=label_column)
    with open(src, newline="", encoding="utf-8-sig") as f:
        header = [c.strip() for c in next(csv.reader(f), [])]
    if label_column not in header:
        raise MultiLabelDataError(f"{src}: no column {label_column!r} in the header {header}")
    if not records:
        raise MultiLabelDataError(f"{src}: no images listed")
    classes = list(constraints.classes)
    empty_idx = None
    if empty_label is not None:
        try:
            empty_idx = constraints.index(empty_label)
        except KeyError:
            raise MultiLabelDataError(
                f"--empty-label {empty_label!r} is not a class of constraint matrix '{constraints.name}'"
                f"{suggest(empty_label, classes)}") from None
    targets = np.zeros((len(records), len(classes)), dtype=bool)
    for i, record in enumerate(records):
        names = [s.strip() for s in (record.label or "").split(sep) if s.strip()]
        if not names and empty_idx is not None:
            targets[i, empty_idx] = True
        for name in names:
            try:
                targets[i, constraints.index(name)] = True
            except KeyError:
                raise MultiLabelDataError(
                    f"{src}: label {name!r} of image {record.path} is not a class of constraint matrix "
                    f"'{constraints.name}' ({constraints.source}){suggest(name, classes + list(constraints.display_names))}"
                ) from None
    return MultiLabelData([r.path for r in records], targets, classes)


def multilabel_folds(targets: np.ndarray, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` ``(train_idx, test_idx)`` pairs stratified on the label set of each row.

    Label sets with fewer rows than folds are pooled into one group; if that group is still
    smaller than ``n_folds`` it joins the most frequent label set. Seeded like
    :func:`eval.crossval.stratified_folds` (which does the split).

    Raises:
        EvalDataError: fewer rows than folds, or ``n_folds < 2``.
    """
    from .crossval import EvalDataError, stratified_folds

    keys = [",".join(str(i) for i in np.flatnonzero(row)) or "-" for row in np.asarray(targets, dtype=bool)]
    if len(keys) < n_folds:
        fix = f": lower --folds to at most {len(keys)}" if len(keys) >= 2 else ""
        raise EvalDataError(f"{len(keys)} images cannot be split into {n_folds} cross-validation folds "
                            f"(--folds {n_folds}){fix}")
    counts = Counter(keys)
    rare = {k for k, n in counts.items() if n < n_folds}
    pooled = "rare label sets"
    groups = [pooled if k in rare else k for k in keys]
    if 0 < sum(counts[k] for k in rare) < n_folds:
        common = max((k for k in counts if k not in rare), key=lambda k: (counts[k], k), default=pooled)
        groups = [common if g == pooled else g for g in groups]
    return stratified_folds(groups, n_folds, seed)


# --------------------------------------------------------------------------- features


def extract_pooled_features(backbone: Any, paths: Sequence[str], pool: str = "mean_patch", **kwargs: Any) -> Any:
    """:func:`eval.features.extract_features` of ``paths`` with ``pool``: ``"cls"`` the CLS
    token, ``"mean_patch"`` the mean over the ``N`` patch tokens ``[n, D]`` (registers and
    CLS excluded). The cache key includes the pool. Returns a ``FeatureSet``."""
    import torch
    from torch import nn

    from .features import EvalBackbone, extract_features

    if pool == "cls":
        return extract_features(backbone, paths, **kwargs)
    if pool != "mean_patch":
        raise MultiLabelDataError(f"pool must be 'mean_patch' or 'cls', got {pool!r}")

    class PatchMean(nn.Module):
        """Presents the patch-token mean under the key extract_features reads."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.embed_dim = int(model.embed_dim)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x_norm_clstoken": self.model(x)["x_norm_patchtokens"].float().mean(1)}

    pooled = EvalBackbone(PatchMean(backbone.model), backbone.meta, backbone.source,
                          f"{backbone.fingerprint}|x_norm_patchtokens.mean")
    return extract_features(pooled, paths, **kwargs)


# --------------------------------------------------------------------------- metrics


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, classes: Sequence[str],
                       exclusive: np.ndarray, y_raw: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of bool ``[n, K]`` predictions against bool ``[n, K]`` truth.

    Per class (``per_class[c]``): ``f1``, ``precision``, ``sensitivity`` (recall),
    ``specificity``, ``balanced_accuracy`` (their mean; None unless both are defined),
    ``auc_roc`` (of ``scores``; None when the class is all-positive or all-negative here),
    ``support`` (positives) and ``n_predicted``. Overall: ``weighted_f1`` (per-class F1
    weighted by support), ``macro_f1`` (mean over classes with support), ``micro_f1``,
    ``balanced_accuracy``, ``sensitivity``, ``specificity``, ``auc_roc`` (means over the
    classes where defined), ``subset_accuracy`` (exact label set), ``hamming_accuracy``,
    ``impossible_rate_before`` (share of rows of ``y_raw``, the predictions before decoding,
    holding an exclusive pair; ``y_pred`` when not given) and ``impossible_rate`` (of
    ``y_pred``).
    """
    from sklearn.metrics import roc_auc_score

    from dinov2_hier.heads.constrained import impossible_mask

    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    raw = p if y_raw is None else np.asarray(y_raw, dtype=bool)
    per_class: dict[str, dict[str, Any]] = {}
    f1s, supports = [], []
    for k, name in enumerate(classes):
        tp = int(np.sum(t[:, k] & p[:, k]))
        fp = int(np.sum(~t[:, k] & p[:, k]))
        fn = int(np.sum(t[:, k] & ~p[:, k]))
        tn = int(np.sum(~t[:, k] & ~p[:, k]))
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn > 0 else None
        auc = float(roc_auc_score(t[:, k], s[:, k])) if 0 < tp + fn < len(t) else None
        per_class[name] = {
            "f1": f1, "precision": _ratio(tp, tp + fp) if tp + fp > 0 else (0.0 if tp + fn > 0 else None),
            "sensitivity": sens, "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
            "auc_roc": auc, "support": tp + fn, "n_predicted": tp + fp,
        }
        if f1 is not None:
            f1s.append(f1)
            supports.append(tp + fn)
    tp_all = int(np.sum(t & p))
    fp_all, fn_all = int(np.sum(~t & p)), int(np.sum(t & ~p))
    rows = [per_class[c] for c in classes]
    return {
        "weighted_f1": float(np.average(f1s, weights=supports)) if f1s else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "micro_f1": _ratio(2 * tp_all, 2 * tp_all + fp_all + fn_all),
        "balanced_accuracy": _mean_defined([r["balanced_accuracy"] for r in rows]),
        "sensitivity": _mean_defined([r["sensitivity"] for r in rows]),
        "specificity": _mean_defined([r["specificity"] for r in rows]),
        "auc_roc": _mean_defined([r["auc_roc"] for r in rows]),
        "subset_accuracy": float(np.mean(np.all(t == p, axis=1))) if len(t) else None,
        "hamming_accuracy": float(np.mean(t == p)) if t.size else None,
        "impossible_rate_before": float(np.mean(impossible_mask(raw, exclusive))) if len(t) else None,
        "impossible_rate": float(np.mean(impossible_mask(p, exclusive))) if len(t) else None,
        "per_class": per_class,
    }


# --------------------------------------------------------------------------- variants


def parse_variant(name: str, base: Any) -> Any:
    """``"<constraints>_<thresholds>"`` -> a copy of the ``ConstrainedConfig`` ``base`` with those modes.

    Raises:
        EvalUsageError: an unknown mode (the message lists the valid ones).
    """
    from dinov2_hier.heads.constrained import CONSTRAINT_MODES, THRESHOLD_MODES

    from .cli_common import EvalUsageError

    parts = name.split("_")
    if len(parts) != 2 or parts[0] not in CONSTRAINT_MODES or parts[1] not in THRESHOLD_MODES:
        raise EvalUsageError(f"variant {name!r} is not <constraints>_<thresholds> with constraints in "
                             f"{'|'.join(CONSTRAINT_MODES)} and thresholds in {'|'.join(THRESHOLD_MODES)}")
    return replace(base, constraints=parts[0], thresholds=parts[1]).validate()


# --------------------------------------------------------------------------- the pipeline


def _variant_names(args: argparse.Namespace) -> list[str]:
    names = list(args.variants)
    if args.ablation:
        names += [v for v in ABLATION_VARIANTS if v not in names]
    return list(dict.fromkeys(names))


def _config_from_args(args: argparse.Namespace) -> Any:
    from dinov2_hier.heads.constrained import ConstrainedConfig

    from .cli_common import EvalUsageError

    keys = ("dropout", "mc_samples", "mc_samples_train", "token_dim", "t_base", "lambda_con", "lambda_unc",
            "lambda_ent", "l1_weight", "hinge_weight", "tau", "temperature", "constraint_diagonal",
            "relation_reduction", "class_weighting", "lr_constraint", "lr_uncertainty", "lr_classifier",
            "weight_decay", "epochs", "batch_size")
    try:
        return ConstrainedConfig(**{k: getattr(args, k) for k in keys}).validate()
    except ValueError as err:
        raise EvalUsageError(f"--{str(err).split(' ')[0].replace('_', '-')}: {err}") from None


def _ckpt_file(spec: str) -> tuple[str, str]:
    """``(name, checkpoint)``: a file, 'none', or a training directory's newest checkpoint."""
    from .features import resolve_checkpoints

    found = resolve_checkpoints(spec)
    if len(found) > 1:
        log.info("%s holds %d checkpoints; using the newest, %s", spec, len(found), found[-1][1])
    return found[-1]


def evaluate_multilabel(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation of ``args`` (see :func:`build_parser`); returns metrics.json's
    content. Raises the library's input errors (exit code 2 through :func:`main`)."""
    from dinov2_hier.constraints import load_constraints
    from dinov2_hier.eval_results import METRICS_FILE, read_json_object
    from dinov2_hier.heads.constrained import impossible_mask
    from dinov2_hier.paths import resolve_resource

    from .cli_common import EvalUsageError, MAX_LISTED_UNREADABLE, feature_cache_dir, probe_threads, resolve_device
    from .features import load_eval_backbone
    from .report import json_safe, summarize, write_metrics_json, write_predictions_csv

    t_start = time.perf_counter()
    if str(args.ckpt).strip().lower() == "none" and not args.arch:
        raise EvalUsageError("--ckpt none evaluates an untrained backbone and needs --arch (e.g. --arch vit_small)")
    for flag, value, low in (("--folds", args.folds, 2), ("--batch-size", args.batch_size_features, 1),
                             ("--num-workers", args.num_workers, 0),
                             ("--threads", 1 if getattr(args, "threads", None) is None else args.threads, 1)):
        if value < low and not (flag == "--folds" and args.test_data):
            raise EvalUsageError(f"{flag} must be >= {low}, got {value}")
    device = resolve_device(args.device)
    base_cfg = _config_from_args(args)
    variants = {name: parse_variant(name, base_cfg) for name in _variant_names(args)}
    constraints = load_constraints(args.constraints, warn=False)
    for line in constraints.warnings_text():
        log.warning("%s", line)
    name, ckpt = _ckpt_file(args.ckpt)
    data_path = resolve_resource(args.data, "--data data")
    data = load_multilabel_data(data_path, constraints, label_column=args.label_column, empty_label=args.empty_label)
    test_path = resolve_resource(args.test_data, "--test-data data") if args.test_data else None
    test = (load_multilabel_data(test_path, constraints, label_column=args.label_column,
                                 empty_label=args.empty_label) if test_path else None)
    classes, exclusive = list(constraints.classes), constraints.exclusive_mask()
    if test is None:
        multilabel_folds(data.targets, args.folds, args.seed)  # fail fast, before extracting features
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    backbone = load_eval_backbone(ckpt, arch=args.arch, device=device, seed=args.seed)
    t_loaded = time.perf_counter()
    cache_dir = feature_cache_dir(args)
    extract = dict(crop_size=args.crop_size, resize_mode=args.resize_mode, batch_size=args.batch_size_features,
                   num_workers=args.num_workers, cache_dir=cache_dir, device=device, progress=args.progress,
                   threads=getattr(args, "threads", None))
    fs = extract_pooled_features(backbone, data.paths, args.pool, **extract)
    fs_test = extract_pooled_features(backbone, test.paths, args.pool, **extract) if test is not None else None
    t_features = time.perf_counter()

    unreadable = [p for p, ok in zip(data.paths, fs.ok) if not ok]
    if fs_test is not None:
        unreadable += [p for p, ok in zip(test.paths, fs_test.ok) if not ok]
    if test is None:
        keep = np.flatnonzero(fs.ok)
        if keep.size == 0:
            raise MultiLabelDataError(f"{data_path}: none of the {len(data.paths)} images could be read")
        X, Y = fs.features[keep], data.targets[keep]
        splits = [(i, tr, te) for i, (tr, te) in enumerate(multilabel_folds(Y, args.folds, args.seed))]
        sample, paths = keep, [data.paths[i] for i in keep]
        test_rows = np.arange(len(keep))
        split_info: dict[str, Any] = {"kind": "cross_validation", "folds": args.folds, "seed": args.seed,
                                      "stratification": "label powerset (rare label sets pooled)"}
    else:
        keep_tr, keep_te = np.flatnonzero(fs.ok), np.flatnonzero(fs_test.ok)
        for kept, src, ds in ((keep_tr, data_path, data), (keep_te, test_path, test)):
            if kept.size == 0:
                raise MultiLabelDataError(f"{src}: none of the {len(ds.paths)} images could be read")
        X = np.concatenate([fs.features[keep_tr], fs_test.features[keep_te]])
        Y = np.concatenate([data.targets[keep_tr], test.targets[keep_te]])
        n_tr = len(keep_tr)
        test_rows = np.arange(n_tr, len(X))
        splits = [(-1, np.arange(n_tr), test_rows)]
        sample, paths = keep_te, [test.paths[i] for i in keep_te]
        split_info = {"kind": "fixed", "n_train": int(n_tr), "n_test": int(len(keep_te))}
    fold_of = np.full(len(X), -2, dtype=np.int64)
    for fold_id, _, te in splits:
        fold_of[te] = fold_id

    with probe_threads(getattr(args, "threads", None)).applied():
        results = {v: _run_variant(v, cfg, X, Y, splits, constraints, args, device) for v, cfg in variants.items()}
    t_probes = time.perf_counter()

    Yt = Y[test_rows]
    first = next(iter(results))
    summary = {v: summarize({"m": r["per_fold"]})["m"] for v, r in results.items()}
    per_class = {}
    for v, r in results.items():
        per_class[v] = {}
        for c in classes:
            folds = [f["per_class"][c] for f in r["per_fold"]]
            entry = summarize({"c": folds})["c"]
            entry["support"] = int(sum(f["support"] for f in folds))
            per_class[v][c] = entry
    true_impossible = impossible_mask(Yt, exclusive)
    extra = {
        "checkpoint": {"name": name, "path": backbone.source, "fingerprint": backbone.fingerprint,
                       "arch": backbone.meta.get("arch"), "iteration": backbone.meta.get("iteration"),
                       "img_size": backbone.meta.get("img_size"), "patch_size": backbone.meta.get("patch_size"),
                       "embed_dim": backbone.meta.get("embed_dim")},
        "data": {"path": str(data_path), "test_path": str(test_path) if test_path else None,
                 "label_column": args.label_column, "label_separator": LABEL_SEP, "empty_label": args.empty_label},
        "split": split_info,
        "n_samples": int(len(test_rows)),
        "n_images": int(len(data.paths) + (len(test.paths) if test is not None else 0)),
        "n_unreadable": len(unreadable),
        "unreadable": unreadable[:MAX_LISTED_UNREADABLE],
        "classes": classes,
        "class_counts": {c: int(n) for c, n in zip(classes, Yt.sum(0))},
        "constraints": {"name": constraints.name, "path": constraints.source, "values": constraints.values,
                        "effective": constraints.effective(), "exclusive_pairs": constraints.exclusive_pairs(),
                        "asymmetries": constraints.asymmetries(), "nonzero_diagonal": constraints.nonzero_diagonal(),
                        "labels_with_exclusive_pair": int(true_impossible.sum())},
        "variants": {v: {"constraints": cfg.constraints, "thresholds": cfg.thresholds} for v, cfg in variants.items()},
        "per_class": per_class,
        "impossible": {v: r["impossible"] for v, r in results.items()},
        "thresholds": {v: r["thresholds"] for v, r in results.items()},
        "relation_matrix": {v: r["relation"] for v, r in results.items() if r["relation"] is not None},
        "uncertainty": {v: r["uncertainty"] for v, r in results.items()},
        "fit_info": {v: r["fit_info"] for v, r in results.items()},
        "settings": {
            "variants": list(variants), "head": asdict(base_cfg), "pool": args.pool,
            "feature": "x_norm_patchtokens mean" if args.pool == "mean_patch" else "x_norm_clstoken",
            "folds": args.folds if test is None else None, "seed": args.seed,
            "crop_size": int(args.crop_size if args.crop_size is not None else backbone.meta["img_size"]),
            "resize_mode": args.resize_mode, "mean": backbone.meta.get("mean"), "std": backbone.meta.get("std"),
            "device": device, "precision": "bf16" if device == "cuda" else "fp32",
            "feature_cache": str(fs.cache_path) if fs.cache_path else None, "features_from_cache": fs.from_cache,
        },
        "timings": {"load_s": t_loaded - t_start, "features_s": t_features - t_loaded,
                    "variants_s": {v: r["seconds"] for v, r in results.items()}, "total_s": t_probes - t_start},
    }
    if true_impossible.any():
        log.warning("%d tested image(s) carry an exclusive pair of '%s' in their labels", int(true_impossible.sum()),
                    constraints.name)
    write_metrics_json(out_dir, summary, extra)
    preds = {}
    for v, r in results.items():
        preds[v] = label_strings(r["decoded"][test_rows], classes)
        preds[f"{v}_raw"] = label_strings(r["raw"][test_rows], classes)
    write_predictions_csv(out_dir, sample, paths, fold_of[test_rows], label_strings(Yt, classes), preds)
    metrics = read_json_object(out_dir / METRICS_FILE)
    if args.report:
        from dinov2_hier.io import atomic_write_text

        r = results[first]
        scatter = _scatter_points(r["prob"][test_rows], r["unc"][test_rows], r["decoded"][test_rows], Yt, args.seed)
        atomic_write_text(out_dir / "report.html", render_multilabel_report(metrics, scatter, first))
    if args.save_model:
        _save_final(out_dir, first, variants[first], X, Y, constraints, backbone, args, device)
    log.info("done in %.1f s -> %s", time.perf_counter() - t_start, out_dir)
    return json_safe(metrics)


def _run_variant(variant: str, cfg: Any, X: np.ndarray, Y: np.ndarray, splits: list, constraints: Any,
                 args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Train and test one variant on every split; pooled predictions and per-fold metrics."""
    from dinov2_hier.heads.constrained import fit_constrained_head, predict

    n, k = Y.shape
    classes = list(constraints.classes)
    exclusive = constraints.exclusive_mask()
    prob, unc, thr = np.zeros((n, k)), np.zeros((n, k)), np.zeros((n, k))
    raw, dec = np.zeros((n, k), bool), np.zeros((n, k), bool)
    per_fold, fit_info = [], []
    params: dict[str, list] = {"alpha": [], "beta": [], "delta": [], "class_frequency": []}
    rel_sum = gram_sum = None
    t0 = time.perf_counter()
    for fold_id, train, test in splits:
        seed = args.seed + 1000 * max(fold_id, 0)
        fit = fit_constrained_head(X[train], Y[train], cfg, constraints if cfg.constraints != "off" else None,
                                   seed=seed, device=device)
        t1 = time.perf_counter()
        pr = predict(fit.head, X[test], seed=seed)
        predict_s = time.perf_counter() - t1
        prob[test], unc[test], thr[test], raw[test], dec[test] = (pr.probabilities, pr.uncertainty, pr.thresholds,
                                                                  pr.raw, pr.decoded)
        per_fold.append(multilabel_metrics(Y[test], pr.decoded, pr.probabilities, classes, exclusive, y_raw=pr.raw))
        th = fit.head.thresholds
        for key, tensor in (("alpha", th.alpha), ("beta", th.beta), ("delta", th.delta),
                            ("class_frequency", th.class_frequency)):
            params[key].append(tensor.detach().cpu().numpy().tolist())
        if pr.relation_mean is not None:
            rel_sum = pr.relation_mean * len(test) + (0 if rel_sum is None else rel_sum)
            gram_sum = pr.gram_mean * len(test) + (0 if gram_sum is None else gram_sum)
        last = fit.history[-1] if fit.history else {}
        fit_info.append({"fold": int(fold_id), "n_train": int(len(train)), "n_test": int(len(test)),
                         "fit_s": fit.seconds, "predict_s": predict_s, "epochs": len(fit.history),
                         "final_loss": {key: v for key, v in last.items() if key != "epoch"}})
        log.info("%s fold %d: trained on %d, tested on %d, weighted F1 %.4f", variant, fold_id, len(train), len(test),
                 per_fold[-1]["weighted_f1"] or float("nan"))
    tested = np.concatenate([te for _, _, te in splits])
    imp_raw, imp_dec = _impossible_counts(raw[tested], exclusive), _impossible_counts(dec[tested], exclusive)
    correct = dec[tested] == Y[tested].astype(bool)
    conf = np.where(dec[tested], prob[tested], 1.0 - prob[tested])
    u = unc[tested]
    return {
        "prob": prob, "unc": unc, "raw": raw, "decoded": dec, "per_fold": per_fold, "fit_info": fit_info,
        "seconds": time.perf_counter() - t0,
        "impossible": {"n": int(len(tested)), "before_decoding": imp_raw[1], "after_decoding": imp_dec[1],
                       "n_before_decoding": imp_raw[0], "n_after_decoding": imp_dec[0]},
        "thresholds": {
            "mode": cfg.thresholds, "t_base": cfg.t_base,
            "per_class": {c: {"mean": float(thr[tested, i].mean()), "std": float(thr[tested, i].std())}
                          for i, c in enumerate(classes)},
            **{key: {c: [fold[i] for fold in vals] for i, c in enumerate(classes)} for key, vals in params.items()},
        },
        "relation": None if rel_sum is None else {"mean_R": rel_sum / len(tested), "mean_RRt": gram_sum / len(tested),
                                                  "target": constraints.binary() if cfg.constraints == "binary"
                                                  else constraints.effective()},
        "uncertainty": {
            key: {"n": int(mask.sum()), "mean_uncertainty": float(u[mask].mean()) if mask.any() else None,
                  "mean_confidence": float(conf[mask].mean()) if mask.any() else None}
            for key, mask in (("correct", correct), ("incorrect", ~correct))
        },
    }


def _impossible_counts(pred: np.ndarray, exclusive: np.ndarray) -> tuple[int, float | None]:
    from dinov2_hier.heads.constrained import impossible_mask

    bad = impossible_mask(pred, exclusive)
    return int(bad.sum()), float(bad.mean()) if len(bad) else None


def _save_final(out_dir: Path, variant: str, cfg: Any, X: np.ndarray, Y: np.ndarray, constraints: Any,
                backbone: Any, args: argparse.Namespace, device: str) -> Path:
    from dinov2_hier.heads.constrained import fit_constrained_head, save_head

    fit = fit_constrained_head(X, Y, cfg, constraints if cfg.constraints != "off" else None, seed=args.seed,
                               device=device)
    path = save_head(out_dir / HEAD_FILE, fit.head, constraints.classes, constraints, extra={
        "variant": variant, "pool": args.pool, "backbone_fingerprint": backbone.fingerprint,
        "backbone_source": backbone.source, "n_train": int(len(X)),
    })
    log.info("saved the %s head trained on all %d images to %s", variant, len(X), path)
    return path


# --------------------------------------------------------------------------- report


def _scatter_points(prob: np.ndarray, unc: np.ndarray, dec: np.ndarray, truth: np.ndarray, seed: int) -> dict:
    conf = np.where(dec, prob, 1.0 - prob).ravel()
    u = unc.ravel()
    correct = (dec == truth.astype(bool)).ravel()
    idx = np.arange(conf.size)
    if conf.size > MAX_SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(conf.size, MAX_SCATTER_POINTS, replace=False))
    return {"confidence": conf[idx], "uncertainty": u[idx], "correct": correct[idx], "n_total": int(conf.size)}


def _diverging(v: float, vmax: float) -> str:
    """Blue (negative) - white (0) - red (positive), saturating at ``|v| = vmax``."""
    t = max(-1.0, min(1.0, v / vmax)) if vmax > 0 else 0.0
    if t >= 0:
        r, g, b = 255 - 75 * t, 255 - 225 * t, 255 - 215 * t
    else:
        r, g, b = 255 + 222 * t, 255 + 150 * t, 255 + 75 * t
    return f"rgb({r:.0f},{g:.0f},{b:.0f})"


def svg_matrix_heatmap(values: Any, labels: Sequence[str], title: str, vmax: float | None = None) -> str:
    """Heatmap of a ``K x K`` matrix (rows/columns ``labels``), diverging colours around 0,
    from ``-vmax`` to ``+vmax``; values written in the cells up to K = 25.

    ``vmax`` defaults to the largest absolute value (at least 1e-9); a given ``vmax`` is
    widened to the largest absolute value when an entry exceeds it, so the stated colour
    scale always holds every value (``R R^T`` is not bounded by the ``-1..+1`` of ``C``).
    The caption states the scale and the actual range of the values."""
    arr = np.asarray(values, dtype=np.float64)
    n = len(labels)
    largest = float(np.abs(arr).max(initial=0.0))
    vmax = max(float(vmax) if vmax is not None else 0.0, largest, 1e-9)
    cell = max(14.0, min(36.0, 560.0 / max(n, 1)))
    font = min(10.0, cell * 0.32)
    label_w = 6.6 * max((len(str(x)) for x in labels), default=1)
    left, top = 12 + label_w, 36 + label_w * 0.72
    width, height = left + n * cell + 20 + label_w * 0.5, top + n * cell + 34
    parts = [f'<svg class="heatmap" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
             f'role="img" aria-label="{_esc(title)}">',
             f'<text x="4" y="16" font-size="13" font-weight="bold">{_esc(title)}</text>']
    for j, label in enumerate(labels):
        x, y = left + (j + 0.5) * cell, top - 4
        parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="11" transform="rotate(-45 {x:.1f} {y:.1f})">'
                     f'{_esc(label)}</text>')
    for i, label in enumerate(labels):
        y = top + i * cell
        parts.append(f'<text x="{left - 4:.1f}" y="{y + cell / 2 + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{_esc(label)}</text>')
        for j in range(n):
            v = float(arr[i, j])
            x = left + j * cell
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                         f'fill="{_diverging(v, vmax)}" stroke="#ddd"><title>{_esc(label)} / {_esc(labels[j])}: '
                         f'{v:.3f}</title></rect>')
            if n <= 25:
                colour = "#fff" if abs(v) > 0.6 * vmax else "#222"
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + font / 3:.1f}" font-size="{font:.1f}" '
                             f'text-anchor="middle" fill="{colour}">{round(v, 2) + 0.0:g}</text>')
    span = (f"; values {float(arr.min()):.3g} to {float(arr.max()):.3g}" if arr.size else "")
    parts.append(f'<text x="{left:.1f}" y="{height - 10:.1f}" font-size="10">colour scale: -{vmax:.3g} (blue) '
                 f'to +{vmax:.3g} (red){span}</text></svg>')
    return "".join(parts)


def svg_threshold_bars(thresholds: Mapping[str, Mapping[str, Any]], classes: Sequence[str], t_base: float = 0.5) -> str:
    """Per class, one bar per variant: mean threshold over the tested images (whisker ± std),
    with a dashed line at ``t_base``. ``thresholds[variant]["per_class"][class] = {"mean", "std"}``."""
    variants = list(thresholds)
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    colours = {v: palette[i % len(palette)] for i, v in enumerate(variants)}
    bar, plot_w = 9.0, 360.0
    group = bar * len(variants) + 8
    left = 12 + 6.6 * max((len(c) for c in classes), default=1)
    top = 24 + 16 * len(variants)
    width, height = left + plot_w + 60, top + group * len(classes) + 30
    parts = [f'<svg class="threshold-bars" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="thresholds">']
    parts += svg_legend_and_ticks(variants, colours, left, top, plot_w, height)
    xb = left + min(max(t_base, 0.0), 1.0) * plot_w
    parts.append(f'<line x1="{xb:.1f}" y1="{top - 4:.1f}" x2="{xb:.1f}" y2="{height - 24:.1f}" stroke="#555" '
                 f'stroke-dasharray="4 3"><title>t_base {t_base:g}</title></line>')
    for i, c in enumerate(classes):
        y0 = top + i * group
        parts.append(f'<text x="{left - 4:.1f}" y="{y0 + bar * len(variants) / 2 + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{_esc(c)}</text>')
        for j, v in enumerate(variants):
            entry = (thresholds[v].get("per_class") or {}).get(c) or {}
            mean, std = entry.get("mean"), entry.get("std") or 0.0
            if mean is None:
                continue
            y = y0 + j * bar
            w = min(max(mean, 0.0), 1.0) * plot_w
            parts.append(f'<rect x="{left:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar - 1:.1f}" fill="{colours[v]}">'
                         f'<title>{_esc(v)}, {_esc(c)}: threshold {mean:.3f} ± {std:.3f}</title></rect>')
            if std > 0:
                lo, hi = left + max(mean - std, 0.0) * plot_w, left + min(mean + std, 1.0) * plot_w
                parts.append(f'<line x1="{lo:.1f}" y1="{y + bar / 2:.1f}" x2="{hi:.1f}" y2="{y + bar / 2:.1f}" '
                             f'stroke="#333"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_uncertainty_scatter(confidence: Any, uncertainty: Any, correct: Any, title: str) -> str:
    """Scatter of (confidence, MC-dropout variance) per (image, class) decision: blue correct,
    orange incorrect. Confidence is ``y_bar`` for a positive decision, ``1 - y_bar`` for a
    negative one; the y axis spans 0 to the largest variance (at least 0.01)."""
    conf = np.asarray(confidence, dtype=np.float64)
    u = np.asarray(uncertainty, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    size, pad = 380.0, 40.0
    umax = max(float(u.max(initial=0.0)), 0.01)
    width, height = size + pad + 150, size + pad + 30
    parts = [f'<svg class="uncertainty-scatter" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{_esc(title)}">',
             f'<text x="4" y="16" font-size="13" font-weight="bold">{_esc(title)}</text>',
             f'<rect x="{pad}" y="24" width="{size}" height="{size}" fill="none" stroke="#ccc"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + tick * size
        parts.append(f'<text x="{x:.1f}" y="{24 + size + 14:.1f}" font-size="10" text-anchor="middle">{tick:g}</text>')
        y = 24 + size - tick * size
        parts.append(f'<text x="{pad - 4:.1f}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{tick * umax:.2g}</text>')
    parts.append(f'<text x="{pad + size / 2:.1f}" y="{24 + size + 28:.1f}" font-size="11" text-anchor="middle">'
                 f'confidence</text>')
    for flag, colour, name in ((True, "#1f77b4", "correct"), (False, "#ff7f0e", "incorrect")):
        sel = np.flatnonzero(ok == flag)
        dots = "".join(f'<circle cx="{pad + c * size:.1f}" cy="{24 + size - v / umax * size:.1f}" r="2"/>'
                       for c, v in zip(conf[sel], u[sel]))
        parts.append(f'<g fill="{colour}" fill-opacity="0.6"><title>{name} ({len(sel)})</title>{dots}</g>')
        y = 40 + (0 if flag else 18)
        parts.append(f'<circle cx="{pad + size + 16:.0f}" cy="{y}" r="5" fill="{colour}"/>'
                     f'<text x="{pad + size + 26:.0f}" y="{y + 4}" font-size="11">{name} ({len(sel)})</text>')
    parts.append(f'<text x="{pad + size + 10:.0f}" y="90" font-size="10">y: MC-dropout</text>'
                 f'<text x="{pad + size + 10:.0f}" y="104" font-size="10">variance U</text></svg>')
    return "".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["<table><tr>", *(f"<th>{_esc(h)}</th>" for h in header), "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def _pm(entry: Mapping[str, Any] | None) -> str:
    from .report import format_mean_std

    return format_mean_std(entry)


def render_multilabel_report(metrics: Mapping[str, Any], scatter: Mapping[str, Any] | None = None,
                             scatter_variant: str = "") -> str:
    """``report.html`` as one self-contained string (inline CSS and SVG, no scripts): setup,
    metric table per variant, per-class table, impossible combinations, heatmaps of ``C``
    and of the mean ``R`` and ``R R^T`` over the test set, threshold bars, and the
    uncertainty-vs-confidence scatter of ``scatter_variant``."""
    from dinov2_hier.metrics import metric_label

    probes = metrics.get("probes") or {}
    classes = list(metrics.get("classes") or [])
    cons = metrics.get("constraints") or {}
    ckpt = metrics.get("checkpoint") or {}
    title = f"Constrained multi-label evaluation: {ckpt.get('name', 'checkpoint')}"
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{_esc(title)}</title><style>{REPORT_CSS}</style></head><body><h1>{_esc(title)}</h1>"]
    split = metrics.get("split") or {}
    info = [("checkpoint", ckpt.get("path")), ("architecture", ckpt.get("arch")), ("data", (metrics.get("data") or {}).get("path")),
            ("split", json.dumps(split)), ("tested images", metrics.get("n_samples")),
            ("unreadable images", metrics.get("n_unreadable")),
            ("constraint matrix", f"{cons.get('name')} ({cons.get('path')})"),
            ("feature", (metrics.get("settings") or {}).get("feature"))]
    parts.append(_table(["", ""], [(k, "" if v is None else v) for k, v in info]))
    if cons.get("asymmetries"):
        listed = "; ".join(f"{a}/{b}: {x:g} vs {y:g}" for a, b, x, y in cons["asymmetries"])
        parts.append(f'<p class="note">The constraint matrix is not symmetric: {_esc(listed)}. A pair counts as '
                     "exclusive when either direction is -1.</p>")

    names = list(probes)
    metric_names = [m for m in ("weighted_f1", "macro_f1", "micro_f1", "balanced_accuracy", "auc_roc", "sensitivity",
                                "specificity", "subset_accuracy", "hamming_accuracy", "impossible_rate_before",
                                "impossible_rate") if any(m in probes[v] for v in names)]
    parts.append("<h2>Metrics</h2><p>Mean ± standard deviation over folds; impossible rates are the share of images "
                 "whose predicted label set holds an exclusive pair, before and after decoding. Higher is better, "
                 "except for metrics marked (lower better).</p>")
    parts.append(_table(["metric", *names],
                        [(metric_label(m), *(_pm(probes[v].get(m)) for v in names)) for m in metric_names]))
    imp = metrics.get("impossible") or {}
    if imp:
        parts.append("<h2>Impossible combinations</h2>")
        parts.append(_table(["variant", "images", "before decoding", "after decoding"], [
            (v, e.get("n"), f"{e.get('n_before_decoding')} ({100 * (e.get('before_decoding') or 0):.1f}%)",
             f"{e.get('n_after_decoding')} ({100 * (e.get('after_decoding') or 0):.1f}%)") for v, e in imp.items()]))

    per_class = metrics.get("per_class") or {}
    if per_class:
        parts.append("<h2>Per class</h2>")
        fields = ("f1", "sensitivity", "specificity", "balanced_accuracy", "auc_roc")
        for v, rows in per_class.items():
            parts.append(f"<h3>{_esc(v)}</h3>")
            parts.append(_table(["class", "positives", *fields],
                                [(c, rows[c].get("support"), *(_pm(rows[c].get(f)) for f in fields))
                                 for c in classes if c in rows]))

    parts.append("<h2>Relations</h2><p>The prior matrix C as written in the file, and per variant with a relation "
                 "module the learned R and R R<sup>T</sup> averaged over the tested images (R R<sup>T</sup> is what the "
                 "loss compares with C; its entries are not bounded by C's -1..+1, so its colour scale runs to its "
                 "largest absolute value, stated under each map).</p><div class=\"row\">")
    if cons.get("values") is not None:
        parts.append(svg_matrix_heatmap(cons["values"], classes, "prior C", vmax=1.0))
    for v, rel in (metrics.get("relation_matrix") or {}).items():
        parts.append(svg_matrix_heatmap(rel["mean_R"], classes, f"{v}: mean R"))
        parts.append(svg_matrix_heatmap(rel["mean_RRt"], classes, f"{v}: mean R R^T", vmax=1.0))
    parts.append("</div>")

    thresholds = metrics.get("thresholds") or {}
    if thresholds:
        t_base = next(iter(thresholds.values())).get("t_base", 0.5)
        parts.append("<h2>Decision thresholds</h2><p>Mean threshold per class over the tested images (whisker ± std: "
                     "the uncertainty term varies per image); dashed line: t_base.</p>")
        parts.append(svg_threshold_bars(thresholds, classes, t_base))
    if scatter is not None and len(scatter.get("confidence", [])):
        unc = (metrics.get("uncertainty") or {}).get(scatter_variant) or {}
        text = "; ".join(f"{k}: {e.get('n')} decisions, mean variance {e.get('mean_uncertainty') or 0:.4f}, mean "
                         f"confidence {e.get('mean_confidence') or 0:.3f}" for k, e in unc.items())
        sub = (f" (a seeded subset of {len(scatter['confidence'])} of {scatter['n_total']})"
               if scatter["n_total"] > len(scatter["confidence"]) else "")
        parts.append(f"<h2>Uncertainty and confidence</h2><p>{_esc(scatter_variant)}: every (image, class) decision"
                     f"{_esc(sub)}. {_esc(text)}.</p>")
        parts.append(svg_uncertainty_scatter(scatter["confidence"], scatter["uncertainty"], scatter["correct"],
                                             f"{scatter_variant}: MC-dropout variance vs confidence"))
    parts.append("</body></html>\n")
    return "".join(parts)


# --------------------------------------------------------------------------- the face


def build_parser() -> argparse.ArgumentParser:
    from dinov2_hier.heads.constrained import ConstrainedConfig

    d = ConstrainedConfig()
    p = argparse.ArgumentParser(prog="python -m eval.multilabel", description=(
        "Biologically constrained multi-label classification on frozen features (learnable relation matrix, "
        "MC-dropout uncertainty, adaptive thresholds, decoding without exclusive pairs): k-fold cross-validation "
        "or a fixed split, metrics.json, predictions.csv and report.html."))
    g = p.add_argument_group("model and data")
    g.add_argument("--ckpt", required=True, help="teacher_backbone.pt, a training checkpoint, a training output "
                   "directory (its newest checkpoint), DINOv2/DinoBloom weights (with --arch) or 'none' (with --arch)")
    g.add_argument("--arch", default=None, help="backbone architecture (needed for 'none' and foreign weights)")
    g.add_argument("--data", required=True, help="manifest CSV: path,label with labels separated by '|'")
    g.add_argument("--test-data", default=None, help="fixed test manifest: train on --data, test here (no CV)")
    g.add_argument("--constraints", required=True,
                   help="constraint matrix JSON, or a shipped name: gr_neutro, aml_matek, bmc")
    g.add_argument("--label-column", default="label", help="manifest column holding the labels (default: label)")
    g.add_argument("--empty-label", default=None,
                   help="class an empty label cell stands for (e.g. normal); default: no class positive")
    g = p.add_argument_group("variants and protocol")
    g.add_argument("--variants", nargs="+", default=["soft_uncertainty"],
                   help="<constraints>_<thresholds>, constraints off|fixed|binary|soft, thresholds "
                        "static|class|uncertainty (default: soft_uncertainty, the paper's model)")
    g.add_argument("--ablation", action="store_true",
                   help=f"also run the paper's ablation variants: {' '.join(ABLATION_VARIANTS)}")
    g.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    g.add_argument("--seed", type=int, default=0, help="seed of folds, initialisation, shuffling, dropout (default 0)")
    g.add_argument("--save-model", action="store_true",
                   help=f"also train the first variant on all images and save it as {HEAD_FILE}")
    g = p.add_argument_group("head and loss (defaults: the paper, section 3.4)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", dest="batch_size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--mc-samples", type=int, default=d.mc_samples, help="MC-dropout passes at inference")
    g.add_argument("--mc-samples-train", type=int, default=d.mc_samples_train, help="MC-dropout passes in training")
    g.add_argument("--token-dim", type=int, default=d.token_dim, help="width h of the relation class tokens")
    g.add_argument("--t-base", type=float, default=d.t_base)
    g.add_argument("--lambda-con", type=float, default=d.lambda_con)
    g.add_argument("--lambda-unc", type=float, default=d.lambda_unc)
    g.add_argument("--lambda-ent", type=float, default=d.lambda_ent)
    g.add_argument("--l1-weight", type=float, default=d.l1_weight, help="a of the L1 term of L_con")
    g.add_argument("--hinge-weight", type=float, default=d.hinge_weight, help="b of the variance hinge of L_unc")
    g.add_argument("--tau", type=float, default=d.tau)
    g.add_argument("--temperature", type=float, default=d.temperature, help="soft-decision temperature of the KL")
    g.add_argument("--constraint-diagonal", action="store_true", help="include the diagonal in ||R R^T - C||^2")
    g.add_argument("--relation-reduction", choices=("mean", "sum"), default=d.relation_reduction,
                   help="mean over entries (default) or the sums of eq. 3 as printed")
    g.add_argument("--class-weighting", choices=("balanced", "none"), default=d.class_weighting)
    g.add_argument("--lr-constraint", type=float, default=d.lr_constraint)
    g.add_argument("--lr-uncertainty", type=float, default=d.lr_uncertainty)
    g.add_argument("--lr-classifier", type=float, default=d.lr_classifier)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g = p.add_argument_group("feature extraction")
    g.add_argument("--pool", choices=("mean_patch", "cls"), default="mean_patch",
                   help="mean of the patch tokens (default, the paper) or the CLS token")
    g.add_argument("--crop-size", type=int, default=None, help="input size in px (default: the checkpoint's)")
    g.add_argument("--resize-mode", choices=("pad", "center_crop"), default="pad")
    g.add_argument("--feature-batch-size", dest="batch_size_features", type=int, default=64,
                   help="images per backbone forward pass (default 64)")
    g.add_argument("--num-workers", type=int, default=4,
                   help="image loading processes (default 4, at most the CPU cores less one)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch in every phase (default: the idle cores less the loader workers "
                        "and one spare core; see docs/evaluation.md)")
    g.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder")
    g.add_argument("--no-cache", dest="cache", action="store_false", help="neither read nor write cached features")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", type=Path, required=True)
    g.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    return p


def _format(metrics: Mapping[str, Any]) -> str:
    from dinov2_hier.metrics import metric_label

    from .report import format_mean_std

    probes = metrics["probes"]
    names = list(probes)
    keys = ("weighted_f1", "balanced_accuracy", "auc_roc", "sensitivity", "specificity", "impossible_rate_before",
            "impossible_rate")
    lines = [f"{metrics['n_samples']} images, {len(metrics['classes'])} classes, constraints "
             f"'{metrics['constraints']['name']}'",
             " ".join([f"{'metric':<36}", *(f"{v:>20}" for v in names)])]
    lines += [" ".join([f"{metric_label(k):<36}", *(f"{format_mean_std(probes[v].get(k)):>20}" for v in names)])
              for k in keys]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from .cli_common import run_evaluation

    return run_evaluation(build_parser().parse_args(argv), evaluate_multilabel, _format)


if __name__ == "__main__":
    sys.exit(main())
