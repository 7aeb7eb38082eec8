"""Fault injection: signals to a whole process group, torn files (issue 19). Nothing done
before the fault may be lost, and the right run must resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dinov2_hier.config import load_config
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.run.signals import DEFAULT_STOP_SIGNALS
from dinov2_hier.train.checkpoint import CheckpointError, list_checkpoints
from dinov2_hier.train.data import LOADER_IGNORED_SIGNALS
from dinov2_hier.train.loop import METRICS_FILE, Trainer

from .conftest import TINY_OVERRIDES


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def _train(tmp_path, overrides, stop_at=None):
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")
    trainer.run(stop_at=stop_at)
    return trainer


def test_loader_workers_ignore_every_signal_the_trainer_handles():
    assert set(DEFAULT_STOP_SIGNALS) <= set(LOADER_IGNORED_SIGNALS)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.slow
def test_signal_to_the_process_group_checkpoints_and_exits_0(tmp_path, signum):
    """SLURM (preemption, scancel, time limit) and GNU ``timeout`` send SIGTERM to every
    process of the job, Ctrl-C sends SIGINT to the terminal's process group: with real
    DataLoader workers in the group the trainer must still checkpoint and exit 0."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinov2_hier.train", "--output-dir", str(run), *TINY_OVERRIDES,
         "data.num_workers=2", "train.iterations=2000", "train.checkpoint_every=10000"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a job step's
    )
    try:
        deadline = time.monotonic() + 120
        while not ((run / METRICS_FILE).exists() and len((run / METRICS_FILE).read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # the trainer and its loader workers
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "killed by signal" not in err and "Traceback" not in err, err
    last = _records(run)[-1]["iteration"]
    assert 2 <= last < 2000
    assert [it for it, _ in list_checkpoints(run)] == [last]
    log = (run / "log.txt").read_text()
    assert f"stop requested at iteration {last}" in log and "rerun the same command to resume" in log


def test_resume_repairs_a_torn_metrics_line(tmp_path, tiny_overrides, caplog):
    """A record torn while appending (disk full, kill) does not block the resume: the torn
    line is dropped with a warning naming it, the run continues and its records are whole."""
    _train(tmp_path, tiny_overrides, stop_at=3)
    metrics = tmp_path / "run" / METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"iteration": 4, "loss_dino": 6.1')  # torn tail
    with caplog.at_level("WARNING", logger="dinov2_hier.train"):
        _train(tmp_path, tiny_overrides)
    assert any(f"{metrics} line 4 is not a JSON record" in r.getMessage() for r in caplog.records)
    assert [r["iteration"] for r in _records(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path, capsys):
    """Two runs on one folder would interleave their records and lose one's work: the second
    exits 2 naming the holder. A SIGKILLed holder leaves its ``.lock`` file behind, but the
    kernel released the lock, so the next run resumes."""
    from dinov2_hier.train.__main__ import main as train_main

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinov2_hier.train", "--output-dir", str(run), *TINY_OVERRIDES,
         "train.iterations=5000", "train.checkpoint_every=2"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        rc = train_main(["--output-dir", str(run), *TINY_OVERRIDES, "train.iterations=5000"])
        err = capsys.readouterr().err
        assert rc == 2 and f"{run} is in use by another training run (host" in err and f"pid {proc.pid}" in err
        assert "Traceback" not in err
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (run / ".lock").exists()
    resumed = Trainer(load_config(None, TINY_OVERRIDES + ["train.iterations=5000"]), run)
    assert resumed.state.iteration >= 2  # resumed the killed run's newest checkpoint
    resumed.release()


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_checkpoint_and_cleans_partial_writes(tmp_path, caplog):
    """A kill or a full disk can leave the newest checkpoint truncated (copied in by hand,
    say) and ``.*.tmp`` files of interrupted atomic writes: resume takes the checkpoint
    before it, with a warning naming the bad one, and deletes the leftovers."""
    overrides = TINY_OVERRIDES + ["train.checkpoint_every=2", "train.iterations=6"]
    _train(tmp_path, overrides, stop_at=4)
    run = tmp_path / "run"
    newest = run / "checkpoints" / "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    partial = [run / "checkpoints" / ".ckpt_00000006.pt.x1y2.tmp", run / ".teacher_backbone.pt.a9.tmp"]
    for path in partial:
        path.write_bytes(b"half a file")
    with caplog.at_level("WARNING", logger="dinov2_hier.train"):
        trainer = Trainer(load_config(None, overrides), run)
    assert trainer.state.iteration == 2
    assert any("ckpt_00000004.pt" in r.getMessage() and "trying the checkpoint before it" in r.getMessage()
               for r in caplog.records)
    assert not any(path.exists() for path in partial)
    assert [r["iteration"] for r in _records(run)] == [1, 2]  # records after the checkpoint go
    trainer.run()
    assert [r["iteration"] for r in _records(run)] == [1, 2, 3, 4, 5, 6]
    # every checkpoint unreadable: a clear error, never a silent start from scratch
    for _, path in list_checkpoints(run):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 3 checkpoint"):
        Trainer(load_config(None, overrides), run)


@pytest.mark.slow
def test_a_nonfinite_streak_never_prunes_the_last_good_checkpoint_and_resume_skips_poisoned_ones(
        tmp_path, monkeypatch, caplog):
    """Checkpoints written during a non-finite streak hold the weights that led into it: they
    are recorded as not good, pruning (``train.keep_checkpoints``) keeps the newest good one
    they would push out, the stop message names it, and resume skips every checkpoint that
    is not good (also one of an older version whose weights are not finite) with one line
    each, falling back to it."""
    import torch

    from dinov2_hier.train.checkpoint import TEACHER_FILE, checkpoint_path, load_checkpoint
    from dinov2_hier.train.loop import NonFiniteLossError

    overrides = TINY_OVERRIDES + ["train.checkpoint_every=1", "train.keep_checkpoints=2",
                                  "train.max_consecutive_nonfinite=4", "train.iterations=8"]
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, overrides), run)
    real = trainer.model.compute_losses
    calls = {"n": 0}

    def nan_from_iteration_2(batch, teacher_temp, with_stats=True):
        calls["n"] += 1
        losses, stats = real(batch, teacher_temp, with_stats)
        if calls["n"] >= 3:
            losses["total"] = losses["total"] * float("nan")
        return losses, stats

    monkeypatch.setattr(trainer.model, "compute_losses", nan_from_iteration_2)
    with pytest.raises(NonFiniteLossError, match=r"iteration 5; the last good checkpoint is \S*ckpt_00000002\.pt\."):
        trainer.run()
    # 3, 4, 5 were written during the streak; 2 outlives keep_checkpoints=2 as the newest good one
    assert [it for it, _ in list_checkpoints(run)] == [2, 4, 5]
    assert [load_checkpoint(path).get("good") for _, path in list_checkpoints(run)] == [True, False, False]
    assert torch.load(run / TEACHER_FILE, weights_only=True)["meta"]["iteration"] == 2
    # a checkpoint of an older version (no "good" entry, streak 0) whose weights overflowed
    old_format = load_checkpoint(checkpoint_path(run, 2))
    del old_format["good"]
    old_format["iteration"] = 3
    next(v for v in old_format["model"].values() if v.is_floating_point()).fill_(float("inf"))
    torch.save(old_format, checkpoint_path(run, 3))

    with caplog.at_level("WARNING", logger="dinov2_hier.train"):
        resumed = Trainer(load_config(None, overrides), run)
    resumed.release()
    assert resumed.state.iteration == 2 and resumed.state.nonfinite_streak == 0
    skipped = [r.getMessage() for r in caplog.records if "is not a good checkpoint" in r.getMessage()]
    assert skipped == [
        f"{checkpoint_path(run, 5)} is not a good checkpoint (written after 3 non-finite step(s) in a row); "
        "trying the checkpoint before it",
        f"{checkpoint_path(run, 4)} is not a good checkpoint (written after 2 non-finite step(s) in a row); "
        "trying the checkpoint before it",
        f"{checkpoint_path(run, 3)} is not a good checkpoint (its weights are not finite); "
        "trying the checkpoint before it",
    ]


def test_a_kill_before_the_first_checkpoint_leaves_no_duplicate_records(tmp_path):
    """Records of an attempt that died before its first checkpoint are dropped when the
    run starts again from iteration 0."""
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("".join(json.dumps({"iteration": i, "loss_dino": 7.0}) + "\n" for i in (1, 2)))
    _train(tmp_path, TINY_OVERRIDES + ["train.iterations=3", "train.checkpoint_every=3"])
    assert [r["iteration"] for r in _records(run)] == [1, 2, 3]


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, capsys):
    """torch reports a full disk as a C++ ``inline_container.cc`` error: the CLI says which
    file, how much space is left and the likely cause in one line (exit 3); the earlier
    checkpoint is intact and no partial file stays."""
    import dinov2_hier.io as io_module
    from dinov2_hier.train.__main__ import main as train_main
    from dinov2_hier.train.checkpoint import load_checkpoint

    real_save = io_module.torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # checkpoint 2 and its teacher file succeed, checkpoint 4 fails
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4352")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(io_module.torch, "save", failing_save)
    run = tmp_path / "run"
    rc = train_main(["--output-dir", str(run), *TINY_OVERRIDES, "train.checkpoint_every=2", "train.iterations=6"])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if not line.startswith("20")]  # log lines start with the date
    assert rc == 3 and "Traceback" not in stderr
    assert len(err) == 1 and err[0].startswith("training stopped: could not write ") and "ckpt_00000004.pt" in err[0]
    assert "GiB free" in err[0] and "full disk" in err[0] and "inline_container" in err[0]
    assert [it for it, _ in list_checkpoints(run)] == [2] and load_checkpoint(list_checkpoints(run)[0][1])["iteration"] == 2
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_one_training_source_without_brackets_is_one_source(tmp_path):
    """``data.train=cells.csv`` (the natural way to give one source) is that manifest, not
    its characters (which made ``/`` an image folder and walked the filesystem)."""
    from dinov2_hier.data import write_synthetic_dataset
    from dinov2_hier.hierarchy import Hierarchy

    manifest = write_synthetic_dataset(tmp_path / "cells", 12, Hierarchy.from_json(PROJECT_ROOT / "hierarchies/synthetic.json"),
                                       image_size=40)
    trainer = _train(tmp_path, TINY_OVERRIDES + [f"data.train={manifest}", "train.iterations=1", "train.checkpoint_every=1"])
    assert trainer.data.description == "12 images from 1 source(s), 12 labelled"


def test_a_supervised_arm_without_any_label_exits_2_naming_the_column(tmp_path, capsys):
    """A manifest whose label column has another name gives no labelled image: the
    supervised arm would train to the end on a zero loss. It stops at once instead."""
    from dinov2_hier.data import write_synthetic_dataset
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.train.__main__ import main as train_main

    manifest = write_synthetic_dataset(tmp_path / "cells", 12, Hierarchy.from_json(PROJECT_ROOT / "hierarchies/synthetic.json"),
                                       image_size=40)
    lines = manifest.read_text().splitlines()
    (tmp_path / "cells" / "wrong.csv").write_text("\n".join(["path,code,dataset,true_label", *lines[1:]]) + "\n")
    rc = train_main(["--output-dir", str(tmp_path / "run"), *TINY_OVERRIDES, f"data.train={tmp_path / 'cells' / 'wrong.csv'}",
                     "supervision.hierarchy=hierarchies/synthetic.json", "supervision.losses=[{name: hierce}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "supervision.losses (hierce) is set but none of the 12 training images has a label" in err
    assert "'label' column" in err


def test_a_wrong_test_data_path_is_an_error_not_a_skip(tmp_path):
    env = {**os.environ, "DINOV2_HIER_TEST_DATA": str(tmp_path / "nowhere")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_baselines.py"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    assert f"DINOV2_HIER_TEST_DATA={tmp_path / 'nowhere'} has no bccd/ and pbc_dev/" in done.stderr


# Config values out of range (loss temperatures, Sinkhorn iterations, a negative seed, ...):
# tests/test_bad_inputs.py, which runs every bad value through the training CLI.
