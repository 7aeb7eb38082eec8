"""Input that does not fit is refused, not silently used (issue 19, items 10-12).

* weights matching too little of the backbone, or holding integer/bool tensors where
  floating weights belong, in training (``student.pretrained_weights``), evaluation and
  :func:`dinov2_hier.load_backbone`;
* ``export --eval`` with the metrics of other weights than those exported;
* 16-bit (and 32-bit integer / float) grey images scaled to 8 bits by their value range,
  and images over :data:`dinov2_hier.data.datasets.MAX_IMAGE_PIXELS` decoded reduced (JPEG)
  or refused as unreadable, with a log line naming the file and size.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinov2_hier.data.datasets as datasets
from dinov2_hier.data import UnreadableImageError, load_image
from dinov2_hier.data.datasets import ImageRecordDataset
from dinov2_hier.data.records import Record
from dinov2_hier.models import WeightsError, build_backbone, load_backbone_weights
from dinov2_hier.train.checkpoint import TEACHER_FILE, CheckpointError
from tests.conftest import TINY_OVERRIDES


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run_cli(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny", img_size=32, patch_size=8)


def _teacher_file(path: Path, seed: int = 0, state: dict | None = None) -> Path:
    """A ``teacher_backbone.pt`` as training writes it (vit_tiny, patch 8, 32 px)."""
    model = _tiny_backbone(seed)
    meta = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "num_register_tokens": 0, "iteration": 7,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "ffn_layer": "mlp",
            "layerscale": 1e-5, "qkv_bias": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state if state is not None else model.state_dict(), "meta": meta}, path)
    return path


# ------------------------------------------------------------------ 10: weights that do not fit


def test_pretrained_weights_matching_nothing_exit_2(tmp_path):
    from dinov2_hier.train.__main__ import main as train_main

    weights = tmp_path / "foreign.pth"
    torch.save({"encoder.layer.0.weight": torch.randn(4, 4), "classifier.bias": torch.zeros(4)}, weights)
    code, _, err = _run_cli(train_main, ["--output-dir", str(tmp_path / "run"), *TINY_OVERRIDES,
                                         f"student.pretrained_weights={weights}"])
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    line = lines[0]
    assert str(weights) in line
    assert "matches 0 of" in line
    assert "'encoder.layer.0.weight'" in line  # an example key of the file
    assert "'cls_token'" in line  # an example key of the model


def test_weights_matching_a_small_share_are_refused_and_a_hub_layout_still_loads():
    source, target = _tiny_backbone(0), _tiny_backbone(1)
    state = source.state_dict()
    few = {k: v for k, v in state.items() if k in ("cls_token", "pos_embed", "norm.weight", "norm.bias")}
    with pytest.raises(WeightsError, match=r"state dict: matches 4 of \d+ backbone tensors \(\d+\.\d% of"):
        load_backbone_weights(target, few)
    # A DINOv2 hub checkpoint without registers, into a model with register tokens and another
    # resolution: a legitimate partial match (pos_embed interpolated).
    torch.manual_seed(2)
    with_registers = build_backbone("vit_tiny", img_size=48, patch_size=8, num_register_tokens=4)
    report = load_backbone_weights(with_registers, state)
    assert (report.missing, report.interpolated) == (["register_tokens"], ["pos_embed"])
    assert torch.equal(with_registers.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused_in_training(dtype):
    source, target = _tiny_backbone(0), _tiny_backbone(1)
    state = dict(source.state_dict())
    state["blocks.0.norm1.weight"] = torch.ones(192, dtype=dtype)
    before = target.blocks[0].norm1.weight.clone()
    with pytest.raises(WeightsError, match=rf"'blocks\.0\.norm1\.weight' is {str(dtype).removeprefix('torch.')}"):
        load_backbone_weights(target, state)
    assert torch.equal(target.blocks[0].norm1.weight, before)  # nothing loaded


def test_integer_weights_are_refused_in_training_cli(tmp_path):
    from dinov2_hier.train.__main__ import main as train_main

    state = dict(_tiny_backbone(0).state_dict())
    state["pos_embed"] = state["pos_embed"].long()
    weights = tmp_path / "int.pth"
    torch.save(state, weights)
    code, _, err = _run_cli(train_main, ["--output-dir", str(tmp_path / "run"), *TINY_OVERRIDES,
                                         f"student.pretrained_weights={weights}"])
    assert code == 2, err
    (line,) = _error_lines(err)
    assert str(weights) in line and "'pos_embed' is int64" in line


def test_integer_weights_are_refused_in_eval(tmp_path):
    from eval.features import load_eval_backbone

    state = dict(_tiny_backbone(0).state_dict())
    state["blocks.1.mlp.fc1.bias"] = state["blocks.1.mlp.fc1.bias"].to(torch.int64)
    path = _teacher_file(tmp_path / TEACHER_FILE, state=state)
    with pytest.raises(CheckpointError, match=r"teacher_backbone\.pt.*'blocks\.1\.mlp\.fc1\.bias' is int64"):
        load_eval_backbone(path)


def test_bool_weights_are_refused_by_load_backbone(tmp_path):
    from safetensors.torch import load_file, save_file

    from dinov2_hier.export import export_backbone
    from dinov2_hier.hub import load_backbone

    export_backbone(_teacher_file(tmp_path / "run" / TEACHER_FILE), tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["norm.bias"] = tensors["norm.bias"] > 0
    save_file(tensors, str(weights))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*'norm\.bias' is bool"):
        load_backbone(tmp_path / "export")


# ------------------------------------------------------------------ 11: export --eval of other weights


def _eval_dir(path: Path, fingerprint: str | None, ckpt: Path | None, iteration: int = 7) -> Path:
    checkpoint = {"name": "teacher_backbone", "path": str(ckpt) if ckpt else None, "iteration": iteration}
    if fingerprint is not None:
        checkpoint["fingerprint"] = fingerprint
    doc = {"probes": {"knn_k1": {"balanced_accuracy": {"mean": 0.5, "std": 0.1}}},
           "checkpoint": checkpoint, "data": {"path": "cells/manifest.csv"},
           "split": {"kind": "cross_validation", "folds": 2}, "n_samples": 10}
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(doc))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_refuses_metrics_of_other_weights(tmp_path):
    from dinov2_hier.export import main as export_main

    exported = _teacher_file(tmp_path / "run" / TEACHER_FILE, seed=0)
    other = _teacher_file(tmp_path / "other" / TEACHER_FILE, seed=1)
    evals = _eval_dir(tmp_path / "eval", _sha(other), other)
    code, _, err = _run_cli(export_main, ["--ckpt", str(exported), "--output-dir", str(tmp_path / "o"),
                                          "--eval", str(evals)])
    assert code == 2, err
    (line,) = _error_lines(err)
    assert str(evals / "metrics.json") in line
    assert _sha(other)[:16] in line and _sha(exported)[:16] in line
    assert not (tmp_path / "o" / "README.md").exists()


def test_export_accepts_metrics_of_the_same_weights(tmp_path):
    from dinov2_hier.export import main as export_main

    exported = _teacher_file(tmp_path / "run" / TEACHER_FILE, seed=0)
    same_file = _eval_dir(tmp_path / "eval_same", _sha(exported), exported)
    # Another file (e.g. the run's full checkpoint) holding the same teacher weights.
    copy = tmp_path / "copy" / "teacher_copy.pt"
    copy.parent.mkdir()
    payload = torch.load(exported, weights_only=True)
    payload["meta"]["note"] = "other bytes, same weights"
    torch.save(payload, copy)
    assert _sha(copy) != _sha(exported)
    same_weights = _eval_dir(tmp_path / "eval_copy", _sha(copy), copy)
    code, _, err = _run_cli(export_main, ["--ckpt", str(exported), "--output-dir", str(tmp_path / "o"),
                                          "--eval", str(same_file), str(same_weights)])
    assert code == 0, err
    card = (tmp_path / "o" / "README.md").read_text()
    assert card.count("| knn_k1 |") == 2 and "not verified" not in card


def test_export_labels_metrics_without_a_fingerprint(tmp_path, caplog):
    from dinov2_hier.export import export_backbone

    exported = _teacher_file(tmp_path / "run" / TEACHER_FILE, seed=0)
    evals = _eval_dir(tmp_path / "eval_old", None, None)
    with caplog.at_level(logging.WARNING, logger="dinov2_hier"):
        result = export_backbone(exported, tmp_path / "o", eval_dirs=[evals])
    card = result.card.read_text()
    assert "not verified" in card and "eval_old" in card
    assert any("eval_old" in r.getMessage() and "fingerprint" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ 12: 16-bit and huge images


def _gray(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_16_bit_grey_png_spreads_over_0_255(tmp_path):
    ramp = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)  # 0 .. 65535, every value once
    path = _gray(ramp, tmp_path / "ramp16.png")
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(str(path)))
    assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    grey = pixels[..., 0].astype(np.int64)
    expected = np.round(ramp.astype(np.float64) * 255 / 65535)  # value / 257
    assert np.abs(grey - expected).max() <= 1
    assert grey.mean() == pytest.approx(127.5, abs=0.5)
    assert (grey == 255).mean() < 0.01 and grey.min() == 0 and grey.max() == 255
    assert len(np.unique(grey)) == 256


def test_12_bit_values_in_16_bit_tiff_use_their_bit_depth(tmp_path):
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0 .. 4095
    path = _gray(ramp, tmp_path / "ramp12.tif")
    grey = np.asarray(load_image(str(path)))[..., 0].astype(np.int64)
    expected = np.round(ramp.astype(np.float64) * 255 / 4095)
    assert np.abs(grey - expected).max() <= 1
    assert grey.mean() == pytest.approx(127.5, abs=0.5) and grey.max() == 255


def test_float_and_32_bit_grey(tmp_path):
    unit = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    grey = np.asarray(load_image(str(_gray(unit, tmp_path / "unit.tif"))))[..., 0].astype(np.int64)
    assert grey.mean() == pytest.approx(127.5, abs=0.5) and grey.max() == 255
    wide = (np.arange(64 * 64, dtype=np.int32) * 16).reshape(64, 64)  # 0 .. 65520: 16 bits
    grey = np.asarray(load_image(str(_gray(wide, tmp_path / "wide.tif"))))[..., 0].astype(np.int64)
    assert np.abs(grey - np.round(wide * 255 / 65535)).max() <= 1


def _noise(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_large_jpeg_is_decoded_reduced_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(datasets, "MAX_IMAGE_PIXELS", 100 * 100)
    path = tmp_path / "huge.jpg"
    _noise(200).save(path, quality=90)
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"):
        image = load_image(str(path))
    assert image.size == (100, 100) and image.mode == "RGB"
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(path) in message and "200 x 200" in message


def test_large_png_is_unreadable_and_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(datasets, "MAX_IMAGE_PIXELS", 100 * 100)
    path = tmp_path / "huge.png"
    _noise(200).save(path)
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"):
        with pytest.raises(UnreadableImageError, match=r"huge\.png.*200 x 200"):
            load_image(str(path))
    assert any(str(path) in r.getMessage() for r in caplog.records)
    item = ImageRecordDataset([Record(str(path))], lambda image, draw_id: {"global_crops": []})[0]
    assert "error" in item and "200 x 200" in item["error"]


def test_pil_decompression_bomb_warning_is_logged(tmp_path, monkeypatch, caplog):
    path = tmp_path / "big.png"
    _noise(200).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # PIL warns above this, fails above twice
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may reach the warnings machinery (stderr) alone
        load_image(str(path))
    assert any(str(path) in r.getMessage() and "DecompressionBomb" in r.getMessage() for r in caplog.records)
