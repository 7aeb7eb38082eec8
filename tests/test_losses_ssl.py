"""Numerical tests of the self-supervised losses and teacher normalisations.

Expected values come from explicit formulas written here with ``math`` (independent of
the torch code under test) or from literals derived by hand in the comments.
"""
from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dinov2_hier.losses import (
    DINOLoss,
    KoLeoLoss,
    LossInputError,
    SoftmaxCentering,
    iBOTPatchLoss,
    sinkhorn_knopp,
)
from tests.ports import free_ports

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- helpers
def _ce(target: list[float], logits: list[float], temp: float) -> float:
    """-sum_k t_k log softmax(s / temp)_k with plain floats."""
    scaled = [v / temp for v in logits]
    log_z = math.log(sum(math.exp(v) for v in scaled))
    return -sum(t * (v - log_z) for t, v in zip(target, scaled))


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _naive_sinkhorn(logits: list[list[float]], temp: float, iterations: int) -> list[list[float]]:
    """Unstabilised Sinkhorn-Knopp on Python floats (float64), one process, Q = [K][n]."""
    n, k = len(logits), len(logits[0])
    q = [[math.exp(logits[i][c] / temp) for i in range(n)] for c in range(k)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for c in range(k):
            row_sum = sum(q[c])
            q[c] = [v / row_sum / k for v in q[c]]
        for i in range(n):
            col_sum = sum(q[c][i] for c in range(k))
            for c in range(k):
                q[c][i] = q[c][i] / col_sum / n
    return [[q[c][i] * n for c in range(k)] for i in range(n)]


# ------------------------------------------------------------------------------- DINO
def test_dino_loss_pairs_cross_views_only() -> None:
    # softmax([0, ln2, 0]) = [1/4, 1/2, 1/4]; softmax([ln2, 0, 0]) = [1/2, 1/4, 1/4].
    # Teacher crop 0 is one-hot on prototype 0, crop 1 on prototype 1.
    student = torch.tensor([[0.0, LN2, 0.0], [0.0, LN2, 0.0], [LN2, 0.0, 0.0], [LN2, 0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    loss = DINOLoss(out_dim=3, student_temp=1.0)(student, teacher)
    # Cross-view: student crop 0 vs teacher crop 1 -> -log(1/2); crop 1 vs crop 0 -> -log(1/2).
    assert loss.item() == pytest.approx(LN2, abs=1e-6)
    # Same-view pairing would give -log(1/4) = 2 ln 2 everywhere.
    assert abs(loss.item() - 2 * LN2) > 0.5


def test_dino_loss_temperature() -> None:
    # s / 0.5 = [0, 2 ln2, 0] -> softmax [1/6, 4/6, 1/6]; CE to the one-hot = ln(6/4).
    student = torch.tensor([[0.0, LN2, 0.0], [LN2, 0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    assert DINOLoss(3, student_temp=1.0)(student, teacher).item() == pytest.approx(LN2, abs=1e-6)
    assert DINOLoss(3, student_temp=0.5)(student, teacher).item() == pytest.approx(
        math.log(1.5), abs=1e-6
    )


def test_dino_loss_soft_targets_match_formula() -> None:
    s = [[0.3, -1.2, 0.5], [1.0, 0.0, -0.4], [-0.7, 0.2, 0.9], [0.1, 0.6, -0.3]]
    t = [[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]]
    temp = 0.1
    # B = 2: student rows 0,1 (crop 0) vs teacher rows 2,3 (crop 1), and vice versa.
    pair_0 = (_ce(t[2], s[0], temp) + _ce(t[3], s[1], temp)) / 2
    pair_1 = (_ce(t[0], s[2], temp) + _ce(t[1], s[3], temp)) / 2
    expected = (pair_0 + pair_1) / 2
    loss = DINOLoss(3, student_temp=temp)(torch.tensor(s), torch.tensor(t))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_bf16_inputs_computed_in_float32() -> None:
    student = torch.tensor([[0.3, -1.2, 0.5], [1.0, 0.0, -0.4]]).bfloat16()
    teacher = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]).bfloat16()
    s, t = student.float().tolist(), teacher.float().tolist()
    expected = (_ce(t[1], s[0], 0.1) + _ce(t[0], s[1], 0.1)) / 2
    loss = DINOLoss(3)(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_rejects_bad_shapes() -> None:
    loss = DINOLoss(3)
    with pytest.raises(LossInputError, match="2B"):
        loss(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(LossInputError, match="shape"):
        loss(torch.zeros(4, 3), torch.zeros(2, 3))
    with pytest.raises(LossInputError, match="K=3"):
        loss(torch.zeros(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(3, centering="mean")  # type: ignore[arg-type]


def test_dino_teacher_probs_softmax_centering_uses_previous_centre() -> None:
    loss = DINOLoss(3, centering="softmax", center_momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    first = loss.teacher_probs(logits, teacher_temp=0.5)
    # Centre starts at 0: plain softmax(logits / 0.5).
    torch.testing.assert_close(first[0], torch.tensor(_softmax([2.0, 4.0, 6.0])))
    # Then centre = 0.9 * 0 + 0.1 * mean([1,2,3],[3,4,5]) = [0.2, 0.3, 0.4].
    torch.testing.assert_close(loss.softmax_centering.center, torch.tensor([[0.2, 0.3, 0.4]]))
    second = loss.teacher_probs(torch.zeros(1, 3), teacher_temp=0.5)
    torch.testing.assert_close(second[0], torch.tensor(_softmax([-0.4, -0.6, -0.8])))


def test_dino_teacher_probs_sinkhorn_matches_function() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    probs = DINOLoss(4, sk_iterations=5).teacher_probs(logits, teacher_temp=0.07)
    torch.testing.assert_close(probs, sinkhorn_knopp(logits, 0.07, n_iterations=5))


# ------------------------------------------------------------------------------- iBOT
def test_ibot_loss_weights_crops_and_counts_empty_crop() -> None:
    # 4 crops: crop 0 has 2 masked patches, crops 1 and 3 none, crop 2 one -> M = 3.
    s = [[0.2, -0.1, 0.4], [0.0, 0.3, -0.2], [-0.5, 0.1, 0.0]]
    t = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
    weights = torch.tensor([0.5, 0.5, 1.0])
    temp = 0.1
    crop_0 = (_ce(t[0], s[0], temp) + _ce(t[1], s[1], temp)) / 2
    crop_2 = _ce(t[2], s[2], temp)
    expected = (crop_0 + 0.0 + crop_2 + 0.0) / 4
    loss = iBOTPatchLoss(3, student_temp=temp)(torch.tensor(s), torch.tensor(t), weights, n_crops=4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_no_masked_patch_is_zero_with_gradient() -> None:
    head = nn.Linear(4, 3)
    student = head(torch.zeros(0, 4))  # M = 0 masked patches
    loss = iBOTPatchLoss(3)(student, torch.zeros(0, 3), torch.zeros(0), n_crops=4)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert head.weight.grad is not None
    assert torch.equal(head.weight.grad, torch.zeros(3, 4))


def test_ibot_loss_rejects_bad_inputs() -> None:
    loss = iBOTPatchLoss(3)
    with pytest.raises(LossInputError, match="masks_weight"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), n_crops=2)
    with pytest.raises(LossInputError, match="n_crops"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), n_crops=0)


# ------------------------------------------------------------------------ Sinkhorn-Knopp
def test_sinkhorn_three_iterations_equals_naive_reference() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 2
    expected = torch.tensor(_naive_sinkhorn(logits.tolist(), 0.5, 3), dtype=torch.float32)
    out = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    assert out.shape == (6, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_stable_on_logits_that_overflow_float32_exp() -> None:
    # logits / temp ~ 600: exp overflows float32 (max ~ e^88) but not float64.
    logits = 300.0 + torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    assert torch.isinf(torch.exp(logits / 0.5)).all()
    expected = torch.tensor(_naive_sinkhorn(logits.double().tolist(), 0.5, 3), dtype=torch.float32)
    out = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_converges_to_uniform_marginals() -> None:
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    out = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=200)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(16), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(dim=0), torch.full((4,), 16 / 4), rtol=0, atol=1e-5)


def test_sinkhorn_padding_rows_change_nothing_and_get_zero_targets() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    expected = sinkhorn_knopp(logits, 0.1)
    torch.testing.assert_close(expected.sum(dim=1), torch.ones(6))
    # Padding rows with huge logits (they would dominate the per-prototype maximum and the
    # prototype sums) interleaved with the real rows.
    padded = torch.cat([logits[:2], torch.full((2, 5), 80.0), logits[2:], torch.full((1, 5), -80.0)])
    valid = torch.tensor([True, True, False, False, True, True, True, True, False])
    out = sinkhorn_knopp(padded, 0.1, valid=valid)
    torch.testing.assert_close(out[valid], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(out[~valid], torch.zeros(3, 5))
    # No valid row at all: all-zero targets, no NaN.
    assert torch.equal(sinkhorn_knopp(padded, 0.1, valid=torch.zeros(9, dtype=torch.bool)), torch.zeros(9, 5))
    with pytest.raises(LossInputError, match="valid"):
        sinkhorn_knopp(logits, 0.1, valid=torch.ones(5, dtype=torch.bool))


def test_softmax_centering_and_ibot_loss_ignore_padding() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [50.0, 50.0, 50.0], [3.0, 4.0, 5.0]])
    valid = torch.tensor([True, False, True])
    loss = iBOTPatchLoss(3, centering="softmax", center_momentum=0.9)
    probs = loss.teacher_probs(logits, 0.5, valid=valid)
    torch.testing.assert_close(probs[0], torch.tensor(_softmax([2.0, 4.0, 6.0])))
    assert torch.equal(probs[1], torch.zeros(3))
    # Centre from the two valid rows only: 0.1 * mean([1,2,3],[3,4,5]).
    torch.testing.assert_close(loss.softmax_centering.center, torch.tensor([[0.2, 0.3, 0.4]]))
    # A padding row (weight 0, zero targets) adds exactly nothing to the loss.
    student = torch.tensor([[0.2, -0.1, 0.4], [9.0, -9.0, 0.0], [0.0, 0.3, -0.2]])
    padded = loss(student, probs, torch.tensor([0.5, 0.0, 0.5]), n_crops=2)
    plain = loss(student[valid], probs[valid], torch.tensor([0.5, 0.5]), n_crops=2)
    assert padded.item() == pytest.approx(plain.item(), rel=1e-6)


def test_sinkhorn_empty_and_bf16_inputs() -> None:
    assert sinkhorn_knopp(torch.zeros(0, 4), 0.1).shape == (0, 4)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)).bfloat16()
    out = sinkhorn_knopp(logits, 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sinkhorn_knopp(logits.float(), 0.2))


# ----------------------------------------------------------------------- softmax centre
def test_softmax_centering_update_by_hand() -> None:
    centering = SoftmaxCentering(3, momentum=0.9)
    centering.update(torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))
    # 0.9 * 0 + 0.1 * [2, 3, 4]
    torch.testing.assert_close(centering.center, torch.tensor([[0.2, 0.3, 0.4]]))
    centering.update(torch.tensor([[10.0, 0.0, -10.0]]))
    # 0.9 * [0.2, 0.3, 0.4] + 0.1 * [10, 0, -10] = [1.18, 0.27, -0.64]
    torch.testing.assert_close(centering.center, torch.tensor([[1.18, 0.27, -0.64]]))
    probs = centering.probs(torch.tensor([[1.18, 1.27, 0.36]]), teacher_temp=0.5)
    torch.testing.assert_close(probs[0], torch.tensor(_softmax([0.0, 2.0, 2.0])))
    centering.update(torch.zeros(0, 3))  # empty global batch: unchanged
    torch.testing.assert_close(centering.center, torch.tensor([[1.18, 0.27, -0.64]]))


# -------------------------------------------------------------------------------- KoLeo
def test_koleo_three_points_by_hand() -> None:
    # Unit directions at 0, 30 and 100 degrees (scaled to test the normalisation).
    # Nearest neighbours: 0->30, 30->0, 100->30; chord length at angle a is 2 sin(a/2).
    angles, scales = (0.0, 30.0, 100.0), (2.0, 0.5, 3.0)
    x = torch.tensor(
        [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))]
         for a, r in zip(angles, scales)]
    )
    eps = 1e-8
    near = math.log(2 * math.sin(math.radians(15)) + eps)
    far = math.log(2 * math.sin(math.radians(35)) + eps)
    expected = -(2 * near + far) / 3
    assert KoLeoLoss(eps)(x).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_duplicates_are_finite_with_finite_gradient() -> None:
    eps = 1e-8
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = KoLeoLoss(eps)(x)
    # rows 0 and 1 coincide after normalisation; row 2 is sqrt(2) from either.
    expected = -(2 * math.log(eps) + math.log(math.sqrt(2) + eps)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_koleo_fewer_than_two_rows_is_zero() -> None:
    for n in (0, 1):
        x = torch.randn(n, 4, requires_grad=True)
        loss = KoLeoLoss()(x)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros(n, 4))


def test_koleo_bf16_input_gives_float32() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).bfloat16()
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2) + 1e-8), rel=1e-6)


# --------------------------------------------------------------------- two-rank (gloo)
_SK_LOGITS_SHAPE = (6, 5)
# (rows of rank 0, rows of rank 1, padding rows appended on each rank)
_SPLITS = ((3, 3, 0), (0, 6, 2), (2, 4, 1))


def _full_batch_logits() -> torch.Tensor:
    return torch.randn(*_SK_LOGITS_SHAPE, generator=torch.Generator().manual_seed(7)) * 3


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        logits = _full_batch_logits()
        results: dict[str, torch.Tensor] = {}
        for index, (rows_0, rows_1, pad) in enumerate(_SPLITS):
            start, stop = (0, rows_0) if rank == 0 else (rows_0, rows_0 + rows_1)
            local = torch.cat([logits[start:stop], torch.full((pad, _SK_LOGITS_SHAPE[1]), 40.0)])
            valid = torch.arange(len(local)) < stop - start
            results[f"sk{index}"] = sinkhorn_knopp(local, 0.2, 3, valid=valid)[: stop - start]
        centering = SoftmaxCentering(_SK_LOGITS_SHAPE[1], momentum=0.5)
        centering.update(logits[:2] if rank == 0 else logits[2:])  # unequal counts
        results["center"] = centering.center.clone()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.slow
def test_sinkhorn_and_centre_over_two_gloo_ranks_equal_full_batch(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(2, free_ports(1)[0], str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    logits = _full_batch_logits()
    expected_sk = sinkhorn_knopp(logits, 0.2, 3)
    for index, (rows_0, rows_1, _) in enumerate(_SPLITS):
        assert per_rank[0][f"sk{index}"].shape == (rows_0, 5)
        assert per_rank[1][f"sk{index}"].shape == (rows_1, 5)
        gathered = torch.cat([per_rank[0][f"sk{index}"], per_rank[1][f"sk{index}"]])
        torch.testing.assert_close(gathered, expected_sk, rtol=1e-5, atol=1e-6)
    expected_center = 0.5 * logits.mean(dim=0, keepdim=True)  # 0.5 * 0 + 0.5 * global mean
    for rank in range(2):
        torch.testing.assert_close(per_rank[rank]["center"], expected_center)
