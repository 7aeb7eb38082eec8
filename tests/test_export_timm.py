"""Exports in timm's layout (issue 23, part 1): timm loads them with no project code, our
loaders keep loading them and the exports of format version 1; the model card's front matter.

A demo-size ViT-S/14 (vit_small, patch 14, 4 registers, 56 px; random weights with
non-trivial LayerScale, tokens and biases) saved as a ``teacher_backbone.pt`` beside the
run's ``config.yaml`` (initialised from DINOv2's ViT-S/14 reg4 release, synthetic data), and
a hand-written ``metrics.json`` of those weights stand in for a trained run and its evaluation.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dinov2_hier
from dinov2_hier.config import load_config, save_config
from dinov2_hier.export import export_backbone, main as export_main
from dinov2_hier.io import file_sha256
from dinov2_hier.models import WeightsError, build_backbone
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.checkpoint import TEACHER_FILE

SIZE, REGISTERS = 56, 4
META = {"arch": "vit_small", "patch_size": 14, "img_size": SIZE, "num_register_tokens": REGISTERS,
        "ffn_layer": "mlp", "layerscale": 1e-5, "qkv_bias": True, "mean": [0.5, 0.45, 0.4],
        "std": [0.25, 0.2, 0.22], "iteration": 7}


def _randomised(model):
    """Non-trivial LayerScale, tokens and biases (fresh init has gamma 1e-5, zero biases)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or "token" in name or name.endswith("bias") or name == "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm_export")
    torch.manual_seed(0)
    model = _randomised(build_backbone("vit_small", img_size=SIZE, patch_size=14, num_register_tokens=REGISTERS))
    run_dir = root / "run"
    run_dir.mkdir()
    torch.save({"model": model.state_dict(), "meta": dict(META)}, run_dir / TEACHER_FILE)
    cfg = load_config(None, [
        "student.arch=vit_small", "student.patch_size=14", f"student.num_register_tokens={REGISTERS}",
        f"crops.global_crops_size={SIZE}", "data.synthetic.num_images=12", "data.num_workers=0",
        "crops.mean=[0.5,0.45,0.4]", "crops.std=[0.25,0.2,0.22]",
        "student.pretrained_weights=/weights/dinov2_vits14_reg4_pretrain.pth",
    ])
    save_config(cfg, run_dir / "config.yaml")
    eval_dir = root / "eval"
    eval_dir.mkdir()
    fold = {"mean": 0.75, "std": 0.05, "folds": [0.7, 0.8]}
    (eval_dir / "metrics.json").write_text(json.dumps({
        "data": {"path": "/data/labelled/manifest.csv"}, "split": {"kind": "cross_validation", "folds": 2},
        "checkpoint": {"fingerprint": file_sha256(run_dir / TEACHER_FILE), "path": str(run_dir / TEACHER_FILE),
                       "iteration": 7},
        "n_samples": 20,
        "probes": {"knn_k1": {"balanced_accuracy": fold, "weighted_f1": fold, "hierarchical_f1": None}},
    }))
    result = export_backbone(run_dir / TEACHER_FILE, root / "export", eval_dirs=[eval_dir])
    return {"root": root, "model": model, "export": root / "export", "result": result, "teacher": run_dir / TEACHER_FILE}


def test_config_json_is_timm_schema_with_our_block(run):
    config = json.loads((run["export"] / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_reg4_dinov2" and config["num_classes"] == 0
    assert config["model_args"] == {"img_size": SIZE, "reg_tokens": REGISTERS, "init_values": 1e-5}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, SIZE, SIZE] and cfg["mean"] == META["mean"] and cfg["std"] == META["std"]
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["num_classes"]) == ("bicubic", 1.0, 0)
    ours = config["dinov2_hier"]
    assert (ours["architecture"], ours["embed_dim"], ours["depth"], ours["num_register_tokens"]) == (
        "vit_small", 384, 12, REGISTERS)
    assert (ours["tensor_layout"], ours["format_version"], ours["iteration"]) == ("timm", 2, 7)
    assert ours["timm_family"] == ours["timm_model"] == "vit_small_patch14_reg4_dinov2"
    tensors = load_file(str(run["export"] / "model.safetensors"))
    assert "reg_token" in tensors and "register_tokens" not in tensors and "mask_token" not in tensors
    assert tuple(tensors["pos_embed"].shape) == (1, (SIZE // 14) ** 2, 384)  # no_embed_class: patches only


@pytest.mark.slow  # ~20 s on 2 shared cores: a fresh interpreter importing torch and timm
def test_timm_loads_the_export_without_dinov2_hier(run):
    """The acceptance test: a fresh process, timm only, CLS features equal load_backbone's to 1e-5."""
    pytest.importorskip("timm")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    torch.save(x, run["root"] / "x.pt")
    code = textwrap.dedent(f"""
        import sys, torch, timm
        model = timm.create_model("local-dir:{run['export']}", pretrained=True).eval()
        x = torch.load("{run['root'] / 'x.pt'}", weights_only=True)
        with torch.no_grad():
            torch.save({{"head": model(x), "features": model.forward_features(x)[:, 0]}}, "{run['root'] / 'y.pt'}")
        cfg = timm.data.resolve_data_config({{}}, model=model)
        assert cfg["input_size"] == (3, {SIZE}, {SIZE}) and cfg["crop_pct"] == 1.0, cfg
        assert tuple(cfg["mean"]) == {tuple(META["mean"])!r}, cfg
        assert "dinov2_hier" not in sys.modules and not any(m.startswith("dinov2_hier") for m in sys.modules)
        print("ok", type(model).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=run["root"],
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "ok VisionTransformer", result.stderr[-3000:]
    got = torch.load(run["root"] / "y.pt", weights_only=True)
    with torch.no_grad():
        expected = dinov2_hier.load_backbone(run["export"])(x)["x_norm_clstoken"]
        teacher = run["model"](x)["x_norm_clstoken"]
    assert torch.equal(expected, teacher)  # load_backbone: exactly the exported teacher
    assert expected.abs().max().item() > 0.1
    for key in ("features", "head"):  # num_classes 0, token pooling: model(x) is the CLS token too
        assert (got[key] - expected).abs().max().item() <= 1e-5, key


def test_card_front_matter(run):
    text = (run["export"] / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "timm"
    assert "timm" in meta["tags"] and "dinov2" in meta["tags"]
    assert meta["datasets"] == ["synthetic"]
    assert meta["base_model"] == "timm/vit_small_patch14_reg4_dinov2.lvd142m"
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["dataset"] == {"type": "labelled/manifest.csv", "name": "labelled/manifest.csv",
                                 "split": "2-fold CV"}
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [("balanced_accuracy", 0.75),
                                                                     ("weighted_f1", 0.75)]
    assert 'timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)' in text


def test_our_loaders_take_the_timm_layout(run, tmp_path):
    """load_backbone (folder, config.json, weights file, the file alone), eval's loader and
    student.pretrained_weights (folder and file) read the timm layout back to the teacher."""
    from eval.features import load_eval_backbone

    teacher = run["model"].state_dict()
    x = torch.randn(1, 3, 70, 70, generator=torch.Generator().manual_seed(2))  # another size: interpolated
    with torch.no_grad():
        expected = run["model"](x)["x_norm_clstoken"]
        for where in (run["export"], run["export"] / "config.json", run["export"] / "model.safetensors"):
            assert torch.equal(dinov2_hier.load_backbone(where)(x)["x_norm_clstoken"], expected), where
        alone = tmp_path / "alone.safetensors"  # without config.json: the header describes it
        alone.write_bytes((run["export"] / "model.safetensors").read_bytes())
        assert torch.equal(dinov2_hier.load_backbone(alone)(x)["x_norm_clstoken"], expected)
        backbone = load_eval_backbone(run["export"] / "config.json")
        assert backbone.meta["img_size"] == SIZE and backbone.meta["mean"] == META["mean"]
        assert torch.equal(backbone.model(x)["x_norm_clstoken"], expected)
    for where in (run["export"], run["export"] / "model.safetensors"):
        student = _pretrained_start(where, build_backbone("vit_small", img_size=SIZE, patch_size=14,
                                                          num_register_tokens=REGISTERS))
        assert torch.equal(student["register_tokens"], teacher["register_tokens"])
        assert torch.equal(student["blocks.3.attn.qkv.weight"], teacher["blocks.3.attn.qkv.weight"])
        assert torch.equal(student["cls_token"] + student["pos_embed"][:, :1],
                           teacher["cls_token"] + teacher["pos_embed"][:, :1])
        assert torch.equal(student["pos_embed"][:, 1:], teacher["pos_embed"][:, 1:])


def _pretrained_start(path, backbone):
    """The student backbone after student.pretrained_weights=path (the training code's loader)."""
    from torch import nn

    from dinov2_hier.train.pretrained import load_pretrained

    student, teacher = nn.ModuleDict({"backbone": backbone}), nn.ModuleDict({"backbone": copy.deepcopy(backbone)})
    load_pretrained(student, teacher, str(path), "false", 0)
    return student["backbone"].state_dict()


def test_format_ours_is_format_version_1(run, tmp_path):
    """--format ours writes the layout every export before timm's had; it still loads."""
    result = export_backbone(run["teacher"], tmp_path / "ours", fmt="ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert "dinov2_hier" not in config and "model_args" not in config
    assert (config["format_version"], config["architecture"], config["tensor_layout"]) == (1, "vit_small", "dinov2")
    tensors = load_file(str(result.weights))
    teacher = run["model"].state_dict()
    assert sorted(tensors) == sorted(teacher) and all(torch.equal(tensors[k], v) for k, v in teacher.items())


def test_old_export_fixture_still_loads(tmp_path):
    """An export as the code before timm's layout wrote it (``python -m dinov2_hier.export``
    of commit 7e414ff, stored in tests/fixtures/export_v1: a teacher file recording an
    explicit width-32, 2-block shape, patch 8, 2 registers, 16 px, named vit_tiny) loads with
    load_backbone, eval's loader and as student.pretrained_weights (folder or file)."""
    from eval.features import load_eval_backbone

    fixture = PROJECT_ROOT / "tests" / "fixtures" / "export_v1"
    config = json.loads((fixture / "config.json").read_text())
    assert config["format_version"] == 1 and "tensor_layout" not in config and "dinov2_hier" not in config
    stored = load_file(str(fixture / "model.safetensors"))
    model = dinov2_hier.load_backbone(fixture)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    assert load_eval_backbone(fixture / "config.json").meta["arch"] == "vit_tiny"
    for where in (fixture, fixture / "model.safetensors"):
        student = _pretrained_start(where, dinov2_hier.hub.build_from_config(config))
        assert all(torch.equal(student[k], v) for k, v in stored.items())


def test_no_timm_family_falls_back_or_refuses(tmp_path, caplog):
    """vit_tiny / patch 8: the default writes our layout with a warning; --format timm exits 2."""
    model = build_backbone("vit_tiny", img_size=16, patch_size=8)
    meta = dict(META, arch="vit_tiny", patch_size=8, img_size=16, num_register_tokens=0)
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / TEACHER_FILE)
    with caplog.at_level("WARNING", logger="dinov2_hier.export"):
        result = export_backbone(tmp_path / TEACHER_FILE, tmp_path / "out")
    assert result.layout == "dinov2" and "timm has no DINOv2 model family for vit_tiny / patch 8" in caplog.text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["timm_family"] is None and config["format_version"] == 1
    meta_yaml = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---\n")[1])
    assert meta_yaml["library_name"] == "dinov2_hier" and "base_model" not in meta_yaml
    code = export_main(["--ckpt", str(tmp_path / TEACHER_FILE), "--output-dir", str(tmp_path / "t"),
                        "--format", "timm"])
    assert code == 2
    with pytest.raises(WeightsError, match="not a dinov2_hier export"):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "config.json").write_text(json.dumps(
            {"architecture": "vit_small_patch14_dinov2", "pretrained_cfg": {}}))
        (tmp_path / "foreign" / "model.safetensors").write_bytes(result.weights.read_bytes())
        dinov2_hier.load_backbone(tmp_path / "foreign")
