"""Manifests, ImageFolder scanning, unreadable images, error items and the skip counter."""
from __future__ import annotations

from tests.conftest import real_data_dir

import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dinov2_hier.data import (
    DataSourceError,
    GlobalCropsCollator,
    ImageFolderError,
    ImageRecordDataset,
    ManifestError,
    Record,
    SkipCounter,
    TooManyUnreadableImages,
    UnreadableImageError,
    load_image,
    read_manifest,
    read_manifests,
    records_from_source,
    scan_image_folder,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def save_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# -- manifests -----------------------------------------------------------------------------


def test_manifest_relative_paths_empty_labels_and_dataset_column(tmp_path):
    csv_path = write(
        tmp_path / "lists" / "train.csv",
        "path,label,dataset,extra\n"
        "a.jpg,neutrophil,pbc,x\n"
        "\n"  # blank line: skipped
        "../imgs/b.png,,,y\n"
        "/abs/c.jpg, lymphocyte ,bccd,z\n"
        '"d,e.jpg",monocyte,,w\n',
    )
    records = read_manifest(csv_path, dataset="fallback")
    base = (tmp_path / "lists").resolve()
    assert records == [
        Record(str(base / "a.jpg"), "neutrophil", "pbc"),
        Record(str((tmp_path / "imgs" / "b.png").resolve()), None, "fallback"),
        Record("/abs/c.jpg", "lymphocyte", "bccd"),
        Record(str(base / "d,e.jpg"), "monocyte", "fallback"),
    ]
    assert all(Path(r.path).is_absolute() for r in records)


def test_manifest_without_label_or_dataset_columns(tmp_path):
    csv_path = write(tmp_path / "m.csv", "path\nx.png\ny.png\n")
    assert read_manifest(csv_path) == [
        Record(str(tmp_path.resolve() / "x.png"), None, None),
        Record(str(tmp_path.resolve() / "y.png"), None, None),
    ]


def test_manifest_custom_label_column_and_concatenation(tmp_path):
    first = write(tmp_path / "a.csv", "path,code,folder\nimg/1.jpg,BNE,neutrophil\n")
    second = write(tmp_path / "b.csv", "path,label\nimg/2.jpg,eosinophil\n")
    assert read_manifest(first, label_column="code")[0].label == "BNE"
    assert read_manifest(first)[0].label is None  # no 'label' column -> unlabelled
    both = read_manifests([first, second], dataset="d")
    assert [(Path(r.path).name, r.label, r.dataset) for r in both] == [
        ("1.jpg", None, "d"),
        ("2.jpg", "eosinophil", "d"),
    ]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("path,label\na.jpg,x\nb.jpg,y,extra\n", 3, "expected 2 fields"),
        ("path,label\na.jpg,x\n\nb.jpg\n", 4, "expected 2 fields"),  # blank line still counts
        ("path,label\n ,x\n", 2, "empty 'path'"),
        ("file,label\na.jpg,x\n", 1, "no 'path' column"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, text, line, fragment):
    csv_path = write(tmp_path / "bad.csv", text)
    with pytest.raises(ManifestError) as info:
        read_manifest(csv_path)
    message = str(info.value)
    assert f"bad.csv:{line}:" in message
    assert fragment in message
    assert isinstance(info.value, ValueError)


def test_manifest_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ManifestError, match="nope.csv"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="empty.csv: empty file"):
        read_manifest(write(tmp_path / "empty.csv", ""))


# -- ImageFolder ---------------------------------------------------------------------------


def test_scan_image_folder_labels_sorted_and_filtered(tmp_path):
    root = tmp_path / "root"
    save_png(root / "B" / "x.png", (1, 2, 3))
    save_png(root / "A" / "y.jpg", (1, 2, 3))
    save_png(root / "A" / "sub" / "z.JPEG", (1, 2, 3))  # upper-case extension, nested
    write(root / "A" / "notes.txt", "not an image")
    save_png(root / "top.png", (1, 2, 3))  # no class folder: ignored
    save_png(root / ".hidden" / "q.png", (1, 2, 3))  # hidden class: ignored
    records = scan_image_folder(root, dataset="toy")
    rel = [(str(Path(r.path).relative_to(root.resolve())), r.label, r.dataset) for r in records]
    assert rel == [
        ("A/sub/z.JPEG", "A", "toy"),
        ("A/y.jpg", "A", "toy"),
        ("B/x.png", "B", "toy"),
    ]


def test_scan_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ImageFolderError, match="empty: no images"):
        scan_image_folder(tmp_path / "empty")
    with pytest.raises(ImageFolderError, match="missing"):
        scan_image_folder(tmp_path / "missing")


def test_records_from_source_dispatch(tmp_path):
    save_png(tmp_path / "tree" / "cls" / "a.png", (0, 0, 0))
    csv_path = write(tmp_path / "m.csv", "path,label\ntree/cls/a.png,cls\n")
    from_csv = records_from_source(str(csv_path))
    from_dir = records_from_source(str(tmp_path / "tree"))
    assert from_csv == from_dir == [Record(str((tmp_path / "tree/cls/a.png").resolve()), "cls", None)]
    with pytest.raises(DataSourceError, match="neither a .csv manifest nor an existing directory"):
        records_from_source(str(tmp_path / "nothing_here"))


# -- unreadable images -----------------------------------------------------------------------


def make_bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    zero = folder / "zero.jpg"
    zero.write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=90
    )
    data = buffer.getvalue()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = folder / "text.jpg"
    text.write_text("this is not a JPEG\n")
    return {"zero": zero, "truncated": truncated, "text": text, "missing": folder / "missing.jpg"}


def test_load_image_good_and_bad(tmp_path):
    good = save_png(tmp_path / "good.png", (10, 200, 30), size=(5, 3))
    image = load_image(str(good))
    assert image.mode == "RGB" and image.size == (5, 3)
    assert image.getpixel((4, 2)) == (10, 200, 30)
    gray = tmp_path / "gray.png"
    Image.new("L", (2, 2), 77).save(gray)
    assert load_image(str(gray)).getpixel((0, 0)) == (77, 77, 77)
    for kind, path in make_bad_files(tmp_path / "bad").items():
        with pytest.raises(UnreadableImageError) as info:
            load_image(str(path))
        assert str(path) in str(info.value), kind
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def constant_crops(image: Image.Image, draw_id: int) -> dict:
    """Test transform: crop 0 filled with draw_id, crop 1 with draw_id + 0.5, [3, 4, 4]."""
    return {"global_crops": [torch.full((3, 4, 4), float(draw_id)), torch.full((3, 4, 4), draw_id + 0.5)]}


def test_error_items_are_dropped_and_counted(tmp_path, caplog):
    bad = make_bad_files(tmp_path / "bad")
    good_a = save_png(tmp_path / "a.png", (1, 1, 1))
    good_b = save_png(tmp_path / "b.png", (2, 2, 2))
    records = [
        Record(str(good_a), "x", "d1"),
        Record(str(bad["zero"]), "y", "d1"),
        Record(str(bad["truncated"]), None, "d1"),
        Record(str(good_b), None, "d2"),
        Record(str(bad["text"]), "z", "d2"),
    ]
    dataset = ImageRecordDataset(records, constant_crops)
    assert len(dataset) == 5
    items = [dataset[(i, 100 + i)] for i in range(5)]
    assert [("error" in item) for item in items] == [False, True, True, False, True]
    assert [item["draw_id"] for item in items] == [100, 101, 102, 103, 104]
    assert dataset[3]["draw_id"] == 3  # plain int key: draw_id = index

    batch = GlobalCropsCollator((2, 2), crop_size=4)(items)
    assert batch["n_drawn"] == 5
    assert batch["skipped"] == [str(bad["zero"]), str(bad["truncated"]), str(bad["text"])]
    assert batch["global_crops"].shape == (4, 3, 4, 4)
    # crop-major: crop 0 of items 0 and 3, then crop 1 of items 0 and 3
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [100.0, 103.0, 100.5, 103.5]
    assert batch["labels"] == ["x", None]
    assert batch["datasets"] == ["d1", "d2"]
    assert batch["paths"] == [str(good_a), str(good_b)]

    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"):
        counter.update(batch["skipped"], batch["n_drawn"], batch["skipped_errors"])
        counter.update(batch["skipped"], batch["n_drawn"], batch["skipped_errors"])  # same files again
    assert (counter.n_skipped, counter.n_drawn, counter.n_unique_bad) == (6, 10, 3)
    assert len([r for r in caplog.records if r.name == "dinov2_hier.data"]) == 3  # each path once


def test_skip_counter_threshold_and_state(caplog):
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"):
        counter.update(["a.jpg", "b.jpg"], 10)
        counter.update(["a.jpg"], 10)
    assert [r.getMessage() for r in caplog.records] == [
        "skipping unreadable image a.jpg",
        "skipping unreadable image b.jpg",
    ]
    assert (counter.n_skipped, counter.n_drawn, counter.bad_paths) == (3, 20, ["a.jpg", "b.jpg"])
    assert counter.fraction == pytest.approx(0.15)
    counter.check(max_fraction=0.2, min_draws=10)  # 15% <= 20%: fine
    counter.check(max_fraction=0.1, min_draws=21)  # too few draws to judge
    with pytest.raises(TooManyUnreadableImages) as info:
        counter.check(max_fraction=0.1, min_draws=20)
    message = str(info.value)
    assert "3 of 20" in message and "15.00%" in message and "10.00%" in message
    assert "2 distinct files" in message and "a.jpg" in message

    restored = SkipCounter()
    restored.load_state_dict(counter.state_dict())
    assert (restored.n_skipped, restored.n_drawn, restored.bad_paths) == (3, 20, ["a.jpg", "b.jpg"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"):
        restored.update(["b.jpg", "c.jpg"], 5)
    assert [r.getMessage() for r in caplog.records] == ["skipping unreadable image c.jpg"]
    assert (restored.n_skipped, restored.n_drawn) == (5, 25)
    with pytest.raises(ValueError, match="smaller than"):
        restored.update(["x", "y"], 1)


REAL_DATA = real_data_dir()


@pytest.mark.skipif(REAL_DATA is None, reason="DINOV2_HIER_TEST_DATA with bccd/ and pbc_dev/ not set (optional)")
def test_real_manifests_and_folders():
    root = REAL_DATA
    bccd = read_manifest(root / "bccd" / "labels.csv", dataset="bccd")
    assert len(bccd) == 351
    assert Counter(r.label for r in bccd) == {
        "neutrophil": 207, "eosinophil": 88, "lymphocyte": 33, "monocyte": 20, "basophil": 3
    }
    folder = scan_image_folder(root / "bccd" / "images")
    assert Counter(r.label for r in folder)["Neutrophil"] == 207
    assert sorted(r.path for r in folder) == sorted(r.path for r in bccd)
    pbc = read_manifest(root / "pbc_dev" / "labels.csv", label_column="code")
    assert len(pbc) == 1610 and Counter(r.label for r in pbc)["NEUTROPHIL"] == 50
    image = load_image(pbc[0].path)
    assert image.mode == "RGB" and 355 <= image.width <= 370 and 355 <= image.height <= 370
