from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dinov2_hier.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    why_not_good,
)


def _state(value: float) -> dict:
    return {"iteration": int(value), "model": {"w": torch.full((3,), value)}, "config": "seed: 0\n"}


def test_save_list_load_and_keep(tmp_path):
    for it in (1, 2, 3):
        save_checkpoint(_state(it), tmp_path, it, keep=2)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [2, 3]
    loaded = load_checkpoint(checkpoint_path(tmp_path, 3))
    assert loaded["iteration"] == 3 and torch.equal(loaded["model"]["w"], torch.full((3,), 3.0))


def test_pruning_keeps_the_newest_good_checkpoint_and_goodness_is_judged_on_content(tmp_path):
    good = save_checkpoint(_state(1), tmp_path, 1, keep=2)
    for it in (2, 3, 4):  # written during a non-finite streak
        save_checkpoint({**_state(it), "nonfinite_streak": it - 1}, tmp_path, it, keep=2, newest_good=good)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1, 3, 4]
    assert why_not_good(load_checkpoint(good)) is None  # no streak entry, finite weights: good
    assert why_not_good(load_checkpoint(checkpoint_path(tmp_path, 4))) == "written after 3 non-finite step(s) in a row"
    assert why_not_good({"model": {"w": torch.tensor([1.0, float("nan")])}}) == "its weights are not finite"
    assert why_not_good({"model": {"w": torch.ones(2)}, "good": False}) == "recorded as not good when it was written"


def test_failure_before_rename_keeps_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, 1, keep=0)

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2), tmp_path, 2, keep=1)
    monkeypatch.undo()
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1]
    assert not checkpoint_path(tmp_path, 2).exists()
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["iteration"] == 1
    assert list((tmp_path / "checkpoints").glob("*.tmp")) == []  # temporary file cleaned up


@pytest.mark.slow
def test_sigkill_between_write_and_rename(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1, keep=0)
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from dinov2_hier.train.checkpoint import save_checkpoint
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        save_checkpoint({{"iteration": 2, "model": {{"w": torch.zeros(3)}}}}, {str(tmp_path)!r}, 2, keep=1)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1]  # stray temp file is ignored
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["model"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "checkpoints" / "ckpt_00000005.pt"
    path.parent.mkdir()
    torch.save({"iteration": 5, "obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="ckpt_00000005.pt"):
        load_checkpoint(path)


def test_mismatched_model_names_key(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'weight'.*\(4, 3\).*\(2, 3\)"):
        load_model_state(model, {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="missing key 'bias'"):
        load_model_state(model, {"weight": torch.zeros(2, 3)}, tmp_path / "x.pt")


def test_atomic_files_get_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_checkpoint(_state(1), tmp_path, 1, keep=0)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
