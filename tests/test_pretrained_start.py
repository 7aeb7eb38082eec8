"""Starting from a DINOv2-layout training checkpoint: which tensors land where, and the
head warm-up that freezes the backbone for exactly the configured iterations when the
file brings no heads (issue 18, item 1)."""
from __future__ import annotations

import json

import pytest
import torch

from dinov2_hier.config import load_config
from dinov2_hier.models import WeightsError
from dinov2_hier.train.checkpoint import list_checkpoints, load_checkpoint
from dinov2_hier.train.loop import Trainer
from dinov2_hier.train.meta_arch import SSLMetaArch
from dinov2_hier.train.parallel import clip_grad_norm

SEPARATE_IBOT = ["ibot.separate_head=true"]


def _dinov2_checkpoint(path, overrides, heads=("dino_head", "ibot_head"), seed=7):
    """A DINOv2 training checkpoint as its trainer writes it: ``{"student": ..., "teacher":
    {"backbone.*", "dino_head.*", "ibot_head.*"}}`` with distinct random values in each
    (our head layout is DINOv2's: ``mlp.0/2/4`` and ``last_layer.weight_g / weight_v``)."""
    torch.manual_seed(seed)
    model = SSLMetaArch(load_config(None, overrides))
    teacher, student = {}, {}
    for name in ("backbone",) + tuple(h for h in heads if h in model.student):
        for key, value in model.student[name].state_dict().items():
            teacher[f"{name}.{key}"] = torch.randn_like(value) if value.is_floating_point() else value
            student[f"{name}.{key}"] = torch.randn_like(value) if value.is_floating_point() else value
    torch.save({"student": student, "teacher": teacher, "iteration": 1234}, path)
    return teacher


def _initial_model(overrides) -> SSLMetaArch:
    """The weights a run of this config starts from (the trainer seeds with cfg.seed)."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.seed)
    return SSLMetaArch(cfg)


def _part(state: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def _assert_equal(module, expected: dict) -> None:
    own = module.state_dict()
    assert set(own) == set(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


def test_a_checkpoint_with_heads_loads_the_teachers_backbone_and_heads_into_both(tmp_path, tiny_overrides):
    overrides = tiny_overrides + SEPARATE_IBOT
    file = _dinov2_checkpoint(tmp_path / "dinov2.pth", overrides)
    trainer = Trainer(load_config(None, overrides + [f"student.pretrained_weights={tmp_path / 'dinov2.pth'}"]),
                      tmp_path / "run")
    for which in (trainer.model.student, trainer.model.teacher):
        for name in ("backbone", "dino_head", "ibot_head"):
            _assert_equal(which[name], _part(file, name))  # the teacher's values, not the student's
    assert trainer.head_warmup_iterations == 0  # nothing fresh, nothing to warm up


def test_a_shared_head_in_the_file_serves_a_separate_ibot_head(tmp_path, tiny_overrides):
    file = _dinov2_checkpoint(tmp_path / "shared.pth", tiny_overrides, heads=("dino_head",))
    trainer = Trainer(load_config(None, tiny_overrides + SEPARATE_IBOT + [
        f"student.pretrained_weights={tmp_path / 'shared.pth'}"]), tmp_path / "run")
    _assert_equal(trainer.model.student["ibot_head"], _part(file, "dino_head"))
    assert trainer.head_warmup_iterations == 0


def test_heads_that_do_not_fit_stay_fresh_in_auto_and_stop_a_run_that_requires_them(tmp_path, tiny_overrides):
    _dinov2_checkpoint(tmp_path / "k512.pth", tiny_overrides + ["dino.head_n_prototypes=512"], heads=("dino_head",))
    weights = f"student.pretrained_weights={tmp_path / 'k512.pth'}"
    trainer = Trainer(load_config(None, tiny_overrides + [weights]), tmp_path / "auto")
    fresh = _initial_model(tiny_overrides)
    _assert_equal(trainer.model.student["dino_head"], fresh.student["dino_head"].state_dict())
    assert trainer.head_warmup_iterations == 2  # head_warmup_epochs 1 x epoch_length 2
    with pytest.raises(WeightsError, match=r"k512\.pth: student\.pretrained_heads=true but dino_head cannot load: "
                                           r".*'last_layer\.weight_v' is \(512, 64\) in the file, \(256, 64\) here"):
        Trainer(load_config(None, tiny_overrides + [weights, "student.pretrained_heads=true"]), tmp_path / "strict")


def test_a_backbone_only_file_freezes_the_backbone_for_exactly_the_warm_up(tmp_path, tiny_overrides):
    """head_warmup_epochs 1 x epoch_length 2 = 2 iterations: the student's backbone is the
    file's after iterations 1 and 2 and has moved after 3; the heads train from the first
    step; the teacher's backbone follows the frozen student (EMA of equal weights)."""
    file = _part(_dinov2_checkpoint(tmp_path / "dinov2.pth", tiny_overrides, heads=()), "backbone")
    torch.save({"model": file}, tmp_path / "backbone.pt")  # an export: backbone only
    cfg = load_config(None, tiny_overrides + [
        f"student.pretrained_weights={tmp_path / 'backbone.pt'}", "train.iterations=4", "train.checkpoint_every=1",
        "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",  # a learning rate from the first step
    ])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.head_warmup_iterations == 2
    initial_head = {k: v.clone() for k, v in trainer.model.student["dino_head"].state_dict().items()}
    trainer.run()
    models = {it: load_checkpoint(path)["model"] for it, path in list_checkpoints(tmp_path / "run")}
    assert sorted(models) == [1, 2, 3, 4]

    def moved(it: int, prefix: str, reference: dict) -> bool:
        return any(not torch.equal(models[it][prefix + k], v) for k, v in reference.items())

    assert [moved(it, "student.backbone.", file) for it in (1, 2, 3, 4)] == [False, False, True, True]
    assert [moved(it, "teacher.backbone.", file) for it in (1, 2)] == [False, False]
    assert moved(1, "student.dino_head.", initial_head)  # the heads train during the warm-up
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm_backbone"] == 0 for r in records] == [True, True, False, False]


def test_no_heads_are_loaded_when_told_not_to_and_the_warm_up_can_be_off(tmp_path, tiny_overrides):
    _dinov2_checkpoint(tmp_path / "dinov2.pth", tiny_overrides)
    trainer = Trainer(load_config(None, tiny_overrides + [
        f"student.pretrained_weights={tmp_path / 'dinov2.pth'}", "student.pretrained_heads=false",
        "student.head_warmup_epochs=0"]), tmp_path / "run")
    fresh = _initial_model(tiny_overrides)
    _assert_equal(trainer.model.student["dino_head"], fresh.student["dino_head"].state_dict())
    assert trainer.head_warmup_iterations == 0


def test_the_norm_of_a_group_without_gradients_is_zero_on_its_device():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    norm = clip_grad_norm(params, 1.0)
    assert norm.item() == 0.0 and norm.device == params[0].device
