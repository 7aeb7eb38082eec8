"""Fine-tuning (issue 22, item 1): mixup targets, trainable parts and LR decay, resume,
eval.compare against a frozen probe, and bad input. A tiny ViT (vit_tiny, 32 px, patch 8, no layer scale: its random features are
not constant) on synthetic cells of hierarchies/synthetic.json."""
from __future__ import annotations

import csv

import pytest
import torch

from dinov2_hier.data import write_synthetic_dataset
from dinov2_hier.finetune import FinetuneLoss, FinetuneModel, mixup_batch, param_groups
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.models import build_backbone
from dinov2_hier.train.checkpoint import TEACHER_FILE

HIERARCHY = "hierarchies/synthetic.json"


def _tiny_backbone():
    return build_backbone("vit_tiny", img_size=32, patch_size=8, layerscale_init=None)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """``(manifest with n images, teacher file)`` keyed by n."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    meta = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "num_register_tokens": 0, "ffn_layer": "mlp",
            "layerscale": None, "qkv_bias": True, "mean": [0.5] * 3, "std": [0.25] * 3, "iteration": 0}
    torch.save({"model": _tiny_backbone().state_dict(), "meta": meta}, root / TEACHER_FILE)
    hierarchy = Hierarchy.from_json(HIERARCHY)
    made = {}

    def get(n: int):
        if n not in made:
            made[n] = write_synthetic_dataset(root / f"data{n}", n, hierarchy, image_size=32, seed=0)
        return made[n], root / TEACHER_FILE

    return get


def _args(manifest, ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(manifest), "--hierarchy", HIERARCHY, "--output-dir", str(out),
            "--folds", "2", "--seed", "0", "--batch-size", "32", "--device", "cpu", *extra]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_mixup_soft_targets_sum_to_one_and_are_seeded():
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, soft = mixup_batch(x, y, num_classes=5, alpha=0.4, seed=3)
    assert mixed.shape == x.shape and soft.shape == (6, 5)
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    again = mixup_batch(x, y, num_classes=5, alpha=0.4, seed=3)
    assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)


def test_modes_train_their_parts_with_layer_wise_lr_decay():
    hierarchy = Hierarchy.from_json(HIERARCHY)
    loss = FinetuneLoss("ce", hierarchy, 192)
    depth = 4
    linear = FinetuneModel(_tiny_backbone(), loss.head, "linear")
    assert not any(p.requires_grad for p in linear.backbone.parameters())
    partial = FinetuneModel(_tiny_backbone(), loss.head, "partial", blocks=1)
    trains = {n for n, p in partial.backbone.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(("blocks.3.", "norm.")) for n in trains)
    full = FinetuneModel(_tiny_backbone(), loss.head, "full")
    groups = param_groups(full, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    # embeddings at 0.5 ** (depth + 1), block i at 0.5 ** (depth - i), norm and head at 1
    assert scales == [0.5 ** k for k in range(depth + 1, -1, -1)]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in full.parameters() if p.requires_grad)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))


def test_bad_input_is_one_line_and_exit_code_2(cells, tmp_path, capsys):
    from eval.finetune import main

    manifest, ckpt = cells(44)
    assert main(_args(manifest, ckpt, tmp_path / "a", "--mode", "partial")) == 2
    assert main(_args(manifest, ckpt, tmp_path / "b", "--mixup", "0.2", "--loss", "hierce")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --mode partial needs --blocks N >= 1 (the last N blocks train)",
                   "error: --mixup needs --loss ce (soft targets)"]


def test_resume_reproduces_the_uninterrupted_run(cells, tmp_path):
    from eval.finetune import build_parser
    from eval.finetune_run import finetune

    manifest, ckpt = cells(44)
    # partial fine-tuning with balanced CE, class sampling, mixup and flips: every random draw
    # and LP-FT: 2 head-only epochs (their own optimizer), then 2 of partial fine-tuning
    extra = ("--mode", "partial", "--blocks", "1", "--head-epochs", "2", "--epochs", "2", "--lr", "3e-3",
             "--layer-decay", "0.7", "--class-weights", "balanced", "--sampling", "class", "--mixup", "0.4",
             "--batch-size", "16")
    whole = tmp_path / "whole"
    finetune(build_parser().parse_args(_args(manifest, ckpt, whole, *extra)))

    class Killed(Exception):
        pass

    def kill_at(fold, epoch):
        def hook(f, e):
            if (f, e) == (fold, epoch):
                raise Killed

        return hook

    cut = tmp_path / "cut"
    args = build_parser().parse_args(_args(manifest, ckpt, cut, *extra))
    with pytest.raises(Killed):
        finetune(args, on_epoch_end=kill_at(0, 1))  # fold 0 stops after its last head-only epoch
    with pytest.raises(Killed):
        finetune(args, on_epoch_end=kill_at(1, 2))  # fold 0 resumes and ends; fold 1 stops inside fine-tuning
    metrics = finetune(args)
    assert _rows(cut / "predictions.csv") == _rows(whole / "predictions.csv")
    info = metrics["fit_info"]["finetune"]
    assert [i["epochs_run"] for i in info] == [2, 1]  # what the last two runs had left
    assert info[1]["resumed_from"].endswith("epoch_0002.pt")


@pytest.mark.slow
def test_eval_compare_pairs_finetuned_with_a_frozen_probe(cells, tmp_path):
    from eval.compare import compare_dirs, main as compare_main
    from eval.finetune import main
    from eval.linear import main as linear_main

    manifest, ckpt = cells(44)
    assert main(_args(manifest, ckpt, tmp_path / "ft", "--epochs", "1")) == 0
    assert linear_main(["--ckpt", str(ckpt), "--data", str(manifest), "--hierarchy", HIERARCHY, "--folds", "2",
                        "--seed", "0", "--device", "cpu", "--num-workers", "0", "--no-cache", "--no-report",
                        "--C", "1.0", "--output-dir", str(tmp_path / "probe")]) == 0
    rows = compare_dirs([tmp_path / "probe", tmp_path / "ft"], n_resamples=50, pairs=[("finetune", "logreg")])
    assert {r["classifier"] for r in rows} == {"finetune vs logreg"}
    accuracy = next(r for r in rows if r["metric"] == "accuracy")
    assert accuracy["ci_low"] <= accuracy["difference"] <= accuracy["ci_high"]
    assert compare_main([str(tmp_path / "probe"), str(tmp_path / "ft"), "--n-resamples", "20",
                         "--pair", "finetune=logreg"]) == 0
    assert compare_main([str(tmp_path / "probe"), str(tmp_path / "ft"), "--pair", "finetune"]) == 2


def test_another_run_in_the_same_output_dir_is_refused(cells, tmp_path, capsys):
    """A rerun resumes only the same run: other flags in a used --output-dir exit 2 naming them."""
    from eval.finetune import main

    manifest, ckpt = cells(44)
    assert main(_args(manifest, ckpt, tmp_path / "out", "--epochs", "1")) == 0
    assert main(_args(manifest, ckpt, tmp_path / "out", "--epochs", "1")) == 0  # the same: folds read back
    assert main(_args(manifest, ckpt, tmp_path / "out", "--epochs", "2", "--lr", "1e-2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "holds another fine-tuning run (differs in epochs, lr)" in err[-1]


def test_class_sampling_shows_every_class_exactly_n_c_times():
    """Fazeli et al.: an epoch of C * N_c rows, each class N_c times; a class's rows as evenly as possible."""
    from dinov2_hier.finetune.loop import epoch_length, epoch_order

    targets = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    g = torch.Generator().manual_seed(0)
    order = epoch_order(targets, "class", g)  # N_c = ceil(8 / 3) = 3
    assert epoch_length(targets, "class") == len(order) == 9
    assert torch.bincount(targets[order]).tolist() == [3, 3, 3]
    assert torch.bincount(order, minlength=8)[:6].max() == 1  # 3 of class 0's 6 rows, none twice
    assert torch.bincount(order, minlength=8)[6:].tolist() == [3, 3]  # a one-row class: its row 3 times
    order = epoch_order(targets, "class", g, samples_per_class=8)
    assert torch.bincount(targets[order]).tolist() == [8, 8, 8]
    assert sorted(torch.bincount(order, minlength=8)[:6].tolist()) == [1, 1, 1, 1, 2, 2]
    assert sorted(epoch_order(targets, "none", g).tolist()) == list(range(8))


def test_head_epochs_leave_the_backbone_untouched_then_fine_tune_it():
    """LP-FT: during the head-only epochs only the head changes; afterwards the backbone trains."""
    from dinov2_hier.finetune import FinetuneConfig
    from dinov2_hier.finetune.loop import train_fold

    torch.manual_seed(0)
    hierarchy = Hierarchy.from_json(HIERARCHY)
    loss = FinetuneLoss("ce", hierarchy, 192)
    model = FinetuneModel(_tiny_backbone(), loss.head, "full")
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 32, 32]] * 24)
    targets = torch.tensor([hierarchy.index(leaf) for leaf in hierarchy.leaves[:3]] * 8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def snapshot(fold, epoch):
        seen[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    config = FinetuneConfig(mode="full", epochs=1, head_epochs=2, head_lr=1e-2, lr=1e-3, batch_size=8)
    train_fold(model, loss, images, boxes, targets, lambda x, b: x.float() / 255, config, on_epoch_end=snapshot)
    for epoch in (0, 1):
        assert all(torch.equal(seen[epoch][k], v) for k, v in start.items() if k.startswith("backbone."))
        assert not torch.equal(seen[epoch]["head.weight"], start["head.weight"])
    assert not torch.equal(seen[2]["backbone.blocks.0.attn.qkv.weight"], start["backbone.blocks.0.attn.qkv.weight"])
    assert all(p.requires_grad for p in model.backbone.parameters())  # the mode's parts train again


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path, capsys):
    from eval.finetune import main, parse_args

    base = ["--ckpt", "x.pt", "--data", "d.csv", "--output-dir", str(tmp_path / "o")]
    args = parse_args(["--config", "configs/finetune/fazeli.yaml", *base, "--epochs", "3"])
    assert (args.mode, args.class_weights, args.sampling, args.mixup, args.folds) == ("full", "balanced", "class", 0.2, 5)
    assert (args.epochs, args.head_epochs, args.lr) == (3, 10, 1e-4)  # --epochs from the command line
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("mode: full\nepoch: 3\n", "unknown key 'epoch'"),
        ("sampling: balanced\n", "sampling must be one of none, class, got 'balanced'"),
        ("lr: fast\n", "lr must be float, got 'fast'"),
        ("data: cells.csv\n", "'data' is an input, not a recipe option"),
    ]:
        bad.write_text(text)
        assert main(["--config", str(bad), *base]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --config {bad}: ") and message in err[0], err


def test_unreadable_images_are_skipped_and_counted(cells, tmp_path):
    """As eval.run: a broken image is left out of folds and predictions and counted in metrics.json."""
    import json
    import shutil

    from eval.finetune import main

    manifest, ckpt = cells(44)
    data = tmp_path / "data"
    shutil.copytree(manifest.parent, data)
    rows = _rows(data / manifest.name)
    broken = data / rows[5][0]
    broken.write_bytes(b"not an image")
    assert main(_args(data / manifest.name, ckpt, tmp_path / "out", "--epochs", "1")) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_unreadable"] == 1 and metrics["unreadable"][0].endswith(rows[5][0])
    assert metrics["n_samples"] == 43
    predicted = _rows(tmp_path / "out" / "predictions.csv")
    names = [r[1].replace("\\", "/").split("/")[-1] for r in predicted[1:]]
    assert len(names) == 43 and broken.name not in names and rows[6][0].split("/")[-1] in names


@pytest.mark.slow
def test_the_fine_tuned_demo_model_beats_its_frozen_linear_head(tmp_path):
    """Issue 22: on synthetic cells, fine-tuning the demo model beats the frozen linear head.

    The demo recipe (``configs/demo.yaml``: ViT-Ti/8, 64 px synthetic cells) shortened to 60
    iterations (~1 min here), then 400 other synthetic cells (dataset seed 1), 2 folds, 20
    epochs each: linear head (lr 1e-2) against full fine-tuning (lr 1e-4, layer decay 0.75,
    one warm-up epoch). Measured on this machine's CPU, pooled accuracy linear / full: fold
    seed 0 0.590 / 0.683, fold seed 1 0.603 / 0.688. The margin asserted (seed 0), 0.04 = 16
    of the 400 test images, is under half of the smaller gap (0.085)."""
    import json

    from dinov2_hier.config import load_config
    from dinov2_hier.paths import PROJECT_ROOT
    from dinov2_hier.train.loop import Trainer
    from eval.finetune import main

    Trainer(load_config(PROJECT_ROOT / "configs/demo.yaml", ["train.iterations=60"]), tmp_path / "demo").run()
    manifest = write_synthetic_dataset(tmp_path / "cells", 400, Hierarchy.from_json(HIERARCHY), image_size=64, seed=1)
    ckpt = tmp_path / "demo" / TEACHER_FILE
    assert main(_args(manifest, ckpt, tmp_path / "lin", "--mode", "linear", "--epochs", "20", "--lr", "1e-2")) == 0
    assert main(_args(manifest, ckpt, tmp_path / "full", "--mode", "full", "--epochs", "20", "--lr", "1e-4",
                      "--layer-decay", "0.75", "--warmup-epochs", "1")) == 0

    def accuracy(name):
        return json.loads((tmp_path / name / "metrics.json").read_text())["probes"]["finetune"]["accuracy"]["mean"]

    print(f"linear {accuracy('lin'):.4f} full {accuracy('full'):.4f}")
    assert accuracy("full") - accuracy("lin") >= 0.04, (accuracy("lin"), accuracy("full"))


def test_ce_leaves_coarse_labels_out_of_training_and_counts_them():
    """CE gives an internal-node label no gradient: such rows leave the fold (mixup needs leaves)."""
    from dinov2_hier.finetune import FinetuneConfig
    from dinov2_hier.finetune.loop import train_fold

    torch.manual_seed(0)
    hierarchy = Hierarchy.from_json(HIERARCHY)
    coarse = next(n for n in hierarchy.nodes if not hierarchy.is_leaf(n) and n != hierarchy.root)
    targets = torch.tensor([hierarchy.index(leaf) for leaf in hierarchy.leaves[:2]] * 4 + [hierarchy.index(coarse)] * 3)
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 32, 32]] * 11)
    config = FinetuneConfig(mode="linear", epochs=1, batch_size=4, mixup=0.4, sampling="class")
    for name, left_out in (("ce", 3), ("hierce", 0)):
        loss = FinetuneLoss(name, hierarchy, 192)
        model = FinetuneModel(_tiny_backbone(), loss.head, "linear")
        run = config if name == "ce" else FinetuneConfig(mode="linear", epochs=1, batch_size=4)
        info = train_fold(model, loss, images, boxes, targets, lambda x, b: x.float() / 255, run)
        assert info["n_coarse_left_out"] == left_out and torch.isfinite(torch.tensor(info["last_loss"]))


def test_ce_classifies_coarse_labels_as_classes_of_their_own_as_the_probes_do(cells, tmp_path):
    """With --loss ce the label space is the labels themselves (eval's probes too): a coarse
    label is a class the head can predict, so fine-tuning and a frozen probe are scored alike."""
    import json

    from eval.finetune import main

    hierarchy = Hierarchy.from_json(HIERARCHY)
    manifest, ckpt = cells(44)
    rows = _rows(manifest)
    leaf = rows[1][1]
    coarse = hierarchy.parent(leaf)
    relabelled = tmp_path / manifest.name
    with open(relabelled, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [[r[0], coarse if r[1] == leaf else r[1], *r[2:]] for r in rows[1:]])
    for path in manifest.parent.iterdir():  # the images beside the relabelled manifest
        if path.is_dir():
            (tmp_path / path.name).symlink_to(path)
    assert main(_args(relabelled, ckpt, tmp_path / "out", "--epochs", "1")) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert coarse in metrics["classes"] and leaf not in metrics["classes"]
    assert [info["n_coarse_left_out"] for info in metrics["fit_info"]["finetune"]] == [0, 0]
    assert "hierarchical_f1" in metrics["probes"]["finetune"]  # the tree still scores the predictions
