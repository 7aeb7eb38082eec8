"""Held-out validation (issue 18, item 4): the split (data.val_fraction / data.val), the loss
pass every train.val_every iterations, and checkpoint selection by validation loss in
eval.run / dinov2_hier.export (--select val_loss)."""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from dinov2_hier import distributed
from dinov2_hier.config import ConfigError, load_config
from dinov2_hier.data import ImageRecordDataset, write_synthetic_dataset
from dinov2_hier.export import main as export_main
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train.__main__ import main as train_main
from dinov2_hier.train.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint
from dinov2_hier.train.collapse import run_collapse_status
from dinov2_hier.train.data import build_train_data
from dinov2_hier.train.loop import METRICS_FILE, SUMMARY_FILE, Trainer
from dinov2_hier.train.validation import (
    NoValidationRecords,
    ValidationPass,
    best_checkpoint,
    held_out_indices,
    hold_out,
)
from eval.run import main as eval_main
from tests.conftest import TINY_OVERRIDES
from tests.ports import free_ports
from tests.test_distributed import _clean_launch_env, _spawn

SYNTHETIC = PROJECT_ROOT / "hierarchies" / "synthetic.json"
LOSSES = ("val_dino", "val_ibot", "val_koleo", "val_total")
N_IMAGES = 44  # 4 per synthetic class


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def _val(run) -> list[dict]:
    return [r for r in _records(run) if r.get("split") == "val"]


def _run_cli(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _write_manifest(path, rows):
    path.write_text("path,label\n" + "".join(f"{p},{label or ''}\n" for p, label in rows))
    return path


# --------------------------------------------------------------------------- the split


def test_split_is_a_pure_function_of_seed_paths_and_labels():
    paths = [f"img/{i:03d}.png" for i in range(40)]
    labels = [("A", "B", None)[i % 3] for i in range(40)]
    held = held_out_indices(paths, labels, 0.25, seed=0)
    assert held == held_out_indices(paths, labels, 0.25, seed=0)
    assert held != held_out_indices(paths, labels, 0.25, seed=1)
    # The manifest's row order does not matter: the same images are held out.
    order = list(reversed(range(40)))
    again = held_out_indices([paths[i] for i in order], [labels[i] for i in order], 0.25, seed=0)
    assert sorted(paths[order[i]] for i in again) == sorted(paths[i] for i in held)


def test_split_is_stratified_by_label(tmp_path):
    """Per label of n images, round(fraction * n) (half up) are held out; unlabelled images
    are a stratum of their own. Counted by hand for 4 A, 6 B, 10 C and 3 unlabelled."""
    rows = ([(f"a{i}.png", "A") for i in range(4)] + [(f"b{i}.png", "B") for i in range(6)]
            + [(f"c{i}.png", "C") for i in range(10)] + [(f"u{i}.png", None) for i in range(3)])
    manifest = _write_manifest(tmp_path / "cells.csv", rows)
    cfg = load_config(None, TINY_OVERRIDES + [f"data.train=[{manifest}]", "data.val_fraction=0.25"])
    train, val = hold_out(cfg, build_train_data(cfg))
    count = lambda ds: {label: sum(r.label == label for r in ds.records) for label in ("A", "B", "C", None)}  # noqa: E731
    # 0.25 * 4 = 1 -> 1; 0.25 * 6 = 1.5 -> 2; 0.25 * 10 = 2.5 -> 3; 0.25 * 3 = 0.75 -> 1
    assert count(val) == {"A": 1, "B": 2, "C": 3, None: 1}
    assert count(train.dataset) == {"A": 3, "B": 4, "C": 7, None: 2}
    train_paths = {r.path for r in train.dataset.records}
    val_paths = {r.path for r in val.records}
    assert not train_paths & val_paths and len(train_paths | val_paths) == len(rows)
    # Without labels the whole set is one stratum: round(0.25 * 23) = 6.
    assert len(held_out_indices([p for p, _ in rows], [None] * len(rows), 0.25, seed=0)) == 6


def test_synthetic_split_and_config_errors(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["data.val_fraction=0.25"])
    train, val = hold_out(cfg, build_train_data(cfg))
    assert len(train.dataset) + len(val) == 256 and len(val) > 0
    assert "held out for validation" in train.description
    kept = {item["path"] for item in (train.dataset[(i, 0)] for i in range(0, len(train.dataset), 37))}
    held = {val[(i, 0)]["path"] for i in range(len(val))}
    assert not kept & held

    both = load_config(None, tiny_overrides + ["data.val=[cells.csv]", "data.val_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"data\.val=.*data\.val_fraction=0\.1"):
        hold_out(both, build_train_data(both))
    nothing = load_config(None, tiny_overrides + ["train.val_every=2"])
    with pytest.raises(ConfigError, match="data.val_fraction.*data.val"):
        hold_out(nothing, build_train_data(nothing))
    too_few = load_config(None, tiny_overrides + ["data.val_fraction=0.001"])
    with pytest.raises(ConfigError, match="holds out 0"):
        hold_out(too_few, build_train_data(too_few))


def test_train_cli_refuses_both_validation_sources_with_exit_2(tmp_path, tiny_overrides, capsys):
    argv = ["--output-dir", str(tmp_path / "run"), *tiny_overrides, "data.val=[cells.csv]", "data.val_fraction=0.1"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "data.val=" in lines[0] and "data.val_fraction=0.1" in lines[0]


# --------------------------------------------------------------------------- training with validation


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
    """6 iterations on a 44-image manifest, a quarter held out (one per class), validation
    every 2 iterations and at the checkpoints (3, 6). Records which images the training
    dataset was asked for."""
    root = tmp_path_factory.mktemp("val_run")
    manifest = write_synthetic_dataset(root / "cells", N_IMAGES, Hierarchy.from_json(SYNTHETIC), image_size=40, seed=1)
    overrides = TINY_OVERRIDES + [
        f"data.train=[{manifest}]", "data.val_fraction=0.25", "train.val_every=2", "train.val_max_batches=2",
    ]
    trainer = Trainer(load_config(None, overrides), root / "train")
    drawn: dict[str, list[str]] = {"train": [], "other": []}
    real = ImageRecordDataset.__getitem__

    def spy(self, key):
        item = real(self, key)
        drawn["train" if self is trainer.data.dataset else "other"].append(item["path"])
        return item

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageRecordDataset, "__getitem__", spy)
        trainer.run()
    held = [r.path for r in trainer.validation.dataset.records]
    return {"root": root, "run": root / "train", "manifest": manifest, "overrides": overrides,
            "drawn": drawn, "held": held, "trainer": trainer}


def test_held_out_images_are_never_drawn_for_training(val_run):
    drawn, held = val_run["drawn"], set(val_run["held"])
    assert len(held) == 11  # one of the 4 images of each of the 11 classes
    assert len(drawn["train"]) == 6 * 8
    assert not set(drawn["train"]) & held
    assert len(set(drawn["train"])) == N_IMAGES - 11  # 48 draws cover the 33 training images
    assert set(drawn["other"]) == held  # the validation passes read the held-out images only


def test_val_records_at_the_right_iterations_with_finite_values(val_run):
    records = _records(val_run["run"])
    val = [r for r in records if r.get("split") == "val"]
    assert [r["iteration"] for r in val] == [2, 3, 4, 6]  # every 2 and at the checkpoints 3, 6
    for r in val:
        assert all(math.isfinite(r[k]) for k in LOSSES), r
        assert r["val_images"] == 11 and r["val_skipped"] == 0
    # The same held-out crops and masks every pass: the values move with the weights only.
    assert len({r["val_total"] for r in val}) == 4
    train = [r for r in records if r.get("split") is None]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5, 6]
    # The collapse replay (eval's training status) reads the training records only.
    assert run_collapse_status(val_run["run"])["iteration"] == 6
    summary = json.loads((val_run["run"] / SUMMARY_FILE).read_text())
    best = min((r for r in val if r["iteration"] in (3, 6)), key=lambda r: r["val_total"])
    assert summary["best_val"]["iteration"] == best["iteration"]
    assert summary["last_record"]["iteration"] == 6 and "split" not in summary["last_record"]


@pytest.mark.slow
def test_validation_leaves_training_bitwise_unchanged(tmp_path, tiny_overrides):
    """Stochastic depth (the global RNG) and softmax centres (buffers the loss updates) are
    on: the validation pass re-seeds and restores both, so the training losses and weights
    are exactly those of the same run without validation passes."""
    common = tiny_overrides + [
        "train.iterations=4", "train.checkpoint_every=2", "student.drop_path_rate=0.2",
        "dino.centering=softmax", "ibot.centering=softmax", "data.val_fraction=0.1", "train.val_max_batches=2",
    ]
    runs = {}
    for name, every in (("off", 0), ("on", 1)):
        trainer = Trainer(load_config(None, common + [f"train.val_every={every}"]), tmp_path / name)
        trainer.run()
        runs[name] = tmp_path / name
    assert _val(runs["off"]) == [] and [r["iteration"] for r in _val(runs["on"])] == [1, 2, 3, 4]
    off, on = _records(runs["off"]), [r for r in _records(runs["on"]) if r.get("split") is None]
    assert len(off) == len(on) == 4
    for a, b in zip(off, on):
        for key in a:
            if key.startswith("loss_") or key.endswith("_entropy") or key.startswith("grad_norm"):
                assert a[key] == b[key], (a["iteration"], key)
    w_off = load_checkpoint(list_checkpoints(runs["off"])[-1][1])["model"]
    w_on = load_checkpoint(list_checkpoints(runs["on"])[-1][1])["model"]
    assert w_off.keys() == w_on.keys()
    for key in w_off:
        assert torch.equal(w_off[key], w_on[key]), key


@pytest.mark.slow
def test_resume_keeps_val_records_and_recomputes_the_split(val_run, tmp_path):
    """Stopped at the checkpoint of iteration 3 and resumed: the same held-out images (the
    split is recomputed from seed and paths), the validation records of both attempts once
    each, matching the uninterrupted run."""
    cfg = load_config(None, val_run["overrides"])
    Trainer(cfg, tmp_path / "split").run(stop_at=3)
    assert [r["iteration"] for r in _val(tmp_path / "split")] == [2, 3]
    resumed = Trainer(load_config(None, val_run["overrides"]), tmp_path / "split")
    assert [r.path for r in resumed.validation.dataset.records] == val_run["held"]
    resumed.run()
    straight, split = _val(val_run["run"]), _val(tmp_path / "split")
    assert [r["iteration"] for r in split] == [2, 3, 4, 6]
    for a, b in zip(straight, split):
        for key in LOSSES:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iteration"], key)


def test_the_lowest_val_loss_checkpoint_is_never_pruned(tmp_path, tiny_overrides, monkeypatch):
    """train.keep_checkpoints=1 keeps the newest checkpoint and the one with the lowest
    validation loss (here iteration 2, scripted), which --select val_loss then finds."""
    totals = {2: 1.0, 4: 3.0, 6: 2.0}
    overrides = tiny_overrides + ["data.val_fraction=0.1", "train.val_every=2", "train.checkpoint_every=2",
                                  "train.keep_checkpoints=1"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")

    def scripted(self, engine, teacher_temp):
        return {"val_total": totals[trainer.state.iteration], "val_images": 1, "val_skipped": 0, "val_s": 0.0}

    monkeypatch.setattr(ValidationPass, "run", scripted)
    trainer.run()
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [2, 6]
    assert best_checkpoint(tmp_path / "run").iteration == 2
    assert json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())["best_val"]["iteration"] == 2


# --------------------------------------------------------------------------- selection


def _fake_run(root, checkpoints, records):
    (root / CHECKPOINT_DIR).mkdir(parents=True)
    for it in checkpoints:
        (root / CHECKPOINT_DIR / f"ckpt_{it:08d}.pt").write_bytes(b"")
    (root / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_best_checkpoint_picks_the_lowest_val_total(tmp_path):
    records = [
        {"iteration": 100, "loss_total": 0.1},                              # a training record: not a val loss
        {"iteration": 100, "split": "val", "val_total": 5.0},
        {"iteration": 150, "split": "val", "val_total": 0.5},               # no checkpoint at 150
        {"iteration": 200, "split": "val", "val_total": 3.0, "val_dino": 9.0},
        {"iteration": 300, "split": "val", "val_total": float("nan")},      # not finite: never chosen
        {"iteration": 400, "split": "val", "val_total": 4.0, "val_dino": 1.0},
    ]
    run = _fake_run(tmp_path / "run", [100, 200, 300, 400, 500], records)
    chosen = best_checkpoint(run)
    assert (chosen.iteration, chosen.value, chosen.path.name) == (200, 3.0, "ckpt_00000200.pt")
    assert best_checkpoint(run, by="val_dino").iteration == 400
    with pytest.raises(NoValidationRecords, match="data.val_fraction.*train.val_every"):
        best_checkpoint(_fake_run(tmp_path / "none", [100], records[:1]))


@pytest.fixture(scope="module")
def chosen_run(val_run, tmp_path_factory):
    """A copy of the validated run whose records make the older checkpoint (3) the best,
    and a copy without validation records."""
    root = tmp_path_factory.mktemp("chosen")
    best = shutil.copytree(val_run["run"], root / "best")
    records = _records(best)
    for r in records:
        if r.get("split") == "val":
            r["val_total"] = {3: 1.0, 6: 2.0}.get(r["iteration"], 0.5)  # 0.5 at 2, 4: no checkpoint there
    (best / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    plain = shutil.copytree(val_run["run"], root / "plain")
    (plain / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records if r.get("split") is None))
    return {"best": best, "plain": plain, "root": root}


def _eval_argv(val_run, chosen_run, ckpt, out):
    return ["--ckpt", str(ckpt), "--select", "val_loss", "--data", str(val_run["manifest"]), "--output-dir", str(out),
            "--num-workers", "0", "--no-progress", "--no-report", "--folds", "2", "--k", "1",
            "--cache-dir", str(chosen_run["root"] / "cache")]


def test_eval_select_val_loss_evaluates_only_that_checkpoint(val_run, chosen_run):
    out = chosen_run["root"] / "eval"
    code, _, err = _run_cli(eval_main, _eval_argv(val_run, chosen_run, chosen_run["best"], out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in summary["checkpoints"]] == ["iter_00000003"]
    assert summary["selected_by"]["select"] == "val_loss"
    assert summary["selected_by"]["checkpoint"].endswith("ckpt_00000003.pt")
    assert not (out / "iter_00000006").exists()


def test_export_select_val_loss_exports_that_checkpoint(chosen_run):
    out = chosen_run["root"] / "export"
    code, printed, err = _run_cli(export_main, ["--ckpt", str(chosen_run["best"]), "--output-dir", str(out),
                                                "--select", "val_loss"])
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["iteration"] == 3 and config["source_checkpoint"] == "ckpt_00000003.pt"


def test_select_without_val_records_exits_2_with_one_line(val_run, chosen_run):
    for main, argv in (
        (eval_main, _eval_argv(val_run, chosen_run, chosen_run["plain"], chosen_run["root"] / "eval_plain")),
        (export_main, ["--ckpt", str(chosen_run["plain"]), "--output-dir", str(chosen_run["root"] / "exp_plain"),
                       "--select", "val_loss"]),
    ):
        code, _, err = _run_cli(main, argv)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "data.val_fraction" in lines[0] and "train.val_every" in lines[0]
    # --select needs a run directory, not a checkpoint file.
    ckpt = list_checkpoints(chosen_run["best"])[0][1]
    code, _, err = _run_cli(export_main, ["--ckpt", str(ckpt), "--output-dir", str(chosen_run["root"] / "x"),
                                          "--select", "val_loss"])
    assert code == 2 and "training output directory" in err


# --------------------------------------------------------------------------- two ranks


#: KoLeo and iBOT off: KoLeo's neighbours and the iBOT masks are per rank batch by design.
#: HierCE is a per-image mean, so its validation value is the same on any number of ranks.
DIST_VAL = TINY_OVERRIDES + [
    "compute.device=cpu", "ibot.loss_weight=0", "dino.koleo_loss_weight=0", "data.synthetic.num_images=128",
    "supervision.hierarchy=hierarchies/synthetic.json", "supervision.losses=[{name: hierce, hidden_dim: 32}]",
    "data.val_fraction=0.25", "train.val_every=1", "train.val_max_batches=2",
]
TEACHER_TEMP = 0.05


def _two_rank_val_worker(rank: int, ports: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    _clean_launch_env()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"})
    results = {}
    for port, mode in zip(ports, ("ddp", "fsdp")):
        os.environ["MASTER_PORT"] = str(port)
        distributed.init_distributed(timeout=datetime.timedelta(seconds=60))
        try:
            cfg = load_config(None, DIST_VAL + ["train.batch_size_per_gpu=4", f"compute.parallel={mode}"])
            trainer = Trainer(cfg, Path(out_dir) / mode)
            results[mode] = trainer.validation.run(trainer.engine, TEACHER_TEMP)
            trainer.release()
            del trainer
            distributed.settle_before_destroy()
        finally:
            distributed.destroy_distributed()
    if rank == 0:
        Path(out_dir, "val.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_two_ranks_validate_their_shards_and_agree_with_one_process(tmp_path):
    """2 ranks x batch 4 (DDP and FSDP2) see, batch by batch, the same 8 held-out images as
    one process with batch 8; the all-reduced per-image means equal the one-process ones."""
    one = Trainer(load_config(None, DIST_VAL + ["train.batch_size_per_gpu=8"]), tmp_path / "one")
    expected = one.validation.run(one.engine, TEACHER_TEMP)
    one.release()
    _spawn(_two_rank_val_worker, (free_ports(2), str(tmp_path)))
    results = json.loads((tmp_path / "val.json").read_text())
    assert expected["val_images"] == 16
    for mode, got in results.items():
        assert got["val_images"] == 16, mode
        for key in ("val_dino", "val_hierce", "val_total"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), (mode, key)
