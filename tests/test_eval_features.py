"""Evaluation backbones, checkpoint resolution, labelled data and cached features (eval.features)."""
from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import pytest
import torch

from dinov2_hier.config import load_config
from dinov2_hier.data import write_synthetic_dataset
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.labels import LabelMapError
from dinov2_hier.models import WeightsError
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.checkpoint import TEACHER_FILE, CheckpointError
from dinov2_hier.train.loop import Trainer
from eval.crossval import EvalDataError
from eval.features import (
    extract_features,
    load_eval_backbone,
    load_eval_data,
    resolve_checkpoints,
)
from tests.conftest import TINY_OVERRIDES

HIERARCHY = PROJECT_ROOT / "hierarchies" / "synthetic.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tiny training run: checkpoints at iterations 1 and 2, and the teacher file."""
    out = tmp_path_factory.mktemp("train") / "run"
    overrides = TINY_OVERRIDES + ["train.iterations=2", "train.checkpoint_every=1", "data.synthetic.num_images=32"]
    Trainer(load_config(None, overrides), out).run()
    return out


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """18 synthetic 40 px cells plus a zero-byte image, in one manifest."""
    root = tmp_path_factory.mktemp("cells")
    manifest = write_synthetic_dataset(root, 18, Hierarchy.from_json(HIERARCHY), image_size=40, seed=3)
    (root / "images" / "empty.png").write_bytes(b"")
    with open(manifest, "a", encoding="utf-8") as f:
        f.write("images/empty.png,monocyte,synthetic,monocyte\n")
    return manifest


# -- backbones ------------------------------------------------------------------------------
def test_teacher_file_and_training_checkpoint_give_identical_features(run_dir, cells):
    data = load_eval_data(cells, HIERARCHY)
    ckpts = resolve_checkpoints(run_dir)
    teacher = load_eval_backbone(run_dir / TEACHER_FILE)
    full = load_eval_backbone(ckpts[-1][1])
    for backbone in (teacher, full):
        assert not backbone.model.training
        assert not any(p.requires_grad for p in backbone.model.parameters())
        assert {k: backbone.meta[k] for k in ("arch", "patch_size", "img_size", "num_register_tokens", "iteration")} == {
            "arch": "vit_tiny", "patch_size": 8, "img_size": 32, "num_register_tokens": 0, "iteration": 2,
        }
        assert backbone.meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
        assert len(backbone.fingerprint) == 64
    assert teacher.fingerprint != full.fingerprint
    a = extract_features(teacher, data.paths, cache_dir=None, progress=False)
    b = extract_features(full, data.paths, cache_dir=None, progress=False, batch_size=5)
    assert np.array_equal(a.features, b.features) and np.array_equal(a.ok, b.ok)
    # ...and they are the teacher's, not the student's or an earlier iteration's.
    first = extract_features(load_eval_backbone(ckpts[0][1]), data.paths, cache_dir=None, progress=False)
    assert not np.allclose(first.features[a.ok], a.features[a.ok])


@pytest.mark.parametrize("which", ["teacher", "checkpoint"])
def test_mismatched_arch_is_one_clear_error(run_dir, which):
    path = run_dir / TEACHER_FILE if which == "teacher" else resolve_checkpoints(run_dir)[-1][1]
    with pytest.raises(CheckpointError) as info:
        load_eval_backbone(path, arch="vit_small")
    message = str(info.value)
    assert str(path) in message and "vit_tiny" in message and "vit_small" in message
    assert "'blocks.4.norm1.weight'" in message  # the first mismatching key


def test_weights_not_matching_their_recorded_meta(run_dir, tmp_path):
    payload = torch.load(run_dir / TEACHER_FILE, map_location="cpu", weights_only=True)
    payload["meta"]["num_register_tokens"] = 4
    bad = tmp_path / "edited_teacher.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match=r"edited_teacher\.pt.*missing key 'register_tokens'"):
        load_eval_backbone(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_eval_backbone(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_eval_backbone(run_dir)


def test_foreign_weights_need_an_arch(run_dir, tmp_path):
    """A DINOv2-style file without recorded architecture: arch decides, the rest is read off
    the tensors and position embeddings are resampled to 224 px."""
    payload = torch.load(run_dir / TEACHER_FILE, map_location="cpu", weights_only=True)
    foreign = tmp_path / "dinov2_style.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in payload["model"].items()}}, foreign)
    with pytest.raises(CheckpointError, match="name the architecture"):
        load_eval_backbone(foreign)
    backbone = load_eval_backbone(foreign, arch="vit_tiny")
    assert backbone.meta["patch_size"] == 8 and backbone.meta["img_size"] == 224
    assert torch.equal(backbone.model.state_dict()["blocks.3.mlp.fc2.weight"], payload["model"]["blocks.3.mlp.fc2.weight"])
    with pytest.raises(WeightsError, match=r"dinov2_style\.pth.*vit_small.*shape mismatch"):
        load_eval_backbone(foreign, arch="vit_small")


def test_untrained_backbone_is_deterministic():
    rng = torch.random.get_rng_state()
    a = load_eval_backbone("none", arch="vit_tiny")
    b = load_eval_backbone("None", arch="vit_tiny")
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.fingerprint == "untrained:vit_tiny:0" and a.meta["iteration"] is None
    assert a.meta["img_size"] == 224 and a.meta["patch_size"] == 14
    other = load_eval_backbone("none", arch="vit_tiny", seed=1)
    assert not torch.equal(other.model.state_dict()["pos_embed"], sa["pos_embed"])
    with pytest.raises(CheckpointError, match="needs an architecture"):
        load_eval_backbone("none")


def test_resolve_checkpoints(run_dir, tmp_path):
    found = resolve_checkpoints(run_dir)
    assert [name for name, _ in found] == ["iter_00000001", "iter_00000002"]
    assert [os.path.basename(p) for _, p in found] == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    assert resolve_checkpoints(run_dir / TEACHER_FILE) == [("teacher_backbone", str(run_dir / TEACHER_FILE))]
    assert resolve_checkpoints("none") == [("untrained", "none")]
    with pytest.raises(CheckpointError):
        resolve_checkpoints(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        resolve_checkpoints(tmp_path)


# -- features -------------------------------------------------------------------------------
def test_extract_features_skips_unreadable_and_caches(run_dir, cells, tmp_path, caplog):
    data = load_eval_data(cells, HIERARCHY)
    backbone = load_eval_backbone(run_dir / TEACHER_FILE)
    cache = tmp_path / "feature_cache"
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.eval"):
        first = extract_features(backbone, data.paths, cache_dir=cache, batch_size=4, progress=False)
    n = len(data.paths)
    assert first.features.shape == (n, 192) and first.features.dtype == np.float32
    assert not first.from_cache and first.n_unreadable == 1
    bad = data.paths.index(str(cells.parent / "images" / "empty.png"))
    assert first.ok.tolist() == [i != bad for i in range(n)]
    assert not first.features[bad].any() and np.abs(first.features[first.ok]).sum(axis=1).min() > 0
    skips = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(skips) == 1 and "empty.png" in skips[0].getMessage()
    assert [p.name for p in cache.iterdir()] == [first.cache_path.name]

    again = extract_features(backbone, data.paths, cache_dir=cache, progress=False)
    assert again.from_cache and again.n_unreadable == 1
    assert np.array_equal(again.features, first.features) and np.array_equal(again.ok, first.ok)
    order = np.random.default_rng(0).permutation(n)  # same files, other order: still a hit
    shuffled = extract_features(backbone, [data.paths[i] for i in order], cache_dir=cache, progress=False)
    assert shuffled.from_cache and np.array_equal(shuffled.features, first.features[order])

    cropped = extract_features(backbone, data.paths, cache_dir=cache, resize_mode="center_crop", progress=False)
    assert not cropped.from_cache and cropped.cache_path != first.cache_path
    os.utime(data.paths[0], ns=(1, 1))  # a changed file is a new key
    assert not extract_features(backbone, data.paths, cache_dir=cache, progress=False).from_cache


def test_extract_features_equal_the_model_on_transformed_images_across_host_copies(run_dir, cells, monkeypatch):
    """The features are the model's CLS output on EvalTransform's images, in path order,
    whether they reach the host once at the end or after every batch (the unreadable file,
    6th of 19, shares a batch of 2 with a readable one)."""
    import eval.extraction as extraction_module
    from dinov2_hier.data import EvalTransform, load_image

    data = load_eval_data(cells, HIERARCHY)
    backbone = load_eval_backbone(run_dir / TEACHER_FILE)
    good = [p for p in data.paths if not p.endswith("empty.png")]
    meta = backbone.meta
    transform = EvalTransform(meta["img_size"], "pad", meta["mean"], meta["std"])
    with torch.no_grad():
        reference = backbone.model(torch.stack([transform(load_image(p)) for p in good]))["x_norm_clstoken"].numpy()
    whole = extract_features(backbone, good, batch_size=len(good), cache_dir=None, progress=False)
    assert np.array_equal(whole.features, reference)  # one batch of the same images: the same bits
    paths = good[:5] + [p for p in data.paths if p.endswith("empty.png")] + good[5:]
    late = extract_features(backbone, paths, batch_size=2, cache_dir=None, progress=False)
    monkeypatch.setattr(extraction_module, "HOST_COPY_EVERY", 1)
    each = extract_features(backbone, paths, batch_size=2, cache_dir=None, progress=False)
    assert np.array_equal(each.features, late.features) and np.array_equal(each.ok, late.ok)
    assert late.ok.tolist() == [i != 5 for i in range(19)] and not late.features[5].any()
    rows = [i for i in range(19) if i != 5]
    np.testing.assert_allclose(late.features[rows], reference, rtol=0, atol=1e-5)  # other batch sizes


def test_extract_features_bad_settings(run_dir, cells):
    backbone = load_eval_backbone(run_dir / TEACHER_FILE)
    with pytest.raises(EvalDataError, match="multiple of the patch size"):
        extract_features(backbone, [], crop_size=30, cache_dir=None)
    with pytest.raises(EvalDataError, match="resize_mode"):
        extract_features(backbone, [], resize_mode="stretch", cache_dir=None)
    empty = extract_features(backbone, [], cache_dir=None, progress=False)
    assert empty.features.shape == (0, 192) and empty.n_unreadable == 0


# -- labelled data --------------------------------------------------------------------------
def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _toy_map(tmp_path):
    doc = {"dataset": "toy", "hierarchy": "synthetic",
           "labels": {"MB": "myeloblast", "IG": "immature_granulocyte", "MO": "monocyte"}}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_load_eval_data_maps_dataset_codes_through_label_map(tmp_path):
    label_map = _toy_map(tmp_path)
    rows = [[f"img{i}.png", code, "x"] for i, code in enumerate(["MO", "MB", "IG", "mb", "MO"])]
    manifest = _write_csv(tmp_path / "labels.csv", ["path", "code", "folder"], rows)
    data = load_eval_data(manifest, HIERARCHY, label_map=str(label_map), label_column="code")
    assert data.labels == ["monocyte", "myeloblast", "immature_granulocyte", "myeloblast", "monocyte"]
    h = Hierarchy.from_json(HIERARCHY)
    assert data.classes == sorted({"monocyte", "myeloblast", "immature_granulocyte"}, key=h.index)
    assert data.classes == ["myeloblast", "monocyte", "immature_granulocyte"]  # leaves, then internal
    assert data.paths[0] == str(tmp_path / "img0.png") and data.records[0].label == "MO"
    # The map may also be named by dataset, found in label_maps_dir.
    by_name = load_eval_data(manifest, HIERARCHY, label_map="toy", label_maps_dir=tmp_path, label_column="code")
    assert by_name.labels == data.labels
    # Without a hierarchy: mapped strings (with a map) or the raw labels, sorted.
    raw = load_eval_data(manifest, label_column="code")
    assert raw.labels == ["MO", "MB", "IG", "mb", "MO"] and raw.classes == ["IG", "MB", "MO", "mb"]


def test_load_eval_data_dataset_column_picks_the_map(tmp_path):
    _toy_map(tmp_path)
    rows = [["a.png", "MB", "toy"], ["b.png", "monocyte", ""]]  # no dataset -> must be a node id
    manifest = _write_csv(tmp_path / "m.csv", ["path", "label", "dataset"], rows)
    data = load_eval_data(manifest, HIERARCHY, label_maps_dir=tmp_path)
    assert data.labels == ["myeloblast", "monocyte"]


def test_load_eval_data_errors_name_label_dataset_and_row(tmp_path):
    label_map = _toy_map(tmp_path)
    manifest = _write_csv(tmp_path / "labels.csv", ["path", "code"], [["a.png", "MB"], ["b.png", "ZZ"]])
    with pytest.raises(LabelMapError) as info:
        load_eval_data(manifest, HIERARCHY, label_map=str(label_map), label_column="code")
    message = str(info.value)
    assert "'ZZ'" in message and "'toy'" in message and "b.png" in message and "labels.csv" in message
    with pytest.raises(LabelMapError, match="'ZZ'.*'toy'"):  # also without a hierarchy
        load_eval_data(manifest, label_map=str(label_map), label_column="code")
    with pytest.raises(LabelMapError, match="'nope'"):
        load_eval_data(manifest, HIERARCHY, label_map="nope", label_maps_dir=tmp_path, label_column="code")
    unlabelled = _write_csv(tmp_path / "u.csv", ["path", "label"], [["a.png", "monocyte"], ["b.png", ""]])
    with pytest.raises(EvalDataError, match=r"1 of 2 images have no label \(column 'label'\) \(first: .*b\.png\)"):
        load_eval_data(unlabelled, HIERARCHY)


def test_load_eval_data_image_folder(tmp_path):
    for cls in ("monocyte", "eosinophil"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_bytes(b"")
    data = load_eval_data(tmp_path, HIERARCHY, label_maps_dir=tmp_path / "no_maps_here")
    assert data.labels == ["eosinophil", "monocyte"] and data.classes == ["eosinophil", "monocyte"]
