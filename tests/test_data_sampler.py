"""Infinite sampler: epochs are permutations, ranks partition the stream, resume is exact and O(1)."""
from __future__ import annotations

from itertools import islice

import pytest
import torch

from dinov2_hier.data import InfiniteSampler, SamplerConfigError, epoch_permutation


def take(sampler: InfiniteSampler, n: int) -> list[tuple[int, int]]:
    return list(islice(iter(sampler), n))


def test_single_process_stream_is_concatenated_epoch_permutations():
    stream = take(InfiniteSampler(10, seed=3), 30)
    assert [g for _, g in stream] == list(range(30))
    indices = [i for i, _ in stream]
    for epoch in range(3):
        block = indices[10 * epoch : 10 * epoch + 10]
        assert sorted(block) == list(range(10))
        assert block == epoch_permutation(10, 3, epoch).tolist()
    assert indices[:10] != indices[10:20]  # a fresh order each epoch
    assert take(InfiniteSampler(10, seed=3), 30) == stream  # deterministic
    assert take(InfiniteSampler(10, seed=4), 10) != stream[:10]


def test_ranks_are_disjoint_and_cover_the_stream():
    single = take(InfiniteSampler(7, seed=1), 60)
    per_rank = [take(InfiniteSampler(7, seed=1, rank=r, world_size=3), 20) for r in range(3)]
    for r, draws in enumerate(per_rank):
        assert [g for _, g in draws] == [r + 3 * k for k in range(20)]
    merged = sorted((g, i) for draws in per_rank for i, g in draws)
    assert merged == [(g, i) for i, g in single]


def test_resume_equals_uninterrupted_stream():
    full = take(InfiniteSampler(9, seed=5, rank=1, world_size=2), 40)
    resumed = InfiniteSampler(9, seed=5, rank=1, world_size=2, start=17)
    assert take(resumed, 23) == full[17:]
    resumed.set_start(4)
    assert take(resumed, 10) == full[4:14]


def test_skip_is_constant_time_for_huge_start():
    start = 10**12
    (index, draw_id), = take(InfiniteSampler(10, seed=2, rank=1, world_size=4, start=start), 1)
    g = 1 + 4 * start
    assert draw_id == g
    assert index == int(epoch_permutation(10, 2, g // 10)[g % 10])


def test_no_shuffle_is_identity_order():
    assert [i for i, _ in take(InfiniteSampler(4, shuffle=False, rank=1, world_size=3), 6)] == [1, 0, 3, 2, 1, 0]


def test_invalid_arguments():
    with pytest.raises(SamplerConfigError, match="rank"):
        InfiniteSampler(5, rank=2, world_size=2)
    with pytest.raises(SamplerConfigError, match="size"):
        InfiniteSampler(0)
    with pytest.raises(SamplerConfigError, match="start"):
        InfiniteSampler(5).set_start(-1)


class EchoDataset:
    def __len__(self) -> int:
        return 6

    def __getitem__(self, key):
        return key


def test_dataloader_passes_index_and_draw_id_to_the_dataset():
    sampler = InfiniteSampler(6, seed=0)
    loader = torch.utils.data.DataLoader(EchoDataset(), batch_size=4, sampler=sampler, collate_fn=list)
    first_two = list(islice(iter(loader), 2))
    assert [tuple(k) for batch in first_two for k in batch] == take(InfiniteSampler(6, seed=0), 8)
