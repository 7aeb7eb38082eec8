"""Synthetic cell generator: the JSON tree, determinism, attribute-driven looks, labelling, files."""
from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_hier.data import (
    GlobalCropsAugmentation,
    SyntheticCellDataset,
    SyntheticCellGenerator,
    SyntheticSpecError,
    read_manifest,
    write_synthetic_dataset,
)
from dinov2_hier.hierarchy import Hierarchy

TREE = Path(__file__).resolve().parents[1] / "hierarchies" / "synthetic.json"


@pytest.fixture(scope="module")
def tree() -> Hierarchy:
    return Hierarchy.from_json(TREE)


def test_tree_shape(tree):
    assert tree.name == "synthetic" and tree.root == "cell"
    assert len(tree.leaves) == 11
    assert tree.children("cell") == ["myeloid", "lymphoid", "monocytic", "erythroid"]
    assert tree.ancestors("segmented_neutrophil") == ["segmented_neutrophil", "mature_granulocyte", "myeloid"]
    assert (tree.depth("myeloblast"), tree.depth("monocyte"), tree.depth("erythroblast")) == (3, 2, 2)


def test_generation_is_deterministic_in_seed_and_index(tree):
    a = SyntheticCellGenerator(tree, image_size=32, seed=0)
    b = SyntheticCellGenerator(tree, image_size=32, seed=0)
    image, leaf = a.generate(5)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert leaf == tree.leaves[5] and a.leaf_of(16) == tree.leaves[5]  # 16 % 11 == 5
    assert image.tobytes() == b.generate(5)[0].tobytes()
    assert image.tobytes() != SyntheticCellGenerator(tree, image_size=32, seed=1).generate(5)[0].tobytes()
    assert image.tobytes() != a.generate(16)[0].tobytes()  # same class, other nuisance draws
    array = np.asarray(image)
    assert array.dtype == np.uint8 and 0 < array.std()


def cell_statistics(tree: Hierarchy, leaf: str, n: int = 6, size: int = 48) -> dict[str, np.ndarray]:
    """Measured from pixels only (no red cells): cell = channel sum < 610 (background ~630-710),
    nucleus = channel sum < 450 (nuclei ~220-420, cytoplasm >= 480)."""
    generator = SyntheticCellGenerator(tree, image_size=size, seed=0, red_cells=(0, 0))
    offset = tree.leaves.index(leaf)
    fractions, colours, areas = [], [], []
    for k in range(n):
        pixels, got = generator.generate_array(offset + 11 * k)
        assert got == leaf
        total = pixels.astype(int).sum(axis=-1)
        cell, nucleus = total < 610, total < 450
        fractions.append(nucleus.sum() / cell.sum())
        colours.append(pixels[cell].mean(axis=0) / 255)
        areas.append(cell.mean())
    return {"nucleus_fraction": np.mean(fractions), "colour": np.mean(colours, axis=0), "area": np.mean(areas)}


def test_meta_drives_the_pixels(tree):
    # Round, agranular nuclei: nucleus/cell area = (nucleus size)^2 from the JSON.
    for leaf in ("myeloblast", "lymphoblast", "small_lymphocyte"):
        size = tree.meta(leaf)["nucleus"]["size"]
        measured = cell_statistics(tree, leaf)["nucleus_fraction"]
        assert measured == pytest.approx(size**2, abs=0.05), leaf
    lymph, mono = cell_statistics(tree, "small_lymphocyte"), cell_statistics(tree, "monocyte")
    assert lymph["nucleus_fraction"] > mono["nucleus_fraction"] + 0.4  # 0.77 vs ~0.27
    # Cell area ratio follows cell_radius^2: (0.38 / 0.20)^2 = 3.61.
    assert mono["area"] / lymph["area"] == pytest.approx((0.38 / 0.20) ** 2, rel=0.15)
    # Eosinophil (orange granules) is red-dominant, the lymphocyte blue-dominant.
    eos = cell_statistics(tree, "eosinophil")["colour"]
    assert eos[0] - eos[2] > 0.2 and lymph["colour"][2] - lymph["colour"][0] > 0.15


def test_siblings_look_more_alike_than_lineages(tree):
    features = {}
    for leaf in tree.leaves:
        stats = cell_statistics(tree, leaf, n=4, size=40)
        features[leaf] = np.concatenate([stats["colour"], [stats["area"], stats["nucleus_fraction"]]])
    siblings, across = [], []
    for a, b in itertools.combinations(tree.leaves, 2):
        distance = float(np.linalg.norm(features[a] - features[b]))
        if tree.parent(a) == tree.parent(b):
            siblings.append(distance)
        elif tree.ancestor_at_depth(a, 1) != tree.ancestor_at_depth(b, 1):
            across.append(distance)
    assert np.mean(siblings) < 0.85 * np.mean(across)


def test_invalid_meta_names_node_and_key(tree):
    document = tree.to_dict()
    lymphoid = document["root"]["children"][1]
    small = lymphoid["children"][1]["children"][0]
    assert small["id"] == "small_lymphocyte"
    broken = copy.deepcopy(document)
    del broken["root"]["children"][1]["children"][1]["children"][0]["meta"]["chromatin"]
    with pytest.raises(SyntheticSpecError, match="'small_lymphocyte'.*'chromatin'"):
        SyntheticCellGenerator(Hierarchy.from_dict(broken))
    broken = copy.deepcopy(document)
    broken["root"]["children"][1]["children"][1]["children"][0]["meta"]["nucleus"]["shape"] = "star"
    with pytest.raises(SyntheticSpecError, match="small_lymphocyte.*shape"):
        SyntheticCellGenerator(Hierarchy.from_dict(broken))


def test_labels_honour_fractions_and_coarse_is_parent(tree):
    generator = SyntheticCellGenerator(tree, image_size=16, seed=7)
    n = 200
    labels = [generator.label(i, label_fraction=0.3, coarse_fraction=0.5) for i in range(n)]
    labelled = [(i, lab) for i, lab in enumerate(labels) if lab is not None]
    coarse = [(i, lab) for i, lab in labelled if lab != generator.leaf_of(i)]
    assert abs(len(labelled) - 60) <= 2 and abs(len(coarse) - 30) <= 2
    for i, lab in coarse:
        assert lab == tree.parent(generator.leaf_of(i)) and not tree.is_leaf(lab) and lab != tree.root
    assert {lab for _, lab in coarse} >= {"monocytic", "mature_granulocyte"}
    assert all(generator.label(i, 1.0, 0.0) == generator.leaf_of(i) for i in range(30))
    assert all(generator.label(i, 0.0, 0.0) is None for i in range(30))
    assert labels == [SyntheticCellGenerator(tree, 16, seed=7).label(i, 0.3, 0.5) for i in range(n)]


def test_write_synthetic_dataset(tmp_path, tree):
    manifest = write_synthetic_dataset(
        tmp_path / "synth", 30, tree, image_size=24, seed=3, label_fraction=0.5, coarse_fraction=0.4
    )
    assert manifest == tmp_path / "synth" / "manifest.csv"
    assert len(list((tmp_path / "synth" / "images").glob("*.png"))) == 30
    records = read_manifest(manifest)
    assert len(records) == 30 and {r.dataset for r in records} == {"synthetic"}
    lines = manifest.read_text().splitlines()
    assert lines[0] == "path,label,dataset,true_label"
    truths = [line.split(",")[3] for line in lines[1:]]
    generator = SyntheticCellGenerator(tree, image_size=24, seed=3)
    labelled = [r for r in records if r.label is not None]
    coarse = [(r, t) for r, t in zip(records, truths) if r.label is not None and r.label != t]
    assert abs(len(labelled) - 15) <= 2 and abs(len(coarse) - 6) <= 2
    assert all(r.label == tree.parent(t) for r, t in coarse)
    for i, (record, truth) in enumerate(zip(records, truths)):
        assert truth == tree.leaves[i % 11]
        assert record.label == generator.label(i, 0.5, 0.4)
    pixels, _ = generator.generate_array(7)
    assert np.array_equal(np.asarray(Image.open(records[7].path)), pixels)  # PNG is lossless


def test_synthetic_dataset_items(tree):
    generator = SyntheticCellGenerator(tree, image_size=32, seed=2)
    augmentation = GlobalCropsAugmentation(crop_size=16)
    dataset = SyntheticCellDataset(generator, 25, augmentation, label_fraction=0.5, coarse_fraction=0.5)
    assert len(dataset) == 25
    item = dataset[(12, 1000)]
    assert item["draw_id"] == 1000 and item["dataset"] == "synthetic" and item["path"] == "synthetic:2:12"
    assert item["label"] == generator.label(12, 0.5, 0.5)
    expected = augmentation(generator.generate(12)[0], 1000)["global_crops"]
    assert all(torch.equal(a, b) for a, b in zip(item["global_crops"], expected))
    with pytest.raises(IndexError):
        dataset[25]


def test_batches_do_not_depend_on_worker_count(tree):
    from itertools import islice

    from dinov2_hier.data import GlobalCropsCollator, InfiniteSampler

    def first_batches(num_workers: int) -> list[dict]:
        dataset = SyntheticCellDataset(
            SyntheticCellGenerator(tree, image_size=32, seed=1), 30, GlobalCropsAugmentation(crop_size=16, seed=4)
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=4, sampler=InfiniteSampler(30, seed=2, start=5),
            collate_fn=GlobalCropsCollator((4, 4), seed=3), num_workers=num_workers,
        )
        return list(islice(iter(loader), 2))

    in_process, with_workers = first_batches(0), first_batches(2)
    assert [b["draw_ids"] for b in in_process] == [[5, 6, 7, 8], [9, 10, 11, 12]]
    for a, b in zip(in_process, with_workers):
        assert a["draw_ids"] == b["draw_ids"] and a["paths"] == b["paths"]
        assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["masks"], b["masks"])
