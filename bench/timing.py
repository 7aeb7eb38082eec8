"""Kernel timing shared by the micro-benchmarks (``bench.attention``, ``bench.activation``)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def mean_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls queued back to back after ``warmup``
    calls: on a GPU the kernels' time, not the launch latency of a single call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats
