"""The run of ``eval.multilabel``: variants, the whole evaluation (:func:`evaluate_multilabel`),
one variant over every fold, and the final head.

**Variants**: ``<constraints>_<thresholds>`` with constraints off|fixed|binary|soft and
thresholds static|class|uncertainty (:func:`parse_variant`); ``--ablation`` adds the
paper's ablation table (:data:`ABLATION_VARIANTS`). All variants share the folds; each is
trained and tested on every fold (seeded per fold), and the report and ``--save-model``
use the first.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.eval_results import METRICS_FILE, read_json_object

from ..pipeline import (
    MAX_LISTED_UNREADABLE,
    EvalUsageError,
    checkpoint_record,
    extraction_settings,
    probe_threads,
    readable_rows,
    resolve_device,
    unreadable_paths,
)
from .data import (LABEL_SEP, MultiLabelDataError, extract_pooled_features, label_strings, load_multilabel_data,
                   multilabel_folds)
from .metrics import impossible_counts, multilabel_metrics
from .report import render_multilabel_report, scatter_points

__all__ = ["ABLATION_VARIANTS", "HEAD_FILE", "evaluate_multilabel", "parse_variant"]

log = logging.getLogger("dinov2_hier.eval.multilabel")

ABLATION_VARIANTS = ("off_static", "soft_static", "fixed_static", "binary_static", "soft_class", "soft_uncertainty")
HEAD_FILE = "head.pt"


def parse_variant(name: str, base: Any) -> Any:
    """``"<constraints>_<thresholds>"`` -> a copy of the ``ConstrainedConfig`` ``base`` with those modes.

    Raises:
        EvalUsageError: an unknown mode (the message lists the valid ones).
    """
    from dinov2_hier.heads.constrained import CONSTRAINT_MODES, THRESHOLD_MODES

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
    from ..features import resolve_checkpoints

    found = resolve_checkpoints(spec)
    if len(found) > 1:
        log.info("%s holds %d checkpoints; using the newest, %s", spec, len(found), found[-1][1])
    return found[-1]


def evaluate_multilabel(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation of ``args`` (see :func:`eval.multilabel.build_parser`); returns
    metrics.json's content. Raises the library's input errors (exit code 2 through
    :func:`eval.multilabel.main`)."""
    from dinov2_hier.constraints import load_constraints
    from dinov2_hier.heads.constrained import impossible_mask
    from dinov2_hier.paths import resolve_resource

    from ..features import load_eval_backbone
    from ..report import json_safe, summarize, write_metrics_json, write_predictions_csv

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
    extract = extraction_settings(args, device, args.batch_size_features)
    fs = extract_pooled_features(backbone, data.paths, args.pool, **extract)
    fs_test = extract_pooled_features(backbone, test.paths, args.pool, **extract) if test is not None else None
    t_features = time.perf_counter()

    unreadable = unreadable_paths(data, fs, test, fs_test)
    if test is None:
        keep = readable_rows(fs, data, data_path, MultiLabelDataError)
        X, Y = fs.features[keep], data.targets[keep]
        splits = [(i, tr, te) for i, (tr, te) in enumerate(multilabel_folds(Y, args.folds, args.seed))]
        sample, paths = keep, [data.paths[i] for i in keep]
        test_rows = np.arange(len(keep))
        split_info: dict[str, Any] = {"kind": "cross_validation", "folds": args.folds, "seed": args.seed,
                                      "stratification": "label powerset (rare label sets pooled)"}
    else:
        keep_tr = readable_rows(fs, data, data_path, MultiLabelDataError)
        keep_te = readable_rows(fs_test, test, test_path, MultiLabelDataError)
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
        "checkpoint": checkpoint_record(name, backbone),
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
        scatter = scatter_points(r["prob"][test_rows], r["unc"][test_rows], r["decoded"][test_rows], Yt, args.seed)
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
    imp_raw, imp_dec = impossible_counts(raw[tested], exclusive), impossible_counts(dec[tested], exclusive)
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
