"""The training step's skip of non-finite steps: on the device (fused AdamW) and on the
host (other optimizers) give the same weights, moments and reports, and the device path
never reads a tensor on the host."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dinov2_hier.train.optim import build_optimizer
from dinov2_hier.train.step import PendingStep, Precision, skips_on_device, train_step

SCHEDULE = {"lr": 0.1, "last_layer_lr": 0.1, "wd": 0.0, "teacher_temp": 0.07, "momentum": 0.5}
PRECISION = Precision(device_type="cpu", dtype="fp32")


class Tiny(torch.nn.Module):
    """loss = sum(w * x) (+ a second named loss); teacher = EMA of w."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("teacher_w", torch.ones(3))

    def forward(self, batch, teacher_temp, with_stats=True):
        total = (self.w * batch["x"]).sum()
        return {"total": total, "half": total / 2}

    def update_teacher(self, momentum):
        self.teacher_w.lerp_(self.w.detach(), 1.0 - momentum)


def _run(fused: bool, xs: list[list[float]], clip: float = 10.0):
    model = Tiny()
    groups = [{"params": [model.w], "names": ["w"], "is_last_layer": False, "lr_mult": 1.0, "wd_mult": 0.0}]
    optimizer = build_optimizer(groups, (0.9, 0.999), fused=fused)
    scaler = PRECISION.grad_scaler()
    outs, weights = [], []
    for x in xs:
        outs.append(train_step(model, optimizer, scaler, {"x": torch.tensor(x)}, SCHEDULE, PRECISION, clip))
        weights.append(model.w.detach().clone())
    return model, optimizer, [o.read() for o in outs], weights


def test_device_and_host_skip_give_the_same_steps():
    xs = [[1.0, 2.0, 0.0], [1.0, float("nan"), 0.0], [float("inf"), 1.0, 1.0], [-1.0, 1.0, 0.0]]
    dev_model, dev_opt, dev_outs, dev_w = _run(True, xs)
    host_model, host_opt, host_outs, host_w = _run(False, xs)
    assert skips_on_device(dev_opt, PRECISION.grad_scaler()) and not skips_on_device(host_opt, PRECISION.grad_scaler())
    for outs in (dev_outs, host_outs):
        assert [o.applied for o in outs] == [True, False, False, True]
        assert outs[0].losses == pytest.approx({"total": 3.0, "half": 1.5})  # w = 1: sum(x)
        assert outs[0].grad_norm == pytest.approx(5 ** 0.5)
        assert math.isnan(outs[1].losses["total"]) and math.isnan(outs[1].grad_norm)
        assert math.isinf(outs[2].losses["total"])
    # AdamW's first step moves each weight by lr * g / (|g| + eps): [0.9, 0.9, 1.0]; the two
    # skipped steps leave it there, bit for bit.
    for w in (dev_w, host_w):
        torch.testing.assert_close(w[0], torch.tensor([0.9, 0.9, 1.0]))
        assert torch.equal(w[1], w[0]) and torch.equal(w[2], w[0])
    torch.testing.assert_close(dev_w[3], host_w[3], rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(dev_opt.state[dev_model.w][key], host_opt.state[host_model.w][key])
    assert float(dev_opt.state[dev_model.w]["step"]) == 2.0  # skipped steps are not counted
    # The teacher's EMA step ran in all four steps (momentum 0.5), towards w after each step.
    expected = torch.ones(3)
    for w in dev_w:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(dev_model.teacher_w, expected)
    torch.testing.assert_close(host_model.teacher_w, expected)
    # The optimizer does not keep the skip flag after the step.
    assert not hasattr(dev_opt, "found_inf")


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    """Make every way of reading a tensor's value on the host raise."""
    def refuse(*args, **kwargs):
        raise AssertionError("the step read a tensor on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        yield


def test_device_skip_path_never_reads_a_tensor_on_the_host(monkeypatch):
    model = Tiny()
    groups = [{"params": [model.w], "names": ["w"], "is_last_layer": False, "lr_mult": 1.0, "wd_mult": 0.0}]
    optimizer = build_optimizer(groups, (0.9, 0.999), fused=True)
    scaler = PRECISION.grad_scaler()
    with _no_host_reads(monkeypatch):
        pending = [
            train_step(model, optimizer, scaler, {"x": torch.tensor(x)}, SCHEDULE, PRECISION, 1.0)
            for x in ([1.0, 2.0, 0.0], [float("nan"), 0.0, 0.0])
        ]
    outs = [p.read() for p in pending]
    assert [o.applied for o in outs] == [True, False]
    # The host path reads the flag once: the same step without a fused optimizer fails here.
    host = build_optimizer(groups, (0.9, 0.999), fused=False)
    with _no_host_reads(monkeypatch), pytest.raises(AssertionError, match="read a tensor"):
        train_step(model, host, scaler, {"x": torch.tensor([1.0, 2.0, 0.0])}, SCHEDULE, PRECISION, 1.0)


def test_pending_step_reads_losses_grad_norm_and_flag_in_order():
    values = torch.tensor([1.5, -2.0, 3.0])
    out = PendingStep(["total", "dino"], values, torch.tensor(False), with_grad_norm=True).read()
    assert out.losses == {"total": 1.5, "dino": -2.0} and out.grad_norm == 3.0 and out.applied is False
    out = PendingStep(["total"], values[:1], True, with_grad_norm=False).read()
    assert out.losses == {"total": 1.5} and out.grad_norm is None and out.applied is True


def test_pending_step_reads_stats_between_losses_and_grad_norm():
    values = torch.tensor([1.5, 0.25, 7.0, 3.0])
    out = PendingStep(["total"], values, True, with_grad_norm=True, stat_names=["h", "grad_norm_head"]).read()
    assert out.losses == {"total": 1.5} and out.stats == {"h": 0.25, "grad_norm_head": 7.0} and out.grad_norm == 3.0


class TwoModules(torch.nn.Module):
    """loss = 30 * a + 4 * b . 1 (b has two entries): gradients a -> 30, b -> [4, 4]."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(1))
        self.b = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("teacher", torch.zeros(1))

    def forward(self, batch, teacher_temp, with_stats=True):
        total = 30 * self.a.sum() + 4 * self.b.sum()
        return {"total": total}, {"probe": total.detach() * 0 + 0.5}

    def update_teacher(self, momentum):
        pass


@pytest.mark.parametrize("per_group", [True, False], ids=["per-module", "global"])
def test_clipping_per_module_or_global_by_hand(per_group):
    """Norms before clipping: a 30, b sqrt(32); total sqrt(900 + 32). Clipping to 3: per
    module each group is scaled to norm 3; globally both by 3 / sqrt(932). SGD with lr 1
    makes the applied gradients visible as the weight change."""
    model = TwoModules()
    groups = [{"params": [model.a, model.b], "names": ["a", "b"], "is_last_layer": False, "lr_mult": 1.0, "wd_mult": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grad_groups = {"a": [model.a], "b": [model.b]}
    out = train_step(model, optimizer, scaler, {}, {**SCHEDULE, "lr": 1.0, "last_layer_lr": 1.0}, PRECISION, 3.0,
                     grad_groups, per_group).read()
    assert out.stats["grad_norm_a"] == pytest.approx(30.0) and out.stats["grad_norm_b"] == pytest.approx(math.sqrt(32))
    assert out.grad_norm == pytest.approx(math.sqrt(932)) and out.stats["probe"] == 0.5
    if per_group:
        expected_a, expected_b = -3.0, -3.0 / math.sqrt(2)
    else:
        factor = 3.0 / (math.sqrt(932) + 1e-6)
        expected_a, expected_b = -30 * factor, -4 * factor
    assert model.a.item() == pytest.approx(expected_a, rel=1e-5)
    assert model.b.tolist() == pytest.approx([expected_b, expected_b], rel=1e-5)
