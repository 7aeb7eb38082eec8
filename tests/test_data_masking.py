"""Block masks, per-batch mask sampling and the collator's mask bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dinov2_hier.data import (
    BlockMaskGenerator,
    CollateError,
    GlobalCropsCollator,
    MaskingConfigError,
    masked_patch_budget,
    sample_masks,
)


def test_block_mask_count_never_exceeds_and_nearly_hits_target():
    generator = BlockMaskGenerator((8, 8))
    for target in (4, 6, 10, 16, 20, 25, 32):
        shortfalls = []
        for seed in range(100):
            mask = generator(target, np.random.default_rng([seed, target]))
            assert mask.shape == (8, 8) and mask.dtype == bool
            count = int(mask.sum())
            assert count <= target
            shortfalls.append(target - count)
        assert max(shortfalls) <= 2, (target, shortfalls)
        assert np.mean(shortfalls) <= 0.25, (target, np.mean(shortfalls))
    assert generator(0, np.random.default_rng(0)).sum() == 0


def test_block_mask_places_rectangles_of_the_drawn_shape():
    # Area fixed to 4 and aspect to 1: every block is a 2 x 2 square, anywhere on the grid.
    generator = BlockMaskGenerator((8, 8), min_num_patches=4, max_num_patches=4, min_aspect=1.0, max_aspect=1.0)
    corners = set()
    for seed in range(40):
        mask = generator(4, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        assert len(rows) == 4
        assert (rows.max() - rows.min(), cols.max() - cols.min()) == (1, 1)
        corners.add((int(rows.min()), int(cols.min())))
    assert all(0 <= r <= 6 and 0 <= c <= 6 for r, c in corners) and len(corners) > 20


def test_block_mask_deterministic_and_validated():
    generator = BlockMaskGenerator((6, 5))
    a = generator(9, np.random.default_rng(3))
    b = generator(9, np.random.default_rng(3))
    assert a.shape == (6, 5) and np.array_equal(a, b)
    with pytest.raises(MaskingConfigError, match=r"\[0, 30\]"):
        generator(31, np.random.default_rng(0))
    with pytest.raises(MaskingConfigError, match="max_num_patches"):
        BlockMaskGenerator((4, 4), min_num_patches=5, max_num_patches=4)


@pytest.mark.parametrize("n_crops, probability, n_masked", [(10, 0.5, 5), (7, 0.5, 3), (6, 1.0, 6), (4, 0.0, 0)])
def test_sample_masks_masks_int_n_times_p_crops(n_crops, probability, n_masked):
    for seed in range(5):
        masks = sample_masks(n_crops, (8, 8), (0.1, 0.5), probability, rng=np.random.default_rng(seed))
        assert masks.shape == (n_crops, 64) and masks.dtype == bool
        counts = masks.sum(axis=1)
        assert int((counts > 0).sum()) == n_masked
        # Ratios are stratified: the k-th smallest count <= int(64 * (0.1 + 0.4 * (k + 1) / n_masked)).
        masked_counts = np.sort(counts[counts > 0])
        for k, c in enumerate(masked_counts):
            assert c <= int(64 * (0.1 + 0.4 * (k + 1) / n_masked))
            assert c >= int(64 * (0.1 + 0.4 * k / n_masked)) - 2


def test_sample_masks_shuffles_crop_order():
    positions = set()
    for seed in range(10):
        masks = sample_masks(10, (8, 8), rng=np.random.default_rng(seed))
        positions.update(np.nonzero(masks.any(axis=1))[0].tolist())
    assert positions == set(range(10))  # masked crops are not always the first five


def item(draw_id: int, value: float, label: str | None = None) -> dict:
    return {
        "global_crops": [torch.full((3, 8, 8), value), torch.full((3, 8, 8), -value)],
        "label": label, "dataset": "d", "path": f"img{draw_id}.png", "draw_id": draw_id,
    }


def test_collate_shapes_indices_and_weights():
    items = [item(40, 1.0, "a"), {"error": "broken", "path": "bad.jpg", "draw_id": 41},
             item(42, 2.0), item(43, 3.0, "c")]
    collator = GlobalCropsCollator((4, 4), mask_ratio=(0.1, 0.5), mask_probability=0.5, seed=9)
    batch = collator(items)
    assert batch["global_crops"].shape == (6, 3, 8, 8)
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, -1.0, -2.0, -3.0]
    assert batch["labels"] == ["a", None, "c"]
    assert batch["draw_ids"] == [40, 42, 43]
    assert (batch["n_drawn"], batch["skipped"], batch["skipped_errors"]) == (4, ["bad.jpg"], ["broken"])

    masks = batch["masks"]
    assert masks.shape == (6, 16) and masks.dtype == torch.bool
    # The seeding rule, recomputed independently: rng([seed, first draw id of the batch]).
    expected = sample_masks(6, (4, 4), (0.1, 0.5), 0.5, rng=np.random.default_rng([9, 40]))
    assert np.array_equal(masks.numpy(), expected)
    counts = masks.sum(dim=1).tolist()
    assert sum(c > 0 for c in counts) == 3  # int(6 * 0.5)
    flat = [i * 16 + j for i in range(6) for j in range(16) if masks[i, j]]
    # Padded to the fixed budget: int(16 * 0.2333) + int(16 * 0.3667) + int(16 * 0.5) = 3 + 5 + 8.
    padding = 16 - len(flat)
    assert batch["mask_indices"].dtype == torch.long and batch["mask_indices"].tolist() == flat + [0] * padding
    assert batch["n_masked_patches"] == len(flat) == sum(counts)
    assert batch["masks_weight"].tolist() == pytest.approx([1.0 / counts[f // 16] for f in flat] + [0.0] * padding)
    assert float(batch["masks_weight"].sum()) == pytest.approx(3.0)  # one per masked crop

    again = collator(items)
    assert torch.equal(again["masks"], masks)


def test_collate_all_errors_gives_empty_batch():
    items = [{"error": "x", "path": "a.jpg", "draw_id": 0}, {"error": "y", "path": "b.jpg", "draw_id": 1}]
    batch = GlobalCropsCollator((4, 4), crop_size=8)(items)
    assert batch["global_crops"].shape == (0, 3, 8, 8)
    assert batch["masks"].shape == (0, 16)
    assert batch["mask_indices"].numel() == 0 and batch["masks_weight"].numel() == 0
    assert (batch["n_drawn"], batch["n_masked_patches"], batch["skipped"]) == (2, 0, ["a.jpg", "b.jpg"])
    assert batch["labels"] == []


def test_collate_requires_draw_id():
    broken = item(0, 1.0)
    del broken["draw_id"]
    with pytest.raises(CollateError, match="img0.png.*draw_id"):
        GlobalCropsCollator((4, 4))([broken])


def test_masked_patch_budget_by_hand_and_bounds_every_batch():
    # 6 crops, 3 masked, strata tops 0.1 + 0.4 * (1, 2, 3) / 3 of 16 patches: 3 + 5 + 8.
    assert masked_patch_budget(6, (4, 4), (0.1, 0.5), 0.5) == 16
    assert masked_patch_budget(6, (4, 4), (0.1, 0.5), 0.0) == 0
    # Full ratio: every masked crop may mask all patches.
    assert masked_patch_budget(4, (2, 3), (1.0, 1.0), 1.0) == 24
    # ViT-S/14 at 224 px, batch 128: 256 crops, 128 masked, 16 x 16 patches.
    budget = masked_patch_budget(256, (16, 16), (0.1, 0.5), 0.5)
    assert budget == sum(int(256 * (0.1 + 0.4 * (i + 1) / 128) + 1e-6) for i in range(128))
    counts = [sample_masks(256, (16, 16), rng=np.random.default_rng(seed)).sum() for seed in range(20)]
    assert max(counts) <= budget
    assert budget - min(counts) < 0.02 * budget  # the strata keep the padding small
