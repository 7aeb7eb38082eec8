"""``python -m bench.train_step --config FILE [key=value ...] --steps N --warmup W``

Times the real training step (``dinov2_hier.train.step.train_step``: forward of student
and teacher, DINO/iBOT/KoLeo and supervised losses, backward, clipping, AdamW, EMA) on
synthetic tensors already on the device, so the data loader is out of the picture. With
``crops.photometric=device`` the tensors are uint8 crops and the timed step includes the
photometric augmentations (jitter, grey, blur, solarize, normalise) on the device, as in
training; the result's ``photometric`` field says which mode was measured.
The steps run back to back as in training (each step's report is read after the next
one is queued; no synchronisation between steps). Prints images/s over the ``--steps``
timed steps (``seconds``: their wall time), step time (median, min, max; intervals of
CUDA events on the GPU), the host synchronisations inside one step, peak GPU memory and
MFU: the FLOPs of one step counted with ``torch.utils.flop_counter`` (matmuls,
convolutions and attention of forward and backward, student and teacher) times the steps
per second, divided by the device's dense bf16 peak (``--peak-tflops``; 989 for
H100/H200, a nominal 1.0 on CPU, labelled).
``--compare-eager-fp32`` times the same step again with ``compute.dtype=fp32`` and
``compute.compile=none`` and reports the speed-up as a ratio.

Under ``torchrun --nproc_per_node=N -m bench.train_step ...`` every rank times the same
step wrapped as training wraps it (``compute.parallel``: DDP or FSDP2) on its own random
batch of ``train.batch_size_per_gpu`` images; rank 0 prints per-rank and total images/s
(the sum over ranks) and the peak memory of each rank.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.report import emit
from bench.timeline import summarize
from dinov2_hier import distributed
from dinov2_hier.cli import run_cli
from dinov2_hier.config import load_config
from dinov2_hier.data import GlobalCropsCollator, photometric_params
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import resolve_resource
from dinov2_hier.train.batch import batch_to_device
from dinov2_hier.train.data import build_augmentation, patch_grid
from dinov2_hier.train.parts import StepParts, build_step_parts, resolve_step_compute
from dinov2_hier.train.step import train_step


def _random_crops(augmentation, gen: torch.Generator, size: int, params: list, key: str, params_key: str) -> dict:
    """``len(params)`` random crops of side ``size`` under ``key``: normalised floats, or with
    ``crops.photometric=device`` uint8 pixels plus ``params``' rows under ``params_key``."""
    if augmentation.photometric == "device":
        crops = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen) for _ in params]
        return {key: crops, params_key: photometric_params(params)}
    return {key: [torch.randn(3, size, size, generator=gen) for _ in params]}


def _synthetic_item(cfg, augmentation, gen: torch.Generator, draw_id: int) -> dict:
    """Random crops as a loader worker would send them: normalised floats, or with
    ``crops.photometric=device`` uint8 pixels plus parameters drawn as the augmentation draws
    them; local crops too with ``crops.local_crops_number`` > 0."""
    s = cfg.crops.global_crops_size
    item = {"label": None, "dataset": None, "path": "", "draw_id": draw_id}
    item.update(_random_crops(augmentation, gen, s, augmentation.sample_params(s, s, draw_id),
                              "global_crops", "photometric"))
    if augmentation.local_crops_number:
        item.update(_random_crops(augmentation, gen, augmentation.local_crops_size,
                                  augmentation.sample_local_params(s, s, draw_id), "local_crops", "local_photometric"))
    return item


def synthetic_batch(cfg, device: torch.device, n_leaves: int = 0, rank: int = 0) -> dict:
    """A collated batch of random crops with real iBOT masks, on ``device`` (each rank its own).

    With ``crops.photometric=device`` the crops are uint8 and ``photometric`` holds their
    parameters on the CPU, as the loader delivers them; pass the batch through
    :func:`~dinov2_hier.train.batch.batch_to_device` inside the timed step so the cost of
    the photometric ops on the device is measured (on a batch already on the device the
    function only applies them).
    """
    b, s = cfg.train.batch_size_per_gpu, cfg.crops.global_crops_size
    augmentation = build_augmentation(cfg)
    collator = GlobalCropsCollator(
        patch_grid(cfg), tuple(cfg.ibot.mask_ratio_min_max), cfg.ibot.mask_sample_probability,
        seed=cfg.seed, crop_size=s,
        local_crops_number=augmentation.local_crops_number, local_crops_size=augmentation.local_crops_size,
    )
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    batch = collator([_synthetic_item(cfg, augmentation, gen, rank * b + i) for i in range(b)])
    for key in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight"):
        if key in batch:
            batch[key] = batch[key].to(device)
    # Supervised terms see a random leaf per image (leaves come first in node-index order).
    batch["targets"] = torch.randint(0, n_leaves, (b,), generator=gen).to(device) if n_leaves else torch.full(
        (b,), -1, dtype=torch.long, device=device
    )
    # Terms that use domains (boda) see a random domain of supervision.domains per image.
    domains = cfg.supervision.get("domains")
    if domains:
        batch["domains"] = torch.randint(0, len(domains), (b,), generator=gen).to(device)
    return batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the device (default: 989 for H100/H200, nominal 1.0 on CPU)")
    parser.add_argument("--compare-eager-fp32", action="store_true",
                        help="also time the plain eager fp32 path of the same step and report the ratio")
    parser.add_argument("--profile", type=Path, default=None,
                        help="after timing, profile 3 steps with torch.profiler and write the op table here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides may sit between options
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    info = distributed.init_distributed()
    try:
        result = _measure(args, info, args.overrides)
        if args.compare_eager_fp32:
            eager = _measure(args, info, [*args.overrides, "compute.dtype=fp32", "compute.compile=none"])
            result["eager_fp32"] = {k: eager[k] for k in ("images_per_s", "step_s_median", "peak_mem_gib", "mfu")}
            result["speedup_vs_eager_fp32"] = result["images_per_s"] / eager["images_per_s"]
        distributed.settle_before_destroy()  # the measured engines are gone with _measure
    finally:
        distributed.destroy_distributed()
    if info.is_main:
        emit(result, args.json)


PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Dense bf16 tensor-core peak in TFLOP/s (NVIDIA's data sheets: half the "with sparsity"
#: figure) by a substring of the device name, first match wins: the PCIe and NVL boards
#: run at lower clocks and power than the SXM modules ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
)
NOMINAL_CPU_TFLOPS = 1.0


def peak_tflops(device: torch.device, override: float | None) -> tuple[float, str]:
    """The MFU denominator and where it came from."""
    if override is not None:
        return override, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS:
            if key in name:
                return value, f"{key} dense bf16"
        return float("nan"), f"unknown device {name}: pass --peak-tflops"
    return NOMINAL_CPU_TFLOPS, "nominal CPU value"


def count_step_flops(step) -> int:
    """FLOPs of one call of ``step()`` (forward and backward), counted by PyTorch."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def profile_table(step, device: torch.device, steps: int = 3, rows: int = 30) -> str:
    """torch.profiler op tables of ``steps`` calls of ``step()``: sorted by self device time
    (what the GPU spends its time on) and, on a GPU, also by total CPU time (what keeps the
    host busy; a step whose CPU time exceeds its device time is bound by kernel launches),
    headed on a GPU by the device's busy and idle time and its kernels by kind
    (:mod:`bench.timeline`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    if device.type != "cuda":
        return averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    try:
        by_device = averages.table(sort_by="self_device_time_total", row_limit=rows)
    except (AttributeError, KeyError, ValueError):  # older torch names it self_cuda_time_total
        by_device = averages.table(sort_by="self_cuda_time_total", row_limit=rows)
    by_cpu = averages.table(sort_by="cpu_time_total", row_limit=rows)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    return f"{summarize(events, steps)}\n\nsorted by self device time\n{by_device}\n\nsorted by total CPU time\n{by_cpu}"


def time_steps(step, device: torch.device, n: int) -> tuple[list[float], float]:
    """Run ``step()`` ``n`` times as the training loop does: each step's report is read
    after the next step is queued. Returns the per-step times (s) and the wall time of all
    ``n`` steps (s), from which images/s is computed.

    On a GPU the steps are not separated by synchronisations (which would add an idle gap
    per step that training does not have): per-step times are the intervals between CUDA
    events recorded at each step's start and after the last one, on the GPU's timeline.
    """
    cuda = device.type == "cuda"
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)] if cuda else []
    host_times = []
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    previous = None
    for i in range(n):
        t0 = time.perf_counter()
        if cuda:
            marks[i].record()
        pending = step()
        if previous is not None:
            previous.read()
        previous = pending
        host_times.append(time.perf_counter() - t0)
    previous.read()
    if cuda:
        marks[n].record()
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    if not cuda:  # every step ran to completion before step() returned
        return host_times, wall
    return [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(n)], wall


def _short_path(path: str) -> str:
    """``path`` without the machine's prefix: relative to the project or to site-packages."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return Path(path).name


def find_host_syncs(step, device: torch.device) -> list[str] | None:
    """Where the operations of one ``step()`` that made the host wait for the GPU were
    called (CUDA's sync debug mode; reading the step's report afterwards is not counted):
    for each, ``file:line`` of the innermost project frame and of the warning's own site.
    None on CPU."""
    if device.type != "cuda":
        return None
    sites, inside = [], [False]

    def record(message, category, filename, lineno, file=None, line=None):
        # Only warnings raised by the step (switching the mode on warns by itself).
        if not inside[0] or "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack() if "dinov2_hier" in f.filename or "bench" in f.filename]
        where = f"{_short_path(ours[-2].filename)}:{ours[-2].lineno}" if len(ours) > 1 else "?"  # [-1]: this hook
        sites.append(f"{where} ({_short_path(filename)}:{lineno})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        inside[0] = True
        try:
            pending = step()
        finally:
            inside[0] = False
            torch.cuda.set_sync_debug_mode("default")
    pending.read()
    return sites


def build_bench_parts(cfg, world_size: int, rank: int) -> tuple[StepParts, Hierarchy | None]:
    """The step's parts as the trainer builds them (:func:`~dinov2_hier.train.parts.build_step_parts`),
    from the initial weights (``student.pretrained_weights`` is not loaded), and the label
    hierarchy of ``supervision.hierarchy`` (None without). Resolves ``cfg``'s ``compute``."""
    compute = resolve_step_compute(cfg, world_size)
    hierarchy = None
    if cfg.supervision.hierarchy is not None:
        hierarchy = Hierarchy.from_json(resolve_resource(cfg.supervision.hierarchy, "supervision.hierarchy"))
    return build_step_parts(cfg, compute, hierarchy, world_size, rank, pretrained=False), hierarchy


def _measure(args: argparse.Namespace, info: distributed.DistInfo, overrides: list[str]) -> dict:
    cfg = load_config(args.config, overrides)
    parts, hierarchy = build_bench_parts(cfg, info.world_size, info.rank)
    device, precision, mode, model = parts.compute.device, parts.compute.precision, parts.compute.parallel, parts.model
    parts.engine.train()
    schedule = parts.schedules.values(cfg.train.iterations // 2)  # mid-run values
    batch = synthetic_batch(cfg, device, hierarchy.num_leaves if hierarchy is not None else 0, info.rank)
    augmentation = build_augmentation(cfg)

    calls = itertools.count(1)

    def step():
        # With crops.photometric=device this applies the photometric ops (part of the step's cost).
        step_batch = batch_to_device(batch, device, augmentation)
        # Diagnostics on every train.log_every-th step, as the trainer computes them.
        logged = next(calls) % cfg.train.log_every == 0
        return train_step(parts.engine, parts.optimizer, parts.scaler, step_batch, schedule, precision,
                          parts.clip_grad, parts.grad_groups, parts.clip_per_group, with_stats=logged)

    for _ in range(args.warmup):
        step().read()
    sync_sites = find_host_syncs(step, device)
    times, wall = time_steps(step, device, args.steps)
    # Profiled before the FLOPs are counted: under the counter's dispatch mode a compiled
    # step runs eagerly, and a profile taken after it showed eager kernels.
    if args.profile is not None and info.is_main and "compute.dtype=fp32" not in overrides:
        args.profile.write_text(profile_table(step, device))
    # Counted after timing: the counter's dispatch overhead must not enter the times. Under
    # torch.compile the counter sees the eager graph's FLOPs, which is the right numerator.
    flops = count_step_flops(step)
    peak_value, peak_source = peak_tflops(device, args.peak_tflops)
    b = cfg.train.batch_size_per_gpu
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    per_rank = distributed.all_gather_objects({"images_per_s": b * args.steps / wall, "peak_mem_gib": peak})
    return {
        "arch": cfg.student.arch, "supervised": sorted(model.supervised.keys()), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": precision.dtype, "batch_size": b, "crop": cfg.crops.global_crops_size,
        "world_size": info.world_size, "parallel": mode,
        # Total over ranks (the DDP/FSDP collectives keep the ranks in step); rank 0's step times.
        "images_per_s": sum(r["images_per_s"] for r in per_rank), "steps": args.steps, "seconds": wall,
        "step_s_median": med,
        "step_s_min": min(times), "step_s_max": max(times), "host_syncs_per_step": None if sync_sites is None else len(sync_sites),
        "host_sync_sites": sync_sites,
        "peak_mem_gib": peak,
        "flops_per_step": flops,
        "tflops_per_s": flops * args.steps / wall / 1e12,
        "mfu": flops * args.steps / wall / (peak_value * 1e12),
        "peak_tflops": peak_value, "peak_source": peak_source,
        "compile": str(cfg.compute.compile),
        "photometric": str(cfg.crops.photometric),
        "residual_stream": str(cfg.compute.residual_stream),
        "drop_path_mode": str(cfg.student.drop_path_mode),
        "local_crops_number": augmentation.local_crops_number,
        "local_crops_size": augmentation.local_crops_size,
        "images_per_s_per_rank": [r["images_per_s"] for r in per_rank],
        "peak_mem_gib_per_rank": [r["peak_mem_gib"] for r in per_rank],
    }


if __name__ == "__main__":
    sys.exit(main())
