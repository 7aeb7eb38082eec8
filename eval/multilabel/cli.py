"""The face of ``python -m eval.multilabel``: its arguments, its printed table, :func:`main`."""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..cli_common import run_evaluation
from ..values import format_mean_std
from .runner import ABLATION_VARIANTS, HEAD_FILE, evaluate_multilabel

__all__ = ["build_parser", "main"]


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
    """The printed table: a few metrics x variants, mean ± std."""
    from dinov2_hier.metrics import metric_label

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
    """Parse ``argv`` and run :func:`eval.multilabel.runner.evaluate_multilabel`; the exit code."""
    return run_evaluation(build_parser().parse_args(argv), evaluate_multilabel, _format)
