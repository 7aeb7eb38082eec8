"""``python -m bench.loader --config FILE --workers K [--batches N] [key=value ...]``

Images/s that the training data pipeline delivers: decode + two global crops +
augmentations + block masks + collate, through the same DataLoader the training loop
builds (``dinov2_hier.train.data``), from the files named by ``data.train`` (real JPEGs,
or the synthetic generator). Compare with ``bench.train_step`` to see whether the GPU or
the CPUs limit training. The result's ``photometric`` field says what the workers did:
``loader`` = everything above; ``device`` (``crops.photometric=device``) = decode and
geometry only, delivering uint8 crops whose photometric ops the training step applies.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.report import emit
from dinov2_hier.cli import run_cli
from dinov2_hier.config import load_config
from dinov2_hier.train.data import build_train_data, build_train_loader


def measure_loader(cfg, workers: int, batches: int, warmup: int) -> dict:
    """Time ``batches`` batches after ``warmup`` batches (worker start-up excluded)."""
    cfg.data.num_workers = workers
    data = build_train_data(cfg)
    loader = build_train_loader(data, cfg, consumed=0, rank=0, world_size=1, device=torch.device("cpu"))
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    images = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        images += batch["global_crops"].shape[0] // 2
    elapsed = time.perf_counter() - t0
    return {
        "workers": loader.num_workers, "batch_size": cfg.train.batch_size_per_gpu, "batches": batches,
        "crop": cfg.crops.global_crops_size, "images": images, "seconds": elapsed,
        "images_per_s": images / elapsed, "source": data.description,
        "photometric": str(cfg.crops.photometric), "reduced_decode": bool(cfg.crops.reduced_decode),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides may sit between options

    def run() -> None:
        cfg = load_config(args.config, args.overrides)
        emit(measure_loader(cfg, args.workers, args.batches, args.warmup), args.json)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
