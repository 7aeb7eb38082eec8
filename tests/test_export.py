"""Publishing weights: export, the three load paths (dinov2_hier.load_backbone, timm,
student.pretrained_weights), strictness and safety.

A real tiny training run (vit_tiny/8 with 2 registers, hierarchical CE on a synthetic
manifest) provides the checkpoints; eval.knn on its teacher provides a metrics.json.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dinov2_hier
from dinov2_hier.config import load_config
from dinov2_hier.data import write_synthetic_dataset
from dinov2_hier.export import CARD_METRICS, main as export_main
from dinov2_hier.export import export_backbone, summarize_sources
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.hub import load_backbone
from dinov2_hier.models import WeightsError, build_backbone
from dinov2_hier.models.timm_compat import timm_model_args, to_timm_state_dict
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.checkpoint import TEACHER_FILE, list_checkpoints, load_checkpoint
from dinov2_hier.train.loop import Trainer
from tests.conftest import TINY_OVERRIDES

SYNTHETIC = str(PROJECT_ROOT / "hierarchies" / "synthetic.json")
ARCH = ["student.num_register_tokens=2"]  # on top of TINY_OVERRIDES: vit_tiny, patch 8, 32 px
N_MANIFEST = 30


def _run_cli(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train 4 iterations (checkpoints at 2 and 4), evaluate the teacher with eval.knn and
    export the run directory through the CLI with that evaluation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    tree = Hierarchy.from_json(SYNTHETIC)
    manifest = write_synthetic_dataset(root / "cells", N_MANIFEST, tree, image_size=40, seed=3, label_fraction=0.5)
    overrides = TINY_OVERRIDES + ARCH + [
        "train.iterations=4", "train.checkpoint_every=2", f"data.train=[{manifest}]",
        f"supervision.hierarchy={SYNTHETIC}", "supervision.losses=[{name: hierce, weight: 0.5, alpha: 0.5}]",
    ]
    trainer = Trainer(load_config(None, overrides), root / "train")
    trainer.run()

    labelled = write_synthetic_dataset(root / "labelled", 4 * tree.num_leaves, tree, image_size=40, seed=1)
    from eval.knn import main as knn_main

    code, _, err = _run_cli(knn_main, [
        "--ckpt", str(root / "train" / TEACHER_FILE), "--data", str(labelled), "--hierarchy", SYNTHETIC,
        "--folds", "2", "--k", "1", "3", "--num-workers", "0", "--no-progress", "--no-cache", "--no-report",
        "--output-dir", str(root / "eval"),
    ])
    assert code == 0, err
    code, out, err = _run_cli(export_main, [
        "--ckpt", str(root / "train"), "--output-dir", str(root / "export"), "--eval", str(root / "eval"),
    ])
    assert code == 0, err
    assert out.strip() == f"exported {root / 'export' / 'model.safetensors'}"
    yield {"root": root, "trainer": trainer, "tree": tree, "manifest": manifest, "export": root / "export",
           "teacher": {k: v.detach().clone() for k, v in trainer.model.teacher["backbone"].state_dict().items()}}
    torch.set_num_threads(threads)


def test_exported_weights_equal_the_teacher(run):
    tensors = load_file(str(run["export"] / "model.safetensors"))
    teacher = run["teacher"]
    assert sorted(tensors) == sorted(teacher)
    assert "register_tokens" in tensors and tuple(tensors["pos_embed"].shape) == (1, 1 + 4 * 4, 192)
    for key, value in teacher.items():
        assert tensors[key].dtype == torch.float32 and tensors[key].is_contiguous(), key
        assert torch.equal(tensors[key], value), key
    # The teacher, not the student: after 4 EMA steps they differ.
    student = run["trainer"].model.student["backbone"].state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)


def test_config_json_values(run):
    config = json.loads((run["export"] / "config.json").read_text())
    ckpt = load_checkpoint(list_checkpoints(run["root"] / "train")[-1][1])
    expected = {
        "architecture": "vit_tiny", "embed_dim": 192, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0,
        "patch_size": 8, "img_size": 32, "in_chans": 3, "num_register_tokens": 2, "ffn_layer": "mlp",
        "layerscale": 1e-5, "qkv_bias": True, "interpolate_offset": 0.1, "interpolate_antialias": False,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "iteration": 4,
        "weights_file": "model.safetensors", "dtype": "float32", "source_checkpoint": "ckpt_00000004.pt",
        "dinov2_hier_version": dinov2_hier.__version__, "torch_version": torch.__version__,
        "num_parameters": sum(v.numel() for v in run["teacher"].values()),
        "timm_model": None,  # vit_tiny, patch 8, 2 registers: no timm model of this shape is registered
    }
    for key, value in expected.items():
        assert config[key] == value, key
    assert config["hierarchy"] == {
        "name": "synthetic", "file": "synthetic.json", "fingerprint": run["tree"].fingerprint(),
    }
    assert config["hierarchy"]["fingerprint"] == ckpt["hierarchy_fingerprint"]


def _metric_cell(entry):
    """mean ± population std of the folds, recomputed from the per-fold values."""
    folds = [v for v in entry["folds"] if v is not None]
    return f"{sum(folds) / len(folds):.3f} ± {statistics.pstdev(folds):.3f}"


def test_model_card_lists_data_supervision_and_eval_numbers(run):
    card = (run["export"] / "README.md").read_text()
    with open(run["manifest"], newline="") as f:
        rows = list(csv.DictReader(f))
    n_labelled = sum(1 for r in rows if r["label"])
    assert len(rows) == N_MANIFEST and 0 < n_labelled < N_MANIFEST
    assert (f"| `cells/manifest.csv` | manifest | {N_MANIFEST} | {n_labelled} | synthetic: {N_MANIFEST} |"
            in card)
    assert "| hierce | 0.5 | alpha=0.5 |" in card
    assert "| iterations (trained / planned) | 4 / 4 |" in card
    assert "| batch size per GPU (images, 2 global crops each) | 8 |" in card
    metrics = json.loads((run["root"] / "eval" / "metrics.json").read_text())
    assert sorted(metrics["probes"]) == ["knn_k1", "knn_k3"]
    for probe, entries in metrics["probes"].items():
        cells = " | ".join(_metric_cell(entries[k]) for k in CARD_METRICS)
        assert f"| labelled/manifest.csv | 2-fold CV | {probe} | {cells} |" in card
    assert "| data | split | probe | balanced accuracy | weighted F1 | hF1 | lineage accuracy |" in card


def test_card_counts_synthetic_labels_exactly(tmp_path):
    """Training on the embedded generator: the card's labelled count equals the labelled rows
    the same generator (same seed) writes to disk."""
    cfg = load_config(None, TINY_OVERRIDES + ["data.synthetic.num_images=50", "data.synthetic.label_fraction=0.3",
                                              "seed=7"])
    (entry,) = summarize_sources(cfg)
    manifest = write_synthetic_dataset(tmp_path / "cells", 50, Hierarchy.from_json(SYNTHETIC), image_size=40,
                                       seed=7, label_fraction=0.3)
    with open(manifest, newline="") as f:
        on_disk = sum(1 for row in csv.DictReader(f) if row["label"])
    assert (entry["images"], entry["labelled"]) == (50, on_disk)
    assert abs(on_disk - 15) <= 3 and entry["kind"] == "synthetic cells (40 px, generator)"


def test_load_backbone_reproduces_the_teacher(run):
    teacher = run["trainer"].model.teacher["backbone"].eval()
    gen = torch.Generator().manual_seed(0)
    for side in (32, 48):  # the training size and an interpolated one
        x = torch.randn(3, 3, side, side, generator=gen)
        with torch.no_grad():
            expected = teacher(x)
            for where in (run["export"], run["export"] / "model.safetensors", run["export"] / "config.json"):
                model = dinov2_hier.load_backbone(where)
                assert not model.training
                out = model(x)
                assert torch.equal(out["x_norm_clstoken"], expected["x_norm_clstoken"]), (side, where)
                assert torch.equal(out["x_norm_regtokens"], expected["x_norm_regtokens"])


def test_safetensors_file_alone_describes_itself(run, tmp_path):
    """Copied without config.json, model.safetensors still loads from its header metadata."""
    (tmp_path / "alone").mkdir()
    shutil.copy(run["export"] / "model.safetensors", tmp_path / "alone" / "renamed.safetensors")
    model = load_backbone(tmp_path / "alone" / "renamed.safetensors")
    assert (model.embed_dim, model.n_blocks, model.num_register_tokens, model.patch_size) == (192, 4, 2, 8)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in run["teacher"].items())
    save_file(run["teacher"], str(tmp_path / "alone" / "plain.safetensors"))  # no metadata
    with pytest.raises(WeightsError, match=r"plain.safetensors: no config.json beside it"):
        load_backbone(tmp_path / "alone" / "plain.safetensors")


def test_checkpoint_forms_and_pth_bf16(run, tmp_path):
    root = run["root"]
    # A full checkpoint file: the teacher of that iteration.
    ckpt2 = list_checkpoints(root / "train")[0][1]
    export_backbone(ckpt2, tmp_path / "it2", fmt="pth", dtype="bf16")
    stored = torch.load(tmp_path / "it2" / "model.pth", map_location="cpu", weights_only=True)
    teacher2 = {k[len("teacher.backbone."):]: v for k, v in load_checkpoint(ckpt2)["model"].items()
                if k.startswith("teacher.backbone.")}
    assert sorted(stored) == sorted(teacher2)
    for key, value in teacher2.items():
        assert stored[key].dtype == torch.bfloat16 and torch.equal(stored[key], value.to(torch.bfloat16)), key
    config = json.loads((tmp_path / "it2" / "config.json").read_text())
    assert (config["iteration"], config["dtype"], config["weights_file"]) == (2, "bfloat16", "model.pth")
    model = load_backbone(tmp_path / "it2")  # float32 by default
    assert model.pos_embed.dtype == torch.float32
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], stored["blocks.1.attn.qkv.weight"].float())
    # Re-exporting as safetensors into the same folder replaces the .pth.
    export_backbone(root / "train" / TEACHER_FILE, tmp_path / "it2")
    assert sorted(p.name for p in (tmp_path / "it2").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    # teacher_backbone.pt = newest teacher; its run's config.yaml still feeds the card.
    tensors = load_file(str(tmp_path / "it2" / "model.safetensors"))
    assert all(torch.equal(tensors[k], v) for k, v in run["teacher"].items())
    assert f"| `cells/manifest.csv` | manifest | {N_MANIFEST} |" in (tmp_path / "it2" / "README.md").read_text()


def _copy_export(run, dest: Path) -> Path:
    shutil.copytree(run["export"], dest)
    return dest


def test_shape_mismatch_names_the_first_key_in_model_order(run, tmp_path):
    bad = _copy_export(run, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    # Alphabetically blocks.* comes first; in the model, pos_embed does.
    tensors["blocks.3.ls2.gamma"] = torch.zeros(191)
    tensors["pos_embed"] = torch.zeros(1, 26, 192)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch at 'pos_embed': file \(1, 26, 192\) vs model \(1, 17, 192\)"):
        load_backbone(bad)


def test_missing_and_unexpected_keys(run, tmp_path):
    bad = _copy_export(run, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    del config["num_heads"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"config.json: missing key 'num_heads'"):
        load_backbone(bad)
    shutil.copy(run["export"] / "config.json", bad / "config.json")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["norm.bias"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing key 'norm.bias' \(model expects shape \(192,\)\)"):
        load_backbone(bad)
    tensors["norm.bias"] = torch.zeros(192)
    tensors["head.weight"] = torch.zeros(3, 192)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"unexpected key 'head.weight'"):
        load_backbone(bad)


class _Payload:
    """Unpickling this would create a directory: a stand-in for malicious code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_is_never_executed(run, tmp_path):
    bad = _copy_export(run, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"pos_embed": _Payload(str(marker))}, bad / "model.pth")
    config = json.loads((bad / "config.json").read_text())
    config["weights_file"] = "model.pth"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="holds pickled Python objects, which a safe load refuses"):
        load_backbone(bad)
    code, _, err = _run_cli(export_main, ["--ckpt", str(bad / "model.pth"), "--output-dir", str(tmp_path / "o")])
    # one line of our own, never torch's advice to load it unsafely
    assert code == 2 and err.strip().count("\n") == 0 and "holds pickled Python objects" in err
    assert "weights_only=False" not in err
    assert not marker.exists()


def test_cli_bad_input_exits_2_naming_the_problem(run, tmp_path):
    code, _, err = _run_cli(export_main, ["--ckpt", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and err.strip() == f"error: checkpoint not found: {tmp_path / 'nope'}"
    code, _, err = _run_cli(export_main, ["--ckpt", str(run["root"] / "train"), "--output-dir", str(tmp_path / "o"),
                                          "--eval", str(tmp_path)])
    assert code == 2 and f"{tmp_path}: no metrics.json" in err
    # A teacher file whose tensor does not fit its recorded architecture.
    payload = torch.load(run["root"] / "train" / TEACHER_FILE, map_location="cpu", weights_only=True)
    payload["model"]["blocks.2.attn.proj.weight"] = torch.zeros(192, 96)
    torch.save(payload, tmp_path / TEACHER_FILE)
    code, _, err = _run_cli(export_main, ["--ckpt", str(tmp_path / TEACHER_FILE), "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "shape mismatch at 'blocks.2.attn.proj.weight': file (192, 96) vs model (192, 192)" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_export_serves_as_pretrained_weights(run, tmp_path):
    weights = run["export"] / "model.safetensors"
    cfg = load_config(None, TINY_OVERRIDES + ARCH + [f"student.pretrained_weights={weights}"])
    trainer = Trainer(cfg, tmp_path / "new")
    student = trainer.model.student["backbone"].state_dict()
    teacher = trainer.model.teacher["backbone"].state_dict()
    exported = load_file(str(weights))
    assert sorted(student) == sorted(exported)
    for key, value in exported.items():
        assert torch.equal(student[key], value), key
        assert torch.equal(teacher[key], value), key


@pytest.mark.slow
def test_import_is_cheap_and_timm_free():
    code = (
        "import sys; import dinov2_hier; assert 'torch' not in sys.modules, 'torch imported'; "
        "import dinov2_hier.models.timm_compat, dinov2_hier.hub, dinov2_hier.export; "
        "assert 'timm' not in sys.modules, 'timm imported'; "
        "assert dinov2_hier.load_backbone is dinov2_hier.hub.load_backbone; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------- timm


def test_timm_loads_the_trained_export(run):
    pytest.importorskip("timm")
    from dinov2_hier.hub import create_timm_model

    # 64 px: timm's grid is 8 x 8, the export's 4 x 4 (pos_embed resampled by the converter).
    timm_model = create_timm_model(run["export"], img_size=64)
    ours = load_backbone(run["export"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(x)["x_norm_clstoken"]
        got = timm_model.forward_features(x)[:, 0]
    assert (got - expected).abs().max().item() <= 1e-4
    assert type(timm_model).__module__.startswith("timm.")


def _randomised(model):
    """Non-trivial LayerScale, tokens and biases (fresh init has gamma 1e-5, zero biases)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or "token" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.mark.slow
def test_timm_vit_small_patch14_dinov2_at_224(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = _randomised(build_backbone("vit_small", img_size=224, patch_size=14))
    meta = {"arch": "vit_small", "patch_size": 14, "img_size": 224, "num_register_tokens": 0, "ffn_layer": "mlp",
            "layerscale": 1e-5, "qkv_bias": True, "mean": [0.5] * 3, "std": [0.25] * 3, "iteration": 0}
    torch.save({"model": ours.state_dict(), "meta": meta}, tmp_path / TEACHER_FILE)
    export_backbone(tmp_path / TEACHER_FILE, tmp_path / "export")
    # timm's layout (issue 23): timm's schema, our document under "dinov2_hier", timm's tensor names
    # (to_timm_state_dict below leaves them as they are).
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2"
    config = config["dinov2_hier"]
    assert config["timm_model"] == "vit_small_patch14_dinov2" and config["hierarchy"] is None
    assert config["mean"] == [0.5] * 3 and config["std"] == [0.25] * 3
    # The named timm model as is, with the converted file, strict.
    timm_model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224).eval()
    state = to_timm_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")))
    timm_model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = load_backbone(tmp_path / "export")(x)["x_norm_clstoken"]
        got = timm_model.forward_features(x)[:, 0]
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.1  # not a trivially small output


@pytest.mark.parametrize("arch, kwargs, timm_name", [
    ("vit_small", {}, "vit_small_patch14_dinov2"),
    ("vit_base", {}, "vit_base_patch14_dinov2"),
    ("vit_large", {}, "vit_large_patch14_dinov2"),
    ("vit_small", {"num_register_tokens": 4}, "vit_small_patch14_reg4_dinov2"),
    ("vit_large", {"num_register_tokens": 4}, "vit_large_patch14_reg4_dinov2"),
    ("vit_giant2", {}, "vit_giant_patch14_dinov2"),
])
def test_timm_keys_and_shapes_match_the_named_models(arch, kwargs, timm_name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = build_backbone(arch, img_size=224, **kwargs)
        reference = timm.create_model(timm_name, pretrained=False, img_size=224)
    name, args = timm_model_args(ours, 224, arch)
    assert name == timm_name
    converted = {k: tuple(v.shape) for k, v in to_timm_state_dict(ours.state_dict()).items()}
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert converted == expected
    with torch.device("meta"):
        rebuilt = timm.create_model(name, pretrained=False, **args)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == expected


def test_timm_swiglu_and_no_layerscale_numerically():
    """SwiGLU (giant's feed-forward) and LayerScale off, on a small width: exact CLS match."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = _randomised(build_backbone("vit_tiny", img_size=32, patch_size=8, ffn_layer="swiglu",
                                      layerscale_init=None, num_register_tokens=1))
    name, args = timm_model_args(ours, 32, "vit_tiny")
    assert name == "vit_giant_patch14_reg4_dinov2" and args["init_values"] == 0.0 and args["reg_tokens"] == 1
    timm_model = timm.create_model(name, pretrained=False, **args).eval()
    timm_model.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (timm_model.forward_features(x)[:, 0] - ours(x)["x_norm_clstoken"]).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.slow
def test_timm_vit_large_patch14_dinov2_numerically():
    """ViT-L/14 at 224 px (random weights, converter only): timm's CLS equals ours."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = _randomised(build_backbone("vit_large", img_size=224, patch_size=14))
    with torch.device("meta"):
        timm_model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=224)
    # assign=True adopts our tensors (no second 1.2 GB copy); the converter shares them.
    timm_model.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True, assign=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (timm_model.eval().forward_features(x)[:, 0] - ours(x)["x_norm_clstoken"]).abs().max().item()
    assert diff <= 1e-4


def test_checkpoint_with_wrapper_prefixes(run, tmp_path):
    """Keys of a DDP / torch.compile wrapped model ("module.", "_orig_mod.") export the same weights."""
    ckpt = load_checkpoint(list_checkpoints(run["root"] / "train")[-1][1])
    ckpt["model"] = {("module." + k).replace("teacher.backbone.", "teacher.backbone._orig_mod."): v
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "ckpt_00000004.pt")
    export_backbone(tmp_path / "ckpt_00000004.pt", tmp_path / "export")
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert sorted(tensors) == sorted(run["teacher"])
    assert all(torch.equal(tensors[k], v) for k, v in run["teacher"].items())


def test_eval_reads_an_export_like_the_teacher_file(run):
    """eval takes an export (folder, config.json or weights file) without --arch: the recorded
    architecture, training image size and normalisation, features equal to the teacher file's,
    and the cache keyed by the weights file whichever path named it."""
    from eval.features import load_eval_backbone, resolve_checkpoints

    teacher = load_eval_backbone(run["root"] / "train" / TEACHER_FILE)
    weights = run["export"] / "model.safetensors"
    assert resolve_checkpoints(run["export"]) == [("export", str(weights))]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher.model(x)["x_norm_clstoken"]
    weights_fingerprint = load_eval_backbone(weights).fingerprint
    for where in (weights, run["export"] / "config.json"):
        backbone = load_eval_backbone(where)
        assert backbone.meta["img_size"] == teacher.meta["img_size"] == 32
        assert backbone.meta["mean"] == teacher.meta["mean"] and backbone.meta["std"] == teacher.meta["std"]
        assert backbone.meta["arch"] == "vit_tiny" and backbone.meta["num_register_tokens"] == 2
        assert backbone.source == str(weights) and backbone.fingerprint == weights_fingerprint
        with torch.no_grad():
            assert torch.equal(backbone.model(x)["x_norm_clstoken"], expected)


def test_card_says_which_images_were_held_out_for_validation():
    """data.val_fraction / data.val: the card's training data says what was not trained on."""
    from dinov2_hier.model_card import _held_out_note

    assert _held_out_note(load_config(None, ["data.train=[synthetic]"])) == []
    note = _held_out_note(load_config(None, ["data.train=[synthetic]", "data.val_fraction=0.2"]))
    assert "A share of 0.2 of these images" in note[1] and "not trained on" in note[1]
    note = _held_out_note(load_config(None, ["data.train=[a.csv]", "data.val=[held/val.csv]"]))
    assert note[1] == "Validation images (`data.val`, not trained on): `held/val.csv`."


def test_a_checkpoint_that_is_not_good_is_never_exported_or_evaluated(run, tmp_path):
    """The newest checkpoint poisoned (non-finite streak, NaN teacher weight): export of the run
    directory takes the newest good one with a warning, the file itself exits 2 naming why,
    and eval refuses it naming the file."""
    from eval.features import load_eval_backbone
    from dinov2_hier.train.checkpoint import CheckpointError

    run_dir = tmp_path / "train"
    shutil.copytree(run["root"] / "train", run_dir)
    (newest_it, newest), (previous_it, _) = list_checkpoints(run_dir)[-1], list_checkpoints(run_dir)[-2]
    state = torch.load(newest, map_location="cpu", weights_only=True)
    state["nonfinite_streak"] = 2
    name = next(k for k in state["model"] if k.startswith("teacher.backbone.") and k.endswith("norm.weight"))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, newest)
    code, _, err = _run_cli(export_main, ["--ckpt", str(run_dir), "--output-dir", str(tmp_path / "out")])
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dinov2_hier", config)["iteration"] == previous_it < newest_it
    code, _, err = _run_cli(export_main, ["--ckpt", str(newest), "--output-dir", str(tmp_path / "bad")])
    assert code == 2 and "not a good checkpoint (written after 2 non-finite step(s) in a row)" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match=r"ckpt_00000004.pt: its weights are not finite"):
        load_eval_backbone(newest)
