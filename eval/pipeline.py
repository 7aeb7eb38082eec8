"""The evaluation pipeline of ``eval.linear``, ``eval.knn`` and ``eval.run``, importable and
free of printing; the command line (arguments, printing, the faces) is :mod:`eval.cli_common`.

:func:`evaluate` runs what the arguments of :func:`eval.cli_common.build_parser` describe:
labels -> checkpoints -> frozen features -> probes on stratified folds (or a fixed split) ->
metrics -> ``metrics.json``, ``predictions.csv`` and ``report.html``. For a training output
directory it evaluates every checkpoint in iteration order, one subdirectory each, and
writes ``summary.json`` naming the best one. Bad input raises the input errors registered
here (one ``error: ...`` line, exit code 2, under :func:`dinov2_hier.cli.run_cli`). The
building blocks serve ``eval.multilabel`` too.

Output layout of ``--output-dir DIR`` (see docs/evaluation.md):

    DIR/metrics.json, DIR/predictions.csv, DIR/report.html, DIR/log.txt
    # with --ckpt <training output dir>:
    DIR/summary.json, DIR/iter_00000100/{metrics.json,predictions.csv,report.html}, ...
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_hier.errors import UserError
from dinov2_hier.eval_results import METRICS_FILE, SUMMARY_FILE, read_json_object

from .baselines import is_baseline
from .checkpoint_summary import SELECTION_METRIC, SELECTION_PROBE, training_status, write_summary
from .crossval import EvalDataError
from .report import (
    PredictionTable,
    pooled_confusion,
    summarize,
    summarize_per_class,
    write_metrics_json,
    write_predictions_csv,
    write_report_html,
)

__all__ = [
    "MAX_LISTED_UNREADABLE",
    "SELECTION_METRIC",
    "SELECTION_PROBE",
    "SUMMARY_FILE",
    "EvalUsageError",
    "build_probes",
    "checkpoint_record",
    "default_cache_dir",
    "evaluate",
    "extraction_settings",
    "feature_cache_dir",
    "probe_threads",
    "readable_rows",
    "resolve_device",
    "unreadable_paths",
]

log = logging.getLogger("dinov2_hier.eval.cli")

#: At most this many unreadable paths are listed in metrics.json (all are counted).
MAX_LISTED_UNREADABLE = 50


class EvalUsageError(UserError, ValueError):
    """A command-line value that cannot work (e.g. k < 1, C <= 0, CUDA asked but absent)."""


# --------------------------------------------------------------------------- building blocks


def default_cache_dir() -> Path:
    """``$DINOV2_HIER_CACHE/features``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)``/dinov2_hier/features``."""
    root = os.environ.get("DINOV2_HIER_CACHE")
    if root:
        return Path(root).expanduser() / "features"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dinov2_hier" / "features"


def feature_cache_dir(args: argparse.Namespace) -> Path | None:
    """Where extracted features are cached: ``--cache-dir``, the default, or None (``--no-cache``)."""
    if not args.cache:
        return None
    return Path(args.cache_dir).expanduser() if args.cache_dir is not None else default_cache_dir()


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalUsageError("--device cuda was asked for, but CUDA is not available on this machine")
    return name


def probe_threads(threads: int | None) -> Any:
    """The :class:`~dinov2_hier.cpu.ThreadPlan` of the probe phase (no loader): ``--threads``,
    else the idle cores measured now (torch) and one BLAS thread (scikit-learn's small
    products), unless the environment sets them; logged."""
    from dinov2_hier.cpu import thread_plan

    plan = thread_plan(0, threads=threads, blas=1)
    log.info("probes: torch threads %s", plan.why)
    return plan


def extraction_settings(args: argparse.Namespace, device: str, batch_size: int) -> dict[str, Any]:
    """The keyword arguments of :func:`eval.features.extract_features` that the parsed
    arguments ask for (``--crop-size``, ``--resize-mode``, ``--num-workers``, the cache,
    ``--no-progress``, ``--threads``), with ``batch_size`` images per forward pass."""
    return dict(crop_size=args.crop_size, resize_mode=args.resize_mode, batch_size=batch_size,
                num_workers=args.num_workers, cache_dir=feature_cache_dir(args), device=device, progress=args.progress,
                threads=getattr(args, "threads", None))


def checkpoint_record(name: str, backbone: Any) -> dict[str, Any]:
    """metrics.json's ``checkpoint``: what was evaluated (an :class:`eval.features.EvalBackbone`)."""
    meta = backbone.meta
    return {"name": name, "path": backbone.source, "fingerprint": backbone.fingerprint, "arch": meta.get("arch"),
            "iteration": meta.get("iteration"), "img_size": meta.get("img_size"),
            "patch_size": meta.get("patch_size"), "embed_dim": meta.get("embed_dim")}


def unreadable_paths(data: Any, fs: Any, test: Any = None, fs_test: Any = None) -> list[str]:
    """The images of ``data`` (and ``test``) that could not be read (``ok`` false in their
    feature sets ``fs`` and ``fs_test``)."""
    pairs = [(data, fs)] + ([(test, fs_test)] if test is not None else [])
    return [p for d, f in pairs for p, ok in zip(d.paths, f.ok) if not ok]


def readable_rows(fs: Any, data: Any, source: Any, error: type[Exception] = EvalDataError) -> np.ndarray:
    """The rows of ``data`` whose images could be read (``fs.ok``); ``error`` naming
    ``source`` when there are none."""
    keep = np.flatnonzero(fs.ok)
    if keep.size == 0:
        raise error(f"{source}: none of the {len(data.paths)} images could be read")
    return keep


def _check_args(args: argparse.Namespace) -> None:
    families = getattr(args, "families", ("logreg", "knn"))
    if str(args.ckpt).strip().lower() == "none" and not args.arch:
        raise EvalUsageError("--ckpt none evaluates an untrained backbone and needs --arch (e.g. --arch vit_small)")
    if args.batch_size < 1:
        raise EvalUsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise EvalUsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise EvalUsageError(f"--threads must be >= 1, got {args.threads}")
    if args.test_data is None and args.folds < 2:
        raise EvalUsageError(f"--folds must be >= 2, got {args.folds} (use --test-data for a fixed split)")
    if args.crop_size is not None and args.crop_size < 1:
        raise EvalUsageError(f"--crop-size must be positive, got {args.crop_size}")
    if "logreg" in families:
        if args.C is not None and not args.C > 0:
            raise EvalUsageError(f"--C must be > 0, got {args.C}")
        if args.C_grid is not None and min(args.C_grid) <= 0:
            raise EvalUsageError(f"--C-grid values must be > 0, got {args.C_grid}")
        if args.max_iter < 1:
            raise EvalUsageError(f"--max-iter must be >= 1, got {args.max_iter}")
    if "knn" in families:
        bad = [k for k in args.k if k < 1]
        if bad:
            raise EvalUsageError(f"--k values must be >= 1, got {bad}")
        if len(set(args.k)) != len(args.k):
            raise EvalUsageError(f"--k values must be distinct, got {args.k}")
    from .probes.options import check_extra_probe_args  # --extra-probes (issue 22)
    check_extra_probe_args(args, EvalUsageError)


def build_probes(args: argparse.Namespace, device: str) -> list[Any]:
    """The probes of the face: ``logreg`` (linear) and/or ``knn_k<k>`` for each ``--k``."""
    from .probes import KNNProbe, LogRegProbe

    probes: list[Any] = []
    families = getattr(args, "families", ("logreg", "knn"))
    if "knn" in families:
        probes.extend(KNNProbe(k, metric=args.knn_metric) for k in args.k)
    if "logreg" in families:
        probes.append(LogRegProbe(C=args.C, C_grid=args.C_grid, backend=args.backend, max_iter=args.max_iter,
                                  device=device, seed=args.seed))
    from .probes.options import build_extra_probes  # --extra-probes svm wknn (issue 22); none by default
    probes.extend(build_extra_probes(args))
    return probes


def _probe_settings(args: argparse.Namespace) -> dict[str, Any]:
    from .probes import DEFAULT_C_GRID

    families = getattr(args, "families", ("logreg", "knn"))
    out: dict[str, Any] = {}
    if "knn" in families:
        out["knn"] = {"k": list(args.k), "metric": args.knn_metric}
    if "logreg" in families:
        out["logreg"] = {"C": args.C, "C_grid": None if args.C is not None else list(args.C_grid or DEFAULT_C_GRID),
                         "backend": args.backend, "max_iter": args.max_iter}
    from .probes.options import extra_probe_settings
    out.update(extra_probe_settings(args))
    return out


def _load_hierarchy(spec: str | None) -> tuple[Any, dict[str, Any] | None]:
    if spec is None:
        return None, None
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.paths import resolve_resource

    path = resolve_resource(spec, "hierarchy")
    hierarchy = Hierarchy.from_json(path)
    return hierarchy, {"name": hierarchy.name, "path": str(path), "fingerprint": hierarchy.fingerprint()}


def load_inputs(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None, Path, Path | None, Any, Any]:
    """``(hierarchy, hierarchy_info, data_path, test_path, data, test)`` of ``--hierarchy``,
    ``--data`` and ``--test-data`` (None without it), labels resolved as ``--label-map`` /
    ``--label-column`` say."""
    from .features import load_eval_data

    hierarchy, hierarchy_info = _load_hierarchy(args.hierarchy)
    data_path = _data_path(args.data, "--data")
    test_path = _data_path(args.test_data, "--test-data") if args.test_data else None
    data = load_eval_data(str(data_path), hierarchy, label_map=args.label_map, label_column=args.label_column)
    test = (load_eval_data(str(test_path), hierarchy, label_map=args.label_map, label_column=args.label_column)
            if test_path is not None else None)
    return hierarchy, hierarchy_info, data_path, test_path, data, test


def _data_path(spec: str, flag: str) -> Path:
    from dinov2_hier.paths import resolve_resource

    return resolve_resource(spec, f"{flag} data")


def _class_list(labels: Sequence[str], hierarchy: Any) -> list[str]:
    unique = set(labels)
    return sorted(unique, key=hierarchy.index) if hierarchy is not None else sorted(unique)

# --------------------------------------------------------------------------- the pipeline


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation described by ``args`` (see :func:`eval.cli_common.build_parser`); return a record.

    Returns ``{"output_dir", "evaluations": [{"name", "checkpoint", "output_dir", "metrics"}],
    "summary": summary.json content or None}``; ``metrics`` is the metrics.json content.
    Raises the library's input errors (exit code 2 through :func:`eval.cli_common.run_face`).
    """
    from .crossval import stratified_folds
    from .domains import prepare_domains
    from .features import load_eval_data, resolve_checkpoints

    _check_args(args)
    device = resolve_device(args.device)
    select = getattr(args, "select", None)
    checkpoints = resolve_checkpoints(args.ckpt, select)  # cheap checks of every input before any heavy work
    hierarchy, hierarchy_info, data_path, test_path, data, test = load_inputs(args)
    data, domain = prepare_domains(args, data, data_path, hierarchy, has_test=test is not None)  # --split, --classes
    # The class list is fixed once for everything evaluated, so no fold or split shifts it.
    classes = _class_list(list(data.labels) + (list(test.labels) if test else []), hierarchy)
    if test is None:
        if domain is None or domain.kfold:
            stratified_folds(data.labels, args.folds, args.seed)  # fail fast, before extracting features
    else:
        unseen = sorted(set(test.labels) - set(data.labels))
        if unseen:
            log.warning("test classes absent from the training data (never predicted): %s", ", ".join(unseen))

    multi = str(args.ckpt).strip().lower() != "none" and not is_baseline(args.ckpt) and Path(args.ckpt).expanduser().is_dir()
    probes = build_probes(args, device)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = {
        "hierarchy": hierarchy, "hierarchy_info": hierarchy_info, "data": data, "test": test,
        "data_path": data_path, "test_path": test_path, "classes": classes, "probes": probes, "device": device,
        "domain": domain,
    }
    evaluations = []
    for name, ckpt in checkpoints:
        target = out_dir / name if multi else out_dir
        log.info("evaluating %s (%s) -> %s", name, ckpt, target)
        evaluations.append(_evaluate_checkpoint(args, name, ckpt, target, **shared))
    selection = {"select": select, "checkpoint": checkpoints[0][1]} if select is not None else None
    summary = write_summary(out_dir, evaluations, [p.name for p in probes], selection) if multi else None
    return {"output_dir": str(out_dir), "evaluations": evaluations, "summary": summary}


def _evaluate_checkpoint(args: argparse.Namespace, name: str, ckpt: str, target: Path, *, hierarchy: Any,
                         hierarchy_info: dict | None, data: Any, test: Any, data_path: Path, test_path: Path | None,
                         classes: list[str], probes: list[Any], device: str, domain: Any = None) -> dict[str, Any]:
    import torch

    from .crossval import run_probes, stratified_folds
    from .features import extract_features, load_eval_backbone

    target.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    backbone = load_eval_backbone(ckpt, arch=args.arch, device=device, seed=args.seed)
    t_loaded = time.perf_counter()
    extract = extraction_settings(args, device, args.batch_size)
    fs = extract_features(backbone, data.paths, **extract)
    fs_test = extract_features(backbone, test.paths, **extract) if test is not None else None
    t_features = time.perf_counter()

    n_unreadable = fs.n_unreadable + (fs_test.n_unreadable if fs_test is not None else 0)
    unreadable = unreadable_paths(data, fs, test, fs_test)
    if n_unreadable:
        log.warning("%d missing or unreadable image(s) skipped and counted in metrics.json (n_unreadable)",
                    n_unreadable)

    labels = np.asarray(data.labels, dtype=object)
    keep = readable_rows(fs, data, data_path) if test is None else None
    groups = domain.groups[keep] if domain is not None and keep is not None else None
    if test is None and domain is not None and not domain.kfold:  # eval/domains.py: groups held out
        X, y = fs.features[keep], labels[keep].astype(str)
        split, test_rows, fold_of, split_info = domain.split(keep, y)
        sample, paths = keep[test_rows], [data.paths[i] for i in keep[test_rows]]
    elif test is None:
        keep = readable_rows(fs, data, data_path)
        X, y = fs.features[keep], labels[keep].astype(str)
        try:
            split: Any = stratified_folds(y, args.folds, args.seed)
        except EvalDataError as exc:  # only possible when unreadable images thinned a class
            raise EvalDataError(f"after skipping {n_unreadable} missing or unreadable image(s): {exc}") from None
        test_rows = np.arange(len(keep))
        fold_of = np.empty(len(keep), dtype=np.int64)
        for i, (_, te) in enumerate(split):
            fold_of[te] = i
        sample, paths = keep, [data.paths[i] for i in keep]
        split_info = {"kind": "cross_validation", "folds": args.folds, "seed": args.seed}
    else:
        keep_tr, keep_te = readable_rows(fs, data, data_path), readable_rows(fs_test, test, test_path)
        test_labels = np.asarray(test.labels, dtype=object)
        X = np.concatenate([fs.features[keep_tr], fs_test.features[keep_te]])
        y = np.concatenate([labels[keep_tr], test_labels[keep_te]]).astype(str)
        n_tr = len(keep_tr)
        test_rows = np.arange(n_tr, n_tr + len(keep_te))
        split = (np.arange(n_tr, dtype=np.int64), test_rows.astype(np.int64))
        fold_of = np.full(len(keep_te), -1, dtype=np.int64)
        sample, paths = keep_te, [test.paths[i] for i in keep_te]
        split_info = {"kind": "fixed", "n_train": int(n_tr), "n_test": int(len(keep_te))}

    predictions: dict[str, np.ndarray] = {}
    per_fold: dict[str, list[dict]] = {}
    fit_info: dict[str, list[dict]] = {}
    probe_s: dict[str, float] = {}
    threads = probe_threads(getattr(args, "threads", None))
    probe_torch_threads = torch.get_num_threads()
    for probe in probes:  # one probe at a time, so each gets its own wall time
        t0 = time.perf_counter()
        with threads.applied():
            probe_torch_threads = torch.get_num_threads()
            result = run_probes(X, y, classes, [probe], split, hierarchy=hierarchy, groups=groups)
        probe_s[probe.name] = time.perf_counter() - t0
        predictions[probe.name] = np.asarray(result.predictions[probe.name])[test_rows]
        per_fold[probe.name] = result.per_fold[probe.name]
        fit_info[probe.name] = result.fit_info.get(probe.name, [])
        log.info("%s: %s done in %.2f s", name, probe.name, probe_s[probe.name])

    summary = summarize(per_fold)
    y_test = y[test_rows]
    meta = backbone.meta
    crop = int(args.crop_size if args.crop_size is not None else meta["img_size"])
    logreg = next((p for p in probes if p.name == "logreg"), None)
    extra = {
        "checkpoint": checkpoint_record(name, backbone),
        "data": {"path": str(data_path), "test_path": str(test_path) if test_path else None,
                 "label_column": args.label_column, "label_map": args.label_map},
        "n_samples": int(len(sample)),
        "n_images": int(len(data.paths) + (len(test.paths) if test is not None else 0)),
        "n_unreadable": int(n_unreadable),
        "unreadable": unreadable[:MAX_LISTED_UNREADABLE],
        "classes": classes,
        "class_counts": {c: int(n) for c, n in sorted(Counter(y_test.tolist()).items(),
                                                       key=lambda kv: classes.index(kv[0]))},
        "hierarchy": hierarchy_info,
        "split": split_info,
        "per_class": summarize_per_class(per_fold),
        "confusion_matrix": pooled_confusion(per_fold),
        "fit_info": fit_info,
        "settings": {
            "probes": [p.name for p in probes], **_probe_settings(args),
            "logreg_backend_used": getattr(logreg, "backend_", None) if logreg is not None else None,
            "folds": args.folds if test is None else None, "seed": args.seed,
            "feature": "x_norm_clstoken", "crop_size": crop, "resize_mode": args.resize_mode,
            "mean": meta.get("mean"), "std": meta.get("std"), "batch_size": args.batch_size,
            "num_workers": args.num_workers, "threads": getattr(args, "threads", None), "device": device,
            "precision": "bf16" if device == "cuda" else "fp32",
            "feature_cache": str(fs.cache_path) if fs.cache_path else None, "features_from_cache": fs.from_cache,
        },
        "timings": {"load_s": t_loaded - t_start, "features_s": t_features - t_loaded, "probes_s": probe_s,
                    "probe_threads": probe_torch_threads},
        "training": training_status(ckpt, meta.get("iteration")),
    }
    if domain is not None:
        extra["domains"] = domain.report(X, y, groups, split, classes, probes, per_fold, hierarchy=hierarchy)
    write_metrics_json(target, summary, extra)
    write_predictions_csv(target, sample, paths, fold_of, y_test.tolist(), predictions)
    metrics = read_json_object(target / METRICS_FILE)
    if args.report:
        table = PredictionTable(sample, paths, fold_of, y_test, predictions)
        write_report_html(target, metrics, table, features=X[test_rows], hierarchy=hierarchy, seed=args.seed)
    return {"name": name, "checkpoint": ckpt, "output_dir": str(target), "metrics": metrics}
