"""End-to-end training on CPU with a tiny ViT on synthetic cells."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from dinov2_hier.config import load_config
from dinov2_hier.data import TooManyUnreadableImages, write_synthetic_dataset
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.models import build_backbone, load_backbone_weights
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.__main__ import main as train_main
from dinov2_hier.train.checkpoint import TEACHER_FILE, list_checkpoints, load_checkpoint
from dinov2_hier.train.loop import METRICS_FILE, NonFiniteLossError, Trainer


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _train(tmp_path, overrides, name="run", stop_at=None, resume=True):
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, tmp_path / name, resume=resume)
    trainer.run(stop_at=stop_at)
    return trainer


def test_run_outputs_and_saved_config(tmp_path, tiny_overrides):
    trainer = _train(tmp_path, tiny_overrides)
    run = tmp_path / "run"
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.compute.device == "cpu" and saved.compute.dtype == "fp32"  # resolved, not "auto"/bf16
    assert saved.train.iterations == 6
    assert [it for it, _ in list_checkpoints(run)] == [3, 6]
    records = _metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss_dino", "loss_ibot", "loss_koleo", "loss_total", "lr", "images_per_s", "eta_s"):
        assert key in records[0]
    assert records[-1]["eta_s"] == 0
    # The teacher file is a plain, safely loadable backbone that rebuilds the teacher exactly.
    payload = torch.load(run / TEACHER_FILE, map_location="cpu", weights_only=True)
    assert payload["meta"]["iteration"] == 6 and payload["meta"]["arch"] == "vit_tiny"
    backbone = build_backbone("vit_tiny", img_size=32, patch_size=8)
    report = load_backbone_weights(backbone, run / TEACHER_FILE)
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    expected = trainer.model.teacher["backbone"](x)["x_norm_clstoken"]
    assert torch.allclose(backbone(x)["x_norm_clstoken"], expected, atol=1e-6)


def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_overrides):
    _train(tmp_path, tiny_overrides, name="straight")
    _train(tmp_path, tiny_overrides, name="split", stop_at=3)
    assert [r["iteration"] for r in _metrics(tmp_path / "split")] == [1, 2, 3]
    _train(tmp_path, tiny_overrides, name="split")  # resumes from iteration 3
    straight, split = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [r["iteration"] for r in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, split):
        for key in ("loss_dino", "loss_ibot", "loss_koleo", "loss_total", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
    w_straight = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1][1])["model"]
    w_split = load_checkpoint(list_checkpoints(tmp_path / "split")[-1][1])["model"]
    for key in w_straight:
        assert torch.allclose(w_straight[key], w_split[key], atol=1e-5), key


def test_no_resume_starts_over_and_a_later_resume_picks_the_new_run(tmp_path, tiny_overrides):
    """--no-resume moves the previous run aside: the next plain restart resumes the new run
    (here at another batch size), never the old one, and the records do not mix."""
    _train(tmp_path, tiny_overrides, stop_at=3)
    old = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])
    new_overrides = tiny_overrides + ["train.batch_size_per_gpu=4"]
    trainer = Trainer(load_config(None, new_overrides), tmp_path / "run", resume=False)
    assert trainer.state.iteration == 0 and list_checkpoints(tmp_path / "run") == []
    trainer.run(stop_at=3)
    resumed = Trainer(load_config(None, new_overrides), tmp_path / "run")
    assert resumed.state.iteration == 3
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])
    assert ckpt["consumed_per_rank"] == 3 * 4  # the new run's batch size, not the old run's 8
    assert [r["iteration"] for r in _metrics(tmp_path / "run")] == [1, 2, 3]  # the new run's records only
    (aside,) = (tmp_path / "run").glob("replaced_*")
    kept = list_checkpoints(aside)
    assert [it for it, _ in kept] == [3] and load_checkpoint(kept[0][1])["consumed_per_rank"] == old["consumed_per_rank"]
    assert [r["iteration"] for r in _metrics(aside)] == [1, 2, 3]


@pytest.mark.parametrize("fused", [False, True], ids=["skip-on-host", "skip-on-device"])
def test_nonfinite_loss_skips_steps_then_stops(tmp_path, tiny_overrides, monkeypatch, fused):
    """NaN losses from iteration 2 on: those steps leave the student unchanged and the
    second one in a row stops training. With a fused AdamW the skip is taken on the device
    and the loop learns of it one step late; the outcome is the same."""
    cfg = load_config(None, tiny_overrides + [
        "train.max_consecutive_nonfinite=2", "train.checkpoint_every=2", f"optim.fused={str(fused).lower()}",
    ])
    trainer = Trainer(cfg, tmp_path / "run")
    real = trainer.model.compute_losses
    calls = {"n": 0}

    def flaky(batch, teacher_temp, with_stats=True):
        calls["n"] += 1
        losses, stats = real(batch, teacher_temp, with_stats)
        if calls["n"] >= 3:  # iterations 2, 3, ... (0-based) give NaN
            losses["total"] = losses["total"] * float("nan")
        return losses, stats

    monkeypatch.setattr(trainer.model, "compute_losses", flaky)
    with pytest.raises(NonFiniteLossError, match="iteration 3.*ckpt_00000002.pt"):
        trainer.run()
    # The NaN at iteration 2 left the weights of the checkpoint at iteration 2 untouched.
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])
    assert ckpt["iteration"] == 2
    for key, value in trainer.model.state_dict().items():
        if key.startswith("student."):
            assert torch.equal(value, ckpt["model"][key]), key
    records = _metrics(tmp_path / "run")
    assert [r["applied"] for r in records] == [True, True, False]


def test_diagnostics_are_computed_only_on_logged_steps(tmp_path, tiny_overrides, monkeypatch):
    """The diagnostics cost several passes over the [rows, K] targets and logits: the
    trainer asks for them on the steps it logs (every train.log_every-th and the last)
    only, and every metrics record still has them. The losses do not depend on them."""
    cfg = load_config(None, tiny_overrides + ["train.iterations=5", "train.log_every=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    real = trainer.model.compute_losses
    asked: list[bool] = []

    def spy(batch, teacher_temp, with_stats=True):
        asked.append(with_stats)
        losses, stats = real(batch, teacher_temp, with_stats)
        if with_stats:  # the same losses without the diagnostics
            plain, none = real(batch, teacher_temp, False)
            assert none == {} and {k: v.item() for k, v in plain.items()} == {k: v.item() for k, v in losses.items()}
        return losses, stats

    monkeypatch.setattr(trainer.model, "compute_losses", spy)
    trainer.run()
    assert asked == [False, True, False, True, True]  # iterations 1..5: 2, 4 and the last are logged
    records = _metrics(tmp_path / "run")
    assert [r["iteration"] for r in records] == [2, 4, 5]
    assert all("dino_teacher_entropy" in r and "grad_norm_backbone" in r for r in records)


def _synthetic_manifest(tmp_path, n=24):
    hierarchy = Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "synthetic.json")
    return write_synthetic_dataset(tmp_path / "cells", n, hierarchy, image_size=40, seed=1)


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_overrides):
    manifest = _synthetic_manifest(tmp_path)
    folder = manifest.parent
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    with open(manifest, "a") as f:
        f.write("empty.jpg,,,\ntext.jpg,,,\n")
    overrides = tiny_overrides + [f"data.train=[{manifest}]", "data.max_unreadable_fraction=0.5", "data.min_draws_before_check=1"]
    trainer = _train(tmp_path, overrides)
    assert trainer.skips.n_drawn == 6 * 8
    # Each epoch over 26 entries draws both bad files once: 48 draws cover 1 full epoch + 22.
    assert trainer.skips.n_skipped >= 2
    assert _metrics(tmp_path / "run")[-1]["skipped_images"] == trainer.skips.n_skipped

    strict = tiny_overrides + [f"data.train=[{manifest}]", "data.max_unreadable_fraction=0.0", "data.min_draws_before_check=1"]
    with pytest.raises(TooManyUnreadableImages, match="empty.jpg|text.jpg"):
        _train(tmp_path, strict + ["train.iterations=20"], name="strict")


def test_pretrained_weights_initialise_student_and_teacher(tmp_path, tiny_overrides):
    _train(tmp_path, tiny_overrides, name="first")
    overrides = tiny_overrides + [f"student.pretrained_weights={tmp_path / 'first' / TEACHER_FILE}"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "second")
    source = torch.load(tmp_path / "first" / TEACHER_FILE, weights_only=True)["model"]
    for key, value in source.items():
        assert torch.equal(trainer.model.student["backbone"].state_dict()[key], value), key
        assert torch.equal(trainer.model.teacher["backbone"].state_dict()[key], value), key


def test_cli_frees_the_trainer_and_waits_for_the_ranks_before_destroying_the_group(tmp_path, monkeypatch):
    """A rank must not tear down the process group while its DDP / FSDP wrappers are alive
    or another rank still runs. Normal path: trainer freed, then settle (gc + barrier), then
    destroy. On an error the other ranks may be gone: no barrier, the group is destroyed."""
    import weakref

    import dinov2_hier.train.__main__ as cli
    import dinov2_hier.train.loop as loop
    from dinov2_hier.train.loop import RunState

    events: list[tuple[str, bool]] = []
    alive = []

    class FakeTrainer:
        fail = False

        def __init__(self, cfg, output_dir, resume=True):
            alive.append(weakref.ref(self))

        def run(self, stop_at=None, should_stop=None):
            if FakeTrainer.fail:
                raise RuntimeError("boom")
            return RunState()

    def trainer_alive() -> bool:
        return alive[-1]() is not None

    monkeypatch.setattr(loop, "Trainer", FakeTrainer)
    monkeypatch.setattr(cli, "settle_before_destroy", lambda: events.append(("settle", trainer_alive())))
    monkeypatch.setattr(cli, "destroy_distributed", lambda: events.append(("destroy", trainer_alive())))
    assert train_main(["--output-dir", str(tmp_path / "ok")]) == 0
    assert events == [("settle", False), ("destroy", False)]
    events.clear()
    FakeTrainer.fail = True
    with pytest.raises(RuntimeError, match="boom"):  # not a user error: the traceback stays
        train_main(["--output-dir", str(tmp_path / "fails")])
    assert [name for name, _ in events] == ["destroy"]


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert train_main(["--output-dir", str(tmp_path / "a"), "train.iteratons=3"]) == 2
    assert "train.iteratons" in capsys.readouterr().err
    assert train_main(["--output-dir", str(tmp_path / "b"), "data.train=[no/such/manifest.csv]"]) == 2
    assert "no/such/manifest.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_entry_point_trains(tmp_path, tiny_overrides):
    out = tmp_path / "cli"
    proc = subprocess.run(
        # Overrides before, between and after options (argparse's intermixed parsing).
        [sys.executable, "-m", "dinov2_hier.train", *tiny_overrides[:2], "--output-dir", str(out),
         *tiny_overrides[2:], "--stop-at", "2", "train.iterations=2"],
        capture_output=True, text=True, cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["iteration"] for r in _metrics(out)] == [1, 2]
    assert "it 2/2" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_hierce_training_supervised_loss_falls(tmp_path, tiny_overrides):
    """80 steps with a HierCE head: the mean HierCE loss of the last 10 steps is below 0.85
    of the first 10's.

    The run is deterministic for a given thread count, CPU and torch build, but any change
    of float summation order (another thread count, CPU kernel or torch version) draws
    another trajectory. Measured on the 2-core CPU with torch 2.14.1: seeds 0-8 with one
    thread and seed 0 with 2, 3 and 4 threads ended at 0.549-0.743 of the first loss (mean
    0.652, sd 0.065); without learning (``optim.base_lr=0``, seeds 0-5) at 0.969-1.024
    (mean 1.005, sd 0.022). The former bound, 0.75, sat 1.5 sd above the learning runs'
    mean: seed 0 with two threads (this test run alone on 2 cores, before conftest fixed
    one thread for the session) ended at 0.743, and a full run was reported to fail once.
    0.85 is 3.0 of their sd above their mean and 7.2 of the no-learning runs' sd below
    theirs: a head that does not learn still fails."""
    overrides = tiny_overrides + [
        "supervision.hierarchy=hierarchies/synthetic.json",
        "supervision.losses=[{name: hierce, weight: 1.0, alpha: 0.5, head: linear}]",
        "data.synthetic.label_fraction=0.5", "data.synthetic.coarse_fraction=0.3",
        "supervision.labelled_fraction=1.0",
        "train.iterations=80", "train.epoch_length=10", "train.checkpoint_every=1000",
        "optim.base_lr=0.05", "optim.warmup_epochs=0.5", "student.layerscale=null",
        # colour is the synthetic classes' main cue: without jitter a short run can learn it
        "crops.color_jitter_p=0", "crops.grayscale_p=0", "crops.solarize_p=[0,0]",
    ]
    trainer = _train(tmp_path, overrides)
    assert set(trainer.model.supervised.keys()) == {"hierce"}
    # heads are trained with the student and are not part of the EMA teacher
    assert not any("hierce" in k for k in trainer.model.teacher.state_dict())
    hierce = [r["loss_hierce"] for r in _metrics(tmp_path / "run")]
    first, last = sum(hierce[:10]) / 10, sum(hierce[-10:]) / 10
    assert last < 0.85 * first, (first, last)


def test_labelled_share_puts_labels_in_every_batch(tmp_path, tiny_overrides):
    overrides = tiny_overrides + [
        "supervision.hierarchy=hierarchies/synthetic.json",
        "supervision.losses=[{name: ce, weight: 1.0}]",
        "data.synthetic.label_fraction=0.1",
        "supervision.labelled_fraction=0.5",
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, tmp_path / "run")
    from dinov2_hier.train.data import build_train_loader

    loader = build_train_loader(trainer.data, cfg, 0, 0, 1, torch.device("cpu"), trainer.supervision)
    batches = iter(loader)
    for _ in range(3):
        batch = next(batches)
        targets = trainer.supervision.batch_targets(batch["labels"], batch["datasets"])
        assert int((targets >= 0).sum()) == 4  # half of 8, although only 10% of images are labelled


def test_unknown_label_stops_before_training(tmp_path, tiny_overrides):
    manifest = _synthetic_manifest(tmp_path)
    with open(manifest, "a") as f:
        f.write("images/00000.png,not_a_cell_type,,\n")
    overrides = tiny_overrides + [
        f"data.train=[{manifest}]", "supervision.hierarchy=hierarchies/synthetic.json",
        "supervision.losses=[{name: hierce}]",
    ]
    assert train_main(["--output-dir", str(tmp_path / "bad"), *overrides]) == 2
    with pytest.raises(Exception, match="not_a_cell_type"):
        Trainer(load_config(None, overrides), tmp_path / "bad2")
    # with unmapped=unlabelled the image still trains, without supervision
    trainer = Trainer(load_config(None, overrides + ["supervision.unmapped=unlabelled"]), tmp_path / "ok")
    assert trainer.supervision.targets[-1] == -1


def test_stop_request_checkpoints_and_next_start_resumes(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.checkpoint_every=100"])
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    state = Trainer(cfg, tmp_path / "run").run(should_stop=stop_after_two)
    assert state.interrupted and state.iteration == 2
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [2]
    resumed = Trainer(load_config(None, tiny_overrides + ["train.checkpoint_every=100"]), tmp_path / "run")
    assert resumed.state.iteration == 2
    assert resumed.run().iteration == 6


def test_device_photometric_trains_like_the_loader_path(tmp_path, tiny_overrides):
    """crops.photometric=device on CPU: the loader sends uint8 crops, the loop applies the
    photometric ops to the batch, and the losses equal those of the loader path."""
    overrides = tiny_overrides + ["train.iterations=3", "train.checkpoint_every=100"]
    _train(tmp_path, overrides, name="loader")
    _train(tmp_path, overrides + ["crops.photometric=device"], name="device")
    loader, device = _metrics(tmp_path / "loader"), _metrics(tmp_path / "device")
    assert len(loader) == len(device) == 3
    for a, b in zip(loader, device):
        assert math.isfinite(b["loss_total"])
        assert b["loss_total"] == pytest.approx(a["loss_total"], rel=1e-4, abs=1e-5)


def test_step_skips_a_nonfinite_loss_with_an_enabled_loss_scaler():
    """fp16 path: a NaN loss after the scaler unscaled the gradients skips the update and
    lowers the scale; the next step runs normally (the scaler's state was reset). The
    teacher's EMA step runs in both steps (after a skip, towards the unchanged student)."""
    from dinov2_hier.train.step import Precision, train_step

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.ema_updates = 0

        def forward(self, batch, teacher_temp, with_stats=True):
            return {"total": (self.w * batch["x"]).sum()}

        def update_teacher(self, momentum):
            self.ema_updates += 1

    model = Tiny()
    optimizer = torch.optim.SGD([{"params": [model.w], "is_last_layer": False, "lr_mult": 1.0, "wd_mult": 0.0}], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, enabled=True)
    schedule = {"lr": 0.1, "last_layer_lr": 0.1, "wd": 0.0, "teacher_temp": 0.07, "momentum": 0.9}
    precision = Precision(device_type="cpu", dtype="fp32")
    out = train_step(model, optimizer, scaler, {"x": torch.tensor([1.0, float("nan"), 0.0])}, schedule, precision, 1.0).read()
    assert not out.applied and torch.equal(model.w.detach(), torch.ones(3)) and model.ema_updates == 1
    assert scaler.get_scale() == 4.0  # backoff 0.5 after the inf/NaN gradients
    out = train_step(model, optimizer, scaler, {"x": torch.tensor([1.0, 2.0, 0.0])}, schedule, precision, 10.0).read()
    assert out.applied and model.ema_updates == 2
    # gradient [1, 2, 0] (norm sqrt 5 < 10, not clipped), SGD lr 0.1
    torch.testing.assert_close(model.w.detach(), torch.tensor([0.9, 0.8, 1.0]))
    assert out.grad_norm == pytest.approx(5 ** 0.5)
    # The gradient norm travels with the losses under a reserved name.
    model.forward = lambda batch, teacher_temp, with_stats=True: {"total": model.w.sum(), "grad_norm": model.w.sum()}
    with pytest.raises(ValueError, match="grad_norm"):
        train_step(model, optimizer, scaler, {}, schedule, precision, 1.0)



def test_supervision_start_iteration_freezes_the_supervised_terms_until_then(tmp_path, tiny_overrides):
    """supervision.start_iteration=2: steps 0 and 1 neither move the supervised head (not
    even by weight decay) nor count its loss in the total, which is still logged; step 2 does."""
    overrides = tiny_overrides + [
        "supervision.hierarchy=hierarchies/synthetic.json",
        "supervision.losses=[{name: hierce, weight: 1.0, alpha: 0.5, head: linear}]",
        "data.synthetic.label_fraction=1.0", "supervision.labelled_fraction=1.0",
        "supervision.start_iteration=2",
        "train.iterations=3", "train.checkpoint_every=1", "train.keep_checkpoints=0",
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, tmp_path / "run")
    initial = {k: v.detach().clone() for k, v in trainer.model.supervised.state_dict().items()}
    trainer.run()
    saved = {it: load_checkpoint(path)["model"] for it, path in list_checkpoints(tmp_path / "run")}
    assert sorted(saved) == [1, 2, 3]

    def head(it):
        return {k: v for k, v in saved[it].items() if k.startswith("supervised.")}

    assert head(1) and {k.removeprefix("supervised.") for k in head(1)} == set(initial)
    for it in (1, 2):
        for key, value in head(it).items():
            assert torch.equal(value, initial[key.removeprefix("supervised.")]), (it, key)
    assert any(not torch.equal(v, head(2)[k]) for k, v in head(3).items())
    records = _metrics(tmp_path / "run")
    assert [r["supervision_weight"] for r in records] == [0.0, 0.0, 1.0]
    for r in records:
        ssl = r["loss_dino"] * cfg.dino.loss_weight + r["loss_ibot"] * cfg.ibot.loss_weight
        ssl += r["loss_koleo"] * cfg.dino.koleo_loss_weight
        assert r["loss_hierce"] > 0  # computed and logged either way
        expected = ssl + r["supervision_weight"] * r["loss_hierce"]
        assert r["loss_total"] == pytest.approx(expected, rel=1e-4), r["iteration"]


def test_supervision_crops_unmasked_gives_the_terms_only_the_unmasked_crops(tiny_overrides):
    """supervision.crops=unmasked: the supervised term sees every crop's CLS token with the
    iBOT-masked crops' targets set to -1, so its loss is the loss of the unmasked labelled
    rows alone (hand-filtered here); with crops=all it is the loss over every labelled row."""
    from bench.train_step import synthetic_batch
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.train.meta_arch import SSLMetaArch

    hierarchy = Hierarchy.from_json("hierarchies/synthetic.json")
    results = {}
    for crops in ("all", "unmasked"):
        cfg = load_config(None, tiny_overrides + [
            "supervision.hierarchy=hierarchies/synthetic.json",
            "supervision.losses=[{name: hierce, head: linear, alpha: 0.5}]", f"supervision.crops={crops}"])
        torch.manual_seed(0)
        model = SSLMetaArch(cfg, hierarchy)
        batch = synthetic_batch(cfg, torch.device("cpu"), hierarchy.num_leaves)
        batch["targets"][0] = -1  # one unlabelled image
        seen = {}
        term = model.supervised["hierce"]
        original = term.loss
        term.loss = lambda tokens, targets: seen.update(tokens=tokens, targets=targets) or original(tokens, targets)
        losses, _ = model(batch, 0.07)
        results[crops] = (losses["hierce"].item(), seen, batch, term)
    (loss_all, seen_all, batch, term), (loss_unmasked, seen, _, _) = results["all"], results["unmasked"]
    masked = batch["masks"].any(dim=1)
    assert 0 < int(masked.sum()) < masked.numel()
    expected_targets = torch.where(masked, -1, batch["targets"].repeat(2))
    assert torch.equal(seen["targets"], expected_targets)
    assert torch.equal(seen_all["targets"], batch["targets"].repeat(2))
    keep = expected_targets >= 0
    by_hand = term.criterion(term.head(seen["tokens"][keep]), expected_targets[keep]).item()
    assert loss_unmasked == pytest.approx(by_hand, rel=1e-6)
    assert abs(loss_unmasked - loss_all) > 1e-4
