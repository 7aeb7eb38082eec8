from __future__ import annotations

import math

import pytest

from dinov2_hier.config import load_config
from dinov2_hier.train.schedules import CosineSchedule, LinearWarmupSchedule, build_schedules, scaled_lr


def test_cosine_with_warmup_values():
    s = CosineSchedule(base_value=1.0, final_value=0.0, total_iters=110, warmup_iters=10)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # half-way down the cosine
    assert s(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == 0.0 and s(500) == 0.0


def test_freeze_returns_zero_then_follows_schedule():
    s = CosineSchedule(2.0, 2.0, total_iters=100, freeze_iters=7)
    assert [s(i) for i in (0, 6, 7, 50)] == [0.0, 0.0, 2.0, 2.0]


def test_teacher_temperature_warmup():
    s = LinearWarmupSchedule(0.04, 0.07, warmup_iters=30)
    assert s(0) == pytest.approx(0.04)
    assert s(15) == pytest.approx(0.055)
    assert s(30) == pytest.approx(0.07) and s(1000) == pytest.approx(0.07)


def test_sqrt_batch_scaling():
    assert scaled_lr(0.004, 256, 1024, "sqrt") == pytest.approx(0.002)
    assert scaled_lr(0.004, 256, 1024, "linear") == pytest.approx(0.001)
    assert scaled_lr(0.004, 256, 1024, "none") == pytest.approx(0.004)


def test_build_schedules_from_config():
    cfg = load_config(None, [
        "train.iterations=1000", "train.epoch_length=100", "train.batch_size_per_gpu=64",
        "optim.warmup_epochs=2", "optim.freeze_last_layer_epochs=1", "teacher.warmup_teacher_temp_epochs=3",
        "optim.base_lr=0.004", "optim.min_lr=0.0",
    ])
    s = build_schedules(cfg, world_size=4)  # total batch 256 -> lr 0.002
    v = s.values(200)
    assert v["lr"] == pytest.approx(0.002)
    assert s.values(100)["lr"] == pytest.approx(0.001)
    assert s.values(50)["last_layer_lr"] == 0.0 and s.values(100)["last_layer_lr"] == pytest.approx(0.001)
    assert s.values(0)["wd"] == pytest.approx(0.04) and s.values(1000)["wd"] == pytest.approx(0.2)
    assert s.values(500)["wd"] == pytest.approx(0.12)
    assert s.values(0)["momentum"] == pytest.approx(0.992) and s.values(1000)["momentum"] == pytest.approx(1.0)
    assert s.values(150)["teacher_temp"] == pytest.approx(0.055)
