"""Self-supervised losses switched off entirely (dino/ibot weight 0): Fazeli et al.'s SupCon arm."""
from __future__ import annotations

import json

import pytest
import torch

from dinov2_hier.config import ConfigError, load_config
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.report import main as report_main
from dinov2_hier.train.__main__ import main as train_main
from dinov2_hier.train.checkpoint import TEACHER_FILE
from dinov2_hier.train.collapse import CollapseDetector, ln_k_of
from dinov2_hier.train.loss_plan import check_loss_plan
from dinov2_hier.train.loop import METRICS_FILE, SUMMARY_FILE, Trainer, format_stats
from dinov2_hier.train.meta_arch import SSLMetaArch

SSL_OFF = ["dino.loss_weight=0", "ibot.loss_weight=0", "dino.koleo_loss_weight=0"]
SUPCON = [
    "supervision.hierarchy=hierarchies/synthetic.json",
    "supervision.losses=[{name: supcon, temperature: 0.2, projection_dim: 128, head: mlp, hidden_dim: 128}]",
]


def _raise(*args, **kwargs):
    raise AssertionError("called although the self-supervised losses are off")


def _model_and_batch(overrides):
    from bench.train_step import synthetic_batch

    hierarchy = Hierarchy.from_json(PROJECT_ROOT / "hierarchies/synthetic.json")
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg, hierarchy)
    return model, synthetic_batch(cfg, torch.device("cpu"), hierarchy.num_leaves)


def test_ssl_off_computes_no_teacher_and_the_total_is_the_supervised_loss(tiny_overrides):
    model, batch = _model_and_batch(tiny_overrides + SSL_OFF + SUPCON)
    # Neither the teacher nor the DINO head may run; the DINO loss is not called either.
    model.teacher["backbone"].forward = _raise
    model.teacher["dino_head"].forward = _raise
    model.student["dino_head"].forward = _raise
    model.student["dino_head"].bottleneck = _raise
    model.dino_loss.forward = _raise
    losses, stats = model(batch, 0.07)
    assert set(losses) == {"supcon", "total"}
    assert set(stats) == {"cls_spread_student"}  # no DINO diagnostics, no teacher spread
    # The total is exactly the term on the student's CLS tokens (drop path 0, no masks: deterministic).
    cls = model.student["backbone"](batch["global_crops"])["x_norm_clstoken"]
    direct = model.supervised["supcon"](cls, batch["targets"])
    assert losses["total"].item() == direct.item()
    assert 1.0 < direct.item() < 5.0  # SupCon over 16 crops: ln(15) = 2.708 for equal similarities
    # Every trainable parameter gets a gradient (DDP); the unused DINO head is frozen.
    losses["total"].backward()
    trainable = [(n, p) for n, p in model.trainable_modules().named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert not any(p.requires_grad for p in model.student["dino_head"].parameters())
    assert set(model.gradient_groups()) == {"backbone", "supervised"}


def test_ibot_without_dino_keeps_the_shared_head_and_no_dino_loss(tiny_overrides):
    model, batch = _model_and_batch(tiny_overrides + ["dino.loss_weight=0", "dino.koleo_loss_weight=0"])
    losses, stats = model(batch, 0.07)
    assert set(losses) == {"ibot", "total"}
    assert torch.equal(losses["total"], model.cfg.ibot.loss_weight * losses["ibot"])
    assert not any(k.startswith("dino_") for k in stats) and "ibot_teacher_entropy" in stats
    assert all(p.requires_grad for p in model.student["dino_head"].parameters())  # iBOT shares it
    assert list(ln_k_of(model.cfg)) == ["ibot"]


def test_koleo_without_dino_is_added_to_the_supervised_loss(tiny_overrides):
    model, batch = _model_and_batch(tiny_overrides + SSL_OFF[:2] + ["dino.koleo_loss_weight=0.1"] + SUPCON)
    model.teacher["backbone"].forward = _raise
    losses, _ = model(batch, 0.07)
    assert set(losses) == {"koleo", "supcon", "total"}
    assert losses["total"].item() == pytest.approx(0.1 * losses["koleo"].item() + losses["supcon"].item(), rel=1e-6)


@pytest.mark.parametrize("extra, named", [
    ([], ["dino.loss_weight=0", "ibot.loss_weight=0", "supervision.losses=[]"]),
    (["dino.koleo_loss_weight=0.1"], ["dino.loss_weight=0", "ibot.loss_weight=0", "dino.koleo_loss_weight=0.1"]),
])
def test_a_config_that_trains_nothing_exits_2_naming_the_keys(tmp_path, capsys, extra, named):
    code = train_main(["--output-dir", str(tmp_path / "run"), *SSL_OFF, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and all(key in err[0] for key in named), err
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_local_crops_without_dino_are_refused(tmp_path, capsys, tiny_overrides):
    overrides = tiny_overrides + SSL_OFF + SUPCON + ["crops.local_crops_number=2", "crops.local_crops_size=16"]
    with pytest.raises(ConfigError, match="crops.local_crops_number=2 but dino.loss_weight=0"):
        SSLMetaArch(load_config(None, overrides), Hierarchy.from_json(PROJECT_ROOT / "hierarchies/synthetic.json"))
    assert train_main(["--output-dir", str(tmp_path / "run"), *overrides]) == 2
    assert "crops.local_crops_number" in capsys.readouterr().err


def test_the_supcon_only_config_is_fazelis_arm():
    cfg = load_config(PROJECT_ROOT / "configs/train/vits14_small_supcon_only.yaml", ["data.train=[synthetic]"])
    assert (cfg.dino.loss_weight, cfg.ibot.loss_weight, cfg.dino.koleo_loss_weight) == (0, 0, 0)
    assert cfg.crops.local_crops_number == 0
    [term] = cfg.supervision.losses
    assert (term.name, term.temperature, term.projection_dim) == ("supcon", 0.2, 128)
    assert cfg.student.arch == "vit_small" and cfg.dino.head_n_prototypes == 8192  # the rest: vits14_small
    plan = check_loss_plan(cfg)  # accepted: SupCon alone, no teacher forward, DINO head frozen
    assert (plan.supervised, plan.teacher_forward, plan.dino_head_used) == (True, False, False)


def test_collapse_checks_are_skipped_without_dino_and_ibot(caplog):
    with caplog.at_level("INFO", logger="dinov2_hier.train"):
        detector = CollapseDetector({}, check_after=0)
    assert "collapse checks skipped" in caplog.text
    detector.observe({"iteration": 10, "loss_supcon": 1.0, "cls_spread_student": 0.5})
    assert detector.summary()["checked"] is False and detector.summary()["collapsed"] is False
    assert detector.verdict({"loss_supcon": 1.0}) == "collapse checks skipped (no DINO / iBOT loss)"
    assert format_stats({"cls_spread_student": 0.25}, {}) == "spread s=0.250"


def test_supcon_only_training_runs_and_its_loss_falls(tmp_path, tiny_overrides):
    """80 steps of SupCon alone (tau 0.2, projection 128) on the synthetic cells, colour
    jitter off (colour is the classes' planted cue): the mean SupCon loss of the last 10
    steps is below 0.90 of the first 10's.

    Measured on the 2-core CPU (torch 2.14.1, one thread, this test's settings): seeds 0-5
    ended at 0.621, 0.824, 0.704, 0.572, 0.561, 0.668 of the first loss (mean 0.659, sd
    0.098); without learning (``optim.base_lr=0``, seeds 0-5) at 0.955-0.981 (mean 0.966,
    sd 0.009). 0.90 is 2.5 of the learning runs' sd above their mean (0.08 above the worst
    seed) and 7 of the no-learning runs' sd below theirs: a backbone and projection that do
    not learn fail. (Base LR 0.05 at this batch collapsed the tokens to one point, loss
    ln 15; 0.003 and 0.01 both learn.)"""
    overrides = tiny_overrides + SSL_OFF + SUPCON + [
        "supervision.labelled_fraction=1.0",
        "train.iterations=80", "train.epoch_length=10", "train.checkpoint_every=1000",
        "optim.base_lr=0.01", "optim.warmup_epochs=0.5", "student.layerscale=null",
        "crops.color_jitter_p=0", "crops.grayscale_p=0", "crops.solarize_p=[0,0]",
    ]
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, overrides), run)
    trainer.run()
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert len(records) == 80
    keys = set().union(*records)
    assert not [k for k in keys if "dino" in k or "ibot" in k or k in ("loss_koleo", "cls_spread_teacher")], keys
    assert {"loss_supcon", "loss_total", "cls_spread_student", "grad_norm_backbone", "grad_norm_supervised"} <= keys
    supcon = [r["loss_supcon"] for r in records]
    assert all(r["loss_total"] == r["loss_supcon"] for r in records)
    first, last = sum(supcon[:10]) / 10, sum(supcon[-10:]) / 10
    assert last < 0.90 * first, (first, last)
    # The teacher is the student's EMA: written for eval / export, and it moved from its init.
    assert (run / TEACHER_FILE).is_file()
    torch.manual_seed(trainer.cfg.seed)  # the initial weights, as build_step_parts draws them
    init = SSLMetaArch(trainer.cfg, trainer.supervision.hierarchy).teacher["backbone"].state_dict()
    now = trainer.model.teacher["backbone"].state_dict()
    assert max(float((now[k] - v).abs().max()) for k, v in init.items()) > 1e-3
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["collapse"]["checked"] is False and summary["collapse"]["detected_at_iteration"] is None
    # The report copes with a run that has no DINO loss.
    assert report_main([str(run), "--output", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "collapse checks skipped" in html and "loss_supcon" in html and "loss_dino" not in html
