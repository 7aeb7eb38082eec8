"""Messages and documents that must tell the truth (issue 19, items 19 and 22): the label
error names the tree a label belongs to, the folds error names ``--folds``, the model card
names no wrong timm model or size, a missing file is logged as missing, a heatmap's stated
scale holds its values, metric tables mark the lower-is-better metrics, and the README's
evaluation commands use options their modules have."""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_hier.paths import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"


# --------------------------------------------------------------------------- label errors


def test_label_of_another_tree_names_the_wbc_tree_in_training(tmp_path):
    """PBC rows with a demo config (tree ``synthetic``): the error says to set
    supervision.hierarchy=hierarchies/wbc.json instead of only 'known maps: none'."""
    from dinov2_hier.config import load_config
    from dinov2_hier.data import ImageRecordDataset, Record
    from dinov2_hier.labels import LabelMapError
    from dinov2_hier.train.supervision import build_supervision

    cfg = load_config(PROJECT_ROOT / "configs" / "demo" / "hierce.yaml", [])
    assert cfg.supervision.hierarchy.endswith("synthetic.json")
    pbc = ImageRecordDataset([Record(str(tmp_path / "a.jpg"), "MO", "pbc")], transform=None)
    with pytest.raises(LabelMapError) as info:
        build_supervision(cfg, pbc)
    message = str(info.value)
    assert "'MO'" in message and "'synthetic'" in message
    assert "supervision.hierarchy=hierarchies/wbc.json" in message
    assert "pbc.json" in message  # the map that knows the label

    # No dataset column (bccd's labels.csv): the maps that know the label point to the tree.
    bccd = ImageRecordDataset([Record(str(tmp_path / "b.jpg"), "neutrophil", None)], transform=None)
    with pytest.raises(LabelMapError) as info:
        build_supervision(cfg, bccd)
    assert "supervision.hierarchy=hierarchies/wbc.json" in str(info.value)
    assert "'bccd'" in str(info.value)


def test_label_of_another_tree_names_the_wbc_tree_in_evaluation(tmp_path):
    from dinov2_hier.labels import LabelMapError
    from eval.features import load_eval_data

    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label,dataset\na.jpg,MO,pbc\nb.jpg,LY,pbc\n")
    with pytest.raises(LabelMapError) as info:
        load_eval_data(str(manifest), "hierarchies/synthetic.json")
    assert "--hierarchy hierarchies/wbc.json" in str(info.value)


def test_label_of_a_map_of_this_tree_without_dataset_names_the_map():
    """pbc_dev's codes with --hierarchy wbc but no --label-map: the message names 'pbc'."""
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.labels import LabelMapError, LabelResolver
    from dinov2_hier.labels import split_label_maps

    wbc = Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "wbc.json")
    maps, others = split_label_maps(PROJECT_ROOT / "hierarchies" / "label_maps", wbc)
    with pytest.raises(LabelMapError, match="label map of dataset 'pbc' knows 'MO'"):
        LabelResolver(wbc, maps, other_maps=others).resolve("MO", None)


# --------------------------------------------------------------------------- folds


def test_too_few_samples_for_the_folds_names_the_folds_option():
    from eval.crossval import EvalDataError, stratified_folds

    labels = ["neutrophil"] * 20 + ["basophil"] * 3 + ["monocyte"] * 4
    with pytest.raises(EvalDataError) as info:
        stratified_folds(labels, 5)
    message = str(info.value)
    assert "--folds 5" in message and "lower --folds to 3" in message
    assert "'basophil' has 3 samples" in message and "'monocyte' has 4 samples" in message
    # A class of one sample cannot be cross-validated at all: no '--folds 1' advice.
    with pytest.raises(EvalDataError) as info:
        stratified_folds(["a"] * 10 + ["b"], 5)
    assert "--folds 1" not in str(info.value) and "--test-data" in str(info.value)
    assert len(stratified_folds(labels, 3)) == 3


def test_multilabel_folds_error_names_the_folds_option():
    from eval.crossval import EvalDataError
    from eval.multilabel import multilabel_folds

    with pytest.raises(EvalDataError, match=r"--folds 5\): lower --folds to at most 3"):
        multilabel_folds(np.eye(3, dtype=bool), 5)


# --------------------------------------------------------------------------- model card


def test_model_card_of_a_vit_tiny_patch8_names_no_wrong_timm_model(tmp_path):
    from dinov2_hier.export import export_backbone
    from dinov2_hier.models import build_backbone
    from dinov2_hier.train.checkpoint import TEACHER_FILE

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", img_size=64, patch_size=8, num_register_tokens=2)
    meta = {"arch": "vit_tiny", "patch_size": 8, "img_size": 64, "num_register_tokens": 2, "ffn_layer": "mlp",
            "layerscale": 1e-5, "qkv_bias": True, "mean": [0.5] * 3, "std": [0.25] * 3, "iteration": 0}
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / TEACHER_FILE)
    export_backbone(tmp_path / TEACHER_FILE, tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text()
    config = json.loads((tmp_path / "export" / "config.json").read_text())

    assert "patch14" not in card and "vit_small" not in card
    assert "224" not in card
    assert "create_timm_model(\"PATH/TO/THIS/FOLDER\", img_size=64)" in card
    assert "(here 64 px, the training crop size)" in card
    assert config["timm_model"] is None


def test_registered_timm_names_only_for_exact_shapes():
    from dinov2_hier.models import build_backbone
    from dinov2_hier.models.timm_compat import timm_registered_name

    with torch.device("meta"):
        small = build_backbone("vit_small", img_size=224, patch_size=14)
        small_reg4 = build_backbone("vit_small", img_size=224, patch_size=14, num_register_tokens=4)
        small_p16 = build_backbone("vit_small", img_size=224, patch_size=16)
        tiny = build_backbone("vit_tiny", img_size=224, patch_size=14)
    assert timm_registered_name(small, "vit_small") == "vit_small_patch14_dinov2"
    assert timm_registered_name(small_reg4, "vit_small") == "vit_small_patch14_reg4_dinov2"
    assert timm_registered_name(small_p16, "vit_small") is None
    assert timm_registered_name(tiny, "vit_tiny") is None


# --------------------------------------------------------------------------- missing files


def test_missing_file_is_logged_as_missing(tmp_path, caplog):
    from dinov2_hier.data import MissingImageError, SkipCounter, UnreadableImageError, load_image

    gone, broken = tmp_path / "gone.jpg", tmp_path / "broken.jpg"
    broken.write_text("not an image")
    with pytest.raises(MissingImageError) as missing:
        load_image(str(gone))
    assert isinstance(missing.value, UnreadableImageError)  # skipped and counted like one
    with pytest.raises(UnreadableImageError) as unreadable:
        load_image(str(broken))
    assert not isinstance(unreadable.value, MissingImageError)

    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"):
        counter.update([str(gone), str(broken)], 4, [str(missing.value), str(unreadable.value)])
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"skipping missing image {gone} (no such file)"
    assert messages[1].startswith(f"skipping unreadable image {broken} (")
    assert (counter.n_skipped, counter.n_drawn) == (2, 4)


def test_training_logs_a_missing_manifest_file_as_missing(tmp_path, tiny_overrides, caplog):
    from dinov2_hier.config import load_config
    from dinov2_hier.data import write_synthetic_dataset
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.train.loop import Trainer

    hierarchy = Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "synthetic.json")
    manifest = write_synthetic_dataset(tmp_path / "cells", 14, hierarchy, image_size=40, seed=1)
    (manifest.parent / "text.jpg").write_text("not an image")
    with open(manifest, "a") as f:
        f.write("gone.jpg,,,\ntext.jpg,,,\n")
    overrides = tiny_overrides + [f"data.train=[{manifest}]", "train.iterations=2", "train.checkpoint_every=100",
                                  "data.max_unreadable_fraction=0.5", "data.min_draws_before_check=1"]
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.data"):
        trainer = Trainer(load_config(None, overrides), tmp_path / "run")
        trainer.run()
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    gone = str(manifest.parent / "gone.jpg")
    assert f"skipping missing image {gone} (no such file)" in skips
    assert not any("unreadable" in m and "gone.jpg" in m for m in skips)
    assert any(m.startswith("skipping unreadable image") and "text.jpg" in m for m in skips)
    assert trainer.skips.n_skipped == 2  # 16 entries, 16 draws: each file once, both counted


# --------------------------------------------------------------------------- heatmap scale


def _cells_and_scale(svg: str) -> tuple[list[float], float]:
    scale = re.search(r"colour scale: -([0-9.e+-]+) \(blue\) to \+([0-9.e+-]+) \(red\)", svg)
    assert scale is not None, svg[-300:]
    values = [float(v) for v in re.findall(r"<title>[^<]*: (-?[0-9.]+)</title>", svg)]
    return values, float(scale.group(2))


def test_heatmap_scale_holds_every_value():
    from eval.multilabel import render_multilabel_report, svg_matrix_heatmap

    rrt = np.array([[5.03, -0.4, 1.7], [-0.4, 2.2, 0.1], [1.7, 0.1, 0.9]])
    values, vmax = _cells_and_scale(svg_matrix_heatmap(rrt, ["a", "b", "c"], "mean R R^T", vmax=1.0))
    assert len(values) == 9 and vmax >= 5.03
    assert all(-vmax <= v <= vmax for v in values)

    prior = np.array([[0.0, -1.0, 0.5], [-1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    _, vmax = _cells_and_scale(svg_matrix_heatmap(prior, ["a", "b", "c"], "prior C", vmax=1.0))
    assert vmax == 1.0  # a scale that holds the values is kept

    metrics = {"classes": ["a", "b", "c"], "probes": {}, "constraints": {"name": "t", "values": prior.tolist()},
               "relation_matrix": {"soft": {"mean_R": (rrt / 3).tolist(), "mean_RRt": rrt.tolist()}}}
    html = render_multilabel_report(metrics)
    maps = re.findall(r'<svg class="heatmap".*?</svg>', html)
    assert len(maps) == 3
    for svg in maps:
        values, vmax = _cells_and_scale(svg)
        assert all(-vmax <= v <= vmax for v in values)


# --------------------------------------------------------------------------- metric tables


def _metrics_doc() -> dict:
    entry = {"mean": 0.5, "std": 0.1, "n": 2, "folds": [0.4, 0.6]}
    return {"n_samples": 10, "n_unreadable": 0, "classes": ["a", "b"],
            "split": {"kind": "cross_validation", "folds": 2},
            "probes": {"logreg": {"balanced_accuracy": entry, "mistake_severity": entry}}}


def test_metric_tables_mark_lower_is_better():
    from eval.cli_common import format_results
    from eval.multilabel import render_multilabel_report
    from eval.multilabel.cli import _format
    from eval.report import render_report_html

    html = render_report_html(_metrics_doc())
    assert "<td>mistake_severity (lower better)</td>" in html
    assert "<td>balanced_accuracy</td>" in html
    text = format_results({"evaluations": [{"name": "m", "output_dir": "o", "metrics": _metrics_doc()}]})
    assert "mistake_severity (lower better)" in text and "balanced_accuracy (lower better)" not in text

    entry = {"mean": 0.1, "std": 0.0, "n": 2, "folds": [0.1, 0.1]}
    ml = {"n_samples": 4, "classes": ["a"], "constraints": {"name": "t"},
          "probes": {"v": {"weighted_f1": entry, "impossible_rate": entry, "impossible_rate_before": entry}}}
    assert "<td>impossible_rate (lower better)</td>" in render_multilabel_report(ml)
    assert "impossible_rate_before (lower better)" in _format(ml)


# --------------------------------------------------------------------------- README commands


def _shell_commands(markdown: str, prefix: str) -> list[str]:
    """Commands in the ```bash blocks of ``markdown`` that start with ``prefix``
    (continuation lines joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(prefix):
                commands.append(line.strip())
    return commands


class _Captured(Exception):
    pass


def _parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``python -m <module>`` uses, caught when its main() parses (nothing runs)."""
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Captured

    module = importlib.import_module(module_name)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Captured):
            module.main([])
    return seen["parser"]


def test_readme_eval_commands_parse_and_write_outside_the_package(monkeypatch):
    commands = _shell_commands(README.read_text(), "python -m eval.")
    assert commands
    modules = set()
    for command in commands:
        tokens = shlex.split(command, comments=True)
        module = tokens[2]
        modules.add(module)
        parser = _parser_of(module, monkeypatch)
        unknown = [t for t in tokens[3:] if t.startswith("--") and t.split("=")[0] not in parser._option_string_actions]
        assert not unknown, f"{command}: {module} has no option {unknown}"
        args = parser.parse_args(tokens[3:])  # what argparse makes of it; nothing is run
        outputs = [args.output_dir] if getattr(args, "output_dir", None) else []
        outputs += list(getattr(args, "dirs", []) or [])
        for out in outputs:
            assert Path(out).parts[0] != "eval", f"{command}: writes into the eval/ package ({out})"
        data = getattr(args, "data", None)
        if data and (PROJECT_ROOT / data).is_file():  # the real data is there: its columns must fit
            with open(PROJECT_ROOT / data, newline="") as f:
                header = next(csv.reader(f))
            assert args.label_column in header, f"{command}: {data} has no column {args.label_column!r}"
    assert {"eval.run", "eval.compare"} <= modules


def test_docs_eval_commands_use_existing_options(monkeypatch):
    """The docs' synopses (with [optional] and A|B placeholders) name only real options."""
    docs = [README, PROJECT_ROOT / "eval" / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    parsers: dict[str, argparse.ArgumentParser] = {}
    checked = 0
    for doc in docs:
        for command in _shell_commands(doc.read_text(), "python -m eval."):
            module = command.split()[2]
            parser = parsers.get(module) or parsers.setdefault(module, _parser_of(module, monkeypatch))
            flags = re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", command.split("#")[0])
            unknown = [f for f in flags if f not in parser._option_string_actions]
            assert not unknown, f"{doc.name}: {command}: {module} has no option {unknown}"
            checked += 1
    assert checked >= 8
