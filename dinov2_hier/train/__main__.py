"""``python -m dinov2_hier.train --config FILE --output-dir DIR [key=value ...]``"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..cli import run_cli, setup_logging
from ..config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2_hier.train",
        description="DINOv2 pretraining (two global crops) with optional hierarchical supervision.",
    )
    parser.add_argument("--config", type=Path, default=None, help="override yaml merged on configs/default.yaml")
    parser.add_argument("--output-dir", type=Path, required=True, help="run directory (config, logs, checkpoints)")
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false",
        help="start over even if OUTPUT_DIR holds checkpoints (default: resume from the newest)",
    )
    parser.add_argument(
        "--stop-at", type=int, default=None,
        help="checkpoint and exit after this iteration (the schedules still follow train.iterations)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.iterations=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job() -> None:
        from .loop import Trainer  # heavy imports after argument parsing

        args.output_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(args.output_dir / "log.txt")
        cfg = load_config(args.config, args.overrides)
        Trainer(cfg, args.output_dir, resume=args.resume).run(stop_at=args.stop_at)
        logging.getLogger("dinov2_hier.train").info("done: %s", args.output_dir)

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
