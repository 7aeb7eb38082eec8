"""Training diagnostics and the collapse detector, against hand computations."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from dinov2_hier.losses import diagnostics
from dinov2_hier.train.collapse import (
    CONSECUTIVE_RECORDS,
    UNIFORM_KL_NATS,
    CollapseDetector,
    CollapseError,
    run_collapse_status,
    run_dir_of,
)


def test_mean_entropy_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    # ln 2, ln 4, 0 (0 ln 0 = 0): mean (ln 2 + 2 ln 2) / 3 = ln 2
    assert diagnostics.mean_entropy(probs).item() == pytest.approx(math.log(2), abs=1e-6)
    # weights leave rows out: only the uniform row
    w = torch.tensor([0.0, 1.0, 0.0])
    assert diagnostics.mean_entropy(probs, w).item() == pytest.approx(math.log(4), abs=1e-6)
    assert diagnostics.mean_entropy(torch.zeros(0, 4)).item() == 0.0


def test_mean_entropy_of_logits_by_hand() -> None:
    # logits [ln 3, 0] / T=1 -> p = [3/4, 1/4]; H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    logits = torch.tensor([[math.log(3.0), 0.0]])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert diagnostics.mean_entropy_of_logits(logits, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # temperature 0.5 doubles the logits: p = [9/10, 1/10]
    expected_half = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert diagnostics.mean_entropy_of_logits(logits * 0.5, 0.5).item() == pytest.approx(expected, abs=1e-6)
    assert diagnostics.mean_entropy_of_logits(logits, 0.5).item() == pytest.approx(expected_half, abs=1e-6)
    # equal logits: ln K, whatever their value
    assert diagnostics.mean_entropy_of_logits(torch.full((3, 8), 7.0), 0.1).item() == pytest.approx(math.log(8), abs=1e-6)


def test_prototypes_used_counts_distinct_argmax() -> None:
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]])
    assert diagnostics.prototypes_used(probs).item() == 3
    assert diagnostics.prototypes_used(probs[:2]).item() == 1
    assert diagnostics.prototypes_used(probs, torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == 1
    assert diagnostics.prototypes_used(torch.zeros(0, 3)).item() == 0


def test_token_spread_by_hand() -> None:
    # identical directions (any length): spread 0
    same = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.5, 0.0]])
    assert diagnostics.token_spread(same).item() == pytest.approx(0.0, abs=1e-6)
    # opposite unit vectors: mean 0, spread 1
    assert diagnostics.token_spread(torch.tensor([[0.0, 2.0], [0.0, -1.0]])).item() == pytest.approx(1.0, abs=1e-6)
    # orthogonal pair: mean (1/2, 1/2), ||mean||^2 = 1/2, spread sqrt(1/2)
    assert diagnostics.token_spread(torch.eye(2)).item() == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_mean_norm_weighted() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    assert diagnostics.mean_norm(x).item() == pytest.approx((5 + 1 + 10) / 3)
    assert diagnostics.mean_norm(x, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(3.0)


def _record(it: int, ln_k: float, student_kl: float, teacher_kl: float, ibot: bool = False) -> dict:
    record = {"iteration": it, "dino_student_entropy": ln_k - student_kl, "dino_teacher_entropy": ln_k - teacher_kl}
    if ibot:
        record.update({"ibot_student_entropy": ln_k - 0.5, "ibot_teacher_entropy": ln_k - 0.5})
    return record


LN_K = math.log(1024)


def test_detector_fires_on_a_collapsed_run_once_and_names_values(caplog) -> None:
    detector = CollapseDetector({"dino": LN_K, "ibot": LN_K}, check_after=30)
    caplog.set_level(logging.WARNING, logger="dinov2_hier.train")
    # healthy start, then collapsed records from iteration 20 on: the third in a row (40) is past check_after
    kls = [0.4, 0.3, 0.004, 0.003, 0.002, 0.002, 0.001]
    for i, kl in enumerate(kls):
        detector.observe(_record(10 * i, LN_K, kl, kl + 0.001, ibot=True))
    assert detector.detected_at == 40
    warnings = [r.getMessage() for r in caplog.records if "COLLAPSE" in r.getMessage()]
    assert len(warnings) == 1
    assert "iteration 40" in warnings[0] and "dino" in warnings[0] and "near-uniform" in warnings[0]
    assert "0.0020" in warnings[0] and f"{LN_K:.4f}" in warnings[0] and "docs/training-dynamics.md" in warnings[0]
    assert "ibot" not in warnings[0]  # iBOT stays at 0.5 nats from uniform
    summary = detector.summary()
    assert summary["collapsed"] is True and summary["detected_at_iteration"] == 40
    assert summary["last"]["dino"]["student_kl_to_uniform"] == pytest.approx(0.001)


def test_detector_needs_consecutive_records_and_respects_check_after() -> None:
    detector = CollapseDetector({"dino": LN_K}, check_after=100)
    # collapsed from the start, but check_after delays the verdict to iteration 100
    for it in range(10, 120, 10):
        detector.observe(_record(it, LN_K, 0.001, 0.001))
        assert (detector.detected_at is not None) == (it >= 100)
    # isolated near-uniform records never fire
    detector = CollapseDetector({"dino": LN_K}, check_after=0)
    for i in range(20):
        bad = i % CONSECUTIVE_RECORDS == 0
        detector.observe(_record(i, LN_K, 0.001 if bad else 0.3, 0.3))
    assert detector.detected_at is None


def test_detector_silent_on_a_healthy_run_and_threshold_is_strict() -> None:
    detector = CollapseDetector({"dino": LN_K}, check_after=0)
    for it in range(50):  # just above the threshold, student and teacher
        detector.observe(_record(it, LN_K, UNIFORM_KL_NATS * 1.01, UNIFORM_KL_NATS * 1.5))
    assert detector.detected_at is None and detector.summary()["collapsed"] is False
    # teacher targets alone near-uniform is a collapse too ("no information")
    detector = CollapseDetector({"dino": LN_K}, check_after=0)
    for it in range(5):
        detector.observe(_record(it, LN_K, 0.5, UNIFORM_KL_NATS * 0.5))
    assert detector.detected_at == CONSECUTIVE_RECORDS - 1
    assert "carry no information" in detector.last[0].describe()


def test_detector_stop_raises() -> None:
    detector = CollapseDetector({"dino": LN_K}, check_after=0, stop=True)
    with pytest.raises(CollapseError, match="stop_on_collapse"):
        for it in range(5):
            detector.observe(_record(it, LN_K, 0.0, 0.0))


def test_run_collapse_status_replays_records_up_to_an_iteration(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "dino: {head_n_prototypes: 1024}\nibot: {loss_weight: 0.0}\ntrain: {collapse_check_after: 0}\n"
    )
    records = [_record(it, LN_K, 0.3 if it < 50 else 0.001, 0.3) for it in range(10, 110, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 11')  # torn tail
    assert run_dir_of(run / "checkpoints" / "ckpt_00000100.pt") == run
    assert run_dir_of(run / "teacher_backbone.pt") == run
    assert run_dir_of(tmp_path / "elsewhere.pt") is None
    early = run_collapse_status(run, 40)
    assert early["collapsed"] is False and early["iteration"] == 40
    late = run_collapse_status(run)
    assert late["collapsed"] is True and late["detected_at_iteration"] == 70 and late["iteration"] == 100
    assert run_collapse_status(tmp_path) is None
