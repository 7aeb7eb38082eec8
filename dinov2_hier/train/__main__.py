"""``python -m dinov2_hier.train --config FILE --output-dir DIR [key=value ...]``

Runs as one process, or as one of several under ``torchrun --nproc_per_node=N`` or
``srun`` (one task per GPU): the process group is created from the launcher's variables
before anything else and destroyed on the way out (docs/distributed.md). Only rank 0
writes log.txt, metrics, checkpoints and the teacher file; the other ranks log warnings
to stderr. SIGUSR1, SIGUSR2 and SIGTERM make the run checkpoint after the current
iteration and exit 0 (dinov2_hier.run.signals; docs/slurm.md).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..cli import prepare_output_dir, run_cli, setup_logging
from ..config import load_config
from ..distributed import destroy_distributed, init_distributed, settle_before_destroy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2_hier.train",
        description="DINOv2 pretraining (two global crops) with optional hierarchical supervision.",
    )
    parser.add_argument("--config", type=Path, default=None, help="override yaml merged on configs/default.yaml")
    parser.add_argument("--output-dir", type=Path, required=True, help="run directory (config, logs, checkpoints)")
    parser.add_argument(
        "--no-resume", dest="resume", action="store_false",
        help="start over even if OUTPUT_DIR holds checkpoints; the previous run's files move to "
             "OUTPUT_DIR/replaced_<time>/ (default: resume from the newest)",
    )
    parser.add_argument(
        "--stop-at", type=int, default=None,
        help="checkpoint and exit after this iteration (the schedules still follow train.iterations)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.iterations=100")
    return parser.parse_intermixed_args(argv)  # overrides may sit between options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job() -> None:
        from ..run.signals import stop_on_signals

        info = init_distributed()
        try:
            # A bad config, a missing optional package or an unwritable directory stops
            # here, before anything is created.
            cfg = load_config(args.config, args.overrides)
            from .loss_plan import check_loss_plan

            check_loss_plan(cfg)  # a config that trains nothing exits 2 here
            if cfg.train.tensorboard:
                from .tensorboard import require_summary_writer

                require_summary_writer()
            from .loop import Trainer  # heavy imports after the checks

            prepare_output_dir(args.output_dir)
            if info.is_main:
                setup_logging(args.output_dir / "log.txt")
            else:
                setup_logging(None, level=logging.WARNING)
            if info.world_size > 1:
                logging.getLogger("dinov2_hier.train").info(
                    "distributed: %d ranks via %s, backend %s", info.world_size, info.launcher, info.backend
                )
            trainer = Trainer(cfg, args.output_dir, resume=args.resume)
            # SIGUSR1/SIGUSR2/SIGTERM (SLURM time limit, preemption) only set a flag; the loop
            # checkpoints after the current iteration, agreed over the ranks, and returns (exit 0).
            with stop_on_signals() as stop:
                state = trainer.run(stop_at=args.stop_at, should_stop=stop)
            log = logging.getLogger("dinov2_hier.train")
            if state.interrupted:
                log.info("stopped by signal at iteration %d; rerun the same command to resume: %s",
                         state.iteration, args.output_dir)
            else:
                log.info("done: %s", args.output_dir)
            del trainer  # its DDP / FSDP wrappers go before the process group does
            settle_before_destroy()
        finally:
            destroy_distributed()

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
