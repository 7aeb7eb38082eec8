"""``python -m eval.finetune``: fine-tune a pretrained backbone on a labelled manifest and
evaluate it on the same folds (or fixed split) and metrics as the frozen probes of
``eval.run`` (issue 22, item 1; docs/finetune.md).

The face lives in ``eval/`` because it needs eval's folds, ``metrics.json`` and
``predictions.csv`` writers; the training itself is :mod:`dinov2_hier.finetune`. Bad input:
one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from dinov2_hier.cli import prepare_output_dir, run_cli, setup_logging

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="backbone: a run's checkpoint or teacher file, an export, "
                   "a DINOv2 / DinoBloom weights file (with --arch), or 'none' (untrained --arch)")
    p.add_argument("--arch", default=None, help="architecture for foreign weights or --ckpt none")
    p.add_argument("--data", required=True, help="labelled manifest CSV or ImageFolder")
    p.add_argument("--test-data", default=None, help="fixed test split (else --folds cross-validation)")
    p.add_argument("--hierarchy", default=None, help="hierarchy JSON: labels as nodes, hierarchical metrics, hierce")
    p.add_argument("--label-map", default=None)
    p.add_argument("--label-column", default="label")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("linear", "partial", "full"), default="linear")
    p.add_argument("--blocks", type=int, default=0, help="trainable last blocks for --mode partial")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise LR decay in (0, 1] (1 = none)")
    p.add_argument("--loss", choices=("ce", "hierce"), default="ce")
    p.add_argument("--class-weights", choices=("none", "balanced"), default="none")
    p.add_argument("--sampling", choices=("none", "class"), default="none")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--no-flips", action="store_true", help="no random horizontal/vertical flips")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--crop-size", type=int, default=None)
    p.add_argument("--resize-mode", choices=("pad", "center_crop"), default="pad")
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default="finetune", help="the predictions.csv column (default finetune)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        from .finetune_run import finetune

        prepare_output_dir(args.output_dir)
        setup_logging(args.output_dir / "log.txt")
        metrics = finetune(args)
        acc = metrics["probes"][args.name]["accuracy"]
        print(f"{args.name}: accuracy {acc['mean']:.4f} over {acc['n']} fold(s) -> {args.output_dir}")

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
