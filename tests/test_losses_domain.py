"""BoDA, CORAL, gradient reversal and the centroid state (issue 21) against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from dinov2_hier.losses.centering import LossInputError
from dinov2_hier.losses.domain import (
    DomainCentroids,
    boda_loss,
    coral_loss,
    grad_reverse,
    macro_alignment_loss,
)


def _issue_case(counts):
    """Issue 21's case: 1-D features, domains x classes = 2 x 2, one sample z = 0 from
    (d0, c0); centroids (d0,c0) = 0 (unused: its own pair), (d1,c0) = 1, (d0,c1) = 4, (d1,c1) = 5."""
    z = torch.zeros(1, 1, requires_grad=True)
    centroids = torch.tensor([[[0.0], [4.0]], [[1.0], [5.0]]])  # [D=2, C=2, F=1]
    return z, torch.tensor([0]), torch.tensor([0]), centroids, torch.tensor(counts)


def test_paper_form_matches_the_issue_number():
    # Unsquared distances 1, 4, 5, w = 1 (equal counts), |D| - 1 = 1:
    # -log(e^-1 / (e^-1 + e^-4 + e^-5)) = 1 + log(e^-1 + e^-4 + e^-5) = 0.0658839...
    expected = 1 + math.log(math.exp(-1) + math.exp(-4) + math.exp(-5))
    assert expected == pytest.approx(0.065884, abs=5e-7)
    loss = boda_loss(*_issue_case([[3, 3], [3, 3]]), form="paper", temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_paper_form_distance_is_not_squared():
    # Squared distances would give 1 + log(e^-1 + e^-16 + e^-25) ~ 1.5e-7.
    loss = boda_loss(*_issue_case([[3, 3], [3, 3]]), form="paper")
    assert loss.item() > 0.06


def test_released_form_matches_the_issue_numbers():
    # N_own = N(d0,c0) = 4. Logit of pair k: -(N_k / 4)^0.5 * dist_k / 4:
    # (d1,c0): -(1/4)^.5 * 1/4 = -0.125; (d0,c1): -(2/4)^.5 * 4/4 = -0.70711;
    # (d1,c1): -(8/4)^.5 * 5/4 = -1.76777. One positive, (d1,c0):
    # loss = 0.125 + log(e^-0.125 + e^-0.70711 + e^-1.76777) = 0.560852 (the issue's number).
    logits = [-0.125, -math.sqrt(0.5), -1.25 * math.sqrt(2.0)]
    assert logits[1] == pytest.approx(-0.7071, abs=5e-5) and logits[2] == pytest.approx(-1.7678, abs=5e-5)
    expected = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert expected == pytest.approx(0.560852, abs=5e-7)
    loss = boda_loss(*_issue_case([[4, 2], [1, 8]]), form="released", nu=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # released is the default form
    assert boda_loss(*_issue_case([[4, 2], [1, 8]])).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_divides_the_logits():
    # Paper form, T = 2: logits -0.5, -2, -2.5.
    expected = 0.5 + math.log(math.exp(-0.5) + math.exp(-2) + math.exp(-2.5))
    loss = boda_loss(*_issue_case([[3, 3], [3, 3]]), form="paper", temperature=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_forms_differ_in_reduction_over_samples_and_missing_positives():
    # Three domains, one class present in d0 and d1 only (and a second class in all):
    # paper form divides by |D| - 1 = 2 and sums over samples; released averages.
    D, C = 3, 2
    centroids = torch.tensor([[[0.0], [3.0]], [[1.0], [4.0]], [[2.0], [5.0]]])
    counts = torch.tensor([[1, 1], [1, 1], [0, 1]])  # (d2, c0) absent
    z = torch.zeros(2, 1, requires_grad=True)
    labels, domains = torch.tensor([0, 0]), torch.tensor([0, 0])
    # each sample: positive (d1,c0) at 1; negatives (d0,c1)=3, (d1,c1)=4, (d2,c1)=5
    per = 1 + math.log(math.exp(-1) + math.exp(-3) + math.exp(-4) + math.exp(-5))
    paper = boda_loss(z, labels, domains, centroids, counts, form="paper")
    released = boda_loss(z, labels, domains, centroids, counts, form="released")
    assert paper.item() == pytest.approx(2 * per / 2, rel=1e-6)  # sum of 2 samples / (|D|-1)
    assert released.item() == pytest.approx(per, rel=1e-6)
    assert D * C == counts.numel()


def test_no_cross_domain_positive_gives_exact_zero_with_a_connected_graph():
    z = torch.randn(4, 3, requires_grad=True)
    centroids = torch.randn(2, 2, 3)
    # class 0 only in d0, class 1 only in d1: no sample has its class in another domain
    counts = torch.tensor([[5, 0], [0, 5]])
    labels, domains = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    for form in ("paper", "released"):
        z.grad = None
        loss = boda_loss(z, labels, domains, centroids, counts, form=form)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(z.grad, torch.zeros_like(z))


def test_gradient_is_finite_when_a_sample_sits_on_a_centroid():
    z = torch.tensor([[1.0]], requires_grad=True)
    centroids = torch.tensor([[[0.0], [1.0]], [[1.0], [5.0]]])  # sample on (d1,c0) and (d0,c1)
    loss = boda_loss(z, torch.tensor([0]), torch.tensor([0]), centroids, torch.ones(2, 2))
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_bad_inputs_are_refused():
    z, labels, domains, centroids, counts = _issue_case([[1, 1], [1, 1]])
    with pytest.raises(LossInputError, match="form"):
        boda_loss(z, labels, domains, centroids, counts, form="eq3")
    with pytest.raises(LossInputError, match="counts"):
        boda_loss(z, labels, domains, centroids, torch.ones(3, 2))
    with pytest.raises(LossInputError, match="labels"):
        boda_loss(z, labels.float(), domains, centroids, counts)


def test_coral_of_identical_batches_is_zero_and_matches_a_hand_value():
    x = torch.randn(6, 4)
    assert coral_loss(x, x.clone()).item() == 0.0
    # F = 1, unbiased variances: rows [0, 2] -> 2, rows [0, 4] -> 8; (2 - 8)^2 / (4 * 1^2) = 9
    s, t = torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    assert coral_loss(s, t).item() == pytest.approx((2.0 - 8.0) ** 2 / 4, rel=1e-6)


def test_macro_alignment_adds_the_mean_offset():
    z = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    d = torch.tensor([0, 0, 1, 1])
    # covariances 2 and 8 -> 36/4 = 9; means 1 and 12 -> 121
    assert macro_alignment_loss(z, d, means=False).item() == pytest.approx(9.0, rel=1e-6)
    assert macro_alignment_loss(z, d).item() == pytest.approx(130.0, rel=1e-6)
    one = torch.zeros(3, 2, requires_grad=True)
    loss = macro_alignment_loss(one, torch.tensor([0, 0, 0]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(one.grad, torch.zeros(3, 2))


def test_gradient_reversal_negates_exactly():
    x = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    y = grad_reverse(x, 0.37)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream * -0.37)


def test_centroid_update_by_hand():
    c = DomainCentroids(2, 2, 1, momentum=0.5, every=2, warmup=1)
    z = torch.tensor([[2.0], [4.0], [10.0]])
    labels, domains = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1])
    assert not c.update(z, labels, domains)  # step 0 < warmup
    assert c.update(z, labels, domains)  # step 1: first update, batch means as they are
    assert c.centroids[0, 0, 0].item() == 3.0 and c.centroids[1, 1, 0].item() == 10.0
    assert c.counts.tolist() == [[2.0, 0.0], [0.0, 1.0]]
    assert not c.update(z, labels, domains)  # step 2: not due (every 2)
    z2 = torch.tensor([[7.0], [1.0]])
    assert c.update(z2, torch.tensor([0, 0]), torch.tensor([0, 1]))  # step 3
    assert c.centroids[0, 0, 0].item() == 0.5 * 3.0 + 0.5 * 7.0  # momentum
    assert c.centroids[1, 0, 0].item() == 1.0  # first seen: the batch mean
    assert c.centroids[1, 1, 0].item() == 10.0  # not in the batch: unchanged
    assert c.counts.tolist() == [[3.0, 0.0], [1.0, 1.0]]
    assert int(c.step) == 4


def test_centroid_state_round_trips_through_state_dict():
    c = DomainCentroids(2, 3, 4)
    c.update(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1]))
    state = c.state_dict()
    assert set(state) == {"centroids", "counts", "step"}
    d = DomainCentroids(2, 3, 4)
    d.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(d, name), getattr(c, name))


def _two_rank_update_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        c = DomainCentroids(1, 2, 1, momentum=0.5)
        # rank 0 sees class 0 at 2 and 4; rank 1 sees class 0 at 9 and class 1 at 1
        z = torch.tensor([[2.0], [4.0]]) if rank == 0 else torch.tensor([[9.0], [1.0]])
        labels = torch.tensor([0, 0]) if rank == 0 else torch.tensor([0, 1])
        c.update(z, labels, torch.zeros(2, dtype=torch.long))
        torch.save(c.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_centroid_update_sums_over_ranks(tmp_path):
    from tests.ports import free_ports
    from tests.test_distributed import _spawn  # 2 spawned ranks, ended after a timeout

    _spawn(_two_rank_update_worker, (free_ports(1)[0], str(tmp_path)))
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for s in states:  # class 0: (2 + 4 + 9) / 3 = 5 from 3 samples; class 1: 1 from 1
        assert s["centroids"].flatten().tolist() == [5.0, 1.0]
        assert s["counts"].flatten().tolist() == [3.0, 1.0]
