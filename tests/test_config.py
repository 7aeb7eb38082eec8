from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dinov2_hier.config import ConfigError, load_config, parse_overrides, save_config
from dinov2_hier.paths import PROJECT_ROOT


def test_layering_default_then_file_then_command_line(tmp_path):
    override = tmp_path / "o.yaml"
    override.write_text("train:\n  iterations: 77\n  batch_size_per_gpu: 5\n")
    cfg = load_config(override, ["train.iterations=12", "optim.betas=[0.8,0.9]"])
    assert cfg.train.iterations == 12  # command line beats the file
    assert cfg.train.batch_size_per_gpu == 5  # file beats the default
    assert cfg.train.log_every == 10  # default kept
    assert list(cfg.optim.betas) == [0.8, 0.9]


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match="train.iteratons"):
        load_config(None, ["train.iteratons=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  base_lr: 0.1\n  bse_lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.bse_lr"):
        load_config(bad)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train:\n  iterations: 5\n  log_every: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+"):
        load_config(bad)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.iterations"])


def test_every_shipped_config_loads():
    files = sorted((PROJECT_ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        if f.name == "default.yaml":
            continue
        if f.parent.name == "finetune":  # eval.finetune option files, not training configs
            from eval.finetune import parse_args

            args = parse_args(["--config", str(f), "--ckpt", "x.pt", "--data", "d.csv", "--output-dir", "o"])
            assert args.epochs > 0, f
            continue
        # The paper's configs continue from released weights: they must be named.
        weights = ["student.pretrained_weights=DinoBloom.pth"] if f.parent.name == "paper" else []
        cfg = load_config(f, ["data.train=[cells.csv]"] + weights)
        assert cfg.train.iterations > 0, f


def test_every_default_key_is_documented():
    # Each leaf key line of the default yaml carries a comment (on the line or the line above).
    lines = (PROJECT_ROOT / "configs" / "default.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        if "#" not in line and not lines[i - 1].strip().startswith("#") and "#" not in lines[i - 1]:
            undocumented.append(stripped)
    assert undocumented == []


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.iterations=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = OmegaConf.load(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_base_chain_and_required_values(tmp_path):
    arm = PROJECT_ROOT / "configs" / "train" / "vitl14_hierce.yaml"
    with pytest.raises(ConfigError, match=r"data.train=\.\.\."):
        load_config(arm)  # the ViT-L recipe needs the user's data
    cfg = load_config(arm, ["data.train=[cells.csv]"])
    assert cfg.student.arch == "vit_large"  # from base: vitl14.yaml
    # DINOv2 computes the branches of its ViT-L (drop-path rate 0.4 > 0.1) on a batch subset;
    # ViT-S (0.1) keeps the per-crop draw.
    assert (cfg.student.drop_path_rate, cfg.student.drop_path_mode) == (0.4, "subset")
    small = load_config(PROJECT_ROOT / "configs" / "train" / "vits14.yaml", ["data.train=[cells.csv]"])
    assert (small.student.drop_path_rate, small.student.drop_path_mode) == (0.1, "sample")
    assert cfg.supervision.losses[0].name == "hierce" and cfg.supervision.losses[0].alpha == 0.5
    assert list(cfg.data.train) == ["cells.csv"]
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)


def test_the_paper_configs_need_weights_and_carry_the_papers_values():
    """configs/paper/ continue from released weights with the paper code's values
    (issue 18's table); without weights they refuse to start instead of training from
    scratch at the paper's fine-tuning learning rate."""
    with pytest.raises(ConfigError, match="student.pretrained_weights"):
        load_config(PROJECT_ROOT / "configs" / "paper" / "vitl14_hierce.yaml", ["data.train=[cells.csv]"])
    cfg = load_config(PROJECT_ROOT / "configs" / "paper" / "vitl14_hierce.yaml",
                      ["data.train=[cells.csv]", "student.pretrained_weights=DinoBloom-L.pth"])
    assert (cfg.optim.base_lr, cfg.optim.layerwise_decay, cfg.teacher.momentum_teacher) == (2e-4, 1.0, 0.994)
    assert (cfg.dino.loss_weight, cfg.ibot.loss_weight, cfg.dino.koleo_loss_weight) == (0.5, 1.0, 0.0)
    assert (cfg.dino.head_bottleneck_dim, cfg.ibot.separate_head, cfg.student.drop_path_rate) == (384, True, 0.0)
    assert cfg.train.epoch_length == 500
    warmups = (cfg.optim.warmup_epochs, cfg.teacher.warmup_teacher_temp_epochs, cfg.optim.freeze_last_layer_epochs)
    assert tuple(w * cfg.train.epoch_length for w in warmups) == (10_000, 15_000, 500)
    (term,) = cfg.supervision.losses
    assert (term.name, term.weight, term.head, term.alpha, term.normalize) == ("hierce", 0.5, "linear", 0.5, True)
    (term,) = load_config(PROJECT_ROOT / "configs" / "paper" / "vits14_hiersupcon.yaml", [
        "data.train=[cells.csv]", "student.pretrained_weights=DinoBloom-S.pth"]).supervision.losses
    assert (term.temperature, term.dedup, term.head) == (0.07, True, "linear")
