"""Full training checkpoints: atomic writes, discovery for auto-resume, safe loading,
and which of them are good to resume from.

A checkpoint is a plain dict of tensors, numbers and strings, so it loads with
``torch.load(..., weights_only=True)``: no pickled code is ever executed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_torch_save, load_error_message
# The names of a run's files are defined where every floor's readers find them.
from ..models.artifacts import CHECKPOINT_DIR, TEACHER_FILE, list_checkpoints

__all__ = [
    "CHECKPOINT_DIR", "GOOD_KEY", "METRICS_FILE", "TEACHER_FILE", "CheckpointError", "check_state_dict_matches",
    "checkpoint_path", "list_checkpoints", "load_checkpoint", "load_model_state", "save_checkpoint",
    "weights_finite", "why_not_good",
]

#: The run's JSON-lines records: one per logged training step, and the validation records
#: (``"split": "val"``, :mod:`.validation`).
METRICS_FILE = "metrics.jsonl"
#: Entry of every checkpoint recording :func:`why_not_good`'s verdict when it was written,
#: for readers that do not want to scan the weights.
GOOD_KEY = "good"


class CheckpointError(UserError, ValueError):
    """A checkpoint is unreadable or does not match the model."""


def checkpoint_path(output_dir: Path, iteration: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"ckpt_{iteration:08d}.pt"


def save_checkpoint(
    state: dict, output_dir: Path, iteration: int, keep: int, newest_good: Path | None = None,
    best_val: Path | None = None,
) -> Path:
    """Write ``state`` atomically as the checkpoint of ``iteration``; keep the newest ``keep``
    (0 = all) and, whatever ``keep`` says, ``newest_good``: the checkpoint a run stopped by
    non-finite losses resumes from, which checkpoints written during the streak (not good,
    :func:`why_not_good`) would otherwise push out, and ``best_val``: the checkpoint with
    the lowest validation loss so far (:mod:`.validation`). Older ones are removed only
    after the new one is in place."""
    path = checkpoint_path(output_dir, iteration)
    atomic_torch_save(state, path)
    if keep > 0:
        protected = {p.name for p in (newest_good, best_val) if p is not None}
        for _, old in list_checkpoints(output_dir)[:-keep]:
            if old.name not in protected:
                old.unlink(missing_ok=True)
    return path


def weights_finite(model_state: dict) -> bool:
    """Whether every floating-point tensor of ``model_state`` is finite (one pass over the
    weights: cheap next to writing or reading them)."""
    return all(bool(torch.isfinite(value).all()) for value in model_state.values()
               if torch.is_tensor(value) and value.is_floating_point())


def why_not_good(ckpt: dict) -> str | None:
    """Why training must not resume from ``ckpt``; None when it is good: written after a
    finite, applied step (``nonfinite_streak`` 0) and with finite weights.

    A checkpoint written during a non-finite streak holds the weights that led into it, so
    resuming there replays the streak. Judged on the content (the streak counter and the
    weights, which every checkpoint has), so one written before :data:`GOOD_KEY` existed is
    judged the same way.
    """
    streak = int(ckpt.get("nonfinite_streak", 0))
    if streak:
        return f"written after {streak} non-finite step(s) in a row"
    if not weights_finite(ckpt["model"]):
        return "its weights are not finite"
    if not ckpt.get(GOOD_KEY, True):
        return "recorded as not good when it was written"
    return None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(load_error_message(path, exc)) from None


def check_state_dict_matches(own: dict, state_dict: dict, source: Path) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped key
    of ``state_dict`` against the model's own ``own`` state dict, or the first integer or
    bool tensor where the model has floating weights (with its dtype)."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        first = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise CheckpointError(
            f"{source}: checkpoint does not match the model ({first}; {len(missing)} missing, "
            f"{len(unexpected)} unexpected). Was it written with a different config?"
        )
    for key, value in state_dict.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: shape mismatch at '{key}': checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    from ..models.weights import check_floating

    check_floating(own, state_dict, str(source), CheckpointError)


def load_model_state(model: torch.nn.Module, state_dict: dict, source: Path) -> None:
    """Strict load that names the first missing, unexpected or mis-shaped key."""
    check_state_dict_matches(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)
