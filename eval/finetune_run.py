"""The fine-tuning pipeline behind ``python -m eval.finetune``: data and folds as
``eval/`` makes them, a fresh copy of the backbone trained per fold
(:mod:`dinov2_hier.finetune`), the fold's test rows predicted, then ``metrics.json`` and
``predictions.csv`` in :mod:`eval.pipeline`'s formats, so that ``python -m eval.compare``
pairs a fine-tuned model with a frozen probe evaluated on the same manifest.

Output layout of ``--output-dir DIR``::

    DIR/metrics.json, DIR/predictions.csv, DIR/log.txt
    DIR/folds/fold_F/epoch_EEEE.pt   # the fold's last epoch checkpoint (model + optimizer)
    DIR/folds/fold_F/done.json       # the fold's test predictions: the fold is finished

Rerunning the same command resumes: finished folds are read back, an unfinished one goes
on from its last epoch checkpoint (see :mod:`dinov2_hier.finetune.loop`).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinov2_hier.data import EvalTransform
from dinov2_hier.finetune import (
    FinetuneConfig,
    FinetuneError,
    FinetuneLoss,
    FinetuneModel,
    flat_hierarchy,
    leaf_class_weights,
    predict,
    train_fold,
)
from dinov2_hier.io import atomic_write_text, file_sha256
from dinov2_hier.metrics import all_metrics

from .crossval import EvalDataError, stratified_folds
from .features import load_eval_backbone
from .pipeline import MAX_LISTED_UNREADABLE, _class_list, checkpoint_record, load_inputs, resolve_device
from .report import summarize, summarize_per_class, pooled_confusion, write_metrics_json, write_predictions_csv

__all__ = ["config_of", "finetune"]

log = logging.getLogger("dinov2_hier.eval.finetune")
DONE_FILE = "done.json"
RUN_FILE = "finetune_run.json"
#: Flags that do not change a fine-tuning run's result (where it runs, how it is named).
_VOLATILE = ("output_dir", "device", "name", "config")  # config: its values are the other keys


def _claim_output_dir(out_dir: Path, args: argparse.Namespace, inputs: dict[str, Any]) -> None:
    """Record what this run is in ``out_dir/finetune_run.json``; refuse (:class:`FinetuneError`)
    a directory that holds another run's folds, so a rerun resumes only the same run."""
    key = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in _VOLATILE}
    key.update(inputs)  # what the flags name: the backbone's and the manifests' contents
    path = out_dir / RUN_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(key) if before.get(k) != key.get(k))
        if changed:
            raise FinetuneError(f"{out_dir} holds another fine-tuning run (differs in {', '.join(changed)}); "
                                "rerun its command to resume it, or choose another --output-dir")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(key, indent=1, sort_keys=True))


def config_of(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of the command line, checked."""
    if args.mode == "partial" and args.blocks < 1:
        raise FinetuneError("--mode partial needs --blocks N >= 1 (the last N blocks train)")
    if args.mode != "partial" and args.blocks:
        raise FinetuneError("--blocks applies to --mode partial only")
    config = FinetuneConfig(mode=args.mode, blocks=args.blocks, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                            layer_decay=args.layer_decay, warmup_epochs=args.warmup_epochs, sampling=args.sampling,
                            mixup=args.mixup, flips=not args.no_flips, seed=args.seed,
                            samples_per_class=args.samples_per_class, head_epochs=args.head_epochs,
                            head_lr=args.head_lr)
    config.check()
    if args.mixup > 0 and args.loss != "ce":
        raise FinetuneError("--mixup needs --loss ce (soft targets)")
    if args.loss == "hierce" and not args.hierarchy:
        raise FinetuneError("--loss hierce needs --hierarchy")
    return config


def _load_images(paths: list[str], transform: EvalTransform) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """uint8 ``[N, 3, S, S]``, boxes ``[N, 4]`` and ``ok`` bool ``[N]`` of every image; an
    image that cannot be read is zeros with ``ok`` false (skipped and counted by the caller)."""
    images, boxes, ok = [], [], np.ones(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                u8, box = transform.resize(image)
        except OSError as exc:
            log.debug("cannot read image %s: %s", path, exc)
            ok[i] = False
            u8, box = torch.zeros(3, transform.crop_size, transform.crop_size, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
        images.append(u8)
        boxes.append(box)
    return torch.stack(images), torch.stack(boxes), ok


def _readable(ok: np.ndarray, source: Any) -> np.ndarray:
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        raise FinetuneError(f"{source}: none of the {len(ok)} images could be read")
    return keep


def finetune(args: argparse.Namespace, on_epoch_end: Any = None) -> dict[str, Any]:
    """Run the command ``args`` describes; return the metrics.json content.

    ``on_epoch_end(fold, epoch)``: called after each epoch checkpoint (tests stop a run there).
    """
    config = config_of(args)
    device = resolve_device(args.device)
    hierarchy, hierarchy_info, data_path, test_path, data, test = load_inputs(args)
    all_labels = np.asarray(list(data.labels) + (list(test.labels) if test else []), dtype=object).astype(str)
    paths = list(data.paths) + (list(test.paths) if test else [])
    n_data = len(data.paths)

    t0 = time.perf_counter()
    backbone = load_eval_backbone(args.ckpt, arch=args.arch, device="cpu", seed=args.seed)
    meta = backbone.meta
    crop = int(args.crop_size if args.crop_size is not None else meta["img_size"])
    transform = EvalTransform(crop, args.resize_mode, meta["mean"], meta["std"])
    normalize = transform.to(device).normalize
    images, boxes, ok = _load_images(paths, transform)
    unreadable = [p for p, good in zip(paths, ok) if not good]
    if unreadable:
        log.warning("%d missing or unreadable image(s) skipped and counted in metrics.json (n_unreadable)",
                    len(unreadable))
    keep = _readable(ok[:n_data], data_path)  # manifest rows of the readable images
    keep_test = n_data + _readable(ok[n_data:], test_path) if test else None
    labels = all_labels  # indexed by manifest row (data rows, then test rows)
    used = keep if keep_test is None else np.concatenate([keep, keep_test])
    classes = _class_list(labels[used].tolist(), hierarchy)
    if test is None:
        try:
            folds = stratified_folds(labels[keep].tolist(), args.folds, args.seed)
        except EvalDataError as exc:  # only possible when unreadable images thinned a class
            raise FinetuneError(f"after skipping {len(unreadable)} unreadable image(s): {exc}") from None
        splits = [(i, keep[tr], keep[te]) for i, (tr, te) in enumerate(folds)]
        split_info = {"kind": "cross_validation", "folds": args.folds, "seed": args.seed}
    else:
        splits = [(-1, keep, keep_test)]
        split_info = {"kind": "fixed", "n_train": int(len(keep)), "n_test": int(len(keep_test))}
    # ce classifies the labels as they are, each a class of its own (as eval's probes do), so
    # a coarse label such as `neutrophil` is a class the head can predict; hierce needs the
    # tree (and predicts leaves). --hierarchy then serves the hierarchical metrics only.
    tree = hierarchy if hierarchy is not None and args.loss == "hierce" else flat_hierarchy(classes)
    targets = torch.tensor([tree.index(label) if label in tree else -1 for label in labels], dtype=torch.long)
    allowed = torch.tensor([leaf in set(classes) for leaf in tree.leaves])
    out_dir = Path(args.output_dir)
    manifests = {f"{name}_sha256": file_sha256(p) for name, p in (("data", data_path), ("test_data", test_path))
                 if p is not None and Path(p).is_file()}
    _claim_output_dir(out_dir, args, {"backbone_sha256": backbone.fingerprint, **manifests})
    predicted = np.full(len(paths), "", dtype=object)
    fold_of = np.full(len(paths), -2, dtype=np.int64)
    per_fold, fit_info = [], []
    for fold, train, test_rows in splits:
        fold_dir = out_dir / "folds" / f"fold_{max(fold, 0)}"
        done = fold_dir / DONE_FILE
        if done.is_file():
            record = json.loads(done.read_text(encoding="utf-8"))
            pred = np.asarray(record["predictions"], dtype=object)
            info = record["info"]
            log.info("fold %d: finished before, read back", fold)
        else:
            fold_dir.mkdir(parents=True, exist_ok=True)
            weights = leaf_class_weights(tree, labels[train].tolist()) if args.class_weights == "balanced" else None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed * 1000 + fold + 1)  # the head's initialisation
                loss = FinetuneLoss(args.loss, tree, backbone.embed_dim, class_weights=weights)
            model = FinetuneModel(copy.deepcopy(backbone.model), loss.head, config.mode, config.blocks)
            t_fold = time.perf_counter()
            info = train_fold(model, loss, images[train], boxes[train], targets[train], normalize, config,
                              fold=fold, ckpt_dir=fold_dir, on_epoch_end=on_epoch_end, device=device)
            if info["n_coarse_left_out"]:
                log.info("fold %d: %d training image(s) with coarse labels left out (--loss ce gives them no gradient)",
                         fold, info["n_coarse_left_out"])
            leaf = predict(model, images[test_rows], boxes[test_rows], normalize, allowed, args.batch_size, device)
            pred = np.asarray([tree.leaves[i] for i in leaf.tolist()], dtype=object)
            info.update({"fold": int(fold), "n_train": int(len(train)), "n_test": int(len(test_rows)),
                         "fit_s": time.perf_counter() - t_fold})
            atomic_write_text(done, json.dumps({"predictions": pred.tolist(), "info": info}))
        predicted[test_rows] = pred
        fold_of[test_rows] = fold
        fit_info.append(info)
        per_fold.append(all_metrics(labels[test_rows].tolist(), pred.tolist(), classes, hierarchy=hierarchy))
        log.info("fold %d: accuracy %.4f", fold, per_fold[-1]["accuracy"])

    tested = np.flatnonzero(fold_of != -2)
    name = args.name
    by_name = {name: per_fold}
    sample = tested if test is None else tested - n_data
    extra = {
        "checkpoint": checkpoint_record(str(args.ckpt), backbone),
        "data": {"path": str(data_path), "test_path": str(test_path) if test_path else None,
                 "label_column": args.label_column, "label_map": args.label_map},
        "n_samples": int(len(tested)), "n_images": len(paths), "n_unreadable": len(unreadable),
        "unreadable": unreadable[:MAX_LISTED_UNREADABLE],
        "classes": classes, "hierarchy": hierarchy_info, "split": split_info,
        "per_class": summarize_per_class(by_name), "confusion_matrix": pooled_confusion(by_name),
        "fit_info": {name: fit_info},
        "settings": {"probes": [name], "finetune": {**config.__dict__, "loss": args.loss,
                                                   "class_weights": args.class_weights},
                     "folds": args.folds if test is None else None, "seed": args.seed, "crop_size": crop,
                     "resize_mode": args.resize_mode, "mean": meta.get("mean"), "std": meta.get("std"),
                     "device": device},
        "timings": {"total_s": time.perf_counter() - t0},
    }
    write_metrics_json(out_dir, summarize(by_name), extra)
    write_predictions_csv(out_dir, sample, [paths[i] for i in tested], fold_of[tested],
                          labels[tested].tolist(), {name: predicted[tested].astype(str)})
    return json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
