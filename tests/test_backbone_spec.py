"""BackboneSpec (config -> spec -> metadata -> spec) and read_artifact, and files written
before they existed: tests/fixtures/backbone_adbee34.json records what the code of commit
adbee34 wrote for a vit_tiny/8 at 32 px (2 registers, SwiGLU, no LayerScale, no qkv bias,
its own normalisation): the teacher file's ``meta``, the export's ``config.json`` and
safetensors header, the checkpoint's ``config``. It was made by running adbee34's
``teacher_backbone_payload`` and ``export_backbone`` on ``build_backbone_from_config`` under
``torch.manual_seed(seed)``; ``first_version_config_yaml`` is the ``student`` / ``crops``
of the first commit's default config. The weights themselves (7 MB) are not stored: they
are rebuilt from the recorded seed and written in those layouts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from dinov2_hier.config import load_config
from dinov2_hier.export import export_backbone, load_trained_teacher
from dinov2_hier.hub import load_backbone, model_kwargs
from dinov2_hier.models import BackboneSpec, WeightsError, build_backbone, load_backbone_weights, read_artifact
from dinov2_hier.models.artifacts import CHECKPOINT, EXPORT, TEACHER, WEIGHTS, teacher_backbone_state
from dinov2_hier.models.spec import TEACHER_BACKBONE_PREFIX, ViTShape
from dinov2_hier.train.loop import teacher_backbone_payload
from eval.features import load_eval_backbone
from tests.conftest import TINY_OVERRIDES

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "backbone_adbee34.json").read_text())
VERSION_KEYS = ("dinov2_hier_version", "torch_version")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fixture_cfg():
    return load_config(None, TINY_OVERRIDES + FIXTURE["overrides"])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The fixture's weights in every layout adbee34 wrote: teacher file, export, checkpoint."""
    root = tmp_path_factory.mktemp("adbee34")
    torch.manual_seed(FIXTURE["seed"])
    state = BackboneSpec.from_config(_fixture_cfg()).build().state_dict()
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": state, "meta": FIXTURE["teacher_meta"]}, root / "run" / "teacher_backbone.pt")
    torch.save({"iteration": FIXTURE["iteration"], "config": FIXTURE["checkpoint_config_yaml"],
                "hierarchy_fingerprint": "", "model": {
                    **{f"student.backbone.{k}": v + 1 for k, v in state.items()},
                    **{f"teacher.backbone.{k}": v for k, v in state.items()},
                }}, root / "run" / "checkpoints" / "ckpt_00000007.pt")
    (root / "export").mkdir()
    (root / "export" / "config.json").write_text(FIXTURE["export_config_json"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "export" / "model.safetensors"),
              metadata=FIXTURE["export_header"])
    return root, state


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("extra", [
    [],
    ["student.num_register_tokens=4", "student.ffn_layer=swiglu", "student.layerscale=null", "student.qkv_bias=false"],
    ["crops.mean=[0.5,0.4,0.3]", "crops.std=[0.2,0.25,0.3]", "student.layerscale=0.1"],
])
def test_config_to_spec_to_metadata_and_back(extra):
    cfg = load_config(None, TINY_OVERRIDES + extra)
    spec = BackboneSpec.from_config(cfg)
    meta = spec.to_metadata()
    assert list(meta) == ["arch", "patch_size", "img_size", "num_register_tokens", "ffn_layer", "layerscale",
                          "qkv_bias", "mean", "std"]
    assert BackboneSpec.from_metadata(meta) == spec
    assert BackboneSpec.from_metadata(json.loads(json.dumps(meta))) == spec  # as JSON, too
    assert (spec.arch, spec.patch_size, spec.img_size) == ("vit_tiny", 8, 32)
    assert spec.layerscale == cfg.student.layerscale and list(spec.mean) == list(cfg.crops.mean)
    built = spec.build()
    assert (built.patch_size, built.num_register_tokens, built.grid_size) == (8, spec.num_register_tokens, (4, 4))
    assert [b.drop_path.rate for b in spec.build(drop_path_rate=0.3, drop_path_schedule="uniform").blocks] == [0.3] * 4


def test_configs_of_the_first_version_still_describe_their_backbone():
    spec = BackboneSpec.from_config(OmegaConf.create(FIXTURE["first_version_config_yaml"]))
    assert spec == BackboneSpec("vit_small", 14, 224, 0, "mlp", 1e-5, True)
    with torch.device("meta"):
        assert spec.build().embed_dim == 384


def test_teacher_metadata_defaults_and_errors():
    spec = BackboneSpec.from_metadata({"arch": "vit_tiny", "patch_size": 8, "img_size": 32})
    assert spec == BackboneSpec("vit_tiny", 8, 32, num_register_tokens=0, ffn_layer="mlp", layerscale=1e-5,
                                qkv_bias=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with pytest.raises(WeightsError, match=r"f\.pt: 'meta': missing key 'img_size'"):
        BackboneSpec.from_metadata({"arch": "vit_tiny", "patch_size": 8}, "f.pt: 'meta'")
    with pytest.raises(WeightsError, match="missing key 'arch'"):
        BackboneSpec.from_metadata({"patch_size": 8, "img_size": 32})
    with pytest.raises(WeightsError, match="malformed"):
        BackboneSpec.from_metadata({"arch": "vit_tiny", "patch_size": "eight", "img_size": 32})


def test_export_config_spec_builds_the_teacher_metadata_model():
    config = json.loads(FIXTURE["export_config_json"])
    spec = BackboneSpec.from_metadata(config)
    assert spec.shape == ViTShape(embed_dim=192, depth=4, num_heads=3)
    assert spec.build_kwargs() | {"drop_path_rate": 0.0} == model_kwargs(config)
    teacher = BackboneSpec.from_metadata(FIXTURE["teacher_meta"])
    assert (spec.arch, spec.mean, spec.std) == (teacher.arch, teacher.mean, teacher.std)
    shapes = {k: v.shape for k, v in spec.build().state_dict().items()}
    assert shapes == {k: v.shape for k, v in teacher.build().state_dict().items()}
    hand_written = {k: v for k, v in config.items() if k not in ("architecture", "mean", "std", "format")}
    assert BackboneSpec.from_metadata(hand_written).arch is None


# --------------------------------------------------------------------------- the writers, unchanged


def test_teacher_payload_meta_is_what_adbee34_wrote():
    torch.manual_seed(0)
    state = {f"{TEACHER_BACKBONE_PREFIX}{k}": v for k, v in BackboneSpec.from_config(_fixture_cfg()).build().state_dict().items()}
    meta = teacher_backbone_payload(None, _fixture_cfg(), FIXTURE["iteration"], state)["meta"]
    assert json.dumps(meta) == json.dumps(FIXTURE["teacher_meta"])  # keys, order, value types


def test_export_config_is_what_adbee34_wrote(written, tmp_path):
    root, _ = written
    # Our layout (--format ours; vit_tiny/8 has no timm family, so also the default for it)
    # writes adbee34's document plus the tensor layout and the timm family (none) it names (issue 23).
    export_backbone(root / "run" / "teacher_backbone.pt", tmp_path / "again", fmt="ours")
    text = (tmp_path / "again" / "config.json").read_text()
    ours, theirs = json.loads(text), json.loads(FIXTURE["export_config_json"])
    assert ours.pop("tensor_layout") == "dinov2" and ours.pop("timm_family") is None
    assert list(ours) == list(theirs)
    assert {k: v for k, v in ours.items() if k not in VERSION_KEYS} == {
        k: v for k, v in theirs.items() if k not in VERSION_KEYS}
    with safe_open(str(tmp_path / "again" / "model.safetensors"), framework="pt") as f:
        assert set(f.metadata()) == set(FIXTURE["export_header"])


# --------------------------------------------------------------------------- the readers, on adbee34's files


def test_adbee34_teacher_file_loads_everywhere(written):
    root, state = written
    path = root / "run" / "teacher_backbone.pt"
    expected = BackboneSpec.from_metadata(FIXTURE["teacher_meta"])
    artifact = read_artifact(path)
    assert (artifact.kind, artifact.spec, artifact.iteration, artifact.run_dir) == (TEACHER, expected, 7, root / "run")
    assert _same(artifact.state, state)
    backbone = load_eval_backbone(path)
    assert _same(backbone.model.state_dict(), state)
    assert {k: backbone.meta[k] for k in ("arch", "img_size", "mean", "std", "iteration")} == {
        "arch": "vit_tiny", "img_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "iteration": 7}
    teacher = load_trained_teacher(path)
    assert teacher.spec == expected and _same(teacher.state, state)
    target = expected.build()
    assert load_backbone_weights(target, path).missing == [] and _same(target.state_dict(), state)


def test_adbee34_export_loads_everywhere(written, tmp_path):
    root, state = written
    for where in (root / "export", root / "export" / "config.json", root / "export" / "model.safetensors"):
        assert _same(load_backbone(where).state_dict(), state), where
        artifact = read_artifact(where)
        assert artifact.kind == EXPORT and artifact.iteration == 7
        assert artifact.spec.to_metadata() == BackboneSpec.from_metadata(FIXTURE["teacher_meta"]).to_metadata()
    alone = tmp_path / "alone.safetensors"  # without config.json: the header describes it
    shutil.copy(root / "export" / "model.safetensors", alone)
    assert _same(load_backbone(alone).state_dict(), state)
    target = BackboneSpec.from_metadata(FIXTURE["teacher_meta"]).build()
    assert load_backbone_weights(target, alone).missing == [] and _same(target.state_dict(), state)
    backbone = load_eval_backbone(alone)  # eval reads an export's recorded architecture, size and normalisation
    meta = FIXTURE["teacher_meta"]
    assert (backbone.meta["arch"], backbone.meta["img_size"]) == (meta["arch"], meta["img_size"])
    assert backbone.meta["mean"] == list(meta["mean"]) and _same(backbone.model.state_dict(), state)


def test_adbee34_checkpoint_and_run_directory_load(written):
    root, state = written
    ckpt = root / "run" / "checkpoints" / "ckpt_00000007.pt"
    for where in (ckpt, root / "run"):
        artifact = read_artifact(where)
        assert (artifact.kind, artifact.path, artifact.iteration) == (CHECKPOINT, ckpt, 7)
        assert artifact.spec == BackboneSpec.from_metadata(FIXTURE["teacher_meta"])
        assert _same(artifact.state, state) and artifact.hierarchy_fingerprint == ""
    assert _same(load_eval_backbone(ckpt).model.state_dict(), state)
    teacher = load_trained_teacher(root / "run")
    assert teacher.source == ckpt.name and _same(teacher.state, state) and teacher.cfg is not None


# --------------------------------------------------------------------------- read_artifact


def test_foreign_layouts_and_kinds(tmp_path):
    torch.manual_seed(0)
    state = build_backbone("vit_tiny", img_size=32, patch_size=8).state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "dinov2.pth")
    artifact = read_artifact(tmp_path / "dinov2.pth")
    assert (artifact.kind, artifact.spec, artifact.iteration) == (WEIGHTS, None, None) and _same(artifact.state, state)
    # DINOv2's own training checkpoint: our layout without "config"; its chunked blocks are renamed.
    chunked = {f"teacher.backbone.{k.replace('blocks.', 'blocks.0.', 1)}": v for k, v in state.items()}
    torch.save({"model": chunked, "iteration": 3}, tmp_path / "model_0000003.pth")
    artifact = read_artifact(tmp_path / "model_0000003.pth")
    assert (artifact.kind, artifact.spec, artifact.stores_config) == (CHECKPOINT, None, False)
    assert _same(artifact.state, state)
    with pytest.raises(WeightsError, match=r"dinov2\.pth: not a dinov2_hier training checkpoint or teacher_backbone\.pt"):
        read_artifact(tmp_path / "dinov2.pth", accept=(CHECKPOINT, TEACHER))
    with pytest.raises(WeightsError, match=r"dinov2\.pth: no config\.json beside it"):
        read_artifact(tmp_path / "dinov2.pth", accept=(EXPORT,))
    with pytest.raises(WeightsError, match="no checkpoints/ckpt_\\*.pt and no teacher_backbone.pt"):
        read_artifact(tmp_path)


def test_teacher_backbone_state_drops_wrappers_and_other_modules():
    t, s = torch.ones(2), torch.zeros(2)
    model_state = {"module.teacher.backbone._orig_mod.norm.weight": t, "teacher.dino_head.mlp.0.bias": s,
                   "student.backbone.norm.weight": s}
    assert teacher_backbone_state(model_state) == {"norm.weight": t}
