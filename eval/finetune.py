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
    p.add_argument("--config", default=None, help="YAML file of option defaults (keys = option names with "
                   "underscores, e.g. configs/finetune/fazeli.yaml); options on the command line win")
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
    p.add_argument("--sampling", choices=("none", "class"), default="none",
                   help="class: every class exactly N_c times per epoch (Fazeli et al.'s balanced sampling)")
    p.add_argument("--samples-per-class", type=int, default=0, help="N_c of --sampling class (0 = rows / classes)")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    p.add_argument("--no-flips", action="store_true", help="no random horizontal/vertical flips")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--head-epochs", type=int, default=0, help="partial / full: first train the head alone on the "
                   "frozen backbone for this many epochs (LP-FT), then --epochs of fine-tuning (0 = none)")
    p.add_argument("--head-lr", type=float, default=None, help="learning rate of the head-only epochs (default --lr)")
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


#: Options a --config file may not set: what the run reads and writes, not how it trains.
_INPUTS = ("ckpt", "data", "test_data", "output_dir")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line over the defaults of ``--config`` (when given) over the built-in ones.

    Raises :class:`~dinov2_hier.finetune.FinetuneError` (exit 2) naming the file and key for
    an unreadable file, an unknown key or a value of the wrong type.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    parser.set_defaults(**_config_defaults(parser, args.config))
    return parser.parse_args(argv)


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dinov2_hier.finetune import FinetuneError

    try:
        values = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, OmegaConfBaseException) as exc:
        raise FinetuneError(f"--config {path}: cannot read it ({exc})") from None
    if not isinstance(values, dict):
        raise FinetuneError(f"--config {path}: must be a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    for key, value in values.items():
        if key in _INPUTS:
            raise FinetuneError(f"--config {path}: {key!r} is an input, not a recipe option: give it on the command line")
        action = actions.get(key)
        if action is None:
            raise FinetuneError(f"--config {path}: unknown key {key!r} (keys are option names with underscores)")
        if action.choices is not None and value not in action.choices:
            raise FinetuneError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        if action.type is not None and value is not None:
            try:
                values[key] = action.type(value)
            except (TypeError, ValueError):
                raise FinetuneError(f"--config {path}: {key} must be {action.type.__name__}, got {value!r}") from None
        if action.nargs == 0 and not isinstance(value, bool):
            raise FinetuneError(f"--config {path}: {key} must be true or false, got {value!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    def job() -> None:
        from .finetune_run import finetune

        args = parse_args(argv)
        prepare_output_dir(args.output_dir)
        setup_logging(args.output_dir / "log.txt")
        metrics = finetune(args)
        acc = metrics["probes"][args.name]["accuracy"]
        print(f"{args.name}: accuracy {acc['mean']:.4f} over {acc['n']} fold(s) -> {args.output_dir}")

    return run_cli(job)


if __name__ == "__main__":
    raise SystemExit(main())
