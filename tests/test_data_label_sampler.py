"""Labelled-share sampler: fixed labelled slots per batch, endless (balanced) pools, O(1) resume."""
from __future__ import annotations

import time
from collections import Counter
from itertools import islice

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dinov2_hier.data import (
    LabelledShareSampler,
    SamplerConfigError,
    labelled_per_batch_from_fraction,
    torch_generator,
)
from dinov2_hier.data.samplers import BALANCED_CHUNK, LABELLED_STREAM, UNLABELLED_STREAM


def take(sampler: LabelledShareSampler, n: int) -> list[tuple[int, int]]:
    return list(islice(iter(sampler), n))


def mixed_labels(n: int = 50, every: int = 3) -> list[int]:
    """Every ``every``-th item labelled (class ``i % 4``), the rest unlabelled."""
    return [i % 4 if i % every == 0 else -1 for i in range(n)]


class EchoDataset(Dataset):
    """Returns what the sampler hands in, so a DataLoader batch shows the draws."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        index, draw_id = key
        return index, draw_id, self.labels[index]


def reference_item(labels, seed, stream, q, weights=None):
    """Stream ``stream`` at position ``q``, straight from the documented definition."""
    want_labelled = stream == LABELLED_STREAM
    pool = [i for i, y in enumerate(labels) if (y >= 0) == want_labelled]
    if weights is None:
        epoch, offset = divmod(q, len(pool))
        return pool[int(torch.randperm(len(pool), generator=torch_generator(seed, stream, epoch))[offset])]
    chunk, offset = divmod(q, BALANCED_CHUNK)
    draws = torch.multinomial(weights, BALANCED_CHUNK, replacement=True, generator=torch_generator(seed, stream, chunk))
    return pool[int(draws[offset])]


def class_weights(labels) -> torch.Tensor:
    """Inverse class frequency over the labelled pool, in pool order."""
    lab = torch.tensor([y for y in labels if y >= 0])
    return 1.0 / torch.bincount(lab).double()[lab]


def test_every_dataloader_batch_has_exactly_the_labelled_share():
    labels = mixed_labels()
    for rank in range(2):
        sampler = LabelledShareSampler(labels, batch_size=8, labelled_per_batch=3, seed=7, rank=rank, world_size=2)
        loader = DataLoader(EchoDataset(labels), batch_size=8, sampler=sampler)
        for b, (index, draw_id, label) in enumerate(islice(iter(loader), 25)):
            assert index.shape == (8,)
            assert (label[:3] >= 0).all() and (label[3:] == -1).all()
            assert int((label >= 0).sum()) == 3
            assert draw_id.tolist() == [rank + 2 * (8 * b + s) for s in range(8)]


def test_stream_positions_follow_the_formula():
    labels = mixed_labels()
    nlab = sum(y >= 0 for y in labels)
    for balance in ("none", "class"):
        sampler = LabelledShareSampler(labels, 6, 2, seed=4, rank=1, world_size=3, balance=balance)
        weights = class_weights(labels) if balance == "class" else None
        for k, (index, draw_id) in enumerate(take(sampler, 120)):
            b, s = divmod(k, 6)
            if s < 2:
                stream, q = LABELLED_STREAM, (b * 2 + s) * 3 + 1
                expect = reference_item(labels, 4, stream, q, weights)
            else:
                stream, q = UNLABELLED_STREAM, (b * 4 + s - 2) * 3 + 1
                expect = reference_item(labels, 4, stream, q)
            assert sampler.stream_position(k) == (stream, q)
            assert (index, draw_id) == (expect, 1 + 3 * k)
            assert sampler.item_at(k) == (index, draw_id)
    assert nlab == 17


@pytest.mark.parametrize("balance", ["none", "class", "branch"])
def test_resume_equals_uninterrupted_stream(balance):
    labels = mixed_labels(60)
    groups = [y // 2 if y >= 0 else -1 for y in labels]
    kwargs = dict(seed=5, rank=1, world_size=2, balance=balance, groups=groups)
    full = take(LabelledShareSampler(labels, 8, 3, **kwargs), 300)
    resumed = LabelledShareSampler(labels, 8, 3, start=64, **kwargs)
    assert take(resumed, 236) == full[64:]
    resumed.set_start(37)  # mid-batch resumes are exact too
    assert take(resumed, 50) == full[37:87]
    assert take(LabelledShareSampler(labels, 8, 3, **kwargs), 300) == full  # deterministic
    assert take(LabelledShareSampler(labels, 8, 3, **{**kwargs, "seed": 6}), 40) != full[:40]


def test_ranks_are_disjoint_and_a_labelled_epoch_is_covered():
    labels = mixed_labels(40, every=4)  # 10 labelled, 30 unlabelled
    labelled = [i for i, y in enumerate(labels) if y >= 0]
    world, batch, lab = 2, 4, 2
    per_rank = [take(LabelledShareSampler(labels, batch, lab, seed=9, rank=r, world_size=world), 4 * batch)
                for r in range(world)]
    ids = [g for draws in per_rank for _, g in draws]
    assert len(ids) == len(set(ids)) == 32
    assert sorted(ids) == list(range(32))  # ranks together cover the global positions
    lab_draws = [[i for k, (i, _) in enumerate(d) if k % batch < lab] for d in per_rank]  # 8 per rank
    interleaved = [lab_draws[j % world][j // world] for j in range(16)]
    assert sorted(interleaved[:10]) == labelled  # first labelled epoch: every labelled item once
    # The ranks interleave exactly the single-process labelled stream.
    single = take(LabelledShareSampler(labels, batch, lab, seed=9), 8 * batch)
    assert [i for k, (i, _) in enumerate(single) if k % batch < lab] == interleaved


def test_small_labelled_pool_is_oversampled_by_cycling():
    labels = [-1] * 100
    for i in (5, 50, 95):
        labels[i] = 2
    draws = take(LabelledShareSampler(labels, batch_size=16, labelled_per_batch=4, seed=1), 10 * 16)
    lab = [i for k, (i, _) in enumerate(draws) if k % 16 < 4]
    counts = Counter(lab)
    assert len(lab) == 40
    assert sorted(counts) == [5, 50, 95]
    assert sorted(counts.values()) == [13, 13, 14]
    unl = [i for k, (i, _) in enumerate(draws) if k % 16 >= 4]
    assert all(labels[i] == -1 for i in unl) and len(set(unl)) == 97  # 120 draws: one full epoch + 23


def test_class_balance_equalises_a_90_10_split():
    labels = [0] * 90 + [1] * 10 + [-1] * 20
    balanced = take(LabelledShareSampler(labels, 8, 8, seed=3, balance="class"), 4000)
    share = sum(labels[i] == 1 for i, _ in balanced) / 4000
    assert abs(share - 0.5) < 0.03
    minority = Counter(i for i, _ in balanced if labels[i] == 1)
    assert sorted(minority) == list(range(90, 100))
    assert all(abs(c - 200) < 60 for c in minority.values())  # uniform within the class
    plain = take(LabelledShareSampler(labels, 8, 8, seed=3), 4000)
    assert abs(sum(labels[i] == 1 for i, _ in plain) / 4000 - 0.1) < 0.01


def test_branch_balance_equalises_groups():
    # Classes 0-3 form lineage 0 (80 items), classes 4-5 lineage 1 (20 items: 15 + 5).
    labels = [c for c in range(4) for _ in range(20)] + [4] * 15 + [5] * 5 + [-1] * 10
    groups = [(0 if y < 4 else 1) if y >= 0 else -1 for y in labels]
    draws = take(LabelledShareSampler(labels, 10, 10, seed=2, balance="branch", groups=groups), 4000)
    share = sum(groups[i] == 1 for i, _ in draws) / 4000
    assert abs(share - 0.5) < 0.03
    # Uniform within the group, not within classes: class 5 holds 5/20 of lineage 1.
    class5 = sum(labels[i] == 5 for i, _ in draws) / 4000
    assert abs(class5 - 0.125) < 0.02
    by_class = take(LabelledShareSampler(labels, 10, 10, seed=2, balance="class"), 4000)
    assert abs(sum(groups[i] == 1 for i, _ in by_class) / 4000 - 2 / 6) < 0.03


def test_jump_to_a_huge_start_is_constant_time():
    labels = mixed_labels(30)
    for balance in ("none", "class"):
        sampler = LabelledShareSampler(labels, 8, 3, seed=2, rank=3, world_size=4, start=10**12, balance=balance)
        t0 = time.perf_counter()
        draws = take(sampler, 16)
        assert time.perf_counter() - t0 < 0.5
        for k, (index, draw_id) in enumerate(draws):
            p = 10**12 + k
            assert draw_id == 3 + 4 * p
            assert (index, draw_id) == sampler.item_at(p)
            assert (labels[index] >= 0) == (p % 8 < 3)
    # `sampler`/`draws` are the class-balanced ones from the last loop pass.
    p = 10**12 + 1  # slot 1 of batch 125e9: labelled stream position (125e9 * 3 + 1) * 4 + 3
    q = (125_000_000_000 * 3 + 1) * 4 + 3
    assert sampler.stream_position(p) == (LABELLED_STREAM, q)
    assert draws[1][0] == reference_item(labels, 2, LABELLED_STREAM, q, class_weights(labels))
    p = 10**12 + 5  # slot 5: unlabelled stream position (125e9 * 5 + 2) * 4 + 3
    q = (125_000_000_000 * 5 + 2) * 4 + 3
    assert sampler.stream_position(p) == (UNLABELLED_STREAM, q)
    assert draws[5][0] == reference_item(labels, 2, UNLABELLED_STREAM, q)


def test_pure_pools_and_edge_shares():
    all_labelled = [0, 1, 2, 1]
    draws = take(LabelledShareSampler(all_labelled, 4, 4), 12)
    assert sorted(i for i, _ in draws[:4]) == [0, 1, 2, 3]
    all_unlabelled = [-1] * 5
    draws = take(LabelledShareSampler(all_unlabelled, 5, 0), 10)
    assert sorted(i for i, _ in draws[:5]) == list(range(5))


def test_empty_pools_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="no item is labelled"):
        LabelledShareSampler([-1] * 6, 4, 1)
    with pytest.raises(ValueError, match="every item is labelled"):
        LabelledShareSampler([0, 1, 0], 4, 3)
    with pytest.raises(SamplerConfigError, match="labelled_per_batch"):
        LabelledShareSampler([0, -1], 4, 5)
    with pytest.raises(SamplerConfigError, match="needs groups"):
        LabelledShareSampler([0, -1], 2, 1, balance="branch")
    with pytest.raises(SamplerConfigError, match="groups has"):
        LabelledShareSampler([0, -1], 2, 1, balance="branch", groups=[0])
    with pytest.raises(SamplerConfigError, match="balance"):
        LabelledShareSampler([0, -1], 2, 1, balance="lineage")
    with pytest.raises(SamplerConfigError, match="rank"):
        LabelledShareSampler([0, -1], 2, 1, rank=2, world_size=2)
    with pytest.raises(SamplerConfigError, match="-1"):
        LabelledShareSampler([0, -2], 2, 1)
    with pytest.raises(SamplerConfigError, match="start"):
        LabelledShareSampler([0, -1], 2, 1).set_start(-1)


def test_labelled_per_batch_from_fraction():
    assert labelled_per_batch_from_fraction(32, 0.25) == 8
    assert labelled_per_batch_from_fraction(10, 0.25) == 3  # 2.5 rounds half up
    assert labelled_per_batch_from_fraction(8, 0.0) == 0
    assert labelled_per_batch_from_fraction(8, 1.0) == 8
    assert labelled_per_batch_from_fraction(8, 1.7) == 8
    assert labelled_per_batch_from_fraction(8, -0.3) == 0
    for bad in (None, float("nan"), float("inf")):
        with pytest.raises(SamplerConfigError, match="fraction"):
            labelled_per_batch_from_fraction(8, bad)
    with pytest.raises(SamplerConfigError, match="batch_size"):
        labelled_per_batch_from_fraction(0, 0.5)
