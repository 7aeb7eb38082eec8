"""The command line of the evaluation faces (``eval.linear``, ``eval.knn``, ``eval.run``).

* :func:`build_parser` defines the arguments every face shares plus those of its probes.
* :func:`eval.pipeline.evaluate` is the whole pipeline, importable and free of printing
  (re-exported here, with the other names this module always had).
* :func:`format_results` prints its record as plain-text tables.
* :func:`run_face` parses, sets up logging and runs :func:`evaluate` under
  :func:`dinov2_hier.cli.run_cli`, so bad input is one ``error: ...`` line and exit code 2.

Output layout of ``--output-dir DIR``: see :mod:`eval.pipeline` and docs/evaluation.md.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinov2_hier.cli import prepare_output_dir, run_cli, setup_logging

from .pipeline import (  # noqa: F401  (re-exported: the names of this module before eval.pipeline)
    MAX_LISTED_UNREADABLE,
    SELECTION_METRIC,
    SELECTION_PROBE,
    SUMMARY_FILE,
    EvalUsageError,
    build_probes,
    default_cache_dir,
    evaluate,
    feature_cache_dir,
    probe_threads,
    resolve_device,
)
from .values import format_mean_std

__all__ = [
    "SUMMARY_FILE",
    "EvalUsageError",
    "add_backbone_args",
    "add_extraction_args",
    "build_parser",
    "build_probes",
    "default_cache_dir",
    "feature_cache_dir",
    "evaluate",
    "format_results",
    "resolve_device",
    "run_face",
]


# --------------------------------------------------------------------------- arguments


def add_backbone_args(g: Any, directory: str = "every checkpoint, in iteration order") -> None:
    """``--ckpt``, ``--select``, ``--arch`` (shared with ``eval.extract``); ``directory`` says
    what a training output directory stands for."""
    g.add_argument("--ckpt", required=True,
                   help="training checkpoint (checkpoints/ckpt_*.pt), teacher_backbone.pt, an export of "
                        "dinov2_hier.export (its folder, config.json or weights file), DINOv2/DinoBloom "
                        f"weights (with --arch), a training output directory ({directory}), "
                        "'none' (untrained --arch baseline) or 'baseline:colour' (colour histogram + "
                        "16x16 grey pixels: the floor a pretrained model must clear)")
    g.add_argument("--select", choices=("val_loss",), default=None,
                   help="with --ckpt <training output directory>: use only the checkpoint with the lowest "
                        "validation loss (val_total in its metrics.jsonl; training with data.val_fraction or "
                        "data.val and train.val_every)")
    g.add_argument("--arch", default=None,
                   help="backbone architecture (vit_tiny|vit_small|vit_base|vit_large|vit_giant2); required for "
                        "--ckpt none and foreign weights, checked against a dinov2_hier checkpoint otherwise")


def add_extraction_args(g: Any) -> None:
    """How images become features (shared with ``eval.extract``): ``--crop-size``,
    ``--resize-mode``, ``--batch-size``, ``--num-workers``, ``--device``, ``--threads``,
    ``--no-progress``."""
    g.add_argument("--crop-size", type=int, default=None,
                   help="input size in px (default: the checkpoint's training crop size; 224 for --ckpt none)")
    g.add_argument("--resize-mode", choices=("pad", "center_crop"), default="pad",
                   help="keep the aspect ratio by padding to a square (default) or by centre-cropping")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    g.add_argument("--num-workers", type=int, default=4,
                   help="image loading processes (default 4, at most the CPU cores less one; 0 = in-process)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = CUDA when available (bf16 features), else CPU (fp32)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (and of BLAS in the probes) in every phase; default: the idle "
                        "cores when the phase starts less its loader workers and one spare core (1 on a busy or "
                        "a 2-core machine), or what OMP_NUM_THREADS / MKL_NUM_THREADS set (docs/evaluation.md)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data")
    add_backbone_args(g)
    g.add_argument("--data", required=True, help="labelled manifest CSV (path,label[,dataset]) or ImageFolder")
    g.add_argument("--test-data", default=None,
                   help="fixed test set (manifest or ImageFolder): train on --data, test here, no cross-validation")
    g.add_argument("--hierarchy", default=None,
                   help="hierarchy JSON (e.g. hierarchies/wbc.json): labels become node ids and the hierarchical "
                        "metrics are computed")
    g.add_argument("--label-map", default=None,
                   help="label map JSON (or a dataset name under hierarchies/label_maps) applied to every row; "
                        "default: each row's 'dataset' column picks its map")
    g.add_argument("--label-column", default="label", help="manifest column holding the labels (default: label)")
    g = parser.add_argument_group("evaluation protocol")
    g.add_argument("--folds", type=int, default=5, help="stratified cross-validation folds (default 5)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the folds, the inner C search, the untrained baseline and the UMAP (default 0)")
    g.add_argument("--group-column", default="dataset",
                   help="manifest column naming each row's group (domain) for --split and --classes shared "
                        "(default: dataset)")
    g.add_argument("--split", default="kfold", metavar="{kfold,group-kfold,leave-one-group-out,holdout=GROUP}",
                   help="kfold (default): stratified --folds CV over all rows; group-kfold: stratified --folds "
                        "CV in which no group is on both sides of a fold (e.g. patients, slides, regions); "
                        "leave-one-group-out: each group held out in turn, probes trained on the other groups; "
                        "holdout=GROUP: trained on the other groups, tested on GROUP only "
                        "(docs/domain-generalisation.md)")
    g.add_argument("--classes", choices=("all", "shared"), default="all",
                   help="all (default): every label as resolved; shared: compare at the label precision all "
                        "groups share (each label -> its ancestor among the classes every group has; rows of "
                        "classes in fewer groups are dropped and counted)")
    g = parser.add_argument_group("feature extraction")
    add_extraction_args(g)
    g.add_argument("--cache-dir", type=Path, default=None,
                   help=f"feature cache folder (default {default_cache_dir()}; $DINOV2_HIER_CACHE overrides)")
    g.add_argument("--no-cache", dest="cache", action="store_false", help="neither read nor write cached features")
    g = parser.add_argument_group("outputs")
    g.add_argument("--output-dir", type=Path, required=True,
                   help="writes metrics.json, predictions.csv, report.html and log.txt here")
    g.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")


def _add_linear(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logistic regression")
    g.add_argument("--C", dest="C", type=float, default=None,
                   help="fixed inverse L2 strength (scikit-learn's C); default: chosen per fold by inner "
                        "3-fold CV on balanced accuracy over --C-grid")
    g.add_argument("--C-grid", dest="C_grid", type=float, nargs="+", default=None,
                   help="candidate C values (default 1e-4 1e-3 ... 1e2)")
    g.add_argument("--backend", choices=("auto", "sklearn", "torch"), default="auto",
                   help="auto = the batched torch L-BFGS (on --device) from 1,000 training samples, "
                        "scikit-learn below")
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (default 1000)")


def _add_knn(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("k-nearest neighbours")
    g.add_argument("--k", type=int, nargs="+", default=[1, 20], help="neighbour counts (default: 1 20)")
    g.add_argument("--metric", dest="knn_metric", choices=("cosine", "euclidean"), default="cosine",
                   help="cosine on L2-normalised features (default) or Euclidean distance")


def build_parser(prog: str, description: str, families: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of a face running the probe ``families`` (``"logreg"`` and/or ``"knn"``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _add_common(parser)
    if "logreg" in families:
        _add_linear(parser)
    if "knn" in families:
        _add_knn(parser)
    from .probes.options import add_extra_probe_args  # --extra-probes svm wknn (issue 22)

    add_extra_probe_args(parser)
    parser.set_defaults(families=tuple(families))
    return parser


# --------------------------------------------------------------------------- printing and the faces


def format_results(result: dict[str, Any]) -> str:
    """A plain-text table per evaluated checkpoint (metrics x probes, mean ± std)."""
    from dinov2_hier.metrics import metric_label

    lines: list[str] = []
    for ev in result["evaluations"]:
        m = ev["metrics"]
        probes = m["probes"]
        names = list(probes)
        metrics: list[str] = []
        for p in names:
            metrics.extend(k for k in probes[p] if k not in metrics)
        split = m.get("split", {})
        how = (f"{split.get('folds')}-fold CV" if split.get("kind") == "cross_validation"
               else f"{split.get('kind')} over '{split.get('group_column')}' ({', '.join(split.get('groups', []))})"
               if "groups" in split else f"fixed split ({split.get('n_train')} train / {split.get('n_test')} test)")
        lines.append(f"{ev['name']}: {m['n_samples']} samples, {len(m['classes'])} classes, {how}, "
                     f"{m['n_unreadable']} unreadable -> {ev['output_dir']}")
        width = max([len(metric_label(x)) for x in metrics] + [6])
        lines.append(" ".join([f"{'metric':<{width}}", *(f"{p:>17}" for p in names)]))
        for metric in metrics:
            lines.append(" ".join([f"{metric_label(metric):<{width}}",
                                   *(f"{format_mean_std(probes[p].get(metric)):>17}" for p in names)]))
        lines.extend(format_domains(m.get("domains")))
        lines.append("")
    summary = result.get("summary")
    if summary:
        c = summary["criterion"]
        lines.append(f"best checkpoint by {c['probe']} {c['metric']} ({c['statistic']}): {summary['best']} "
                     f"({summary['best_score']:.4f})" if summary["best_score"] is not None else "no best checkpoint")
    return "\n".join(lines).rstrip() + "\n"


def format_domains(domains: dict[str, Any] | None) -> list[str]:
    """Lines per held-out group and probe: out-of-domain, in-domain and gap of the headline metrics."""
    if not domains or not domains.get("held_out"):
        return []
    heads = domains["headline_metrics"]
    lines = ["held out  probe       " + "  ".join(f"{h + ' out/in/gap':>30}" for h in heads)]
    for group, entry in domains["held_out"].items():
        for probe, r in entry["probes"].items():
            cells = [" / ".join(f"{v:+.3f}" if k == "gap" and v is not None else (f"{v:.3f}" if v is not None else "n/a")
                                for k, v in (("out", r["out_of_domain"].get(h)), ("in", r["in_domain"].get(h)),
                                             ("gap", r["gap"].get(h)))) for h in heads]
            lines.append(f"{group:<9} {probe:<11} " + "  ".join(f"{c:>30}" for c in cells))
        if entry["classes_absent_from_training"]:
            lines.append(f"{group:<9} classes absent from training (counted as errors): "
                         + ", ".join(f"{c} ({n})" for c, n in entry["classes_absent_from_training"].items()))
    return lines


def run_evaluation(args: argparse.Namespace, run, fmt) -> int:
    """Create ``args.output_dir``, log to stderr and ``OUTPUT_DIR/log.txt``, print
    ``fmt(run(args))``; exit codes from :func:`dinov2_hier.cli.run_cli` (2 = user error)."""

    def job() -> None:
        prepare_output_dir(args.output_dir)
        setup_logging(args.output_dir / "log.txt")
        print(fmt(run(args)), end="")

    return run_cli(job)


def run_face(argv: Sequence[str] | None, prog: str, description: str, families: Sequence[str]) -> int:
    """Parse ``argv`` and run :func:`evaluate` through :func:`run_evaluation`."""
    return run_evaluation(build_parser(prog, description, families).parse_args(argv), evaluate, format_results)
